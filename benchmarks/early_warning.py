"""When did each detector warn, and when did the loss go bad? Read a run's telemetry and policy.

Usage::

    lbw-policy run --policy early-warning --data ../shared/data/tinyshakespeare.txt --lr 1e-1 --out runs/ew
    python benchmarks/early_warning.py runs/ew [--margin 0.3] [--format markdown|json]

Reads ``<run>/telemetry.jsonl`` (per-step loss and the signals computed that step),
``<run>/policy.yaml`` (the policy the run used, copied there by the guard) and
``<run>/decisions.jsonl`` (the rules' ``fired`` records). Reports:

- the **loss event**: the first step ``t`` at which ``loss_t > min_{s <= t} loss_s + margin``
  (default margin 0.3 nats), i.e. the loss first exceeded its running minimum by ``margin``;
- for each condition leaf of each rule (``signal op value``): the first step at which a value
  computed that step satisfied it;
- for each rule: the first step its whole condition held (signals carried forward between due
  steps, as the engine sees them) and the step of its first ``fired`` record;
- ``lead``: loss-event step minus crossing step (positive: the warning came first).

NaN values never satisfy a leaf (as in the engine).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

from lbw_policy.engine import evaluate_condition
from lbw_policy.policy import load_policy
from lbw_policy.telemetry_log import read_telemetry as _read_telemetry

def read_telemetry(path: Path) -> list[dict]:
    """The per-step rows of ``telemetry.jsonl`` (:func:`lbw_policy.telemetry_log.read_telemetry`:
    non-finite numbers back as floats, a torn last line skipped)."""
    return _read_telemetry(path)[0]


def loss_event(rows: list[dict], margin: float) -> Optional[int]:
    """First step whose loss exceeds the running minimum (this step included) by ``margin``."""
    best = math.inf
    for row in rows:
        loss = row["loss"]
        if not isinstance(loss, (int, float)) or math.isnan(loss):
            continue
        best = min(best, loss)
        if loss > best + margin:
            return row["step"]
    return None


def _leaves(node: dict) -> Iterator[dict]:
    for key in ("all", "any"):
        if key in node:
            for child in node[key]:
                yield from _leaves(child)
            return
    if "not" in node:
        yield from _leaves(node["not"])
        return
    yield node


def analyse(run: Path, margin: float = 0.3) -> dict:
    """The report for one run directory, as plain data."""
    policy = load_policy(run / "policy.yaml")
    rows = read_telemetry(run / "telemetry.jsonl")
    event = loss_event(rows, margin)
    fired: dict = {}
    log = run / "decisions.jsonl"
    if log.exists():
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("event") == "fired" and rec.get("rule") not in fired:
                fired[rec["rule"]] = rec["step"]
    leaves, rules = [], []
    latest: dict = {}
    first_held = {}
    for row in rows:
        latest.update(row["signals"])
        for rule in policy.rules:
            if rule.name not in first_held and evaluate_condition(rule.when, latest):
                first_held[rule.name] = row["step"]
    lead = (lambda s: None if s is None or event is None else event - s)  # noqa: E731
    for rule in policy.rules:
        for leaf in _leaves(rule.when):
            step = next((r["step"] for r in rows if leaf["signal"] in r["signals"]
                         and evaluate_condition(leaf, r["signals"])), None)
            leaves.append({"rule": rule.name, "signal": leaf["signal"], "op": leaf["op"], "value": leaf["value"],
                           "first_step": step, "lead": lead(step)})
        step = first_held.get(rule.name)
        rules.append({"rule": rule.name, "first_held": step, "first_fired": fired.get(rule.name),
                      "lead": lead(step)})
    return {"run": str(run), "policy": policy.name, "steps": len(rows), "margin": margin,
            "loss_event": event,
            "loss_at_event": next((r["loss"] for r in rows if r["step"] == event), None),
            "leaves": leaves, "rules": rules}


def _cell(v: Any) -> str:
    return "never" if v is None else f"{v:+d}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


def to_markdown(report: dict) -> str:
    ev = report["loss_event"]
    out = [f"Run `{report['run']}` ({report['steps']} steps, policy `{report['policy']}`). "
           f"Loss first exceeded its running minimum by {report['margin']} nats at step "
           f"**{'never' if ev is None else ev}**.", "",
           "| detector signal | threshold | first crossed (step) | lead (steps) |",
           "|---|---|---|---|"]
    for leaf in report["leaves"]:
        step = leaf["first_step"]
        out.append(f"| `{leaf['signal']}` | {leaf['op']} {leaf['value']:g} | "
                   f"{'never' if step is None else step} | {'' if leaf['lead'] is None else _cell(leaf['lead'])} |")
    out += ["", "| rule | condition first held (step) | first fired record (step) | lead (steps) |",
            "|---|---|---|---|"]
    for rule in report["rules"]:
        held, fired = rule["first_held"], rule["first_fired"]
        out.append(f"| {rule['rule']} | {'never' if held is None else held} | "
                   f"{'never' if fired is None else fired} | {'' if rule['lead'] is None else _cell(rule['lead'])} |")
    return "\n".join(out)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (with telemetry.jsonl)")
    parser.add_argument("--margin", type=float, default=0.3, help="nats above the running minimum (default 0.3)")
    parser.add_argument("--format", choices=("markdown", "json"), default="markdown")
    args = parser.parse_args(argv)
    reports = [analyse(run, args.margin) for run in args.runs]
    if args.format == "json":
        print(json.dumps(reports, indent=2))
    else:
        print("\n\n".join(to_markdown(r) for r in reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
