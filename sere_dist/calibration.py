"""Calibration as a Ray Data job: similarity matrices of every MoE layer, streamed and spread.

The pipeline (one pass over the calibration tokens, nothing keeps all of them):

    token rows [N, L]                       ray.data.from_items, one row per sequence
      -> _CaptureStage  (actor pool)        a forward pass per batch of sequences; emits one row per
                                            (MoE layer, shard): the block's input [b*L, H] and the
                                            global token positions of that shard
      -> _ExpertGramStage (actor pool)      runs that layer's experts on the shard in token chunks
                                            and emits the partial Gram  G_s = Y_s Y_s^T  [E, E] float64
                                            (Frobenius, cosine) or the shard's tokens that belong to
                                            the layer's CKA sample
      -> driver                             sums partial Grams per layer (exact: G = sum_s G_s), or
                                            gathers the CKA sample, and computes the matrices

Per-worker memory is set by the batch size (b*L tokens x E experts x H), never by N. Both pools are
spread over the cluster's nodes (SPREAD scheduling), so a bigger cluster calibrates more layers
and batches at once.

CKA sample: the single-process `capture.calibrate` keeps a reservoir (Algorithm R) of at most
`cka_tokens` tokens; here each layer's sample is drawn up front instead, as `cka_tokens` global token
positions chosen uniformly without replacement with seed `seed + layer` (`cka_positions`). Both are
uniform samples of the same size; when the run has at most `cka_tokens` tokens both keep every token
and the matrices agree to float tolerance.

`prepare` does every check (output path, metric, checkpoint is MoE, text column, enough qualifying
texts) and the tokenisation before any Ray work; `run` writes the artifact atomically at the very
end, so a job that fails half way leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import math
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .artifact import ArtifactError, SimilarityArtifact, model_fingerprint
from .config import METRICS
from .similarity import GramAccumulator, linear_cka, offdiag_stats, rbf_cka

log = logging.getLogger("sere_dist")

GRAM_METRICS = ("frobenius", "cosine")
STATS_CSV = "stats.csv"
STATS_MD = "stats.md"
HEATMAP_PNG = "heatmaps.png"
REPORT_JSON = "calibration.json"


@dataclass(frozen=True)
class CalibrationJob:
    """Everything a calibration run needs; `prepare` validates it."""

    model: str                           # local checkpoint directory (transformers layout)
    out: str                             # artifact directory to write
    data: str | None = None              # .jsonl/.json/.parquet, a datasets directory, a hub name; None: stdlib text
    text_column: str = "text"
    split: str = "train"                 # for directories and hub names
    metric: str = "frobenius"
    num_samples: int = 64                # calibration sequences
    seq_len: int = 128                   # tokens per sequence
    keep_longer_only: bool = True        # paper: only texts with more than seq_len tokens qualify
    shuffle: bool = False                # shuffle the texts with `seed` before picking qualifying ones
    seed: int = 0
    batch_size: int = 8                  # sequences per forward pass (sets per-worker memory)
    token_chunk: int = 1024              # tokens per expert evaluation inside a shard
    num_workers: int = 2                 # actors per stage
    cpus_per_worker: float = 0.5
    actor_start_timeout_s: float = 600.0  # every actor of a stage must be up before work starts
    cka_tokens: int = 512
    overwrite: bool = False
    dtype: str = "float32"


@dataclass
class Prepared:
    """Output of `prepare`: validated inputs, ready for the Ray stages."""

    job: CalibrationJob
    tokens: torch.Tensor                 # [num_samples, seq_len] int64
    fingerprint: dict[str, Any]
    data_digest: str
    source: str                          # where the text came from, for the report


@dataclass
class Result:
    artifact: SimilarityArtifact
    out: Path
    report: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- inputs and checks (no Ray)

def load_texts(data: str | None, text_column: str = "text", split: str = "train") -> tuple[Iterable[str], str]:
    """Calibration texts (lazily where the source allows) and a description of their source.

    data: None (the Python stdlib corpus that ships with every machine), a .jsonl/.json/.parquet
    file, a directory (`datasets.save_to_disk` output, or data files `datasets` can load), or a
    Hugging Face dataset name (needs a reachable hub). Raises ValueError naming a missing column.
    """
    if data is None:
        from .corpus import split_corpus, stdlib_documents
        return split_corpus(stdlib_documents())[0], "python-stdlib (sere_dist.corpus, training split)"
    import datasets

    p = Path(data)
    if p.is_file():
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(p.suffix)
        if kind is None:
            raise ValueError(f"--data {data}: unsupported file type {p.suffix!r}; use .jsonl, .json or .parquet")
        ds = datasets.load_dataset(kind, data_files=str(p), split="train")
    elif p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "state.json").exists():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(str(p), split=split)
    elif p.is_absolute() or data.startswith("."):
        raise ValueError(f"--data {data}: no such file or directory")
    else:
        try:
            ds = datasets.load_dataset(data, split=split)
        except Exception as exc:  # noqa: BLE001 - any hub failure becomes one clear message
            raise ValueError(f"--data {data!r} is not a local file or directory and could not be loaded as a "
                             f"Hugging Face dataset ({type(exc).__name__}: {exc})") from exc
    if text_column not in ds.column_names:
        raise ValueError(f"--data {data}: no {text_column!r} column (columns: {ds.column_names}); "
                         f"pass --text-column to name the text column")
    return (row[text_column] for row in ds), f"{data} (column {text_column!r})"


def prepare(job: CalibrationJob) -> Prepared:
    """Validate the job and tokenise the calibration text; cheap, and touches no Ray."""
    from transformers import AutoConfig, AutoTokenizer

    from .capture import tokenize_texts
    from .corpus import digest

    if job.metric not in METRICS:
        raise ValueError(f"--metric {job.metric!r} is not a similarity metric; use one of {', '.join(METRICS)}")
    out = Path(job.out)
    if out.exists() and not job.overwrite:
        raise ArtifactError(f"--out {out} exists; pass --overwrite to replace it")
    for name in ("num_samples", "seq_len", "batch_size", "num_workers", "cka_tokens", "token_chunk"):
        if int(getattr(job, name)) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(job, name)}")
    if job.cpus_per_worker <= 0:
        raise ValueError(f"--cpus-per-worker must be > 0, got {job.cpus_per_worker}")
    if not job.actor_start_timeout_s > 0:
        raise ValueError(f"--actor-start-timeout-s must be > 0, got {job.actor_start_timeout_s}")
    if job.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype {job.dtype!r}: use float32, bfloat16 or float16")
    mpath = Path(job.model)
    if not (mpath / "config.json").exists():
        raise ArtifactError(f"--model {job.model}: no checkpoint there (config.json missing)")
    fp = model_fingerprint(AutoConfig.from_pretrained(str(mpath)))   # refuses a dense model
    tok = AutoTokenizer.from_pretrained(str(mpath))
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


# ---------------------------------------------------------------- Ray Data stages

def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _CaptureStage:
    """Actor: the model loaded once; a batch of token rows -> one row per (MoE layer, shard)."""

    def __init__(self, model: str, dtype: str):
        import ray

        from .capture import load_model
        self.model, _ = load_model(model, dtype=getattr(torch, dtype))
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .capture import layer_inputs
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


class _ExpertGramStage:
    """Actor: that layer's experts on a shard -> partial Gram [E, E] float64 (or CKA sample rows)."""

    def __init__(self, model: str, dtype: str, metric: str, token_chunk: int,
                 cka_sample: dict[int, np.ndarray] | None):
        import ray

        from .capture import load_model, moe_blocks
        m, _ = load_model(model, dtype=getattr(torch, dtype))
        self.experts = {i: b.experts for i, b in moe_blocks(m).items()}
        del m                                       # keep only the routed experts (shared ones never count)
        self.metric, self.chunk, self.cka_sample = metric, token_chunk, cka_sample or {}
        self.node = ray.get_runtime_context().get_node_id()

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .capture import expert_outputs
        out: dict[str, list] = {"layer": [], "tokens": [], "gram": [], "sample": [], "sample_pos": [],
                                "node": [], "peak_rss_mb": []}
        for layer, pos, x, cnode in zip(batch["layer"], batch["positions"], batch["hidden"], batch["capture_node"]):
            layer = int(layer)
            experts = self.experts[layer]
            x = torch.tensor(np.asarray(x))          # a writable copy of the shard
            e = experts.gate_up_proj.shape[0]
            gram = torch.zeros(e, e, dtype=torch.float64)
            keep = np.isin(pos, self.cka_sample[layer]) if self.metric not in GRAM_METRICS else None
            parts = []
            for s in range(0, x.shape[0], self.chunk):
                y = expert_outputs(experts, x[s:s + self.chunk], chunk=self.chunk)   # [E, n, H]
                if keep is None:
                    flat = y.reshape(e, -1).double()
                    gram += flat @ flat.t()
                else:
                    parts.append(y[:, torch.as_tensor(keep[s:s + self.chunk])])
            sample = torch.cat(parts, dim=1) if parts else torch.zeros(e, 0, x.shape[1])
            out["layer"].append(layer)
            out["tokens"].append(int(x.shape[0]))
            out["gram"].append(gram.numpy())
            # CKA rows carry their sample tokens as bytes (ragged across shards)
            out["sample"].append(sample.float().numpy().tobytes())
            out["sample_pos"].append(pos[keep].tobytes() if keep is not None else b"")
            out["node"].append(f"{cnode},{self.node}")   # where this shard was captured, and reduced
            out["peak_rss_mb"].append(_peak_rss_mb())
        return {k: np.array(v, dtype=object) if k in ("sample", "sample_pos", "node") else np.array(v)
                for k, v in out.items()}


def _pipeline(prep: Prepared, cka_sample: dict[int, np.ndarray] | None):
    """The lazy Ray Data dataset of per-(layer, shard) partial results."""
    import ray
    from ray.data import ActorPoolStrategy

    job = prep.job
    n = prep.tokens.shape[0]
    items = [{"row": i, "ids": prep.tokens[i].numpy()} for i in range(n)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, -(-n // job.batch_size)))
    # SPREAD: one stage's actors on as many nodes as possible (a plain remote arg; Ray 2.60 warns that
    # such args are deprecated from 2.64 but ray_remote_args_fn does not place actors)
    # One block in flight per actor: a fast actor may otherwise queue every block of a stage and the
    # other nodes' actors idle (each block is a whole forward pass, so queueing gains nothing).
    common = dict(num_cpus=job.cpus_per_worker, scheduling_strategy="SPREAD",
                  compute=ActorPoolStrategy(size=job.num_workers, max_tasks_in_flight_per_actor=1))
    ds = ds.map_batches(_CaptureStage, fn_constructor_kwargs={"model": job.model, "dtype": job.dtype},
                        batch_size=job.batch_size, batch_format="numpy", **common)
    ds = ds.map_batches(_ExpertGramStage, batch_size=1, batch_format="numpy",
                        fn_constructor_kwargs={"model": job.model, "dtype": job.dtype, "metric": job.metric,
                                               "token_chunk": job.token_chunk, "cka_sample": cka_sample},
                        **common)
    # Each stage starts only once all its actors are up: otherwise the first actor to load the model can
    # take every block while the others are still importing torch, and a cluster too small for the pool
    # would wait forever instead of failing (GetTimeoutError, turned into ActorStartError by `_batches`).
    ds.context.wait_for_min_actors_s = max(1, math.ceil(job.actor_start_timeout_s))
    return ds


class ActorStartError(RuntimeError):
    """A stage's actors did not all start in time (usually: the cluster lacks the CPUs they ask for)."""


def _batches(prep: Prepared, cka: dict[int, np.ndarray] | None):
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


def run(prep: Prepared) -> Result:
    """Run the Ray Data pipeline on the connected cluster and write the artifact atomically.

    Ray must be initialised by the caller (a job: `ray.init()`; a test: a private local instance).
    """
    job, fp = prep.job, prep.fingerprint
    t0 = time.time()
    layers = list(fp["moe_layers"])
    e, n_tok = fp["num_experts"], int(prep.tokens.numel())
    cka = None if job.metric in GRAM_METRICS else {i: cka_positions(n_tok, job.cka_tokens, job.seed, i)
                                                   for i in layers}
    grams = {i: GramAccumulator(e) for i in layers}
    samples: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {i: [] for i in layers}
    seen = {i: 0 for i in layers}
    nodes: set[str] = set()
    peak = 0.0
    h = fp["hidden_size"]
    for batch in _batches(prep, cka):
        for k in range(len(batch["layer"])):
            i = int(batch["layer"][k])
            seen[i] += int(batch["tokens"][k])
            nodes.update(str(batch["node"][k]).split(","))
            peak = max(peak, float(batch["peak_rss_mb"][k]))
            if cka is None:
                grams[i].gram += torch.as_tensor(np.asarray(batch["gram"][k], dtype=np.float64))
                grams[i].tokens += int(batch["tokens"][k])
            else:
                pos = np.frombuffer(batch["sample_pos"][k], dtype=np.int64)
                if pos.size:
                    y = np.frombuffer(batch["sample"][k], dtype=np.float32).reshape(e, pos.size, h)
                    samples[i].append((pos, y))
    bad = {i: s for i, s in seen.items() if s != n_tok}
    if bad:
        raise RuntimeError(f"calibration pipeline lost shards: tokens seen per layer {bad}, expected {n_tok}")
    mats = {}
    for i in layers:
        if cka is None:
            mats[i] = grams[i].result(job.metric)
        else:
            pos = np.concatenate([p for p, _ in samples[i]])
            y = torch.from_numpy(np.concatenate([s for _, s in samples[i]], axis=1)[:, np.argsort(pos)].copy())
            mats[i] = linear_cka(y) if job.metric == "cka_linear" else rbf_cka(y)
    wall = time.time() - t0
    report = {"wall_s": round(wall, 3), "tokens": n_tok, "layers": len(layers), "experts": e,
              "tokens_per_s": round(n_tok / wall, 1), "num_workers": job.num_workers, "nodes": sorted(nodes),
              "worker_peak_rss_mb": round(peak, 1), "source": prep.source,
              "job": {k: v for k, v in asdict(job).items() if k not in ("out", "overwrite")}}
    art = SimilarityArtifact(matrices=mats, fingerprint=fp, metric=job.metric, tokens=n_tok,
                             data_digest=prep.data_digest,
                             extra={"calibration": {k: report[k] for k in ("source", "job")}})
    out = art.save(job.out, overwrite=job.overwrite, extra_files=report_files(art, report))
    return Result(artifact=art, out=out, report=report)


# ---------------------------------------------------------------- reports

def stats_rows(matrices: dict[int, torch.Tensor]) -> list[dict[str, float]]:
    """Per-layer off-diagonal statistics: [{layer, mean, std, min, max}]."""
    return [{"layer": i, **offdiag_stats(m)} for i, m in sorted(matrices.items())]


def stats_table(matrices: dict[int, torch.Tensor], fmt: str = "md") -> str:
    rows = stats_rows(matrices)
    if fmt == "csv":
        return "layer,mean,std,min,max\n" + "".join(
            f"{r['layer']},{r['mean']:.6f},{r['std']:.6f},{r['min']:.6f},{r['max']:.6f}\n" for r in rows)
    lines = ["| layer | mean | std | min | max |", "| ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['layer']} | {r['mean']:.4f} | {r['std']:.4f} | {r['min']:.4f} | {r['max']:.4f} |" for r in rows]
    return "\n".join(lines) + "\n"


def report_files(art: SimilarityArtifact, report: dict[str, Any]) -> dict[str, bytes]:
    """The files written next to the matrices: stats table (CSV, Markdown), heatmap grid, run report."""
    from .plots import similarity_heatmaps

    title = (f"{art.fingerprint['architecture']}: {art.metric} similarity, {art.tokens} tokens "
             "(off-diagonal stats in stats.md)")
    return {STATS_CSV: stats_table(art.matrices, "csv").encode(),
            STATS_MD: stats_table(art.matrices, "md").encode(),
            HEATMAP_PNG: similarity_heatmaps(art.matrices, title=title),
            REPORT_JSON: (json.dumps(report, indent=2) + "\n").encode()}


def summary_line(res: Result) -> str:
    r = res.report
    return (f"calibrated {r['layers']} MoE layers x {r['experts']} experts on {r['tokens']} tokens in "
            f"{r['wall_s']:.1f} s ({r['tokens_per_s']:.0f} tokens/s; {r['num_workers']} workers per stage on "
            f"{len(r['nodes'])} node(s); worker peak RSS {r['worker_peak_rss_mb']:.0f} MiB) -> {res.out}")
