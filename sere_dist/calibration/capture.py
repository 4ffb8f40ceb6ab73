"""Model capture with `transformers`: find the MoE blocks, record their inputs, run every expert.

All supported families (Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V2/V3) share one layout in
transformers >= 5: a sparse block with `.gate` (router returning (logits, weights, ids)) and
`.experts` holding 3-D weights gate_up_proj [E, 2I, H] and down_proj [E, H, I]; the gate is called on the
block's input (2-D [N, H] works for every family) and carries its weights in `.weight`. Shared experts are
separate modules (`shared_expert`, `shared_experts`) and are never part of the matrices.
This is the one place that knows those internals.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Iterator

import torch

from sere_dist.core.model import ArtifactError, model_fingerprint

_BLOCK_ATTRS = ("mlp", "block_sparse_moe", "feed_forward")


def load_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a checkpoint with transformers; refuses a model without MoE layers before any work."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(str(path))
    model_fingerprint(cfg)  # raises ArtifactError naming the model if it is not MoE
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    return model, tok


def moe_blocks(model) -> dict[int, torch.nn.Module]:
    """MoE layer index -> sparse block (has `.gate` and `.experts.gate_up_proj`)."""
    layers = model.model.layers if hasattr(model, "model") else model.layers
    out = {}
    for i, layer in enumerate(layers):
        for attr in _BLOCK_ATTRS:
            blk = getattr(layer, attr, None)
            if blk is not None and hasattr(blk, "gate") and hasattr(getattr(blk, "experts", None), "gate_up_proj"):
                out[i] = blk
                break
    if not out:
        raise ArtifactError(f"{type(model).__name__} has no MoE blocks with routed experts")
    return out


def expert_outputs(experts: torch.nn.Module, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Every expert applied to every token (no routing weights).  x: [N, H] -> [E, N, H] float32."""
    gu, down, act = experts.gate_up_proj, experts.down_proj, experts.act_fn
    outs = []
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk].to(gu.dtype)
        h = torch.einsum("nh,eih->eni", xs, gu)
        gate, up = h.chunk(2, dim=-1)
        outs.append(torch.einsum("eni,ehi->enh", act(gate) * up, down).float())
    return torch.cat(outs, dim=1)


@torch.no_grad()
def routing(block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's own router on its inputs: x [N, H] -> (ids [N, k] int64, weights [N, k] float32),
    exactly the top-k and weights the block's forward would use (the gate returns (logits, weights, ids))."""
    gate = block.gate
    _, weights, ids = gate(x.to(gate.weight.dtype))
    return ids.long(), weights.float()


@contextlib.contextmanager
def capture_inputs(model) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Record each MoE block's input hidden states ([B, L, H] per forward) while active."""
    store: dict[int, list[torch.Tensor]] = {}
    handles = []
    for idx, blk in moe_blocks(model).items():
        def pre(mod, args, kwargs, idx=idx):
            hs = args[0] if args else kwargs["hidden_states"]
            store.setdefault(idx, []).append(hs.detach())
        handles.append(blk.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def tokenize_texts(tok, texts: Iterable[str], seq_len: int, num_samples: int,
                   keep_longer_only: bool = True) -> torch.Tensor:
    """[num_samples, seq_len] token ids: the first seq_len tokens of each qualifying text.

    keep_longer_only follows the paper: only texts with more than seq_len tokens qualify.
    Raises ValueError when fewer than num_samples qualify.
    """
    rows = []
    for t in texts:
        ids = tok(t, add_special_tokens=False).input_ids
        if len(ids) > seq_len or (not keep_longer_only and len(ids) > 1):
            rows.append((ids + [tok.pad_token_id] * seq_len)[:seq_len])
        if len(rows) >= num_samples:
            break
    if len(rows) < num_samples:
        raise ValueError(f"only {len(rows)} calibration texts qualify (need {num_samples} with more than "
                         f"{seq_len} tokens); lower --num-samples or --seq-len, or add text")
    return torch.tensor(rows)


@torch.no_grad()
def layer_inputs(model, batch: torch.Tensor) -> dict[int, torch.Tensor]:
    """One forward over [B, L] ids -> {layer: [B*L, H] MoE-block inputs}."""
    with capture_inputs(model) as store:
        model(batch)
    return {i: torch.cat([h.reshape(-1, h.shape[-1]) for h in hs]) for i, hs in store.items()}
