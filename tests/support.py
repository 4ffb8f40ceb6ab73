"""Helpers shared by the test modules (the only module tests import helpers from).

- naive per-slot references of the re-routing rules (Python loops, no tensors): `naive_paper`,
  `naive_rank_aware`;
- random kernel cases and the reference they are checked against: `random_case`, `expected`,
  `assert_same` (native kernels and the CUDA emulation);
- real vLLM engines on tiny checkpoints: `make_llm`, `greedy`, `close_llm`, `random_artifact`.
"""

from __future__ import annotations

import gc
import math
import random
import struct

import torch

from sere_dist.core.artifact import SimilarityArtifact
from sere_dist.core.model import checkpoint_fingerprint
from sere_dist.core.reroute import reroute
from sere_dist.engine.args import engine_kwargs


def f32(x):
    """Round to float32: similarities and rho are compared in float32, as the tensors hold them."""
    return struct.unpack("f", struct.pack("f", x))[0]


def naive_paper(ids, sim, s, rho, valid=None):
    """ids: list of T lists of k ids; sim: E x E nested list. Returns new ids (list of lists)."""
    t = len(ids)
    rho = f32(rho)
    valid = valid if valid is not None else [True] * t
    primary = sorted({e for i in range(t) if valid[i] for e in ids[i][:s]})
    pset = set(primary)
    out = []
    for i in range(t):
        row = list(ids[i])
        if valid[i]:
            for j in range(s, len(row)):
                e = row[j]
                if e in pset:
                    continue
                best, best_sim = None, None
                for p in primary:  # ascending: strict > keeps the lowest id on ties
                    if best_sim is None or sim[e][p] > best_sim:
                        best, best_sim = p, sim[e][p]
                if best is not None and best_sim >= rho:
                    row[j] = best
        out.append(row)
    return out


def naive_rank_aware(ids, sim, s, rho, ranks_of, valid=None):
    """ranks_of: list of E sets of ranks hosting each expert."""
    t = len(ids)
    rho = f32(rho)
    valid = valid if valid is not None else [True] * t
    primary = sorted({e for i in range(t) if valid[i] for e in ids[i][:s]})
    pset = set(primary)
    n_ranks = 1 + max(r for rs in ranks_of for r in rs)
    out = []
    for i in range(t):
        row = list(ids[i])
        if valid[i]:
            visited = set().union(*[ranks_of[e] for e in ids[i][:s]]) if s else set()
            for j in range(s, len(row)):
                e = row[j]
                if e in pset:
                    continue
                # best passing primary on each visited rank, then the best rank (lowest on ties)
                choice, choice_sim = None, None
                for r in range(n_ranks):
                    if r not in visited:
                        continue
                    for p in primary:
                        if r in ranks_of[p] and sim[e][p] >= rho and (choice_sim is None or sim[e][p] > choice_sim):
                            choice, choice_sim = p, sim[e][p]
                if choice is None:
                    best, best_sim = None, None
                    for p in primary:
                        if best_sim is None or sim[e][p] > best_sim:
                            best, best_sim = p, sim[e][p]
                    if best is not None and best_sim >= rho:
                        choice = best
                if choice is not None:
                    row[j] = choice
        out.append(row)
    return out


# ------------------------------------------------------------------ native kernel cases

E_CHOICES = (1, 2, 7, 31, 33, 60, 64, 97, 128, 160, 256, 300, 511, 512)
SIM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def random_case(rng: random.Random, max_t: int = 4096, device: str = "cpu"):
    e = rng.choice(E_CHOICES) if rng.random() < 0.5 else rng.randint(1, 512)
    k = rng.randint(1, min(16, e))
    s = k if rng.random() < 0.15 else rng.randint(1, k)
    t = min(max_t, int(math.exp(rng.uniform(0, math.log(max_t + 1)))))
    if rng.random() < 0.03:
        t = 0
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    levels = rng.choice([4, 10, 1000, 0])  # 0: continuous values
    if levels:
        sim = torch.randint(0, levels + 1, (e, e), generator=g).float() / levels
    else:
        sim = torch.rand(e, e, generator=g)
    if rng.random() < 0.5:
        sim = torch.maximum(sim, sim.t()).fill_diagonal_(1.0)
    rho = rng.choice([0.0, 1.0, 0.3, 0.5, 0.75, rng.random()])
    if levels and rng.random() < 0.3:
        rho = rng.randint(0, levels) / levels  # exactly on a level: ties with the threshold
    if rng.random() < 0.8:  # k distinct ids, skewed so batches share experts
        logits = torch.randn(t, e, generator=g) - torch.linspace(0, rng.uniform(0, 6), e)
        ids = logits.topk(k, dim=1).indices
    else:  # repeats inside a token are legal input too
        ids = torch.randint(0, e, (t, k), generator=g)
    ids = ids.to(rng.choice([torch.int32, torch.int64]))
    r = rng.random()
    valid = None if r < 0.4 else torch.rand(t, generator=g) > rng.choice([0.1, 0.5, 0.9, 1.0])
    sim_dtype = rng.choice(SIM_DTYPES)
    sim = sim.to(sim_dtype)
    return (ids.to(device), sim.to(device), s, rho, None if valid is None else valid.to(device))


def expected(ids, sim, s, rho, valid):
    ids, sim = ids.cpu(), sim.cpu().float()
    return reroute(ids, sim, s, rho, None if valid is None else valid.cpu(), with_stats=False)[0]


def assert_same(got, want, case):
    ids, sim, s, rho, valid = case
    detail = (f"T={ids.shape[0]} k={ids.shape[1]} E={sim.shape[0]} S={s} rho={rho} ids={ids.dtype} "
              f"sim={sim.dtype} valid={'none' if valid is None else int(valid.sum())}")
    assert got.dtype == ids.dtype and got.shape == ids.shape, detail
    assert torch.equal(got.cpu(), want), detail


# ------------------------------------------------------------------ vLLM engines

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Parser:\n    def", "for i in range(10):"]
MAX_TOKENS = 12


def greedy(llm, prompts=PROMPTS, n=MAX_TOKENS) -> list[list[int]]:
    from vllm import SamplingParams
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def random_routed(num_experts: int, layers, seed=0) -> dict:
    """Routed-token statistics (C, N) of random expert outputs, both weightings: a valid format-2 payload."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in layers:
        f = torch.randn(num_experts, 6, dtype=torch.float64, generator=g)
        f = f + 1.0 * torch.randn(1, 6, dtype=torch.float64, generator=g)           # some shared direction
        c = f @ f.t()                                                                 # <f_e, f_p>
        n = (f * f).sum(1).expand(num_experts, -1).clone()                           # |f_p|^2
        out[i] = {"count": (c, n), "router": (0.5 * c, 0.5 * n)}
    return out


def random_artifact(ckpt, out, seed=0, routed=False):
    """A random similarity artifact; `routed` adds random routed-token statistics (format 2, for the
    error-aware modes)."""
    fp = checkpoint_fingerprint(ckpt)
    g = torch.Generator().manual_seed(seed)
    mats = {}
    for i in fp["moe_layers"]:
        m = torch.rand(fp["num_experts"], fp["num_experts"], generator=g)
        m = (m + m.t()) / 2
        m.fill_diagonal_(1.0)
        mats[i] = m
    extra = {"routed": random_routed(fp["num_experts"], fp["moe_layers"], seed)} if routed else {}
    return SimilarityArtifact(matrices=mats, fingerprint=fp, metric="frobenius", tokens=0, **extra).save(
        out, overwrite=True)


def make_llm(ckpt, sere=None, **kw):
    from vllm import LLM
    return LLM(**engine_kwargs(str(ckpt), sere=sere, max_model_len=256, seed=0,
                               kv_cache_memory_bytes=64 * 1024**2, **kw))


def close_llm(llm):
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001
        pass
    del llm
    gc.collect()
