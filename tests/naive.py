"""Deliberately naive per-slot references for the re-routing rules (Python loops, no tensors)."""

from __future__ import annotations

import struct


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
