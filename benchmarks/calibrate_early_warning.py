"""Calibrate the early-warning policy's mechanism thresholds on clean runs, by replay (issue 16).

The lead-time study (``benchmarks/early_warning.py --study DIR``) runs the early-warning policy in
audit mode, so every run's recorded signals (``telemetry.jsonl``) do not depend on the policy's
thresholds. This script re-evaluates other thresholds over those recordings, without training:

1. **Calibrate** on the *tuning* seeds' clean runs (at the study's learning rate and at 3x it):
   for every leaf ``{signal, op, value}`` of a mechanism rule, the most extreme value the signal
   took in any of those runs, ``M``; the calibrated threshold is ``max(value, M + h |M|)`` for
   ``>`` and ``min(value, M - h |M|)`` for ``<`` (``h``: ``--headroom``, default 0.1). So no
   mechanism rule holds on any clean tuning run, and thresholds only move away from the shipped
   ones (never toward more alarms). Leaves on p-values (``gtrend.p``) and the loss-only and
   non-finite rules are left as shipped.
2. **Evaluate** the calibrated policy on every run of the study, with the study's lead-time
   measures (``early_warning.lead_row``): tuning seeds and held-out seeds reported separately.

Usage::

    python benchmarks/calibrate_early_warning.py benchmarks/results/early-warning --tune-seeds 0,1

Writes ``DIR/early-warning-calibrated.yaml`` (the calibrated policy, loadable by ``Guard``) and
``DIR/calibrated.md`` / ``calibrated.json`` (thresholds, then the lead-time tables of the tuning
and the held-out seeds).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import early_warning as ew  # noqa: E402 - benchmarks/early_warning.py

from lbw_policy.policy import load_policy, resolve_policy_path  # noqa: E402

#: leaves left as shipped: statistical significance levels, not magnitudes
KEEP_SIGNALS = ("gtrend.p",)


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
        for leaf in ew._leaves(rule["when"]):
            sig, op, value = leaf["signal"], leaf["op"], float(leaf["value"])
            if sig in KEEP_SIGNALS or sig not in ext or op not in (">", ">=", "<", "<="):
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
    parser.add_argument("study", type=Path, help="the lead-time study's directory")
    parser.add_argument("--tune-seeds", default="0,1", help="seeds to calibrate on (default 0,1)")
    parser.add_argument("--headroom", type=float, default=0.1,
                        help="relative headroom beyond the clean extreme (default 0.1)")
    parser.add_argument("--policy", default="early-warning", help="the policy to calibrate")
    args = parser.parse_args(argv)
    config = json.loads((args.study / "config.json").read_text())
    results = [json.loads(line) for line in (args.study / "results.jsonl").read_text().splitlines()]
    tune = {int(s) for s in args.tune_seeds.split(",") if s}
    if not tune <= set(config["seeds"]):
        parser.error(f"--tune-seeds {sorted(tune)} not all in the study's seeds {config['seeds']}")
    path = resolve_policy_path(args.policy)
    policy = load_policy(path)
    clean = [r for r in results if r["fault"] == "none" and r["seed"] in tune]
    text, table = calibrate(Path(path).read_text(encoding="utf-8"), policy, clean, args.headroom)
    out_policy = args.study / "early-warning-calibrated.yaml"
    out_policy.write_text("# Written by benchmarks/calibrate_early_warning.py: the early-warning "
                          "policy with its mechanism\n# thresholds calibrated on clean runs "
                          f"(tuning seeds {sorted(tune)}, headroom {args.headroom}).\n" + text,
                          encoding="utf-8")
    calibrated = load_policy(out_policy)
    margin = config.get("margin", 0.3)
    report = {"thresholds": table, "tune_seeds": sorted(tune), "headroom": args.headroom}
    md = [f"Calibrated on the clean runs of seeds {sorted(tune)} (lr {config['lr']:g} and "
          f"{3 * config['lr']:g}), headroom {args.headroom}: `{out_policy}`.", "",
          "| rule | signal | shipped | clean extreme | calibrated |", "|---|---|---|---|---|"]
    for t in table:
        clean_v = "-" if t["clean"] is None else f"{t['clean']:.4g}"
        md.append(f"| {t['rule']} | `{t['signal']}` {t['op']} | {t['shipped']:g} | {clean_v} | "
                  f"{t['calibrated']:g} |")
    for title, seeds in (("Tuning seeds", tune), ("Held-out seeds", set(config["seeds"]) - tune)):
        rows = [ew.lead_row(r, margin, calibrated) for r in results if r["seed"] in seeds]
        summary = ew.summarise(rows)
        report[title] = {"summary": summary, "runs": rows}
        md += ["", f"## {title} {sorted(seeds)}", "", ew.study_markdown(rows, summary, {**config, "seeds": sorted(seeds)})]
    (args.study / "calibrated.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.study / "calibrated.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
