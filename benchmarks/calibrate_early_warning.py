"""Calibrate the early-warning policy's mechanism thresholds on clean runs, by replay (issue 16).

The lead-time study (``benchmarks/early_warning.py --study DIR``) runs the early-warning policy in
audit mode, so every run's recorded signals (``telemetry.jsonl``) do not depend on the policy's
thresholds. This script re-evaluates other thresholds over those recordings, without training:

1. **Calibrate** on the *tuning* seeds' clean runs (at the study's learning rate and at 3x it):
   for every leaf ``{signal, op, value}`` of a mechanism rule, the most extreme value the signal
   took in any of those runs, ``M``; the calibrated threshold is ``max(value, M + h |M|)`` for
   ``>`` and ``min(value, M - h |M|)`` for ``<`` (``h``: ``--headroom``, default 0.1). So no
   calibrated rule holds on any clean tuning run, and thresholds only move away from the shipped
   ones (never toward more alarms). Left as shipped: the loss-only and non-finite rules, leaves
   on p-values (signals ``*.p`` and ``*_p``), and every leaf under an ``all`` or a ``not``
   (a leaf's own extreme says nothing about a conjunction, such as the trend rules' slope *and*
   p-value, and under ``not`` the direction is reversed); such rules are reported as kept.
2. **Evaluate** the calibrated policy on every run of the study, with the study's lead-time
   measures (``early_warning.lead_row``): tuning seeds and held-out seeds reported separately.

Usage::

    python benchmarks/calibrate_early_warning.py benchmarks/results/early-warning --tune-seeds 0,1
    python benchmarks/calibrate_early_warning.py STUDY [STUDY ...] --tune-seeds 0,1,2 --headroom 0.25

With several study directories (other seeds, other models), the clean runs of the tuning seeds
of every one of them are pooled, and the outputs go to the first (or ``--out``). Writes
``early-warning-calibrated.yaml`` (the calibrated policy, loadable by ``Guard``) and
``calibrated.md`` / ``calibrated.json`` (thresholds, then the lead-time tables of the tuning and
the held-out seeds of each study).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path
from typing import Iterator

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import early_warning as ew  # noqa: E402 - benchmarks/early_warning.py

from lbw_policy.policy import load_policy, resolve_policy_path  # noqa: E402

def is_p_value(signal: str) -> bool:
    """A significance level (``gtrend.p``, ``upd.trend_p``): left as shipped, not a magnitude."""
    return signal.endswith(".p") or signal.endswith("_p")


def calibratable_leaves(node: dict) -> Iterator[dict]:
    """The leaves of a condition reached through ``any`` nodes only (the root included): those
    whose own threshold decides whether the rule holds. Leaves under ``all`` or ``not`` are not
    yielded."""
    if "any" in node:
        for child in node["any"]:
            yield from calibratable_leaves(child)
    elif "all" not in node and "not" not in node:
        yield node


def clean_extremes(runs: list, signals: set) -> dict:
    """``{signal: (min, max)}`` over every step of ``runs``' telemetry (finite values)."""
    ext: dict = {}
    for result in runs:
        for row in ew.read_telemetry(Path(result["run_dir"]) / "telemetry.jsonl"):
            for name, value in row["signals"].items():
                if name in signals and isinstance(value, (int, float)) and math.isfinite(value):
                    lo, hi = ext.get(name, (math.inf, -math.inf))
                    ext[name] = (min(lo, value), max(hi, value))
    return ext


def calibrate(policy_text: str, policy, clean: list, headroom: float) -> tuple:
    """The calibrated policy's YAML text and the table of changed thresholds."""
    doc = yaml.safe_load(policy_text)
    of_rule = ew._rule_detectors(policy)
    mechanism = {r.name for r in policy.rules if ew._kind(policy, of_rule[r.name]) == "mechanism"}
    signals = {leaf["signal"] for rule in doc["rules"] if rule["name"] in mechanism
               for leaf in ew._leaves(rule["when"])}
    ext = clean_extremes(clean, signals)
    table = []
    for rule in doc["rules"]:
        if rule["name"] not in mechanism:
            continue
        free = {id(leaf) for leaf in calibratable_leaves(rule["when"])}
        for leaf in ew._leaves(rule["when"]):
            sig, op, value = leaf["signal"], leaf["op"], float(leaf["value"])
            if (id(leaf) not in free or is_p_value(sig) or sig not in ext
                    or op not in (">", ">=", "<", "<=")):
                table.append({"rule": rule["name"], "signal": sig, "op": op, "shipped": value,
                              "clean": None, "calibrated": value})
                continue
            lo, hi = ext[sig]
            if op in (">", ">="):
                new = max(value, hi + headroom * abs(hi))
                seen = hi
            else:
                new = min(value, lo - headroom * abs(lo))
                seen = lo
            new = float(f"{new:.4g}")
            leaf["value"] = new
            table.append({"rule": rule["name"], "signal": sig, "op": op, "shipped": value,
                          "clean": seen, "calibrated": new})
    doc["metadata"]["name"] = doc["metadata"]["name"] + "-calibrated"
    doc["metadata"]["description"] = (
        doc["metadata"]["description"] + " Mechanism thresholds calibrated on clean runs by "
        "benchmarks/calibrate_early_warning.py.")
    return yaml.safe_dump(doc, sort_keys=False, width=100), table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, nargs="+",
                        help="lead-time study directories; their tuning seeds' clean runs are pooled")
    parser.add_argument("--tune-seeds", default="0,1", help="seeds to calibrate on (default 0,1)")
    parser.add_argument("--headroom", type=float, default=0.1,
                        help="relative headroom beyond the clean extreme (default 0.1)")
    parser.add_argument("--policy", default="early-warning", help="the policy to calibrate")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the first study)")
    args = parser.parse_args(argv)
    studies = []
    for study in args.study:
        if not (study / "config.json").is_file() or not (study / "results.jsonl").is_file():
            parser.error(f"{study}: not a lead-time study (no config.json and results.jsonl; "
                         "run benchmarks/early_warning.py --study first)")
        studies.append((study, json.loads((study / "config.json").read_text()),
                        [json.loads(line) for line in (study / "results.jsonl").read_text().splitlines()]))
    tune = {int(s) for s in args.tune_seeds.split(",") if s}
    if not tune:
        parser.error("--tune-seeds is empty: name the seeds whose clean runs to calibrate on")
    seen = {int(s) for _, config, _ in studies for s in config["seeds"]}
    if not tune <= seen:
        parser.error(f"--tune-seeds {sorted(tune - seen)} in no study's seeds ({sorted(seen)})")
    path = resolve_policy_path(args.policy)
    policy = load_policy(path)
    clean = [r for _, _, results in studies for r in results if r["fault"] == "none" and r["seed"] in tune]
    text, table = calibrate(Path(path).read_text(encoding="utf-8"), policy, clean, args.headroom)
    out = args.out or args.study[0]
    out.mkdir(parents=True, exist_ok=True)
    out_policy = out / "early-warning-calibrated.yaml"
    out_policy.write_text("# Written by benchmarks/calibrate_early_warning.py: the early-warning "
                          "policy with its mechanism\n# thresholds calibrated on clean runs "
                          f"(tuning seeds {sorted(tune)} of {', '.join(str(s) for s in args.study)}, "
                          f"headroom {args.headroom}).\n" + text, encoding="utf-8")
    calibrated = load_policy(out_policy)
    report = {"thresholds": table, "tune_seeds": sorted(tune), "headroom": args.headroom,
              "studies": [str(s) for s in args.study], "clean_runs": len(clean)}
    md = [f"Calibrated on {len(clean)} clean runs (seeds {sorted(tune)} of "
          f"{', '.join(f'`{s}`' for s in args.study)}, at each study's learning rate and 3x it), "
          f"headroom {args.headroom}: `{out_policy}`. Kept: leaves under `all` / `not`, p-values.", "",
          "| rule | signal | shipped | clean extreme | calibrated |", "|---|---|---|---|---|"]
    for t in table:
        clean_v = "-" if t["clean"] is None else f"{t['clean']:.4g}"
        md.append(f"| {t['rule']} | `{t['signal']}` {t['op']} | {t['shipped']:g} | {clean_v} | "
                  f"{t['calibrated']:g} |")
    for study, config, results in studies:
        margin = config.get("margin", 0.3)
        for title, seeds in (("Tuning seeds", tune & set(config["seeds"])),
                             ("Held-out seeds", set(config["seeds"]) - tune)):
            if not seeds:
                continue
            rows = [ew.lead_row(r, margin, calibrated) for r in results if r["seed"] in seeds]
            summary = ew.summarise(rows)
            report.setdefault(str(study), {})[title] = {"summary": summary, "runs": rows}
            md += ["", f"## {title} {sorted(seeds)}: `{study}`", "",
                   ew.study_markdown(rows, summary, {**config, "seeds": sorted(seeds)})]
    (out / "calibrated.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "calibrated.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
