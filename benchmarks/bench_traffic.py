"""All-to-all traffic vs expert-parallel size, on routing traces recorded from the trained tiny model.

1. Record: run the trained tiny Qwen3-MoE (16 experts, top-4) on held-out text with decode batches
   simulated by `sere_dist.eval.fidelity.RoutingPatch` (one group = the tokens of `--local-batch`
   sequences at one position); save the pre-re-routing ids/weights per layer to
   benchmarks/results/traces_trained.pt.
2. Replay: for EP size R, one decode step is R consecutive groups, one per data-parallel rank (each
   rank's router sees only its own local batch, so SERE picks primaries per rank), experts placed
   linearly. Count, per MoE layer and step, with `sere_dist.eval.traffic`: no re-routing, the paper's rule,
   and the rank-aware rule (`expert_ranks=expert_ranks_for(E, R, "linear")`).

3. Fidelity of the rank-aware choice: top-1 agreement / KL of the paper rule vs the rank-aware rule
   at each EP size (decode batches of one rank's local batch), so the byte saving has its price next to it.

With E = 16, EP sizes above 16 leave ranks with no experts (linear placement puts one expert on each
of the first 16 ranks); those ranks still hold tokens and send them. Bytes assume hidden size
`--hidden-size` (default 2048, Qwen3-30B-A3B's) with bf16 activations: the routing pattern is the
tiny model's, the payload per token is a real model's.

    python benchmarks/bench_traffic.py

Writes benchmarks/results/traffic.json and traffic.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from bench_fidelity import heldout_tokens

from sere_dist.calibration.capture import load_model, tokenize_texts
from sere_dist.calibration.pipeline import calibrate
from sere_dist.calibration.corpus import split_corpus, stdlib_documents
from sere_dist.eval.fidelity import RoutingPatch, active_experts, evaluate, record_transform
from sere_dist.core.reroute import expert_ranks_for, reroute
from sere_dist.models.tiny import DATA_DIR
from sere_dist.eval.traffic import Wire, compare_rerouting

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("deepep_high_throughput", "deepep_low_latency", "allgather_reducescatter")


@torch.no_grad()
def record_traces(model, tokens: torch.Tensor, local_batch: int, num_experts: int) -> dict:
    """{layer: ids [N_groups, local_batch, k] int16, weights [..] float16}: pre-re-routing routing."""
    store: dict[int, list] = {}
    with RoutingPatch(model, record_transform(num_experts, store)):
        for s in range(0, tokens.shape[0] - local_batch + 1, local_batch):
            model(tokens[s:s + local_batch])
    return {layer: {"ids": torch.cat([c[0] for c in calls]).to(torch.int16),
                    "weights": torch.cat([c[1] for c in calls]).to(torch.float16)}
            for layer, calls in store.items()}


def replay(traces: dict, sims: dict, ep: int, s: int, rho: float, wire: Wire, max_steps: int) -> dict:
    """Mean per (layer, step) counts for each routing and backend at EP size `ep`."""
    e = next(iter(sims.values())).shape[0]
    placement = expert_ranks_for(e, ep, "linear")
    acc: dict = {}
    steps = 0
    for layer, tr in traces.items():
        ids_all = tr["ids"].long()
        n_groups, b, k = ids_all.shape
        for st in range(min(n_groups // ep, max_steps)):
            ids = ids_all[st * ep:(st + 1) * ep].reshape(ep * b, k)
            src = torch.arange(ep).repeat_interleave(b)
            rep = compare_rerouting(ids, src, sims[layer], s, rho, placement, wire, backends=BACKENDS)
            for routing, per_backend in rep.items():
                for backend, r in per_backend.items():
                    a = acc.setdefault(routing, {}).setdefault(backend, {"total_bytes": 0.0, "dispatch_bytes": 0.0,
                                                                          "messages": 0.0, "rank_pairs": 0.0,
                                                                          "remote_pairs": 0.0, "tokens": 0.0,
                                                                          "imbalance": 0.0})
                    for key in a:
                        a[key] += getattr(r, key)
            steps += 1
    out = {}
    for routing, per_backend in acc.items():
        out[routing] = {}
        for backend, a in per_backend.items():
            out[routing][backend] = {
                "dispatch_bytes_per_step": a["dispatch_bytes"] / steps, "total_bytes_per_step": a["total_bytes"] / steps,
                "messages_per_step": a["messages"] / steps, "ranks_per_token": a["rank_pairs"] / a["tokens"],
                "remote_ranks_per_token": a["remote_pairs"] / a["tokens"], "imbalance": a["imbalance"] / steps}
    return {"ep": ep, "steps_per_layer": steps // len(traces), "tokens_per_step": ep * b, "routings": out}


def rank_aware_transform(sims: dict, s: int, rho: float, placement: torch.Tensor | None):
    """SERE as a fidelity transform; with `placement` the rank-aware rule, else the paper's."""
    def fn(layer, ids, w, valid):
        new, _ = reroute(ids, sims[layer], s, rho, valid, expert_ranks=placement, with_stats=False)
        return new, w, active_experts(new, w, valid, sims[layer].shape[0])
    return fn


def fidelity_rows(model, tokens, sims, settings, ep_sizes, local_batch: int) -> list[dict]:
    """What the rank-aware choice costs in fidelity: top-1 agreement / KL of paper vs rank-aware at
    each EP size, decode batches of one rank's local batch."""
    e = next(iter(sims.values())).shape[0]
    rows = []
    for s, rho in settings:
        paper = evaluate(model, tokens, rank_aware_transform(sims, s, rho, None), batch_size=local_batch)
        for ep in ep_sizes:
            ra = evaluate(model, tokens, rank_aware_transform(sims, s, rho, expert_ranks_for(e, ep, "linear")),
                          batch_size=local_batch)
            rows.append({"S": s, "rho": rho, "ep": ep, "paper_top1": paper["top1_agreement"], "paper_kl": paper["kl"],
                         "paper_experts": paper["experts"], "rank_aware_top1": ra["top1_agreement"],
                         "rank_aware_kl": ra["kl"], "rank_aware_experts": ra["experts"]})
    return rows


def print_table(res: dict) -> None:
    for s_rho in res["settings"]:
        print(f"\nSERE S={s_rho['S']} rho={s_rho['rho']}, local batch {res['local_batch']} sequences per rank, "
              f"H={res['hidden_size']} bf16; per MoE layer per decode step")
        print(f"{'EP':>4} {'tokens':>7} | {'ranks/token none':>16} {'paper':>7} {'rank-aw':>8} | "
              f"{'HT dispatch KB none':>20} {'paper':>9} {'rank-aw':>9} {'saved':>7} | {'LL KB none':>11} "
              f"{'paper':>9} {'rank-aw':>9} | {'AgRs KB':>9}")
        for row in s_rho["rows"]:
            r = row["routings"]
            ht = [r[x]["deepep_high_throughput"] for x in ("none", "paper", "rank_aware")]
            ll = [r[x]["deepep_low_latency"] for x in ("none", "paper", "rank_aware")]
            ag = r["none"]["allgather_reducescatter"]
            saved = 1 - ht[2]["dispatch_bytes_per_step"] / ht[0]["dispatch_bytes_per_step"] \
                if ht[0]["dispatch_bytes_per_step"] else 0.0
            print(f"{row['ep']:>4} {row['tokens_per_step']:>7} | {ht[0]['ranks_per_token']:16.2f} "
                  f"{ht[1]['ranks_per_token']:7.2f} {ht[2]['ranks_per_token']:8.2f} | "
                  f"{ht[0]['dispatch_bytes_per_step'] / 1e3:20.1f} {ht[1]['dispatch_bytes_per_step'] / 1e3:9.1f} "
                  f"{ht[2]['dispatch_bytes_per_step'] / 1e3:9.1f} {saved:7.1%} | "
                  f"{ll[0]['dispatch_bytes_per_step'] / 1e3:11.1f} {ll[1]['dispatch_bytes_per_step'] / 1e3:9.1f} "
                  f"{ll[2]['dispatch_bytes_per_step'] / 1e3:9.1f} | {ag['dispatch_bytes_per_step'] / 1e3:9.1f}")


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"none": "k-o", "paper": "b--s", "rank_aware": "r-^"}
    for s_rho, alpha in zip(res["settings"], (1.0, 0.5)):
        eps = [r["ep"] for r in s_rho["rows"]]
        for routing, style in styles.items():
            if routing == "none" and alpha < 1:
                continue
            lab = "no re-routing" if routing == "none" else f"{routing} S={s_rho['S']} rho={s_rho['rho']}"
            axes[0].plot(eps, [r["routings"][routing]["deepep_high_throughput"]["dispatch_bytes_per_step"] / 1e6
                               for r in s_rho["rows"]], style, alpha=alpha, label=lab)
            axes[1].plot(eps, [r["routings"][routing]["deepep_high_throughput"]["ranks_per_token"]
                               for r in s_rho["rows"]], style, alpha=alpha, label=lab)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("expert-parallel size (ranks)")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("DeepEP HT dispatch MB per layer per step")
    axes[1].set_ylabel("distinct ranks per token (own incl.)")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"trained tiny MoE traces, {res['local_batch']} seqs/rank, H={res['hidden_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ep-sizes", nargs="+", type=int, default=[2, 4, 8, 16, 32, 64])
    p.add_argument("--local-batch", type=int, default=16, help="decode sequences per data-parallel rank")
    p.add_argument("--settings", nargs="+", default=["2:0.3", "1:0.3"], help="S:rho pairs")
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--num-seqs", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=48)
    p.add_argument("--max-steps", type=int, default=24, help="decode steps replayed per layer and EP size")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "traffic.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    path = DATA_DIR / "tiny-trained"
    model, tok = load_model(path)
    train_docs, held_docs = split_corpus(stdlib_documents())
    cal = tokenize_texts(tok, train_docs, 64, 32)
    sims = calibrate(model, cal, metric="frobenius").matrices
    ev = heldout_tokens(tok, held_docs, args.num_seqs, args.seq_len)
    num_experts = next(iter(sims.values())).shape[0]
    traces = record_traces(model, ev, args.local_batch, num_experts)
    trace_path = Path(args.out).with_name("traces_trained.pt")
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": str(path), "local_batch": args.local_batch, "seq_len": args.seq_len,
                "note": "pre-re-routing top-k ids/weights per MoE layer; [groups, local_batch, k]; one group = "
                        "one simulated decode step of local_batch sequences", "layers": traces}, trace_path)
    wire = Wire(hidden_size=args.hidden_size)
    res = {"benchmark": "traffic", "command": "python " + " ".join(["benchmarks/bench_traffic.py"] + sys.argv[1:]),
           "machine": f"{platform.machine()}, CPU, counts only (no network)", "model": str(path),
           "num_experts": num_experts, "top_k": int(traces[next(iter(traces))]["ids"].shape[-1]),
           "local_batch": args.local_batch, "hidden_size": args.hidden_size, "placement": "linear",
           "traces": str(trace_path.name), "settings": []}
    for item in args.settings:
        s, rho = item.split(":")
        rows = [replay(traces, sims, ep, int(s), float(rho), wire, args.max_steps) for ep in args.ep_sizes]
        res["settings"].append({"S": int(s), "rho": float(rho), "rows": rows})
    pairs = [(int(x.split(":")[0]), float(x.split(":")[1])) for x in args.settings]
    res["fidelity"] = fidelity_rows(model, ev[:64], sims, pairs, [e for e in args.ep_sizes if e <= num_experts],
                                    args.local_batch)
    res["wall_s"] = round(time.time() - t0, 1)
    print_table(res)
    print("\nfidelity of the rank-aware choice (top-1 agreement / KL vs unmodified, decode batches of "
          f"{args.local_batch}):")
    for r in res["fidelity"]:
        print(f"  S={r['S']} rho={r['rho']} EP={r['ep']:>3}: paper {r['paper_top1']:.4f} / {r['paper_kl']:.5f} "
              f"({r['paper_experts']:.2f} experts)  rank-aware {r['rank_aware_top1']:.4f} / {r['rank_aware_kl']:.5f} "
              f"({r['rank_aware_experts']:.2f} experts)")
    Path(args.out).write_text(json.dumps(res, indent=1))
    plot(res, Path(args.out).with_name("traffic.png"))
    print(f"\nwrote {args.out}, {trace_path.name} and traffic.png in {res['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
