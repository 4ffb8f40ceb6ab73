"""All-to-all traffic vs expert-parallel size, on routing traces recorded from the tiny models, per rule.

0. Calibrate each model in process on the calibration split (`calibrate_in_process`): the similarity
   matrices (paper and rank-aware rules) and the routed-token statistics C, N (error-aware rule,
   `core.reroute.error_aware_gain`), from one reduction.
1. Record: run the model (default: the trained tiny Qwen3-MoE, 16 experts top-4, and the 64-expert
   top-8 one trained from scratch) on held-out text with decode batches simulated by
   `sere_dist.eval.fidelity.RoutingPatch` (one group = the tokens of `--local-batch` sequences at one
   position); save the pre-re-routing ids/weights per layer to benchmarks/results/traces_<model>.pt.
2. Replay: for EP size R, one decode step is R consecutive groups, one per data-parallel rank (each
   rank's router sees only its own local batch, so SERE picks primaries per rank), experts placed
   linearly. Count, per MoE layer and step, with `sere_dist.eval.traffic`: no re-routing, the paper's
   rule, the rank-aware rule (`expert_ranks=expert_ranks_for(E, R, "linear")`), and the error-aware
   rule (gain threshold `--ea-threshold`, unmatched slots dropped or kept) alone and composed with the
   rank-aware choice. A slot the error-aware rule leaves with weight 0 (dropped, or moved with scale 0)
   sends nothing under DeepEP (the hook would hand DeepEP id -1 for it).
3. Fidelity of every arm: top-1 agreement / KL vs the unmodified model at each EP size (decode batches
   of one rank's local batch, the same batches the router sees), so each byte saving has its price
   next to it; an arm with both fewer bytes and lower KL than another is named in `dominates`.

With E = 16, EP sizes above 16 leave ranks with no experts (linear placement puts one expert on each
of the first 16 ranks); those ranks still hold tokens and send them. Bytes assume hidden size
`--hidden-size` (default 2048, Qwen3-30B-A3B's) with bf16 activations: the routing pattern is the
tiny model's, the payload per token is a real model's.

    python benchmarks/bench_traffic.py

Writes benchmarks/results/traffic.json (the first model's results at the top level, the others under
`other_models`; `headline.traffic_ep16_s2`: DeepEP-HT dispatch saving and KL of every arm at EP 16,
S = 2), traffic.png and the traces.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench_fidelity import heldout_tokens

from sere_dist.calibration.capture import load_model, tokenize_texts
from sere_dist.calibration.pipeline import calibrate_in_process
from sere_dist.calibration.corpus import split_corpus, stdlib_documents
from sere_dist.eval.baselines import error_aware_transform
from sere_dist.eval.fidelity import RoutingPatch, active_experts, paired_bootstrap, record_transform, reference, score
from sere_dist.core.reroute import error_aware_gain, expert_ranks_for, reroute
from sere_dist.models.tiny import DATA_DIR
from sere_dist.eval.traffic import ErrorAware, Wire, compare_rerouting, error_aware_arms

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("deepep_high_throughput", "deepep_low_latency", "allgather_reducescatter")
TRACE_NAMES = {"tiny-trained": "traces_trained.pt"}   # the others: traces_<model without "tiny-">.pt


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


def replay(traces: dict, sims: dict, ep: int, s: int, rho: float, wire: Wire, max_steps: int,
           ea: dict[int, ErrorAware] | None = None) -> dict:
    """Mean per (layer, step) counts for each routing and backend at EP size `ep`; `ea`: layer ->
    error-aware table (adds the error-aware arms)."""
    e = next(iter(sims.values())).shape[0]
    placement = expert_ranks_for(e, ep, "linear")
    acc: dict = {}
    steps = 0
    for layer, tr in traces.items():
        ids_all = tr["ids"].long()
        w_all = tr["weights"].float()
        n_groups, b, k = ids_all.shape
        for st in range(min(n_groups // ep, max_steps)):
            ids = ids_all[st * ep:(st + 1) * ep].reshape(ep * b, k)
            w = w_all[st * ep:(st + 1) * ep].reshape(ep * b, k)
            src = torch.arange(ep).repeat_interleave(b)
            rep = compare_rerouting(ids, src, sims[layer], s, rho, placement, wire, backends=BACKENDS, weights=w,
                                    error_aware=None if ea is None else ea[layer])
            for routing, per_backend in rep.items():
                for backend, r in per_backend.items():
                    a = acc.setdefault(routing, {}).setdefault(backend, {"total_bytes": 0.0, "dispatch_bytes": 0.0,
                                                                          "messages": 0.0, "rank_pairs": 0.0,
                                                                          "remote_pairs": 0.0, "tokens": 0.0,
                                                                          "slots": 0.0, "imbalance": 0.0})
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
                "remote_ranks_per_token": a["remote_pairs"] / a["tokens"],
                "sent_slots_per_token": a["slots"] / a["tokens"], "imbalance": a["imbalance"] / steps}
    return {"ep": ep, "steps_per_layer": steps // len(traces), "tokens_per_step": ep * b, "routings": out}


def rank_aware_transform(sims: dict, s: int, rho: float, placement: torch.Tensor | None):
    """SERE as a fidelity transform; with `placement` the rank-aware rule, else the paper's."""
    def fn(layer, ids, w, valid):
        new, _ = reroute(ids, sims[layer], s, rho, valid, expert_ranks=placement, with_stats=False)
        return new, w, active_experts(new, w, valid, sims[layer].shape[0])
    return fn


def arm_transform(arm: str, sims: dict, routed: dict, s: int, rho: float, threshold: float,
                  placement: torch.Tensor | None):
    """The fidelity transform of one replay arm (`placement` used by the *rank_aware arms only)."""
    ra = placement if arm.endswith("rank_aware") else None
    if arm in ("paper", "rank_aware"):
        return rank_aware_transform(sims, s, rho, ra)
    unmatched = arm[len("error_aware_"):].removesuffix("_rank_aware")
    return error_aware_transform(routed, s, threshold, unmatched, ra)


def fidelity_rows(model, tokens, sims, routed, settings, ep_sizes, local_batch: int, threshold: float,
                  unmatched: tuple[str, ...]) -> list[dict]:
    """Fidelity of every arm: top-1 agreement / KL vs the unmodified model at each EP size, decode
    batches of one rank's local batch. Arms that do not depend on the placement are scored once."""
    e = next(iter(sims.values())).shape[0]
    ref = reference(model, tokens, batch_size=local_batch)
    ea_arms = error_aware_arms(ErrorAware(torch.zeros(1), torch.zeros(1), threshold, unmatched))

    def run(arm, s, rho, placement):
        r = score(model, tokens, arm_transform(arm, sims, routed, s, rho, threshold, placement), ref,
                  batch_size=local_batch)
        n = float(r["tokens"].sum())
        return {"top1": float(r["agree"].sum()) / n, "kl": float(r["kl"].sum()) / n, "experts": r["experts"],
                "_kl": r["kl"], "_tokens": r["tokens"]}

    rows = []
    for s, rho in settings:
        flat = {arm: run(arm, s, rho, None) for arm in ("paper",) + ea_arms if not arm.endswith("rank_aware")}
        for ep in ep_sizes:
            placement = expert_ranks_for(e, ep, "linear")
            arms = {}
            for arm in ("paper", "rank_aware") + ea_arms:
                arms[arm] = dict(flat[arm] if arm in flat else run(arm, s, rho, placement))
            for arm, a in arms.items():    # paired bootstrap over sequences of KL(arm) - KL(other)
                a["kl_diff_ci95"] = {o: [round(x, 7) for x in paired_bootstrap(a["_kl"] - b["_kl"], a["_tokens"])]
                                     for o, b in arms.items() if o != arm}
            for a in arms.values():
                del a["_kl"], a["_tokens"]
            arms = {"none": {"top1": 1.0, "kl": 0.0, "experts": ref.experts}, **arms}
            row = {"S": s, "rho": rho, "ea_threshold": threshold, "ep": ep}
            for arm in ("paper", "rank_aware"):     # the fields make_results.py reads
                row.update({f"{arm}_top1": arms[arm]["top1"], f"{arm}_kl": arms[arm]["kl"],
                            f"{arm}_experts": arms[arm]["experts"]})
            row["arms"] = arms
            rows.append(row)
    return rows


def summary_rows(name: str, res: dict) -> list[dict]:
    """(model, EP, S, arm) rows: DeepEP-HT dispatch bytes and saving vs none, KL and top-1 where the
    fidelity was scored, and the arms this one beats on both bytes and KL: `dominates` (fewer bytes and
    lower mean KL), `dominates_significant` (the paired 95% interval of the KL difference below 0) and
    `fewer_bytes_same_kl` (fewer bytes, the KL difference's interval holding 0: equal fidelity within
    the noise)."""
    fid = {(r["S"], r["ep"]): r["arms"] for r in res["fidelity"]}
    out = []
    for st in res["settings"]:
        for row in st["rows"]:
            f = fid.get((st["S"], row["ep"]))
            ht = {arm: v["deepep_high_throughput"]["dispatch_bytes_per_step"] for arm, v in row["routings"].items()}
            cell = []
            for arm, b in ht.items():
                r = {"model": name, "ep": row["ep"], "S": st["S"], "rule": arm,
                     "threshold": st["rho"] if arm in ("paper", "rank_aware") else
                     (res["ea_threshold"] if arm.startswith("error_aware") else None),
                     "ht_dispatch_bytes_per_step": b, "bytes_saving": 1 - b / ht["none"] if ht["none"] else 0.0,
                     "ranks_per_token": row["routings"][arm]["deepep_high_throughput"]["ranks_per_token"],
                     "kl": f[arm]["kl"] if f else None, "top1": f[arm]["top1"] if f else None,
                     "experts": f[arm]["experts"] if f else None}
                cell.append(r)
            for r in cell:
                fewer = [o for o in cell if o is not r and r["kl"] is not None
                         and r["ht_dispatch_bytes_per_step"] < o["ht_dispatch_bytes_per_step"]]
                ci = f[r["rule"]].get("kl_diff_ci95", {}) if f else {}
                r["dominates"] = [o["rule"] for o in fewer if r["kl"] < o["kl"]]
                r["dominates_significant"] = [o["rule"] for o in fewer
                                              if o["rule"] in ci and ci[o["rule"]][2] < 0]
                r["fewer_bytes_same_kl"] = [o["rule"] for o in fewer
                                            if o["rule"] in ci and ci[o["rule"]][1] <= 0 <= ci[o["rule"]][2]]
            out += cell
    return out


def run_model(name: str, args, wire: Wire) -> dict:
    path = DATA_DIR / name
    model, tok = load_model(path)
    train_docs, held_docs = split_corpus(stdlib_documents())
    cal = tokenize_texts(tok, train_docs, 64, 32)
    t0 = time.time()
    red = calibrate_in_process(model, cal, metric="frobenius")
    sims = red.matrices
    routed = {layer: acc.stats("count") for layer, acc in red.routed.items()}
    gains = {layer: error_aware_gain(c, n) for layer, (c, n) in routed.items()}
    unmatched = tuple(args.ea_unmatched)
    ea = {layer: ErrorAware(scale=a, gain=g, threshold=args.ea_threshold, unmatched=unmatched)
          for layer, (a, g) in gains.items()}
    cal_s = time.time() - t0
    ev = heldout_tokens(tok, held_docs, args.num_seqs, args.seq_len)
    num_experts = next(iter(sims.values())).shape[0]
    traces = record_traces(model, ev, args.local_batch, num_experts)
    trace_path = Path(args.out).with_name(TRACE_NAMES.get(name, f"traces_{name.removeprefix('tiny-')}.pt"))
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": str(path), "local_batch": args.local_batch, "seq_len": args.seq_len,
                "note": "pre-re-routing top-k ids/weights per MoE layer; [groups, local_batch, k]; one group = "
                        "one simulated decode step of local_batch sequences", "layers": traces}, trace_path)
    res = {"model": str(path), "model_name": name, "num_experts": num_experts,
           "top_k": int(traces[next(iter(traces))]["ids"].shape[-1]),
           "local_batch": args.local_batch, "hidden_size": args.hidden_size, "placement": "linear",
           "traces": str(trace_path.name), "calibration": {"tokens": int(cal.numel()), "seconds": round(cal_s, 1),
                                                          "metric": "frobenius", "error_aware_stats": "count"},
           "ea_threshold": args.ea_threshold, "ea_unmatched": list(unmatched), "settings": []}
    for item in args.settings:
        s, rho = item.split(":")
        rows = [replay(traces, sims, ep, int(s), float(rho), wire, args.max_steps, ea) for ep in args.ep_sizes]
        res["settings"].append({"S": int(s), "rho": float(rho), "rows": rows})
    pairs = [(int(x.split(":")[0]), float(x.split(":")[1])) for x in args.settings]
    res["fidelity"] = fidelity_rows(model, ev[:args.fidelity_seqs], sims, routed, pairs,
                                    [e for e in args.ep_sizes if e <= num_experts], args.local_batch,
                                    args.ea_threshold, unmatched)
    res["summary"] = summary_rows(name, res)
    return res


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


def print_summary(rows: list[dict], ep_filter: set[int] | None = None) -> None:
    print(f"{'model':>14} {'EP':>3} {'S':>2} {'arm':>28} {'HT disp KB':>10} {'saving':>7} {'KL':>9} {'top-1':>7} "
          f"{'experts':>7}  fewer bytes than: [KL lower, paired 95% interval below 0] [KL equal within the interval]")
    for r in rows:
        if ep_filter and r["ep"] not in ep_filter:
            continue
        kl = "-" if r["kl"] is None else f"{r['kl']:.5f}"
        t1 = "-" if r["top1"] is None else f"{r['top1']:.4f}"
        ex = "-" if r["experts"] is None else f"{r['experts']:.2f}"
        print(f"{r['model']:>14} {r['ep']:>3} {r['S']:>2} {r['rule']:>28} {r['ht_dispatch_bytes_per_step'] / 1e3:10.1f} "
              f"{r['bytes_saving']:7.1%} {kl:>9} {t1:>7} {ex:>7}  [{', '.join(r['dominates_significant'])}] "
              f"[{', '.join(r['fewer_bytes_same_kl'])}]")


ARM_STYLES = {"none": "k-o", "paper": "b--s", "rank_aware": "r-^", "error_aware_drop": "g--v",
              "error_aware_drop_rank_aware": "m-D", "error_aware_keep": "c:v", "error_aware_keep_rank_aware": "y:D"}


def plot(results: list[dict], path: Path) -> None:
    """Per model: DeepEP-HT dispatch saving vs EP size (S = 2 solid, S = 1 faded) and, at the largest
    EP size scored for fidelity, KL vs saving for every arm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(12, 4 * len(results)), squeeze=False)
    for ax_row, res in zip(axes, results):
        for s_rho, alpha in zip(res["settings"], (1.0, 0.45)):
            eps = [r["ep"] for r in s_rho["rows"]]
            for routing, style in ARM_STYLES.items():
                if routing == "none" or routing not in s_rho["rows"][0]["routings"]:
                    continue
                base = [r["routings"]["none"]["deepep_high_throughput"]["dispatch_bytes_per_step"] for r in s_rho["rows"]]
                sav = [100 * (1 - r["routings"][routing]["deepep_high_throughput"]["dispatch_bytes_per_step"] / b)
                       for r, b in zip(s_rho["rows"], base)]
                ax_row[0].plot(eps, sav, style, alpha=alpha, label=f"{routing} S={s_rho['S']}")
        ax_row[0].set_xscale("log", base=2)
        ax_row[0].set_xlabel("expert-parallel size (ranks)")
        ax_row[0].set_ylabel("DeepEP HT dispatch bytes saved vs none (%)")
        ax_row[0].axhline(20, color="grey", lw=0.6, ls=":")
        ax_row[0].legend(fontsize=6, ncol=2)
        ax_row[0].set_title(f"{res['model_name']} ({res['num_experts']} experts top-{res['top_k']})", fontsize=9)
        ep_f = max(r["ep"] for r in res["fidelity"])
        for st, marker in zip(sorted({r["S"] for r in res["summary"]}, reverse=True), ("o", "s")):
            for r in res["summary"]:
                if r["ep"] == ep_f and r["S"] == st and r["kl"] is not None and r["rule"] != "none":
                    c = ARM_STYLES[r["rule"]][0]
                    ax_row[1].scatter(100 * r["bytes_saving"], r["kl"], color=c, marker=marker,
                                      label=f"{r['rule']} S={st}")
        ax_row[1].set_yscale("log")
        ax_row[1].set_xlabel(f"DeepEP HT dispatch bytes saved vs none (%), EP={ep_f}")
        ax_row[1].set_ylabel("KL vs unmodified (nats/token)")
        ax_row[1].legend(fontsize=6, ncol=2)
    fig.suptitle(f"tiny MoE traces, {results[0]['local_batch']} seqs/rank, H={results[0]['hidden_size']}, "
                 f"error-aware gain threshold {results[0]['ea_threshold']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny-trained", "tiny-scratch64"],
                   help="checkpoints under sere_dist/data; the first one's results are the file's top level")
    p.add_argument("--ep-sizes", nargs="+", type=int, default=[2, 4, 8, 16, 32, 64])
    p.add_argument("--local-batch", type=int, default=16, help="decode sequences per data-parallel rank")
    p.add_argument("--settings", nargs="+", default=["2:0.3", "1:0.3"], help="S:rho pairs (rho: the paper rule's)")
    p.add_argument("--ea-threshold", type=float, default=0.0, help="error-aware gain threshold")
    p.add_argument("--ea-unmatched", nargs="+", default=["drop", "keep"], choices=["drop", "keep", "renorm"])
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--num-seqs", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=48)
    p.add_argument("--max-steps", type=int, default=24, help="decode steps replayed per layer and EP size")
    p.add_argument("--fidelity-seqs", type=int, default=128, help="held-out sequences scored for fidelity")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "traffic.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    up0 = uptime()
    wire = Wire(hidden_size=args.hidden_size)
    results = []
    for name in args.models:
        tm = time.time()
        results.append(run_model(name, args, wire))
        results[-1]["wall_s"] = round(time.time() - tm, 1)
        print(f"{name}: {results[-1]['wall_s']} s", flush=True)
    res = {"benchmark": "traffic", "command": "python " + " ".join(["benchmarks/bench_traffic.py"] + sys.argv[1:]),
           "machine": f"{platform.machine()}, CPU, counts only (no network)", **results[0],
           "other_models": results[1:]}
    head_ep = 16 if 16 in args.ep_sizes else max(args.ep_sizes)
    res["headline"] = {f"traffic_ep{head_ep}_s2": [
        {k: r[k] for k in ("model", "ep", "S", "rule", "threshold", "bytes_saving", "kl", "top1", "dominates",
                           "dominates_significant", "fewer_bytes_same_kl")}
        for m in results for r in m["summary"] if r["ep"] == head_ep and r["S"] == 2]}
    res["wall_s"] = round(time.time() - t0, 1)
    res["uptime_before"], res["uptime_after"] = up0, uptime()
    for m in results:
        print(f"\n== {m['model_name']} ({m['num_experts']} experts top-{m['top_k']})")
        print_table(m)
        print("\nper arm (DeepEP HT dispatch per MoE layer per decode step; KL / top-1 vs unmodified, decode batches "
              f"of {args.local_batch}; error-aware gain threshold {args.ea_threshold}):")
        print_summary(m["summary"], {e for e in args.ep_sizes if e <= m["num_experts"]})
    Path(args.out).write_text(json.dumps(res, indent=1))
    png = Path(args.out).with_suffix(".png")
    plot(results, png)
    print(f"\nwrote {args.out}, {', '.join(m['traces'] for m in results)} and {png.name} in {res['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
