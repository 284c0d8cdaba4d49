"""Tables and plots for the stress benchmark (``benchmarks/stress.py``), from ``results.jsonl``.

``write_report(out_dir)`` writes ``out_dir/report.md``, ``out_dir/loss_vs_lr.png`` and
``out_dir/timeline.png`` and returns the markdown. Every number is computed from the runs in
``results.jsonl``: losses are final validation losses in nats, averaged over seeds.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

METHOD_ORDER = ("adamw", "clip", "zclip", "spam", "stablespam", "lbwguard", "lbw", "lbw-guard-eval",
                "lbw-audit")
PEERS = ("adamw", "clip", "zclip", "spam", "stablespam", "lbwguard")


def load_results(out: Path) -> list:
    rows = []
    for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _loss(v, ln_v):
    """A diverged run (no finite loss) counts as ln V, the loss of a uniform prediction."""
    return ln_v if v is None else v


def summarize(rows: list) -> dict:
    """Per-(method, lr, fault) means over seeds, LR sensitivity per method, goal checks."""
    ln_v = math.log(rows[0]["vocab_size"])
    cell = defaultdict(list)
    for r in rows:
        cell[(r["method"], r["lr"], r["fault"])].append(r)
    means = {k: _mean([_loss(r["final_val_loss"], ln_v) for r in v]) for k, v in cell.items()}
    methods = [m for m in METHOD_ORDER if any(k[0] == m for k in cell)]
    grid_lrs = sorted({k[1] for k in cell if k[2] == "none"})
    # LR sensitivity (Wortsman et al., arXiv 2309.14322): E_lr[min(loss, ln V)] minus the
    # method's own best loss over the grid; "sensitivity_global" subtracts the best loss of any
    # method instead (the variant this report used before issue 15).
    grid = {(m, lr): means[(m, lr, "none")] for m in methods for lr in grid_lrs if (m, lr, "none") in means}
    best = min(grid.values())
    complete = [m for m in methods if all((m, lr) in grid for lr in grid_lrs)]
    mean = {m: statistics.fmean(min(grid[(m, lr)], ln_v) for lr in grid_lrs) for m in complete}
    own = {m: min(min(grid[(m, lr)], ln_v) for lr in grid_lrs) for m in complete}
    sensitivity = {m: mean[m] - own[m] for m in complete}
    return {"ln_v": ln_v, "means": means, "methods": methods, "lrs": grid_lrs, "best": best,
            "sensitivity": sensitivity, "sensitivity_global": {m: mean[m] - best for m in complete},
            "cells": cell}


def _fmt(x, nd=3):
    return "n/a" if x is None else f"{x:.{nd}f}"


def write_report(out: Path) -> str:
    out = Path(out)
    rows = load_results(out)
    s = summarize(rows)
    means, methods, lrs, cells = s["means"], s["methods"], s["lrs"], s["cells"]
    lines = [f"Corpus `{Path(rows[0]['data']).name}` (V = {rows[0]['vocab_size']}, ln V = {s['ln_v']:.3f}), "
             f"{rows[0]['steps']} steps, {len({r['seed'] for r in rows})} seeds; "
             f"final validation loss in nats, mean over seeds (diverged runs count as ln V).", ""]
    lines += ["| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | LR sensitivity |",
              "|---" * (len(lrs) + 2) + "|"]
    for m in methods:
        vals = []
        for lr in lrs:
            rs = cells.get((m, lr, "none"), [])
            div = sum(r["diverged"] for r in rs)
            v = _fmt(means.get((m, lr, "none")))
            vals.append(v + (f" ({div} div.)" if div else ""))
        lines.append(f"| {m} | " + " | ".join(vals) + f" | {_fmt(s['sensitivity'].get(m))} |")
    faults = sorted({r["fault"] for r in rows if r["fault"] != "none"})
    if faults:
        fault_lr = next(r["lr"] for r in rows if r["fault"] != "none")
        lines += ["", f"Faults at lr {fault_lr:g} from step 100 (final validation loss; spikes; first governance action step):", "",
                  "| method | clean | " + " | ".join(faults) + " |", "|---" * (len(faults) + 2) + "|"]
        for m in methods:
            row = [f"{_fmt(means.get((m, fault_lr, 'none')))}"]
            for f in faults:
                rs = cells.get((m, fault_lr, f), [])
                spikes = _mean([r["spikes"] for r in rs])
                acts = [r["first_action_step"] for r in rs if r["first_action_step"] is not None]
                halts = [r["halted_step"] for r in rs if r.get("halted_step") is not None]
                row.append(f"{_fmt(means.get((m, fault_lr, f)))}; {_fmt(spikes, 1)} spikes"
                           + (f"; action at {min(acts)}" if acts else "")
                           + (f"; halted at {'/'.join(map(str, halts))}" if halts else ""))
            lines.append(f"| {m} | " + " | ".join(row) + " |")
    speed = defaultdict(list)
    for r in rows:
        if r.get("steps_per_second") is not None:   # None: a run halted at its first step
            speed[r["method"]].append(r["steps_per_second"])
    lines += ["", "Steps per second, mean over every run of the method (runs shared the machine; the "
              "overhead benchmark measures the ratio properly): " +
              ", ".join(f"{m} {statistics.fmean(speed[m]):.1f}" for m in methods if speed[m])]
    policy = next((r.get("policy", "default") for r in rows if r["method"] == "lbw"), "default")
    lines += ["", f"Goals (lbw with policy `{policy}`, means over seeds):", ""] + [f"- {g}" for g in goal_checks(s, rows)]
    plot_loss_vs_lr(s, out / "loss_vs_lr.png")
    stressed = [r for r in rows if r["method"] == "lbw" and r["fault"] == "lr30" and r["seed"] == 0 and r["run_dir"]]
    if stressed:
        plot_timeline(stressed[0], rows, out / "timeline.png")
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text, encoding="utf-8")
    return text


def goal_checks(s: dict, rows: list) -> list:
    means, sens = s["means"], s["sensitivity"]
    out = []
    if "lbw" in sens and "adamw" in sens:
        peers = {m: v for m, v in sens.items() if m in PEERS}
        ok = sens["lbw"] <= 0.5 * sens["adamw"] and all(sens["lbw"] < v for v in peers.values())
        out.append(f"{'MET' if ok else 'NOT MET'}: LR sensitivity {sens['lbw']:.3f} vs AdamW {sens['adamw']:.3f} "
                   f"(goal <= {0.5 * sens['adamw']:.3f}) and below every peer "
                   f"({', '.join(f'{m} {v:.3f}' for m, v in peers.items())})")
    fault_rows = [r for r in rows if r["fault"] != "none"]
    if fault_rows:
        lr = fault_rows[0]["lr"]
        a, l = means.get(("adamw", lr, "none")), means.get(("lbw", lr, "none"))
        if a is not None and l is not None:
            out.append(f"{'MET' if l - a <= 0.02 else 'NOT MET'}: no harm at lr {lr:g}: lbw {l:.3f} vs AdamW {a:.3f} "
                       f"({l - a:+.3f}, goal <= +0.02)")
        for f in sorted({r["fault"] for r in fault_rows}):
            lf, af = means.get(("lbw", lr, f)), means.get(("adamw", lr, f))
            if None in (lf, af, l):
                continue
            ok = lf - l <= 0.05 and lf < af
            out.append(f"{'MET' if ok else 'NOT MET'}: fault {f}: lbw {lf:.3f} vs its clean {l:.3f} "
                       f"({lf - l:+.3f}, goal <= +0.05), AdamW under the fault {af:.3f}")
    audit = [(r, next((q for q in rows if q["key"] == r["key"].replace("lbw-audit", "adamw", 1)), None))
             for r in rows if r["method"] == "lbw-audit"]
    diffs = [abs((r["final_val_loss"] or 0) - (q["final_val_loss"] or 0)) for r, q in audit if q]
    if diffs:
        out.append(f"{'MET' if max(diffs) == 0 else 'NOT MET'}: audit mode equals plain AdamW: "
                   f"max |difference| of final loss over {len(diffs)} paired runs = {max(diffs):.3g}")
    return out


def plot_loss_vs_lr(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in s["methods"]:
        xs = [lr for lr in s["lrs"] if (m, lr, "none") in s["means"]]
        ax.plot(xs, [s["means"][(m, lr, "none")] for lr in xs], marker="o",
                linestyle="--" if m == "lbw-audit" else "-", label=m, linewidth=2.2 if m == "lbw" else 1.2)
    ax.axhline(s["ln_v"], color="grey", linewidth=0.8, linestyle=":", label="ln V")
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss (nats)")
    ax.set_title("Final loss vs learning rate (mean over seeds)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_timeline(run: dict, rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = next((r for r in rows if r["key"] == run["key"].replace("lbw", "adamw", 1)), None)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    steps = range(len(run["losses"]))
    if ref:
        ref_steps = range(len(ref["losses"]))   # a halted run is shorter than its reference
        ax1.plot(ref_steps, [v if v is not None else float("nan") for v in ref["losses"]], color="grey",
                 linewidth=0.8, label="AdamW, same fault")
        ax2.plot(ref_steps, ref["lrs"], color="grey", linewidth=0.8, label="AdamW")
    ax1.plot(steps, [v if v is not None else float("nan") for v in run["losses"]], color="C0", linewidth=1,
             label=f"lbw-policy ({Path(run.get('policy', 'default')).stem})")
    ax2.plot(steps, run["lrs"], color="C0", label="lbw-policy effective LR")
    log = Path(run["run_dir"]) / "decisions.jsonl"
    if log.exists():
        for line in log.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            if r["event"] in ("fired", "action"):
                ax1.axvline(r["step"], color="C3", alpha=0.25, linewidth=0.8)
    ax1.axvspan(100, 130, color="orange", alpha=0.12, label="fault: LR x30")
    ax1.set_ylabel("train loss (nats)")
    ax1.legend(fontsize=8)
    ax1.set_title(f"lr {run['lr']:g}, seed {run['seed']}: red lines mark policy actions")
    ax2.set_yscale("log")
    ax2.set_ylabel("learning rate")
    ax2.set_xlabel("step")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
