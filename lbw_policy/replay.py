"""``lbw-policy replay``: what would another policy have done on this run? (shadow evaluation)

The run's ``telemetry.jsonl`` holds, per step, the loss, the learning rate, whether the step was
skipped and the signals the detectors emitted that step. :func:`replay` feeds those signals,
step by step, to a :class:`~lbw_policy.shadow.Shadow` of the other policy (its engine and real
actuators, sample-and-hold between emissions, as the guard does) and compares what it decides
with what the run's decision log says was decided. Nothing trains.

It is an *open-loop* comparison: the shadow policy sees the signals of the run as it was
actually trained. Had the shadow policy been in control, its actions (a lower learning rate, a
skipped step) would have changed the training and so the later signals. Divergence after the
first differing step is therefore indicative, not a prediction; the first difference is exact.

Replaying a run with its own ``policy.yaml`` reproduces the decisions it took, step for step
(a check that the log and telemetry are complete).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from lbw_policy.audit import record_text
from lbw_policy.governor import Fault
from lbw_policy.decision_log import read_log
from lbw_policy.policy import Policy, load_policy
from lbw_policy.records import DECISION_EVENTS, effective_records, from_json_number
from lbw_policy.shadow import Shadow
from lbw_policy.telemetry_log import iter_telemetry

__all__ = ["replay", "ReplayResult", "ReplayStep", "format_replay",
           "replay_json"]


@dataclass
class ReplayStep:
    """One step where the taken run or the shadow decided something, or where they differ.

    ``*_scale`` is the ``lr_scale`` actuator's scale in force during the step (1.0 without it
    or in audit mode); ``shadow_lr`` the learning rate the shadow would have used: the run's
    rate divided by the run's scale, times the shadow's (other actuators that change the
    learning rate, such as ``momentum_reset``'s warm-up, are not included).
    """

    step: int
    taken: list
    shadow: list
    taken_skipped: bool
    shadow_skipped: bool
    taken_scale: float
    shadow_scale: float
    lr: Optional[float]
    shadow_lr: Optional[float]
    taken_halted: bool
    shadow_halted: bool
    differs: bool


@dataclass
class ReplayResult:
    """What :func:`replay` found; ``steps`` holds only steps with decisions or differences."""

    run_dir: str
    taken: dict
    shadow: dict
    n_steps: int = 0
    steps: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def _label(policy: Policy) -> dict:
    return {"name": policy.name, "revision": policy.revision, "owner": policy.owner,
            "description": policy.description, "mode": policy.mode, "source": str(policy.source)}


def _segments(items: list, new: Any) -> list:
    out: list = []
    for item in items:
        if not out or new(item, out[-1]):
            out.append([])
        out[-1].append(item)
    return out


def replay(run_dir: Union[str, "os.PathLike[str]"], policy: Union[Policy, str, "os.PathLike[str]"],
           *, registry: Any = None) -> ReplayResult:
    """Evaluate ``policy`` over a run's recorded telemetry and compare with its decisions.

    :param run_dir: a run directory holding ``telemetry.jsonl`` and ``decisions.jsonl``.
    :param policy: the shadow policy (a :class:`Policy` or a file).
    :raises FileNotFoundError: the run directory lacks its telemetry or decision log.
    :raises PolicyError: the shadow policy is invalid.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"no run directory {str(run)!r}")
    shadow_policy = load_policy(policy, registry=registry)
    # The telemetry is streamed twice, one row in memory at a time: first to count its run
    # segments and the signals it recorded, then to replay the segments chosen.
    tel_path = run / "telemetry.jsonl"
    warnings: list = []
    n_tel, recorded = 0, set()
    for seg, row in _telemetry_segments(tel_path, warnings):
        n_tel = seg + 1
        recorded.update(row.get("signals") or {})
    log_path = run / "decisions.jsonl"
    if not log_path.is_file():
        raise FileNotFoundError(f"no decision log at {str(log_path)!r}")
    read = read_log(log_path)
    if read.torn_tail:
        warnings.append("decisions.jsonl has a torn last line (the run was interrupted)")
    records = read.records
    start = next((r for r in records if r.get("event") == "run_start"), records[0] if records else {})
    taken_label = dict(start.get("policy") or {}, mode=start.get("mode"))
    result = ReplayResult(run_dir=str(run), taken=taken_label, shadow=_label(shadow_policy),
                          warnings=warnings)

    # One run directory may hold several runs: a log segment starts at each run_start (a
    # resumed guard's run_start + resume continues the previous one); telemetry segments start
    # where the step count goes back.
    log_segs = _segments(records, lambda r, seg: r.get("event") == "run_start")
    merged: list = []
    for seg in log_segs:
        if merged and any(r.get("event") == "resume" for r in seg):
            merged[-1] += seg
        else:
            merged.append(seg)
    chosen = list(range(n_tel))
    if len(merged) != n_tel:
        if n_tel and merged:
            warnings.append(f"the run directory holds {len(merged)} run(s) in decisions.jsonl "
                            f"and {n_tel} in telemetry.jsonl; replaying the last of each")
        merged, chosen = merged[-1:], chosen[-1:] if merged else []
    elif len(merged) > 1:
        warnings.append(f"the run directory holds {len(merged)} runs; each is replayed from a "
                        "fresh shadow state")

    counts = {"taken_records": 0, "shadow_records": 0, "taken_skipped": 0,
              "shadow_skipped": 0, "taken_halted_at": None, "shadow_halted_at": None,
              "taken_min_scale": 1.0, "shadow_min_scale": 1.0, "differing_steps": 0,
              "scale_differs_steps": 0,
              "first_difference": None}
    wanted = set(chosen)
    rows = ((seg, row) for seg, row in _telemetry_segments(tel_path, []) if seg in wanted)
    for seg_records, (_, seg_rows) in zip(merged, itertools.groupby(rows, key=lambda sr: sr[0])):
        _replay_segment(result, counts, shadow_policy, registry, seg_records,
                        (row for _, row in seg_rows))
    result.summary = counts
    # A rule that reads a detector signal the run never recorded cannot decide anything here.
    published = {f"{name}.{sig}" for name, spec in shadow_policy.actuators.items()
                 for sig in _actuator_signals(registry, name, spec.bounds)}
    for rule in shadow_policy.rules:
        missing = [s for s in rule.signals() if s not in recorded and s not in published]
        if missing:
            warnings.append(f"rule {rule.name!r} reads {', '.join(map(repr, missing))}, which "
                            "the run never recorded: it cannot fire in this replay (add the "
                            "detector to the run's policy to record it)")
    return result


def _telemetry_segments(path: Path, warnings: list) -> Any:
    """``(segment index, row)`` for each telemetry row, streamed; a segment (one run in the
    directory) starts where the step count goes back."""
    seg, last = -1, None
    for row in iter_telemetry(path, warnings):
        if last is None or row["step"] <= last:
            seg += 1
        last = row["step"]
        yield seg, row


def _replay_segment(result, counts, policy, registry, records, rows) -> None:
    start = next((r for r in records if r.get("event") == "run_start"), {})
    delay = int(start.get("delay") or 0)  # 1: the run evaluated step t's signals at t + 1
    # the run's device gate ran only where it could (run_start's gate.mode); the shadow policy's
    # gate rules are evaluated as the device would, on each step's own signals
    gate_ran = delay and (start.get("gate") or {}).get("mode") is not None
    shadow = Shadow(policy, registry=registry, optimizer=str(start.get("optimizer", "AdamW")),
                    hyperparameters=start.get("optimizer_hyperparameters") or {},
                    transfer="deferred" if gate_ran else "immediate")
    by_step: dict = {}
    taken_scale = 1.0  # every scale starts at 1 (its bounds contain 1)
    for r in records:
        if r.get("event") in DECISION_EVENTS and isinstance(r.get("step"), int):
            by_step.setdefault(r["step"], []).append(r)
    taken_halt = next((r["step"] for r in records if r.get("event") == "halt"), None)
    recent: dict = {}  # the last `delay` rows by step: the signals a deferred step evaluated
    for row in rows:
        step = row["step"]
        result.n_steps += 1
        taken = by_step.get(step, [])
        for r in effective_records(taken):  # a commit that raised (within its step) applied nothing
            for a in r.get("actions") or ():
                if a.get("actuator") == "lr_scale" and r.get("enforced") and \
                        isinstance(a.get("after"), (int, float)) and a.get("applied") is not None:
                    taken_scale = float(a["after"])
        t_halt = taken_halt == step
        # the host's skip (a device-gated step shows as the gate's record one step later)
        t_skip = (bool(row.get("skipped")) and not row.get("gated")) or t_halt
        counts["taken_records"] += len(taken)
        counts["taken_skipped"] += t_skip and not t_halt
        counts["taken_min_scale"] = min(counts["taken_min_scale"], taken_scale)
        if t_halt and counts["taken_halted_at"] is None:
            counts["taken_halted_at"] = step
        if shadow.halted:  # the shadow stopped earlier; the run went on
            counts["after_shadow_halt"] = counts.get("after_shadow_halt", 0) + 1
            counts["differing_steps"] += 1
            if taken:
                result.steps.append(ReplayStep(step, taken, [], t_skip, True, taken_scale,
                                               math.nan, row.get("lr"), None, t_halt, True, True))
            continue
        src = recent.get(step - delay) if delay else row
        if delay:
            recent[step] = row
            for old in [k for k in recent if k <= step - delay]:  # needed no more
                del recent[old]
        out = shadow.step(step, (src or {}).get("signals") or {}, _faults(src, "faults"),
                          loss=(src or {}).get("loss", 0.0), scheduled_lr=row.get("scheduled_lr"),
                          signals_step=None if src is None else src["step"],
                          after_faults=_faults(row, "after_faults"),
                          gate_signals=row.get("signals") or {} if gate_ran else None)
        s_skip, s_halt = out.skipped, out.halted
        s_scale = math.nan if s_halt else out.lr_scale  # no optimizer step: no learning rate
        counts["shadow_records"] += len(out.records)
        counts["shadow_skipped"] += s_skip and not s_halt
        if not s_halt:
            counts["shadow_min_scale"] = min(counts["shadow_min_scale"], s_scale)
        if s_halt and counts["shadow_halted_at"] is None:
            counts["shadow_halted_at"] = step
        out_records = out.records
        # A step differs when the decisions, the skip or the halt differ; a learning-rate scale
        # that still differs from an earlier decision is counted, not listed step by step.
        differs = (t_skip != s_skip or t_halt != s_halt
                   or _effects(taken) != _effects(out_records))
        counts["scale_differs_steps"] += not (s_halt or t_halt or _close(taken_scale, s_scale))
        if differs:
            counts["differing_steps"] += 1
            if counts["first_difference"] is None:
                counts["first_difference"] = step
        if not (differs or taken or out_records):
            continue
        lr = row.get("lr") if isinstance(row.get("lr"), (int, float)) else None
        shadow_lr = lr / taken_scale * s_scale if lr is not None and taken_scale and \
            not s_halt else None
        result.steps.append(ReplayStep(step, taken, out_records, t_skip, s_skip, taken_scale,
                                       s_scale, lr, shadow_lr, t_halt, s_halt, differs))


def _faults(row: Optional[dict], key: str) -> list:
    """The faults a telemetry row recorded (``faults``: the detectors' ``compute`` errors of
    its signals; ``after_faults``: their ``after_step`` errors of its step)."""
    out = []
    for f in (row or {}).get(key) or ():
        try:
            out.append(Fault.from_dict(f))
        except (KeyError, TypeError, AttributeError):
            continue  # a damaged entry: the comparison will show the difference
    return out


def _actuator_signals(registry: Any, name: str, bounds: Any) -> tuple:
    if registry is None:
        from lbw_policy.plugins import get_registry

        registry = get_registry()
    reg = registry.actuators.get(name)
    return tuple(reg.cls.signals_for(bounds)) if reg is not None else ()


def _close(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _effects(records: list) -> list:
    """What records did, without rule names: [(event, actuator, applied)], sorted; an action
    whose commit raised (its error record follows within the step) applied nothing."""
    out = []
    for r in effective_records(records):
        actions = r.get("actions") or []
        if not actions:
            out.append((r.get("event"), "", ""))
        for a in actions:
            v = from_json_number(a.get("applied"))
            v = round(v, 9) if isinstance(v, float) and math.isfinite(v) else v
            out.append((r.get("event"), str(a.get("actuator")), json.dumps(v)))
    return sorted(out)


# ------------------------------------------------------------------------------ output


def _state(skipped: bool, scale: float, halted: bool) -> str:
    if halted:
        return "halted"
    scale_text = "-" if math.isnan(scale) else f"{scale:.6g}"
    return f"{'skipped' if skipped else 'stepped'}, lr_scale {scale_text}"


def format_replay(result: ReplayResult, *, all_steps: bool = False, limit: int = 200) -> str:
    """The comparison as text: steps that differ (every step with a decision with
    ``all_steps``), then a summary table."""
    t, s = result.taken, result.shadow
    lines = [f"replay  {result.run_dir}  ({result.n_steps} steps from telemetry.jsonl)",
             f"taken   {t.get('name')}  revision {str(t.get('revision'))[:12]}  mode "
             f"{t.get('mode')}  owner {t.get('owner') or '(none given)'}",
             f"shadow  {s['name']}  revision {s['revision'][:12]}  mode {s['mode']}  owner "
             f"{s['owner'] or '(none given)'}  ({s['source']})",
             "open loop: the shadow sees the signals of the run as trained; after the first "
             "difference its later decisions are indicative only"]
    lines += [f"warning: {w}" for w in result.warnings]
    shown = [st for st in result.steps if all_steps or st.differs]
    lines.append("")
    lines.append(("steps with decisions" if all_steps else "steps where the decisions differ")
                 + f": {len(shown)}" + ("" if shown else " (none)"))
    for st in shown[: limit or None]:
        mark = "differs" if st.differs else "same"
        lr = "" if st.shadow_lr is None or st.lr is None or _close(st.lr, st.shadow_lr) else \
            f"; lr {st.lr:.4g}, shadow {st.shadow_lr:.4g}"
        lines.append(f"step {st.step} ({mark}{lr})")
        for side, recs, state in (("taken ", st.taken, _state(st.taken_skipped, st.taken_scale,
                                                               st.taken_halted)),
                                  ("shadow", st.shadow, _state(st.shadow_skipped, st.shadow_scale,
                                                               st.shadow_halted))):
            if not recs:
                lines.append(f"  {side}  no decision  [{state}]")
            for i, r in enumerate(recs):
                tail = f"  [{state}]" if i == len(recs) - 1 else ""
                who = f"{r['rule']} " if r.get("rule") else ""
                lines.append(f"  {side}  {who}{r.get('event')}: {record_text(r)}{tail}")
    if limit and len(shown) > limit:
        lines.append(f"... {len(shown) - limit} more steps (--limit 0 shows all)")
    c = result.summary
    lines += ["", f"{'summary':<22}{'taken':>12}{'shadow':>12}"]
    for title, a, b in (("decision records", c["taken_records"], c["shadow_records"]),
                        ("skipped steps", c["taken_skipped"], c["shadow_skipped"]),
                        ("halted at step", c["taken_halted_at"], c["shadow_halted_at"]),
                        ("lowest lr_scale", f"{c['taken_min_scale']:.6g}",
                         f"{c['shadow_min_scale']:.6g}")):
        lines.append(f"{title:<22}{'-' if a is None else a:>12}{'-' if b is None else b:>12}")
    if c.get("after_shadow_halt"):
        lines.append(f"the shadow halted at step {c['shadow_halted_at']}: the run's "
                     f"{c['after_shadow_halt']} later steps would not have run")
    first = c["first_difference"]
    lines.append(f"steps where the decisions differ: {c['differing_steps']} of {result.n_steps}"
                 + ("" if first is None else f" (first at step {first})"))
    lines.append(f"steps where the lr_scale differs: {c['scale_differs_steps']} of {result.n_steps}")
    return "\n".join(lines)


def replay_json(result: ReplayResult) -> dict:
    """The comparison as plain data (``--format json``)."""
    return {"run_dir": result.run_dir, "taken": result.taken, "shadow": result.shadow,
            "steps_replayed": result.n_steps, "warnings": result.warnings,
            "summary": result.summary,
            "steps": [{"step": st.step, "differs": st.differs,
                       "taken": {"records": st.taken, "skipped": st.taken_skipped,
                                 "lr_scale": st.taken_scale, "lr": st.lr,
                                 "halted": st.taken_halted},
                       "shadow": {"records": st.shadow, "skipped": st.shadow_skipped,
                                  "lr_scale": None if math.isnan(st.shadow_scale) else st.shadow_scale,
                                  "lr": st.shadow_lr, "halted": st.shadow_halted}}
                      for st in result.steps]}
