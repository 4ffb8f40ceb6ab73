"""Ray Serve LLM start-up callback for checkpoints that are already on local disk.

Before it builds a vLLM engine, Ray Serve LLM runs one "download model files" Ray task on every node
of the replica's placement group. With a local checkpoint directory that task downloads nothing and
returns the path unchanged. It still costs a fresh Ray worker process that imports torch and
transformers: about 16 s of a replica start on a 2-core machine, paid again on every restart.
`LocalCheckpoint` skips those tasks only when the model source is a directory on the replica's node;
hub ids and remote (s3://, gs://) sources go through Ray's download as before.
"""

from __future__ import annotations

import os

from ray.llm._internal.common.callbacks.base import CallbackBase  # Ray 2.60: not re-exported publicly


class LocalCheckpoint(CallbackBase):
    async def on_before_node_init(self) -> None:
        source = self.llm_config.model_loading_config.model_source
        mirror = getattr(self.llm_config.get_engine_config(), "mirror_config", None)
        if isinstance(source, str) and mirror is None and os.path.isdir(source):
            self.ctx.run_init_node = False
