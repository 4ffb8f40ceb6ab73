"""Expert similarity from expert outputs on calibration tokens. Tensors in, tensors out.

Y denotes one batch of expert outputs, shape [E, N, H] (every expert applied to the same N tokens).

Frobenius and cosine need only the E x E Gram matrix G[i, j] = sum_n <Y_i[n], Y_j[n]>, which is
additive over batches: `GramAccumulator` is exact for any number of batches and its memory does not
depend on N. CKA needs token-by-token kernels, so `SampleAccumulator` keeps a bounded, seeded
reservoir of tokens (every expert's output on the same tokens) and computes CKA on it.

Every matrix returned is float32 [E, E], symmetric, diagonal 1, values in [0, 1], NaN-free.
"""

from __future__ import annotations

import torch

from sere_dist.core.config import METRICS

_EPS = 1e-12


def frobenius_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Paper's metric: d_ij = ||Y_i - Y_j||_F, sim = 1 - d_ij / max_{i != j} d_ij.  [E,E] -> [E,E]."""
    g = gram.double()
    diag = g.diagonal()
    d2 = (diag[:, None] + diag[None, :] - 2 * g).clamp_min(0)
    d = d2.sqrt()
    d.fill_diagonal_(0)
    dmax = d.max()
    sim = torch.ones_like(d) if dmax <= 0 else 1 - d / dmax
    return _finish(sim)


def cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Cosine of the flattened outputs, mapped from [-1, 1] to [0, 1]; zero outputs: identical to
    each other (1), unrelated to the rest (0.5).  [E,E] -> [E,E]."""
    g = gram.double()
    norm = g.diagonal().clamp_min(0).sqrt()
    zero = norm <= _EPS
    cos = g / (norm[:, None] * norm[None, :]).clamp_min(_EPS)
    cos = cos.clamp(-1, 1)
    cos = torch.where(zero[:, None] | zero[None, :], torch.zeros_like(cos), cos)
    sim = (cos + 1) / 2
    sim = torch.where(zero[:, None] & zero[None, :], torch.ones_like(sim), sim)
    return _finish(sim)


def linear_cka(y: torch.Tensor) -> torch.Tensor:
    """Linear CKA between experts over a token sample.  y: [E, n, H] -> [E, E].

    CKA(X, Z) = ||Z^T X||_F^2 / (||X^T X||_F ||Z^T Z||_F) on token-centred outputs; computed through
    the n x n Gram matrices K_i = X_i X_i^T so cost is O(E n^2 H + E^2 n^2).
    """
    x = y.double()
    x = x - x.mean(dim=1, keepdim=True)
    k = torch.einsum("enh,emh->enm", x, x)                                   # [E, n, n]
    return _cka_from_kernels(k)


def rbf_cka(y: torch.Tensor, sigma_scale: float = 1.0) -> torch.Tensor:
    """RBF-kernel CKA (bandwidth = sigma_scale * median pairwise token distance per expert).
    y: [E, n, H] -> [E, E]."""
    x = y.double()
    d2 = torch.cdist(x, x).pow(2)                                              # [E, n, n]
    n = x.shape[1]
    off = ~torch.eye(n, dtype=torch.bool)
    med = torch.stack([d2[e][off].median() if n > 1 else d2.new_tensor(0.0) for e in range(x.shape[0])])
    bw = (sigma_scale ** 2 * med).clamp_min(_EPS)
    k = torch.exp(-d2 / (2 * bw[:, None, None]))
    # a constant expert has all distances 0 -> kernel of ones -> centred to zero: handled below
    return _cka_from_kernels(k)


def _cka_from_kernels(k: torch.Tensor) -> torch.Tensor:
    n = k.shape[1]
    h = torch.eye(n, dtype=k.dtype) - 1.0 / n
    kc = h @ k @ h                                                             # centred, [E, n, n]
    flat = kc.reshape(kc.shape[0], -1)
    hsic = flat @ flat.t()                                                     # [E, E]
    norm = hsic.diagonal().clamp_min(0).sqrt()
    zero = norm <= 1e-9 * max(1.0, float(norm.max()) if norm.numel() else 1.0)
    sim = hsic / (norm[:, None] * norm[None, :]).clamp_min(_EPS)
    sim = torch.where(zero[:, None] | zero[None, :], torch.zeros_like(sim), sim)
    sim = torch.where(zero[:, None] & zero[None, :], torch.ones_like(sim), sim)
    return _finish(sim)


def _finish(sim: torch.Tensor) -> torch.Tensor:
    sim = torch.nan_to_num(sim, nan=0.0).clamp(0, 1)
    sim = (sim + sim.t()) / 2
    sim.fill_diagonal_(1.0)
    return sim.float()


class GramAccumulator:
    """Exact streaming E x E Gram statistics for Frobenius and cosine similarity."""

    def __init__(self, num_experts: int):
        self.gram = torch.zeros(num_experts, num_experts, dtype=torch.float64)
        self.tokens = 0

    def update(self, y: torch.Tensor) -> None:
        """y: [E, N, H] outputs of every expert on the same N tokens."""
        flat = y.reshape(y.shape[0], -1).double()
        self.gram += flat @ flat.t()
        self.tokens += y.shape[1]

    def merge(self, other: "GramAccumulator") -> None:
        self.gram += other.gram
        self.tokens += other.tokens

    def result(self, metric: str) -> torch.Tensor:
        if metric == "frobenius":
            return frobenius_from_gram(self.gram)
        if metric == "cosine":
            return cosine_from_gram(self.gram)
        raise ValueError(f"GramAccumulator cannot compute {metric!r}")


class SampleAccumulator:
    """Seeded reservoir of at most `max_tokens` tokens' expert outputs, for CKA metrics."""

    def __init__(self, num_experts: int, max_tokens: int = 512, seed: int = 0):
        self.max_tokens = max_tokens
        self.gen = torch.Generator().manual_seed(seed)
        self.sample: torch.Tensor | None = None                                # [E, n, H]
        self.tokens = 0
        self.num_experts = num_experts

    def update(self, y: torch.Tensor) -> None:
        """y: [E, N, H]. Algorithm R: token number i (0-based, over all batches) takes a uniformly
        random slot j in [0, i] and replaces it when j < max_tokens."""
        y = y.float()
        e, n, h = y.shape
        if self.sample is None:
            self.sample = y.new_zeros(e, self.max_tokens, h)
        pos = torch.arange(self.tokens, self.tokens + n)
        j = (torch.rand(n, generator=self.gen, dtype=torch.float64) * (pos + 1)).long()
        j = torch.where(pos < self.max_tokens, pos, j)
        last = {}
        for src, dst in zip(torch.nonzero(j < self.max_tokens).flatten().tolist(), j[j < self.max_tokens].tolist()):
            last[dst] = src  # a later token overwrites an earlier one in the same slot
        if last:
            dst = torch.tensor(list(last.keys()))
            src = torch.tensor(list(last.values()))
            self.sample[:, dst] = y[:, src]
        self.tokens += n

    def result(self, metric: str) -> torch.Tensor:
        if self.sample is None or self.tokens < 2:
            raise ValueError("CKA needs at least 2 calibration tokens")
        y = self.sample[:, : min(self.tokens, self.max_tokens)]
        if metric == "cka_linear":
            return linear_cka(y)
        if metric == "cka_rbf":
            return rbf_cka(y)
        raise ValueError(f"SampleAccumulator cannot compute {metric!r}")


def make_accumulator(metric: str, num_experts: int, *, max_tokens: int = 512, seed: int = 0):
    """The streaming accumulator for a metric (update(y [E,N,H]) ... result(metric) -> [E,E])."""
    if metric in ("frobenius", "cosine"):
        return GramAccumulator(num_experts)
    if metric in ("cka_linear", "cka_rbf"):
        return SampleAccumulator(num_experts, max_tokens=max_tokens, seed=seed)
    raise ValueError(f"unknown similarity metric {metric!r}; use one of {', '.join(METRICS)}")


def similarity(y: torch.Tensor, metric: str) -> torch.Tensor:
    """One-shot similarity of [E, N, H] outputs (the all-in-memory method; used as the reference)."""
    if metric in ("frobenius", "cosine"):
        acc = GramAccumulator(y.shape[0])
        acc.update(y)
        return acc.result(metric)
    if metric == "cka_linear":
        return linear_cka(y)
    if metric == "cka_rbf":
        return rbf_cka(y)
    raise ValueError(f"unknown similarity metric {metric!r}; use one of {', '.join(METRICS)}")


def offdiag_stats(sim: torch.Tensor) -> dict[str, float]:
    """Mean, std, min, max of the off-diagonal entries of an [E, E] matrix."""
    e = sim.shape[0]
    off = sim[~torch.eye(e, dtype=torch.bool)]
    if off.numel() == 0:
        return {"mean": 1.0, "std": 0.0, "min": 1.0, "max": 1.0}
    return {"mean": float(off.mean()), "std": float(off.std(unbiased=False)),
            "min": float(off.min()), "max": float(off.max())}
