"""Calibration: text -> similarity artifact, one pipeline run either as a Ray Data job or in one process.

The pipeline (one pass over the calibration tokens, nothing keeps all of them):

    token rows [N, L]                       one row per sequence
      -> CaptureStage                       a forward pass per batch of sequences; emits one row per
                                            (MoE layer, shard): the block's input [b*L, H] and the
                                            global token positions of that shard
      -> ExpertGramStage                    runs that layer's experts on the shard in token chunks
                                            and emits the partial Gram  G_s = Y_s Y_s^T  [E, E] float64,
                                            the partial routed-token statistics C_s, N_s [E, E] float64
                                            (routing from the layer's own gate on the same inputs) and,
                                            for CKA, the shard's tokens that belong to the layer's sample
      -> reduce (driver)                    sums partial Grams and routed statistics per layer (exact:
                                            G = sum_s G_s), gathers the CKA sample, and computes the
                                            matrices and the redundancy diagnostics

With Ray (`run(prep)`, the `ray job submit` entry and `sere calibrate --ray`) both stages are Ray Data
actor pools spread over the cluster's nodes (SPREAD), so a bigger cluster calibrates more layers and
batches at once; per-worker memory is set by the batch size (b*L tokens x E experts x H), never by N.
Without Ray (`run(prep, use_ray=False)`, plain `sere calibrate`, and `calibrate(model, tokens)` for a
model already in memory) the same two stages run in this process, one batch at a time, and the same
reduction gives the same matrices.

CKA sample: each layer's sample is `cka_tokens` global token positions chosen uniformly without
replacement with seed `seed + layer` (`cka_positions`); with at most `cka_tokens` tokens every token is
kept.

`prepare` does every check (output path, metric, checkpoint is MoE, text column, enough qualifying
texts) and the tokenisation before any heavy work; `run` writes the artifact, `stats.csv`/`stats.md`,
`heatmaps.png`, `calibration.json`, `diagnostics.json` and `routed_stats.safetensors` (the routed-token
statistics, `calibration.diagnostics`) atomically at the very end, so a run that fails half way leaves
nothing behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Iterable, Iterator, Literal, Mapping

import numpy as np
import torch
from pydantic import Field, StrictBool, StrictInt, StrictStr, field_validator

from sere_dist.core.artifact import ArtifactError, SimilarityArtifact
from sere_dist.core.config import METRICS, ConfigError, StrictModel
from sere_dist.core.model import ModelFingerprint, model_fingerprint
from sere_dist.calibration.diagnostics import ROUTED_STATS, diagnostics, routed_stats_bytes
from sere_dist.calibration.report import report_files
from sere_dist.core.similarity import GramAccumulator, RoutedAccumulator, linear_cka, rbf_cka

log = logging.getLogger("sere_dist")

GRAM_METRICS = ("frobenius", "cosine")

PositiveInt = Annotated[StrictInt, Field(ge=1)]


def is_uri(path: str) -> bool:
    """A filesystem URI (file://, s3://, gs://, hdfs://...) rather than a local path."""
    return "://" in path


def _out_fs(out: str):
    """(pyarrow filesystem, path inside it) for an --out URI; errors name the option."""
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(out)
    except Exception as exc:  # noqa: BLE001 - unknown scheme, missing credentials, ...
        raise ConfigError(f"--out {out}: pyarrow cannot open this filesystem URI ({exc})") from None


def _out_exists(out: str) -> bool:
    if not is_uri(out):
        return Path(out).exists()
    import pyarrow.fs

    fs, path = _out_fs(out)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def _write(art: SimilarityArtifact, out: str, overwrite: bool, extra_files: dict[str, bytes]) -> Path | str:
    """Write the artifact atomically to a local path, or to a filesystem URI through pyarrow (written
    locally first, copied to a temporary sibling, then moved into place)."""
    if not is_uri(out):
        return art.save(out, overwrite=overwrite, extra_files=extra_files)
    import tempfile

    import pyarrow.fs

    fs, path = _out_fs(out)
    with tempfile.TemporaryDirectory(prefix="sere-artifact-") as d:
        local = art.save(Path(d) / "artifact", extra_files=extra_files)
        tmp = f"{path.rstrip('/')}.tmp-{os.getpid()}"
        try:
            fs.create_dir(tmp, recursive=True)
            pyarrow.fs.copy_files(str(local), tmp, destination_filesystem=fs)
            if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
                if not overwrite:
                    fs.delete_dir(tmp)
                    raise ArtifactError(f"--out {out} exists; pass --overwrite to replace it")
                fs.delete_dir(path)
            fs.move(tmp, path)
        except OSError as exc:
            raise ArtifactError(f"--out {out}: could not write the artifact there ({exc})") from None
    return out


class CalibrationJob(StrictModel):
    """Everything a calibration run needs (the options of `sere calibrate` and the Ray job).

    Errors name the command-line option (`--num-samples must be >= 1, got 0`).
    """

    config_name: ClassVar[str] = "--"
    error_type: ClassVar[type[ConfigError]] = ConfigError
    unknown_label: ClassVar[str] = "option"

    model: StrictStr                          # local checkpoint directory (transformers layout)
    out: StrictStr                            # artifact directory to write
    data: StrictStr | None = None             # .jsonl/.json/.parquet, a datasets directory, a hub name; None: stdlib
    text_column: StrictStr = "text"
    split: StrictStr = "train"                # for directories and hub names
    metric: StrictStr = "frobenius"
    num_samples: PositiveInt = 64         # calibration sequences
    seq_len: PositiveInt = 128             # tokens per sequence
    keep_longer_only: StrictBool = True       # paper: only texts with more than seq_len tokens qualify
    shuffle: StrictBool = False               # shuffle the texts with `seed` before picking qualifying ones
    seed: StrictInt = 0
    batch_size: PositiveInt = 8          # sequences per forward pass (sets per-worker memory)
    token_chunk: PositiveInt = 1024         # tokens per expert evaluation inside a shard
    num_workers: PositiveInt = 2         # Ray: actors per stage
    cpus_per_worker: float = Field(0.5, strict=False, gt=0, allow_inf_nan=False)
    actor_start_timeout_s: float = Field(600.0, strict=False, gt=0, allow_inf_nan=False)
    cka_tokens: PositiveInt = 512
    overwrite: StrictBool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @field_validator("out")
    @classmethod
    def _absolute_or_uri(cls, v: str) -> str:
        if is_uri(v) or os.path.isabs(v):
            return v
        raise ConfigError(
            f"--out {v} is a relative path: a Ray job runs in a temporary working directory, so the artifact "
            f"would be written there and lost; give an absolute path (e.g. {os.path.abspath(v)}) or a "
            f"filesystem URI (file:///..., s3://bucket/...)")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        if v not in METRICS:
            raise ConfigError(f"--metric {v!r} is not a similarity metric; use one of {', '.join(METRICS)}")
        return v




@dataclass
class Prepared:
    """Output of `prepare`: validated inputs, ready for the Ray stages."""

    job: CalibrationJob
    tokens: torch.Tensor                 # [num_samples, seq_len] int64
    fingerprint: ModelFingerprint
    data_digest: str
    source: str                          # where the text came from, for the report


@dataclass
class Result:
    artifact: SimilarityArtifact
    out: Path | str                      # a local directory, or the filesystem URI it was written to
    report: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)   # calibration.diagnostics.diagnostics


@dataclass
class Reduced:
    """The pipeline's reduction: per MoE layer the similarity matrix, the Gram over all tokens and the
    routed-token statistics; and facts about the run (nodes, worker memory)."""

    matrices: dict[int, torch.Tensor]
    grams: dict[int, torch.Tensor]
    routed: dict[int, RoutedAccumulator]
    facts: dict[str, Any]


# ---------------------------------------------------------------- inputs and checks (no Ray)

def load_texts(data: str | None, text_column: str = "text", split: str = "train") -> tuple[Iterable[str], str]:
    """Calibration texts (lazily where the source allows) and a description of their source.

    data: None (the Python stdlib corpus that ships with every machine), a .jsonl/.json/.parquet
    file, a directory (`datasets.save_to_disk` output, or data files `datasets` can load), or a
    Hugging Face dataset name (needs a reachable hub). Every failure is a ValueError naming the file:
    missing, empty, not JSON Lines, unreadable, or without the text column.
    """
    if data is None:
        from sere_dist.calibration.corpus import split_corpus, stdlib_documents
        return split_corpus(stdlib_documents())[0], "python-stdlib (sere_dist.calibration.corpus, training split)"
    p = Path(data)
    suffix = p.suffix.lower()
    if p.is_file():
        if p.stat().st_size == 0:
            raise ValueError(f"--data {data}: the file is empty; it needs one text per row (column {text_column!r})")
        if suffix == ".jsonl":
            return _jsonl_texts(p, text_column), f"{data} (column {text_column!r})"
        if suffix not in (".json", ".parquet"):
            raise ValueError(f"--data {data}: unsupported file type {p.suffix!r}; use .jsonl, .json or .parquet")
        ds = _load_dataset(data, lambda d: d.load_dataset("json" if suffix == ".json" else "parquet",
                                                          data_files=str(p), split="train"))
    elif p.is_dir():
        def from_dir(d):
            if (p / "dataset_info.json").exists() or (p / "state.json").exists():
                out = d.load_from_disk(str(p))
                return out[split] if isinstance(out, d.DatasetDict) else out
            return d.load_dataset(str(p), split=split)
        ds = _load_dataset(data, from_dir)
    elif p.is_absolute() or data.startswith(".") or suffix in (".jsonl", ".json", ".parquet"):
        raise ValueError(f"--data {data}: no such file or directory")
    else:
        ds = _load_dataset(data, lambda d: d.load_dataset(data, split=split), hub=True)
    if text_column not in ds.column_names:
        raise ValueError(f"--data {data}: no {text_column!r} column (columns: {ds.column_names}); "
                         f"pass --text-column to name the text column")
    return (row[text_column] for row in ds), f"{data} (column {text_column!r})"


def _load_dataset(data: str, load: Callable[[Any], Any], hub: bool = False):
    import datasets

    try:
        return load(datasets)
    except Exception as exc:  # noqa: BLE001 - any loader failure becomes one line naming the input
        what = ("is not a local file or directory and could not be loaded as a Hugging Face dataset" if hub
                else "could not be read")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"--data {data!r} {what} ({type(exc).__name__}: {first[:300]})") from None


def _jsonl_texts(path: Path, text_column: str) -> list[str]:
    """The text column of a JSON Lines file, checked line by line (blank lines are skipped)."""
    texts: list[str] = []
    columns: list[str] | None = None
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--data {path}: line {n} is not JSON ({exc.msg}); expected JSON Lines: one "
                                 f"object per line with a {text_column!r} field") from None
            if not isinstance(row, dict):
                raise ValueError(f"--data {path}: line {n} is a JSON {type(row).__name__}, not an object with a "
                                 f"{text_column!r} field")
            if columns is None:
                columns = list(row)
            if text_column not in row:
                raise ValueError(f"--data {path}: no {text_column!r} column (columns: {columns}); "
                                 f"pass --text-column to name the text column")
            if not isinstance(row[text_column], str):
                raise ValueError(f"--data {path}: line {n}: {text_column!r} is a {type(row[text_column]).__name__}, "
                                 f"not a string")
            texts.append(row[text_column])
    if not texts:
        raise ValueError(f"--data {path}: no rows (only blank lines); it needs one JSON object per line")
    return texts


def prepare(job: CalibrationJob) -> Prepared:
    """Validate the job and tokenise the calibration text; cheap, and touches no Ray."""
    from transformers import AutoTokenizer

    from sere_dist.calibration.capture import tokenize_texts
    from sere_dist.calibration.corpus import digest
    from sere_dist.core.model import checkpoint_fingerprint

    if _out_exists(job.out) and not job.overwrite:
        raise ArtifactError(f"--out {job.out} exists; pass --overwrite to replace it")
    if not (Path(job.model) / "config.json").exists():
        raise ArtifactError(f"--model {job.model}: no checkpoint there (config.json missing)")
    fp = checkpoint_fingerprint(job.model)           # refuses a dense model
    tok = AutoTokenizer.from_pretrained(str(job.model))
    texts, source = load_texts(job.data, job.text_column, job.split)
    if job.shuffle:
        texts = list(texts)
        random.Random(job.seed).shuffle(texts)
    tokens = tokenize_texts(tok, texts, job.seq_len, job.num_samples, keep_longer_only=job.keep_longer_only)
    return Prepared(job=job, tokens=tokens, fingerprint=fp, data_digest=digest(tokens.tolist()), source=source)


def cka_positions(num_tokens: int, cka_tokens: int, seed: int, layer: int) -> np.ndarray:
    """Sorted global token positions of one layer's CKA sample: uniform, without replacement."""
    if num_tokens <= cka_tokens:
        return np.arange(num_tokens, dtype=np.int64)
    g = torch.Generator().manual_seed(seed + layer)
    return np.sort(torch.randperm(num_tokens, generator=g)[:cka_tokens].numpy()).astype(np.int64)


# ---------------------------------------------------------------- the two stages (Ray actors, or plain objects)

def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def _loaded(model: str | torch.nn.Module, dtype: str) -> torch.nn.Module:
    if isinstance(model, torch.nn.Module):
        return model
    from sere_dist.calibration.capture import load_model
    return load_model(model, dtype=getattr(torch, dtype))[0]


class CaptureStage:
    """The model loaded once; a batch of token rows -> one row per (MoE layer, shard)."""

    def __init__(self, model: str | torch.nn.Module, dtype: str):
        self.model = _loaded(model, dtype)
        self.node = _node_id()

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from sere_dist.calibration.capture import layer_inputs
        ids = torch.tensor(np.stack(batch["ids"]), dtype=torch.long)            # [b, L]
        rows = torch.tensor(np.asarray(batch["row"]), dtype=torch.long)         # [b]
        L = ids.shape[1]
        pos = (rows[:, None] * L + torch.arange(L)).reshape(-1).numpy()        # [b*L] global positions
        hidden = layer_inputs(self.model, ids)                                 # {layer: [b*L, H]}
        layers = sorted(hidden)
        return {"layer": np.array(layers, dtype=np.int64),
                "positions": np.stack([pos] * len(layers)),
                "capture_node": np.array([self.node] * len(layers), dtype=object),
                "hidden": np.stack([hidden[i].float().numpy() for i in layers])}


# a shard's routed statistics travel as two fixed-shape float64 arrays: [4, E, E] and [2, E]
_ROUTED_MATS = ("c.count", "n.count", "c.router", "n.router")
_ROUTED_SUMS = ("count", "weight")


def _routed_from_row(mats: np.ndarray, sums: np.ndarray, tokens: int) -> RoutedAccumulator:
    t = {k: torch.as_tensor(np.asarray(mats[j], dtype=np.float64)) for j, k in enumerate(_ROUTED_MATS)}
    t.update({k: torch.as_tensor(np.asarray(sums[j], dtype=np.float64)) for j, k in enumerate(_ROUTED_SUMS)})
    return RoutedAccumulator.from_tensors({**t, "tokens": torch.tensor([tokens], dtype=torch.int64)})


class ExpertGramStage:
    """That layer's experts on a shard -> partial Gram [E, E] float64, partial routed-token statistics
    (`RoutedAccumulator.tensors`, routing by the layer's gate) and, for CKA, the sample rows."""

    def __init__(self, model: str | torch.nn.Module, dtype: str, metric: str, token_chunk: int,
                 cka_sample: dict[int, np.ndarray] | None):
        from sere_dist.calibration.capture import moe_blocks
        # only the routed experts count (shared experts never do); the gate gives the routing
        self.blocks = moe_blocks(_loaded(model, dtype))
        self.metric, self.chunk, self.cka_sample = metric, token_chunk, cka_sample or {}
        self.node = _node_id()

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from sere_dist.calibration.capture import expert_outputs, routing
        out: dict[str, list] = {"layer": [], "tokens": [], "gram": [], "routed_mats": [], "routed_sums": [], "sample": [], "sample_pos": [],
                                "node": [], "peak_rss_mb": []}
        for layer, pos, x, cnode in zip(batch["layer"], batch["positions"], batch["hidden"], batch["capture_node"]):
            layer = int(layer)
            block = self.blocks[layer]
            x = torch.tensor(np.asarray(x))          # a writable copy of the shard
            e = block.experts.gate_up_proj.shape[0]
            gram = GramAccumulator(e)
            routed = RoutedAccumulator(e)
            keep = np.isin(pos, self.cka_sample[layer]) if self.metric not in GRAM_METRICS else None
            parts = []
            for s in range(0, x.shape[0], self.chunk):
                xs = x[s:s + self.chunk]
                y = expert_outputs(block.experts, xs, chunk=self.chunk)   # [E, n, H]
                yd = y.double()                                             # once for both statistics
                gram.update(yd)
                routed.update(yd, *routing(block, xs))
                if keep is not None:
                    parts.append(y[:, torch.as_tensor(keep[s:s + self.chunk])])
            sample = torch.cat(parts, dim=1) if parts else torch.zeros(e, 0, x.shape[1])
            out["layer"].append(layer)
            out["tokens"].append(int(x.shape[0]))
            out["gram"].append(gram.gram.numpy())
            t = routed.tensors()
            out["routed_mats"].append(np.stack([t[k].numpy() for k in _ROUTED_MATS]))
            out["routed_sums"].append(np.stack([t[k].numpy() for k in _ROUTED_SUMS]))
            # CKA rows carry their sample tokens as bytes (ragged across shards)
            out["sample"].append(sample.float().numpy().tobytes())
            out["sample_pos"].append(pos[keep].tobytes() if keep is not None else b"")
            out["node"].append(f"{cnode},{self.node}")   # where this shard was captured, and reduced
            out["peak_rss_mb"].append(_peak_rss_mb())
        return {k: np.array(v, dtype=object) if k in ("sample", "sample_pos", "node") else np.array(v)
                for k, v in out.items()}


def _rows(tokens: torch.Tensor) -> list[dict[str, Any]]:
    return [{"row": i, "ids": tokens[i].numpy()} for i in range(tokens.shape[0])]


# ---------------------------------------------------------------- backends: Ray Data, or this process

def _pipeline(prep: Prepared, cka_sample: dict[int, np.ndarray] | None):
    """The lazy Ray Data dataset of per-(layer, shard) partial results."""
    import ray
    from ray.data import ActorPoolStrategy

    job = prep.job
    n = prep.tokens.shape[0]
    ds = ray.data.from_items(_rows(prep.tokens), override_num_blocks=max(1, -(-n // job.batch_size)))
    # SPREAD: one stage's actors on as many nodes as possible (a plain remote arg; Ray 2.60 warns that
    # such args are deprecated from 2.64 but ray_remote_args_fn does not place actors)
    # One block in flight per actor: a fast actor may otherwise queue every block of a stage and the
    # other nodes' actors idle (each block is a whole forward pass, so queueing gains nothing).
    common = dict(num_cpus=job.cpus_per_worker, scheduling_strategy="SPREAD",
                  compute=ActorPoolStrategy(size=job.num_workers, max_tasks_in_flight_per_actor=1))
    ds = ds.map_batches(CaptureStage, fn_constructor_kwargs={"model": job.model, "dtype": job.dtype},
                        batch_size=job.batch_size, batch_format="numpy", **common)
    ds = ds.map_batches(ExpertGramStage, batch_size=1, batch_format="numpy",
                        fn_constructor_kwargs={"model": job.model, "dtype": job.dtype, "metric": job.metric,
                                               "token_chunk": job.token_chunk, "cka_sample": cka_sample},
                        **common)
    # Each stage starts only once all its actors are up: otherwise the first actor to load the model can
    # take every block while the others are still importing torch, and a cluster too small for the pool
    # would wait forever instead of failing (GetTimeoutError, turned into ActorStartError by `_ray_batches`).
    ds.context.wait_for_min_actors_s = max(1, math.ceil(job.actor_start_timeout_s))
    return ds


class ActorStartError(RuntimeError):
    """A stage's actors did not all start in time (usually: the cluster lacks the CPUs they ask for)."""


def _ray_batches(prep: Prepared, cka: dict[int, np.ndarray] | None) -> Iterator[dict[str, np.ndarray]]:
    """The pipeline's output batches; a stage whose actors cannot all start raises ActorStartError."""
    import ray

    job = prep.job
    try:
        yield from _pipeline(prep, cka).iter_batches(batch_format="numpy", batch_size=None)
    except ray.exceptions.GetTimeoutError as exc:
        raise ActorStartError(
            f"calibration: the {job.num_workers} actor(s) of a stage ({job.cpus_per_worker} CPU each, two stages) "
            f"did not all start within {job.actor_start_timeout_s:g} s; the cluster has "
            f"{ray.cluster_resources().get('CPU', 0):g} CPU(s) in all. Lower --num-workers or --cpus-per-worker, "
            f"or raise --actor-start-timeout-s") from exc


def _local_batches(model: str | torch.nn.Module, tokens: torch.Tensor, *, dtype: str, metric: str,
                   batch_size: int, token_chunk: int, cka: dict[int, np.ndarray] | None,
                   progress: Callable[[Iterable], Iterable] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """The same two stages in this process, one batch of sequences at a time."""
    model = _loaded(model, dtype)
    capture = CaptureStage(model, dtype)
    grams = ExpertGramStage(model, dtype, metric, token_chunk, cka)
    rows = _rows(tokens)
    starts = range(0, len(rows), batch_size)
    for s in (progress(starts) if progress else starts):
        part = rows[s:s + batch_size]
        shards = capture({"row": np.array([r["row"] for r in part]), "ids": np.stack([r["ids"] for r in part])})
        for i in range(len(shards["layer"])):
            yield grams({k: v[i:i + 1] for k, v in shards.items()})


def _reduce(batches: Iterable[dict[str, np.ndarray]], fp: ModelFingerprint, num_tokens: int, metric: str,
            cka: dict[int, np.ndarray] | None) -> Reduced:
    """Sum the partial results per layer (Gram and routed statistics: exact sums, in any order) and
    compute the matrices."""
    layers = list(fp.moe_layers)
    e, h = fp.num_experts, fp.hidden_size
    grams = {i: GramAccumulator(e) for i in layers}
    routed = {i: RoutedAccumulator(e) for i in layers}
    samples: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {i: [] for i in layers}
    seen = {i: 0 for i in layers}
    nodes: set[str] = set()
    peak = 0.0
    for batch in batches:
        for k in range(len(batch["layer"])):
            i = int(batch["layer"][k])
            seen[i] += int(batch["tokens"][k])
            nodes.update(str(batch["node"][k]).split(","))
            peak = max(peak, float(batch["peak_rss_mb"][k]))
            grams[i].gram += torch.as_tensor(np.asarray(batch["gram"][k], dtype=np.float64))
            grams[i].tokens += int(batch["tokens"][k])
            routed[i].merge(_routed_from_row(batch["routed_mats"][k], batch["routed_sums"][k], int(batch["tokens"][k])))
            if cka is not None:
                pos = np.frombuffer(batch["sample_pos"][k], dtype=np.int64)
                if pos.size:
                    y = np.frombuffer(batch["sample"][k], dtype=np.float32).reshape(e, pos.size, h)
                    samples[i].append((pos, y))
    bad = {i: s for i, s in seen.items() if s != num_tokens}
    if bad:
        raise RuntimeError(f"calibration pipeline lost shards: tokens seen per layer {bad}, expected {num_tokens}")
    mats = {}
    for i in layers:
        if cka is None:
            mats[i] = grams[i].result(metric)
        else:
            pos = np.concatenate([p for p, _ in samples[i]])
            y = torch.from_numpy(np.concatenate([s for _, s in samples[i]], axis=1)[:, np.argsort(pos)].copy())
            mats[i] = linear_cka(y) if metric == "cka_linear" else rbf_cka(y)
    return Reduced(matrices=mats, grams={i: g.gram for i, g in grams.items()}, routed=routed,
                   facts={"nodes": sorted(nodes), "worker_peak_rss_mb": round(peak, 1)})


def _cka_sample(fp: ModelFingerprint, metric: str, num_tokens: int, cka_tokens: int,
                seed: int) -> dict[int, np.ndarray] | None:
    if metric in GRAM_METRICS:
        return None
    return {i: cka_positions(num_tokens, cka_tokens, seed, i) for i in fp.moe_layers}


def run(prep: Prepared, *, use_ray: bool = True,
        progress: Callable[[Iterable], Iterable] | None = None) -> Result:
    """Run the pipeline and write the artifact with its report, atomically.

    use_ray: Ray Data on the connected cluster (the caller initialises Ray: a job calls `ray.init()`,
    a test starts a private instance); False runs the same stages in this process (`progress` wraps
    its batch loop, e.g. with tqdm).
    """
    job, fp = prep.job, prep.fingerprint
    t0 = time.time()
    n_tok = int(prep.tokens.numel())
    cka = _cka_sample(fp, job.metric, n_tok, job.cka_tokens, job.seed)
    if use_ray:
        batches = _ray_batches(prep, cka)
        workers = job.num_workers
    else:
        batches = _local_batches(job.model, prep.tokens, dtype=job.dtype, metric=job.metric,
                                 batch_size=job.batch_size, token_chunk=job.token_chunk, cka=cka, progress=progress)
        workers = 1
    red = _reduce(batches, fp, n_tok, job.metric, cka)
    diag = diagnostics(red.grams, red.matrices, red.routed, metric=job.metric)
    wall = time.time() - t0
    report = {"wall_s": round(wall, 3), "tokens": n_tok, "layers": len(fp.moe_layers), "experts": fp.num_experts,
              "tokens_per_s": round(n_tok / wall, 1), "backend": "ray" if use_ray else "local",
              "num_workers": workers, **red.facts, "source": prep.source,
              "job": job.model_dump(exclude={"out", "overwrite"}), "verdict": diag["verdict"]}
    art = SimilarityArtifact(matrices=red.matrices, fingerprint=fp, metric=job.metric, tokens=n_tok,
                             data_digest=prep.data_digest, routed=routed_for_artifact(red.routed),
                             extra={"calibration": {k: report[k] for k in ("source", "job")}})
    files = {**report_files(art, report, diag), ROUTED_STATS: routed_stats_bytes(red.routed)}
    out = _write(art, job.out, job.overwrite, files)
    return Result(artifact=art, out=out, report=report, diagnostics=diag)


@torch.no_grad()
def calibrate_in_process(model: torch.nn.Module, tokens: torch.Tensor, metric: str = "frobenius",
                         batch_size: int = 8, cka_tokens: int = 512, seed: int = 0, token_chunk: int = 1024,
                         progress: Callable[[Iterable], Iterable] | None = None) -> Reduced:
    """The pipeline's stages and reduction in this process for a model already in memory:
    [N, L] token ids -> per-layer matrices, Grams and routed statistics."""
    if metric not in METRICS:
        raise ValueError(f"unknown similarity metric {metric!r}; use one of {', '.join(METRICS)}")
    if tokens.dim() != 2 or tokens.numel() == 0:
        raise ValueError(f"calibration tokens must be a non-empty [N, L] tensor of ids, got shape {list(tokens.shape)}")
    fp = model_fingerprint(model.config)
    n_tok = int(tokens.numel())
    cka = _cka_sample(fp, metric, n_tok, cka_tokens, seed)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    batches = _local_batches(model, tokens, dtype=dtype, metric=metric, batch_size=batch_size,
                             token_chunk=token_chunk, cka=cka, progress=progress)
    return _reduce(batches, fp, n_tok, metric, cka)


@torch.no_grad()
def calibrate(model: torch.nn.Module, tokens: torch.Tensor, metric: str = "frobenius", batch_size: int = 8,
              cka_tokens: int = 512, seed: int = 0, data_digest: str = "", token_chunk: int = 1024,
              progress: Callable[[Iterable], Iterable] | None = None) -> SimilarityArtifact:
    """The pipeline in this process for a model already in memory: [N, L] token ids -> artifact
    (not written; `.save(out)` writes it). `calibration.diagnostics.diagnose` gives the diagnostics."""
    from sere_dist.calibration.corpus import digest

    red = calibrate_in_process(model, tokens, metric=metric, batch_size=batch_size, cka_tokens=cka_tokens,
                               seed=seed, token_chunk=token_chunk, progress=progress)
    return SimilarityArtifact(matrices=red.matrices, fingerprint=model_fingerprint(model.config), metric=metric,
                              tokens=int(tokens.numel()), data_digest=data_digest or digest(tokens.tolist()),
                              routed=routed_for_artifact(red.routed))


def routed_for_artifact(routed: Mapping[int, RoutedAccumulator]) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The reduction's routed-token statistics in the artifact's shape: layer -> weighting -> (C, N)."""
    return {i: {w: acc.stats(w) for w in acc.WEIGHTINGS} for i, acc in routed.items()}
