"""When did each detector warn, and when did the loss go bad? Read a run's telemetry and policy;
or run the lead-time study under slow-onset faults (``--study``).

Usage::

    lbw-policy run --policy early-warning --data ../shared/data/tinyshakespeare.txt --lr 1e-1 --out runs/ew
    python benchmarks/early_warning.py runs/ew [--margin 0.3] [--format markdown|json]

    # the lead-time study (issue 16): faults x onset rates x seeds, and clean runs at --lr and 3x
    python benchmarks/early_warning.py --study benchmarks/results/early-warning \
        --data ../shared/data/tinyshakespeare.txt [--faults lr-ramp,attn-lowp,wd-grow,combo] \
        [--rates 1.02,1.03,1.05] [--seeds 0,1,2] [--lr 3e-3] [--fault-start 100] [--steps 300] \
        [--policy early-warning] [--jobs 2] [--cell NAME]   # --cell: a generalization-matrix cell
    python benchmarks/early_warning.py --study DIR --tiny      # a seconds-long smoke run (tests)
    python benchmarks/early_warning.py --report DIR            # a study's tables again, from lead_times.json
    # enforce against audit: final losses per fault of studies of the same grid (the first: audit)
    python benchmarks/early_warning.py --compare AUDIT_DIR ENFORCE_DIR [ENFORCE_DIR ...]

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

**The study** (:func:`study`) trains the stress benchmark's demo GPT (``benchmarks/stress.py``,
method ``lbw``: AdamW under ``--policy``, by default ``early-warning``, which is in audit mode:
every rule's firing is logged, nothing changes) once per slow-onset fault (``stress.py``:
"Slow-onset faults", from ``--fault-start`` growing at each ``--rates`` factor a step) and seed,
and clean at ``--lr`` (the best AdamW learning rate of the stress grid, 3e-3 on tinyshakespeare)
and at 3x it. Per run, per detector (the rules whose signals all come from that detector id):

- ``warning``: the first ``fired`` record of any of its rules at or after the fault's first
  step (a record before it is counted in ``pre_fault``, a false alarm);
- ``loss_event``: as above (running minimum + ``--margin``), at or after the fault's first step
  (the minimum runs from step 0; a one-batch spike during warm-up is not the fault's event);
- ``divergence``: at or after the fault's first step, the first step whose loss is non-finite,
  or the first of ``DIVERGE_STEPS`` (5) consecutive steps above ``max(ln V, loss at step 0)``
  (worse than the untrained model), if any;
- ``lead = loss_event - warning`` (steps; positive: the warning came first).

A detector of type ``loss_spike``, ``grad_norm`` or ``grad_norm_trend`` is *loss-only*, ``nonfinite`` is neither;
every other is a *mechanism* detector. Per run: the first mechanism warning, its lead, and whether
it came before the first loss-only warning. Per cell (fault and onset rate), over the seeds whose
loss event came (a cell where none did has no verdict), the goals of issue 16, which it states as
means over seeds: each such seed warned by a mechanism rule before any loss-only one, and their
mean lead >= 50 steps (``goal_met``); the stricter reading, each of them >= 50
(``goal_met_every_seed``); and the ``lead_ceiling``, the mean of ``loss_event - fault_start``
over them: the largest mean lead any warning at or after the fault's first step could have
(below 50, no detector can meet the goal in that cell). On clean runs no mechanism rule may fire.
Outputs in the study directory: ``config.json``, ``results.jsonl`` (the stress harness' raw
runs; an interrupted study resumes, and a study under other settings than the directory's runs
is refused: a run's key holds neither the policy nor the shape), ``runs/`` (each run's decision
log, telemetry and policy; git-ignored in ``benchmarks/results``), ``lead_times.json``,
``lead_times.md`` and ``lead_times.png`` (lead per detector; and lead against onset rate when
several are given; not written for a study of clean runs only, ``--faults ''``).
``--report DIR`` rewrites the last three from ``lead_times.json``'s per-run records, without
training or telemetry.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

from lbw_policy.engine import evaluate_condition
from lbw_policy.errors import PolicyError
from lbw_policy.policy import load_policy, resolve_policy_path
from lbw_policy.telemetry_log import read_telemetry as _read_telemetry

def read_telemetry(path: Path) -> list[dict]:
    """The per-step rows of ``telemetry.jsonl`` (:func:`lbw_policy.telemetry_log.read_telemetry`:
    non-finite numbers back as floats, a torn last line skipped)."""
    return _read_telemetry(path)[0]


def loss_event(rows: list[dict], margin: float, start: int = 0) -> Optional[int]:
    """First step ``>= start`` whose loss exceeds the running minimum (from step 0, this step
    included) by ``margin``."""
    best = math.inf
    for row in rows:
        loss = row["loss"]
        if not isinstance(loss, (int, float)) or math.isnan(loss):
            continue
        best = min(best, loss)
        if loss > best + margin and row["step"] >= start:
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


def analyse(run: Path, margin: float = 0.3, start: int = 0, policy: Any = None) -> dict:
    """The report for one run directory, as plain data (loss events from step ``start``;
    ``policy``: evaluate another policy's rules than the run's own ``policy.yaml``)."""
    policy = policy or load_policy(run / "policy.yaml")
    rows = read_telemetry(run / "telemetry.jsonl")
    event = loss_event(rows, margin, start)
    fired = {rule: steps[0] for rule, steps in _fired(run).items()}
    leaves, rules = [], []
    first_held = {rule: steps[0] for rule, steps in held_steps(policy, rows).items()}
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


# ------------------------------------------------------------------------------ the lead-time study

#: Detector types that only watch the loss (issue 16: the mechanism warnings must precede them).
LOSS_ONLY = ("loss_spike", "grad_norm", "grad_norm_trend")
#: Detector types that are neither (a non-finite value is a fault of its own).
NEUTRAL = ("nonfinite",)
#: The ``--tiny`` study: a 1-layer d=32 model, 60 steps, one seed, one fast onset rate.
TINY = dict(steps=60, fault_start=20, rates="1.15", seeds="0", n_layer=1, n_head=2, n_embd=32,
            block_size=16, batch_size=8, warmup_steps=5, eval_batches=2, jobs=1)


#: issue 16's lead-time goal (steps between the first mechanism warning and the loss event)
GOAL_LEAD = 50

#: consecutive steps above the untrained model's loss that make a divergence (one bad batch
#: does not)
DIVERGE_STEPS = 5


def divergence_step(losses: list, vocab_size: int, start: int = 0) -> Optional[int]:
    """From step ``start``: the first step whose loss is non-finite (``None`` in the stress
    harness' list), or the first of ``DIVERGE_STEPS`` consecutive steps above
    ``max(ln V, loss at step 0)`` nats (worse than the untrained model); ``None`` if none."""
    bound = math.log(vocab_size)
    if losses and losses[0] is not None and math.isfinite(losses[0]):
        bound = max(bound, losses[0])
    run = 0
    for step, loss in enumerate(losses):
        if step < start:
            continue
        if loss is None or not math.isfinite(loss):
            return step - run
        run = run + 1 if loss > bound else 0
        if run == DIVERGE_STEPS:
            return step - run + 1
    return None


def _rule_detectors(policy) -> dict:
    """``{rule name: detector id}``: the detector all of a rule's signals come from, or the ids
    joined by ``+`` when they come from several."""
    out = {}
    for rule in policy.rules:
        ids = sorted({leaf["signal"].split(".", 1)[0] for leaf in _leaves(rule.when)})
        out[rule.name] = "+".join(ids)
    return out


def _kind(policy, det: str) -> str:
    types = {policy.detectors[d].type if d in policy.detectors else "actuator" for d in det.split("+")}
    if types <= set(NEUTRAL):
        return "neutral"
    return "loss-only" if types <= set(LOSS_ONLY) else "mechanism"


def lead_row(result: dict, margin: float, policy: Any = None) -> dict:
    """The lead-time record of one stress-harness result (a run with a decision log).

    ``policy``: instead of the run's decision log, the steps where each rule of ``policy`` holds
    on the run's recorded signals (an audit-mode run's signals do not depend on its policy, so
    this is what that policy would have warned; ``benchmarks/calibrate_early_warning.py``)."""
    run = Path(result["run_dir"])
    start = result["fault_start"] if result["fault"] != "none" else 0
    if policy is None:
        policy = load_policy(run / "policy.yaml")
        fired_by_rule = _fired(run)
    else:
        fired_by_rule = held_steps(policy, read_telemetry(run / "telemetry.jsonl"))
    rep = analyse(run, margin, start, policy)
    of_rule = _rule_detectors(policy)
    detectors: dict = {}
    for rule in rep["rules"]:
        det = of_rule[rule["rule"]]
        d = detectors.setdefault(det, {"kind": _kind(policy, det), "warning": None, "pre_fault": None,
                                       "rules": []})
        fired = fired_by_rule.get(rule["rule"], [])
        pre = [t for t in fired if t < start]
        post = [t for t in fired if t >= start]
        if fired:
            d["rules"].append({"rule": rule["rule"], "first_fired": fired[0], "pre_fault": bool(pre)})
        if pre and (d["pre_fault"] is None or pre[0] < d["pre_fault"]):
            d["pre_fault"] = pre[0]
        if post and (d["warning"] is None or post[0] < d["warning"]):
            d["warning"] = post[0]
    event = rep["loss_event"]
    for d in detectors.values():
        d["lead"] = None if d["warning"] is None or event is None else event - d["warning"]

    def first(kind):
        steps = [d["warning"] for d in detectors.values() if d["kind"] == kind and d["warning"] is not None]
        return min(steps) if steps else None
    mech, loss_only = first("mechanism"), first("loss-only")
    return {"key": result["key"], "fault": result["fault"], "seed": result["seed"], "lr": result["lr"],
            "onset_rate": result["onset_rate"] if result["fault"] != "none" else None,
            "fault_start": result["fault_start"] if result["fault"] != "none" else None,
            "steps": result["steps"], "loss_event": event,
            "divergence": divergence_step(result["losses"], result["vocab_size"], start),
            "final_val_loss": result["final_val_loss"], "detectors": detectors,
            "first_mechanism": mech, "first_loss_only": loss_only,
            "mechanism_lead": None if mech is None or event is None else event - mech,
            "mechanism_before_loss_only": None if mech is None else (loss_only is None or mech < loss_only),
            # mechanism rules that fired on a clean run, or before a faulted run's fault began
            "false_alarms": sorted(r["rule"] for d in detectors.values() if d["kind"] == "mechanism"
                                   for r in d["rules"] if r["pre_fault"] or result["fault"] == "none"),
            "run_dir": str(run)}


def held_steps(policy: Any, rows: list) -> dict:
    """``{rule: [steps where its condition has held for the rule's ``for`` consecutive steps]}``
    over telemetry ``rows``, sample-and-hold (a signal keeps its value on the steps its detector
    does not run, as in the engine): the first such step is where the engine fires the rule
    (``keep_firing_for`` and ``cooldown`` only shape later firings)."""
    latest: dict = {}
    streak: dict = {}
    steps: dict = {}
    for row in rows:
        latest.update(row["signals"])
        for rule in policy.rules:
            streak[rule.name] = streak.get(rule.name, 0) + 1 if evaluate_condition(rule.when, latest) else 0
            if streak[rule.name] >= rule.for_:
                steps.setdefault(rule.name, []).append(row["step"])
    return steps


def _fired(run: Path) -> dict:
    """``{rule: [steps of its fired records, in order]}`` from ``<run>/decisions.jsonl``."""
    log = run / "decisions.jsonl"
    steps: dict = {}
    if log.exists():
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("event") == "fired":
                steps.setdefault(rec.get("rule"), []).append(rec["step"])
    return steps


def summarise(rows: list) -> dict:
    """Means over seeds per (fault, onset rate, detector), and the issue's goals per cell."""
    cells: dict = {}
    for r in rows:
        if r["fault"] == "none":
            continue
        cell = cells.setdefault((r["fault"], r["onset_rate"]), {"runs": [], "detectors": {}})
        cell["runs"].append(r)
        for det, d in r["detectors"].items():
            cell["detectors"].setdefault(det, {"kind": d["kind"], "leads": [], "warned": 0})
            cd = cell["detectors"][det]
            cd["warned"] += d["warning"] is not None
            if d["lead"] is not None:
                cd["leads"].append(d["lead"])
    out = []
    for (fault, rate), cell in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        runs = cell["runs"]
        events = [r for r in runs if r["loss_event"] is not None]   # the seeds with something to lead
        leads = [r["mechanism_lead"] for r in events if r["mechanism_lead"] is not None]
        # each seed with a loss event warned, by a mechanism rule, before any loss-only one
        warned_first = bool(events) and len(leads) == len(events) and \
            all(r["mechanism_before_loss_only"] for r in events)
        mean_lead = sum(leads) / len(leads) if leads else None
        # the largest mean lead any warning at or after the fault's first step could have
        ceiling = sum(r["loss_event"] - r["fault_start"] for r in events) / len(events) if events else None
        out.append({
            "fault": fault, "onset_rate": rate, "seeds": len(runs),
            "loss_events": len(events),
            "divergences": sum(r["divergence"] is not None for r in runs),
            "mean_mechanism_lead": mean_lead,
            "min_mechanism_lead": min(leads) if leads else None,
            "lead_ceiling": ceiling,
            "mechanism_before_loss_only": sum(bool(r["mechanism_before_loss_only"]) for r in runs),
            # issue 16 (means over seeds): the seeds whose loss left its running minimum were
            # warned by a mechanism rule before any loss-only one, on average >= 50 steps ahead of
            # that event; a cell without a loss event has nothing to lead (None), and one where
            # only some seeds have one is judged on those
            "goal_met": None if not events else warned_first and mean_lead >= GOAL_LEAD,
            # the stricter reading: every such seed >= 50 steps ahead
            "goal_met_every_seed": None if not events else warned_first and min(leads) >= GOAL_LEAD,
            "detectors": {det: {"kind": d["kind"], "warned": d["warned"],
                                "mean_lead": sum(d["leads"]) / len(d["leads"]) if d["leads"] else None}
                          for det, d in sorted(cell["detectors"].items())},
        })
    clean = [r for r in rows if r["fault"] == "none"]
    return {"cells": out, "clean": [{"lr": r["lr"], "seed": r["seed"], "false_alarms": r["false_alarms"],
                                     "loss_event": r["loss_event"], "final_val_loss": r["final_val_loss"]}
                                    for r in clean],
            "zero_false_alarms": all(not r["false_alarms"] for r in clean)}


def study_markdown(rows: list, summary: dict, config: dict) -> str:
    if not summary["cells"]:
        out = [f"False-alarm study: policy `{config['policy']}`, clean runs only at lr {config['lr']:g} and "
               f"{3 * config['lr']:g}, {config['steps']} steps, seeds {config['seeds']}. A false alarm: a "
               "mechanism rule that fired.", "",
               "No faulted runs: clean runs only (`--faults ''`), for false alarms."]
    else:
        out = [f"Lead-time study: policy `{config['policy']}`, lr {config['lr']:g} (clean also at "
               f"{3 * config['lr']:g}), {config['steps']} steps, faults from step {config['fault_start']}, "
               f"margin {config['margin']} nats. Lead = loss event - first warning (steps; positive: the "
               "warning came first). Warnings before the fault's first step are false alarms, not leads.", "",
               f"The goal (issue 16): the mean lead over the seeds with a loss event >= {GOAL_LEAD}, each of "
               "them warned by a mechanism rule before any loss-only one; `every seed`: the stricter "
               f"reading, each of those seeds >= {GOAL_LEAD}. Ceiling: the mean of (loss event - fault "
               "start) over those seeds, the largest mean lead a warning at or after the fault's first "
               f"step could have (below {GOAL_LEAD}, no detector can meet the goal in that cell).", "",
               "| fault | onset rate | seeds | loss events | divergences | mean mechanism lead | min | "
               "ceiling | mechanism before loss-only | goal (mean) | every seed |",
               "|---" * 11 + "|"]
    fmt = lambda v: "never" if v is None else f"{v:+.1f}" if isinstance(v, float) else str(v)  # noqa: E731

    def verdict(met, ceiling=None):
        if met is None:
            return "no loss event"
        if met:
            return "met"
        return f"missed (ceiling < {GOAL_LEAD})" if ceiling is not None and ceiling < GOAL_LEAD else "missed"
    for c in summary["cells"]:
        out.append(f"| {c['fault']} | {c['onset_rate']:g} | {c['seeds']} | {c['loss_events']} | {c['divergences']} | "
                   f"{fmt(c['mean_mechanism_lead'])} | {fmt(c['min_mechanism_lead'])} | "
                   f"{'-' if c['lead_ceiling'] is None else format(c['lead_ceiling'], '.1f')} | "
                   f"{c['mechanism_before_loss_only']}/{c['seeds']} | {verdict(c['goal_met'], c['lead_ceiling'])} | "
                   f"{verdict(c['goal_met_every_seed'])} |")
    dets = sorted({d for c in summary["cells"] for d in c["detectors"]})
    if dets:
        out += ["", "Mean lead per detector (steps; warned in n of the seeds):", "",
                "| fault | onset rate | " + " | ".join(f"`{d}`" for d in dets) + " |", "|---" * (len(dets) + 2) + "|"]
        for c in summary["cells"]:
            cellv = [c["detectors"].get(d) for d in dets]
            out.append(f"| {c['fault']} | {c['onset_rate']:g} | " + " | ".join(
                "" if v is None else f"{fmt(v['mean_lead'])} ({v['warned']}/{c['seeds']})" for v in cellv) + " |")
    out += ["", "Per run:", "", "| run | loss event | divergence | first mechanism warning | first loss-only | "
            "false alarms |", "|---" * 6 + "|"]
    for r in rows:
        out.append(f"| {r['key'].replace('|', ' ')} | {fmt(r['loss_event'])} | {fmt(r['divergence'])} | {fmt(r['first_mechanism'])} | "
                   f"{fmt(r['first_loss_only'])} | {', '.join(r['false_alarms']) or 'none'} |")
    out += ["", "Clean runs: " + ("no mechanism rule fired (zero false alarms)." if summary["zero_false_alarms"] else
                                 "false alarms: " + "; ".join(f"lr {c['lr']:g} seed {c['seed']}: "
                                                              f"{', '.join(c['false_alarms'])}"
                                                              for c in summary["clean"] if c["false_alarms"]))]
    return "\n".join(out)


def plot_leads(rows: list, path: Path) -> None:
    """Lead time per detector (one point per faulted run, coloured by fault); a second panel of
    the mean lead against the onset rate when the study has several rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    faulted = [r for r in rows if r["fault"] != "none"]
    if not faulted:                     # clean runs only: no lead to plot
        path.unlink(missing_ok=True)
        return
    dets = sorted({d for r in faulted for d in r["detectors"] if r["detectors"][d]["kind"] != "neutral"})
    faults = sorted({r["fault"] for r in faulted})
    rates = sorted({r["onset_rate"] for r in faulted})
    ncols = 2 if len(rates) > 1 else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 + 5 * (ncols - 1) + 0.4 * len(dets), 4.5), squeeze=False)
    ax = axes[0][0]
    for j, fault in enumerate(faults):
        for i, det in enumerate(dets):
            leads = [r["detectors"][det]["lead"] for r in faulted if r["fault"] == fault and det in r["detectors"]
                     and r["detectors"][det]["lead"] is not None]
            off = (j - (len(faults) - 1) / 2) * 0.15
            ax.scatter([i + off] * len(leads), leads, s=18, label=fault if i == 0 else None,
                       color=f"C{j}")
    ax.axhline(GOAL_LEAD, color="0.5", ls="--", lw=1, label=f"goal: mean lead {GOAL_LEAD} steps")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(dets)), dets, rotation=45, ha="right")
    ax.set_xlim(-0.5, len(dets) - 0.5)
    ax.set_ylabel("lead time (steps; > 0: warned before the loss event)")
    ax.set_title("lead time per detector")
    ax.legend(fontsize=7)
    if ncols == 2:
        ax = axes[0][1]
        for i, det in enumerate(dets):
            xs, ys = [], []
            for rate in rates:
                leads = [r["detectors"][det]["lead"] for r in faulted if r["onset_rate"] == rate
                         and det in r["detectors"] and r["detectors"][det]["lead"] is not None]
                if leads:
                    xs.append(rate)
                    ys.append(sum(leads) / len(leads))
            if xs:
                ax.plot(xs, ys, marker="o", label=det, color=f"C{i % 10}")
        ax.axhline(GOAL_LEAD, color="0.5", ls="--", lw=1, label=f"goal: mean lead {GOAL_LEAD} steps")
        ax.set_xlabel("onset rate (growth factor per step)")
        ax.set_ylabel("mean lead (steps, all faults and seeds)")
        ax.set_title("lead time against onset rate")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def study(out: Path, data: str, faults: list, rates: list, seeds: list, lr: float, policy: str = "early-warning",
          steps: int = 300, fault_start: int = 100, margin: float = 0.3, jobs: int = 2, threads: int = 1,
          **shape) -> dict:
    """Run the study (resuming from ``out/results.jsonl``) and write its reports; returns
    ``{"rows": [...], "summary": {...}}``. ``shape``: further :class:`stress.RunSpec` fields
    (``n_layer``, ``n_embd``, ``batch_size``, ...)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import stress  # benchmarks/stress.py: the training loop and the fault definitions

    bad = set(faults) - set(stress.SLOW_FAULTS) - set(stress.FAULTS)
    if bad:
        raise ValueError(f"unknown faults {sorted(bad)}; choose from {list(stress.SLOW_FAULTS + stress.FAULTS)}")
    out.mkdir(parents=True, exist_ok=True)
    common = dict(method="lbw", data=str(Path(data).resolve()), steps=steps, policy=policy,
                  fault_start=fault_start, **shape)
    specs = [stress.RunSpec(lr=lr, seed=s, fault=f, onset_rate=r, **common)
             for f in faults for r in rates for s in seeds]
    specs += [stress.RunSpec(lr=x, seed=s, **common) for x in (lr, 3 * lr) for s in seeds]
    config = {"data": common["data"], "policy": policy, "lr": lr, "steps": steps, "fault_start": fault_start,
              "faults": faults, "rates": rates, "seeds": seeds, "margin": margin, **shape}
    try:   # the policy's revision: an edited file under the same name is another study
        config["policy_revision"] = load_policy(resolve_policy_path(policy)).revision[:12]
    except (FileNotFoundError, PolicyError) as exc:
        raise ValueError(f"--policy {policy}: {exc}") from None
    _check_resume(out, config)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    results = stress._run_all(specs, out, jobs, threads, out / "results.jsonl")
    rows = [lead_row(results[s.key], margin) for s in specs]
    return write_reports(out, rows, config)


#: study settings that a study directory's runs may differ in (a resumed study may add faults,
#: onset rates and seeds; the margin only changes how the recorded runs are read)
EXTENDABLE = ("faults", "rates", "seeds", "margin")


def _check_resume(out: Path, config: dict) -> None:
    """Refuse to resume a study directory whose recorded runs were trained under other settings.

    The harness resumes from ``results.jsonl`` by run key (method, learning rate, seed, fault and
    onset), which does not hold the policy, the model's shape or ``repair_at_halt``: a study under
    another policy into the same directory would silently reuse the old runs. The policy is
    compared by name and by revision (an edited file is another study; a ``config.json`` written
    before revisions were recorded is compared by name only); the corpus by its last two path
    parts (a clone elsewhere has another absolute path; ``wikitext-2/test.txt`` is not another
    ``test.txt``).

    :raises ValueError: ``out`` holds runs (a non-empty ``results.jsonl``) and its ``config.json``
        differs from ``config`` in a setting outside :data:`EXTENDABLE`."""
    results, recorded = out / "results.jsonl", out / "config.json"
    if not (results.exists() and results.stat().st_size and recorded.exists()):
        return
    old = json.loads(recorded.read_text())
    keys = (set(old) | set(config)) - set(EXTENDABLE)
    if "policy_revision" not in old:
        keys.discard("policy_revision")
    norm = lambda c, k: "/".join(Path(c[k]).parts[-2:]) if k == "data" and c.get(k) else c.get(k)  # noqa: E731
    diff = sorted(k for k in keys if norm(old, k) != norm(config, k))
    if diff:
        what = ", ".join(f"{k}: {norm(old, k)!r} there, {norm(config, k)!r} now" for k in diff)
        raise ValueError(f"{out} holds runs of another study ({what}); they would be reused as they are: "
                         "use a new directory, or delete its results.jsonl and runs/ to rerun it")


def write_reports(out: Path, rows: list, config: dict) -> dict:
    """Summarise lead-time ``rows`` and write ``out/lead_times.json``, ``.md`` and ``.png``;
    returns ``{"rows": rows, "summary": ...}``. The study writes them after its runs, ``--report``
    again from a study's ``lead_times.json`` (after a change to the summary, without the runs'
    telemetry)."""
    summary = summarise(rows)
    md = study_markdown(rows, summary, config)      # both before any file is written
    (out / "lead_times.json").write_text(json.dumps({"config": config, "summary": summary, "runs": rows},
                                                    indent=2) + "\n")
    (out / "lead_times.md").write_text(md + "\n")
    plot_leads(rows, out / "lead_times.png")
    return {"rows": rows, "summary": summary}


def report(out: Path) -> dict:
    """Rewrite a study's reports from the per-run records of its ``lead_times.json`` (the loss
    events, warnings and leads as the study measured them; no telemetry is read).

    :raises ValueError: ``out/lead_times.json`` is missing or is not a study's report."""
    path = out / "lead_times.json"
    try:
        rep = json.loads(path.read_text())
        rows, config = rep["runs"], rep["config"]
        study_markdown(rows, summarise(rows), config)   # records of the right shape
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file (run the study first: --study {out})") from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a lead-time study's report ({type(exc).__name__}: {exc})") from None
    return write_reports(out, rows, config)


def _final_losses(study_dir: Path) -> tuple[dict, dict]:
    """``({(fault, onset rate, lr): [final val loss per seed]}, config)`` of a study directory;
    a final loss that is not finite or above ``ln V`` (worse than the untrained model: a
    divergence) counts as ``ln V``. Clean runs have fault ``"none"`` and rate ``None``. A run that
    a ``halt`` rule stopped (``halted_step``) has its validation loss at the halt; the steps are
    in ``config["halted"]``: ``{(fault, onset rate, lr): [halted step per halted seed]}``. A run
    resumed after its halt (``repair_at_halt``) has its final loss; its halt steps are in
    ``config["resumed"]``, of the same form (one halted again after its resume is a halted run,
    at that second step)."""
    results = study_dir / "results.jsonl"
    if not results.exists():
        raise ValueError(f"{results}: no such file (run the study first: --study {study_dir})")
    cells: dict = {}
    halted: dict = {}
    resumed: dict = {}
    for n, line in enumerate(results.read_text(encoding="utf-8").splitlines(), 1):
        try:
            r = json.loads(line)
            lnv = math.log(r["vocab_size"])
            v = r["final_val_loss"]
            key = (r["fault"].split("@")[0], r["onset_rate"] if r["fault"] != "none" else None, round(r["lr"], 12))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{results}:{n}: not a stress-harness result ({exc})") from None
        cells.setdefault(key, []).append(lnv if v is None or not math.isfinite(v) or v > lnv else v)
        if r.get("halted_again_step") is not None:    # resumed, then halted again: it ended there
            halted.setdefault(key, []).append(r["halted_again_step"])
        elif r.get("halted_step") is not None:
            (resumed if r.get("repair_at_halt") else halted).setdefault(key, []).append(r["halted_step"])
    try:
        config = json.loads((study_dir / "config.json").read_text())
        float(config["lr"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{study_dir / 'config.json'}: not a study's config ({exc}); the study "
                         "writes it") from None
    config["halted"] = halted
    config["resumed"] = resumed
    return cells, config


def compare(dirs: list, labels: Optional[list] = None, gap: float = 0.5, within: float = 0.1) -> str:
    """Markdown table of the mean final validation loss per fault and onset rate over studies of
    the same grid: ``dirs[0]`` is the reference (an audit-mode study: its runs are plain AdamW's),
    each other directory a policy in enforce mode. A *goal cell* is one where the reference ends
    more than ``gap`` nats above its clean run at the study's learning rate; there, issue 16 asks
    each enforced run to end within ``within`` nats of its own clean run (also shown: against
    the reference's clean run).

    :raises ValueError: a directory without results, or studies with different learning rates.
    """
    loaded = [_final_losses(Path(d)) for d in dirs]
    if labels is None:
        labels = [Path(d).name for d in dirs]
        if len(set(labels)) < len(labels):      # same directory names: tell them apart by path
            labels = [str(d) for d in dirs]
    lrs = {cfg.get("lr") for _, cfg in loaded}
    if len(lrs) != 1:
        raise ValueError(f"the studies ran at different learning rates: {sorted(map(str, lrs))}")
    lr = round(lrs.pop(), 12)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    ref = loaded[0][0]
    clean = [mean(c[("none", None, lr)]) if ("none", None, lr) in c else float("nan") for c, _ in loaded]
    head = ["run", f"{labels[0]}"] + [x for lab in labels[1:] for x in (lab, f"{lab} - own clean")]
    lines = ["| " + " | ".join(head + ["goal cell"]) + " |", "|" + "---|" * (len(head) + 1)]
    verdicts = {lab: [0, 0] for lab in labels[1:]}
    for key in sorted(k for k in ref if k[0] != "none"):
        a = mean(ref[key])
        goal = a - clean[0] > gap
        row = [f"{key[0]} at {key[1]}", f"{a:.3f} ({a - clean[0]:+.3f})"]
        for lab, (cells, cfg), c in zip(labels[1:], loaded[1:], clean[1:]):
            if key not in cells:
                row += ["-", "-"]
                continue
            v = mean(cells[key])
            ok = v - c <= within
            stops, resumes = cfg["halted"].get(key), cfg["resumed"].get(key)
            halt = f", halted at {'/'.join(map(str, stops))}" if stops else ""
            halt += f", halted at {'/'.join(map(str, resumes))} and resumed repaired" if resumes else ""
            row += [f"{v:.3f} ({v - clean[0]:+.3f}{halt})", f"{v - c:+.3f}" + (" **met**" if goal and ok else "")]
            if goal:
                verdicts[lab][0] += ok
                verdicts[lab][1] += 1
        lines.append("| " + " | ".join(row + ["yes" if goal else "no"]) + " |")
    cleans = []
    for x in sorted({k[2] for c, _ in loaded for k in c if k[0] == "none"}):
        cleans.append(f"clean at lr {x:g}: " + ", ".join(
            f"{lab} {mean(c[('none', None, x)]):.3f}" for lab, (c, _) in zip(labels, loaded) if ("none", None, x) in c))
    notes = [f"Mean final validation loss over seeds (nats; a divergence counts as ln V); in brackets, minus "
             f"{labels[0]}'s clean run at lr {lr:g}. Goal cell: {labels[0]} ends more than {gap} above its clean "
             f"run; there the enforced run should end within {within} of its own clean run. A run a halt "
             "rule stopped counts with its validation loss at the halt (its step shown); one resumed after the "
             "halt with the attention kernel repaired (--repair-at-halt), with its final loss."]
    notes += cleans
    notes += [f"{lab}: within {within} of its own clean run in {ok} of {n} goal cells" for lab, (ok, n) in verdicts.items()]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, help="run directories (with telemetry.jsonl)")
    parser.add_argument("--margin", type=float, default=0.3, help="nats above the running minimum (default 0.3)")
    parser.add_argument("--format", choices=("markdown", "json"), default="markdown")
    st = parser.add_argument_group("the lead-time study (--study DIR)")
    st.add_argument("--study", type=Path, metavar="DIR", help="run the study into DIR")
    st.add_argument("--tiny", action="store_true", help="a seconds-long study (tests): " + ", ".join(
        f"{k}={v}" for k, v in TINY.items()))
    st.add_argument("--data", help="the corpus (default: ../shared/data/tinyshakespeare.txt; "
                                   "not with --cell, which names its own)")
    st.add_argument("--faults", default="lr-ramp,attn-lowp,wd-grow,combo")
    st.add_argument("--rates", default="1.02,1.03,1.05", help="onset rates (growth factor per step)")
    st.add_argument("--seeds", default="0,1,2")
    st.add_argument("--lr", type=float, default=3e-3, help="the best learning rate (clean runs also at 3x)")
    st.add_argument("--policy", default="early-warning")
    st.add_argument("--steps", type=int, default=300)
    st.add_argument("--fault-start", type=int, default=100)
    st.add_argument("--jobs", type=int, default=2)
    st.add_argument("--threads", type=int, default=1)
    st.add_argument("--repair-at-halt", action="store_true",
                    help="enforce mode: at the first halt (of any rule; in the shipped enforce policy only "
                         "attention-kernel-error halts), remove the attention fault (the kernel fixed) and "
                         "resume from the halt checkpoint; the other faults go on, a second halt ends the run")
    st.add_argument("--cell", metavar="NAME",
                    help="train a cell of the generalization matrix (benchmarks/matrix.py: its model, "
                         "init, tokenizer, corpus, shape, batch and weight decay) instead of the demo "
                         "GPT on --data")
    st.add_argument("--report", type=Path, metavar="DIR",
                    help="rewrite a study's lead_times.md, .json and .png from its lead_times.json "
                         "(no training, no telemetry needed)")
    cmp = parser.add_argument_group("enforce against audit (--compare)")
    cmp.add_argument("--compare", type=Path, nargs="+", metavar="DIR",
                     help="study directories of the same grid: the first in audit mode (the AdamW "
                          "reference), the others enforced policies; prints final losses per fault")
    args = parser.parse_args(argv)
    if args.compare:
        if len(args.compare) < 2:
            parser.error("--compare needs the audit study and at least one enforced study")
        try:
            print(compare(args.compare))
        except (ValueError, OSError) as exc:
            parser.error(str(exc))
        return 0
    if args.report is not None:
        try:
            res = report(args.report)
        except ValueError as exc:
            parser.error(str(exc))
        print(json.dumps(res["summary"], indent=2) if args.format == "json"
              else (args.report / "lead_times.md").read_text())
        return 0
    if args.study is not None:
        opts = dict(steps=args.steps, fault_start=args.fault_start, rates=args.rates, seeds=args.seeds,
                    jobs=args.jobs)
        shape = {}
        if args.cell:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            import matrix  # benchmarks/matrix.py: the cells
            cells = {c.name: c for c in matrix.CELLS}
            if args.cell not in cells:
                parser.error(f"--cell {args.cell!r}: no such cell; choose from {sorted(cells)}")
            if args.data is not None:
                parser.error("--cell names its own corpus: give --cell or --data, not both")
            shape = dict(cells[args.cell].shape)
            args.data = shape.pop("data")
        if args.data is None:
            args.data = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt")
        if args.repair_at_halt:
            shape["repair_at_halt"] = True
        if args.tiny:
            opts.update({k: v for k, v in TINY.items() if k in opts})
            shape.update({k: v for k, v in TINY.items() if k not in opts})
        try:
            res = study(args.study, args.data, [f for f in args.faults.split(",") if f],
                        [float(v) for v in opts["rates"].split(",")], [int(v) for v in opts["seeds"].split(",")],
                        args.lr, args.policy, opts["steps"], opts["fault_start"], args.margin, opts["jobs"],
                        args.threads, **shape)
        except ValueError as exc:
            parser.error(str(exc))
        print(json.dumps(res["summary"], indent=2) if args.format == "json"
              else (args.study / "lead_times.md").read_text())
        return 0
    if not args.runs:
        parser.error("give run directories, or --study DIR")
    reports = [analyse(run, args.margin) for run in args.runs]
    if args.format == "json":
        print(json.dumps(reports, indent=2))
    else:
        print("\n\n".join(to_markdown(r) for r in reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
