"""Expert similarity from expert outputs on calibration tokens. Tensors in, tensors out.

Y denotes one batch of expert outputs, shape [E, N, H] (every expert applied to the same N tokens).

Frobenius and cosine need only the E x E Gram matrix G[i, j] = sum_n <Y_i[n], Y_j[n]>, which is
additive over batches: `GramAccumulator` is exact for any number of batches and its memory does not
depend on N. CKA needs token-by-token kernels, so `SampleAccumulator` keeps a bounded, seeded
reservoir of tokens (every expert's output on the same tokens) and computes CKA on it.

Every matrix returned is float32 [E, E], symmetric, diagonal 1, values in [0, 1], NaN-free.

Routed-token statistics (`RoutedAccumulator`): what substituting expert p for expert e costs on the
tokens the router actually sends to e. With q_te the weight of token t on e (1, or the router's weight)
for every t that has e among its top-k,
    C[e, p] = sum_t q_te <f_e(x_t), f_p(x_t)>        N[e, p] = sum_t q_te |f_p(x_t)|^2      [E, E] float64
so C[e, e] = N[e, e] is e's routed output energy, and per routed row e
    relative substitution error   R[e, p] = (C[e, e] - 2 C[e, p] + N[e, p]) / C[e, e]
                                          = sum_t q |f_e - f_p|^2 / sum_t q |f_e|^2     (dropping: 1)
    least-squares scaled error    L[e, p] = 1 - C[e, p]^2 / (N[e, p] C[e, e])   (min over a of the same
                                            with a * f_p; a = C[e, p] / N[e, p]; in [0, 1])
Like the Gram matrix both are sums over tokens, so streaming and merging are exact.
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


class RoutedAccumulator:
    """Exact streaming routed-token statistics of one MoE layer (see the module docstring).

    Both weightings are kept from one pass: q = 1 (`count`, the default) and q = the router's weight
    (`router`). Also per expert: `count` [E] routed (token, slot) pairs and `weight` [E] the sum of
    their router weights; `tokens` the tokens seen. Everything is float64 and a plain sum over tokens.
    """

    WEIGHTINGS = ("count", "router")

    def __init__(self, num_experts: int):
        e = num_experts
        self.num_experts = e
        self.c = {w: torch.zeros(e, e, dtype=torch.float64) for w in self.WEIGHTINGS}
        self.n = {w: torch.zeros(e, e, dtype=torch.float64) for w in self.WEIGHTINGS}
        self.count = torch.zeros(e, dtype=torch.float64)
        self.weight = torch.zeros(e, dtype=torch.float64)
        self.tokens = 0

    def update(self, y: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """y: [E, n, H] every expert's output on the same n tokens; ids: [n, k] the experts each token is
        routed to; weights: [n, k] their router weights (None: all 1). Cost O(n k E H + n k E^2); pass y in
        float64 to share the conversion with `GramAccumulator.update`."""
        e, n = self.num_experts, y.shape[1]
        if y.dim() != 3 or y.shape[0] != e:
            raise ValueError(f"RoutedAccumulator: outputs must be [E={e}, n, H], got {list(y.shape)}")
        if ids.dim() != 2 or ids.shape[0] != n:
            raise ValueError(f"RoutedAccumulator: ids must be [n={n}, k], got {list(ids.shape)}")
        if weights is not None and weights.shape != ids.shape:
            raise ValueError(f"RoutedAccumulator: weights must have the shape of ids {list(ids.shape)}, "
                             f"got {list(weights.shape)}")
        ids = ids.long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= e):
            raise ValueError(f"RoutedAccumulator: expert ids must be in [0, {e}), got {int(ids.min())}..{int(ids.max())}")
        k = ids.shape[1]
        w = torch.ones(n * k, dtype=torch.float64) if weights is None else weights.double().reshape(-1)
        yd = y.double()                                                        # no copy if already float64
        sq = torch.einsum("enh,enh->en", yd, yd)                               # [E, n]      |f_p(x_t)|^2
        own = yd[ids, torch.arange(n)[:, None]]                                # [n, k, H]   f_e(x_t) per slot
        inner = torch.bmm(own, yd.permute(1, 2, 0)).reshape(n * k, e)          # [n*k, E]    <f_e, f_p> per slot
        # slot -> expert matrices, one per weighting: sums by GEMMs (index_add_ is far slower on CPU)
        q = torch.zeros(2, e, n * k, dtype=torch.float64)
        flat, slot = ids.reshape(-1), torch.arange(n * k)
        q[0, flat, slot] = 1.0
        q[1, flat, slot] = w
        c, nn = q @ inner, q.reshape(2, e, n, k).sum(-1) @ sq.t()             # [2, E, E] each
        for j, name in enumerate(self.WEIGHTINGS):
            self.c[name] += c[j]
            self.n[name] += nn[j]
        self.count += q[0].sum(1)
        self.weight += q[1].sum(1)
        self.tokens += n

    def merge(self, other: "RoutedAccumulator") -> None:
        for name in self.WEIGHTINGS:
            self.c[name] += other.c[name]
            self.n[name] += other.n[name]
        self.count += other.count
        self.weight += other.weight
        self.tokens += other.tokens

    def stats(self, weighting: str = "count") -> tuple[torch.Tensor, torch.Tensor]:
        """(C, N), each [E, E] float64, for one weighting."""
        if weighting not in self.WEIGHTINGS:
            raise ValueError(f"unknown routed-token weighting {weighting!r}; use one of {', '.join(self.WEIGHTINGS)}")
        return self.c[weighting], self.n[weighting]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The whole state as named tensors (for transport between processes and for files)."""
        out = {f"{m}.{w}": getattr(self, m)[w] for m in ("c", "n") for w in self.WEIGHTINGS}
        return {**out, "count": self.count, "weight": self.weight,
                "tokens": torch.tensor([self.tokens], dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "RoutedAccumulator":
        """Inverse of `tensors`; a missing or misshapen entry is a ValueError naming it."""
        if "count" not in t:
            raise ValueError("routed statistics lack 'count'")
        acc = cls(int(t["count"].shape[0]))
        e = acc.num_experts
        for key, shape in [(f"{m}.{w}", (e, e)) for m in ("c", "n") for w in cls.WEIGHTINGS] + \
                          [("count", (e,)), ("weight", (e,)), ("tokens", (1,))]:
            if key not in t or tuple(t[key].shape) != shape:
                got = list(t[key].shape) if key in t else "missing"
                raise ValueError(f"routed statistics entry {key!r} must have shape {list(shape)}, got {got}")
        for m in ("c", "n"):
            for w in cls.WEIGHTINGS:
                getattr(acc, m)[w] = t[f"{m}.{w}"].double().clone()
        acc.count, acc.weight = t["count"].double().clone(), t["weight"].double().clone()
        acc.tokens = int(t["tokens"][0])
        return acc


def substitution_error(c: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Relative error of substituting p for e on e's routed tokens, weight unchanged.
    R[e, p] = (C[e, e] - 2 C[e, p] + N[e, p]) / C[e, e]; 1 is the error of dropping e's slot, R[e, e] = 0.
    [E, E], [E, E] -> [E, E] float64; rows of experts with no routed energy are NaN."""
    cee = c.double().diagonal()[:, None]
    r = (cee - 2 * c.double() + n.double()) / cee
    r = torch.where(cee > 0, r.clamp_min(0), torch.full_like(r, float("nan")))
    return r


def scaled_substitution_error(c: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """The same error with p's output scaled by the least-squares a = C[e, p] / N[e, p]:
    L[e, p] = 1 - C[e, p]^2 / (N[e, p] C[e, e]) in [0, 1] (a zero output p gives a = 0: dropping, 1).
    [E, E], [E, E] -> [E, E] float64; rows of experts with no routed energy are NaN."""
    c, n = c.double(), n.double()
    cee = c.diagonal()[:, None]
    gain = torch.where(n > 0, c.pow(2) / (n * cee).clamp_min(_EPS * _EPS), torch.zeros_like(c))
    err = (1 - gain).clamp(0, 1)
    return torch.where(cee > 0, err, torch.full_like(err, float("nan")))


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
