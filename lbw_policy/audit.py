"""``lbw-policy audit``: read a decision log without writing code.

* a header naming the log (with its hash-chain status), the run(s) and the policy revision(s)
  with their owner and description;
* summary tables by rule, by actuator and by event;
* the decision records, one line each, filtered by rule, step range and event;
* ``--explain ID``: one decision in full: the rule, its condition tree annotated with the signal
  values that made it true or false, the actions with the bounds that clamped them, the policy
  revision, owner and run;
* ``--format json`` (one document) and ``--format jsonl`` (one flat row per action) for jq,
  DuckDB and pandas.

Pure reading: nothing here needs torch, except loading the run's ``policy.yaml`` for
``--explain`` (which imports the plugins to validate it).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from lbw_policy.decision_log import LogRead, VerifyReport, read_log, verify_log
from lbw_policy.engine import explain_condition
from lbw_policy.records import effective_records, from_json_number

__all__ = ["AuditLog", "load_audit", "parse_steps", "filter_records", "summarize", "flat_rows",
           "format_audit", "audit_json", "explain", "format_explanation"]

_META_EVENTS = ("run_start", "run_end", "resume", "checkpoint")


@dataclass
class AuditLog:
    """A decision log as read for auditing.

    :param path: the ``decisions.jsonl`` file.
    :param records: the records of its complete, parseable lines, with each action whose commit
        failed marked as not applied (:func:`~lbw_policy.records.effective_records`: ``applied``
        null, ``commit_failed`` naming the ``error`` record); the file itself is never changed.
    :param read: what the lenient reader found (torn tail, damaged lines).
    :param chain: :func:`~lbw_policy.decision_log.verify_log`'s report.
    """

    path: Path
    records: list
    read: LogRead
    chain: VerifyReport
    filters: dict = field(default_factory=dict)


def resolve_log(target: Union[str, "os.PathLike[str]"]) -> Path:
    """A run directory -> its ``decisions.jsonl``; a file -> itself.

    :raises FileNotFoundError: no such file, or no decision log in the directory.
    """
    path = Path(target)
    if path.is_dir():
        path = path / "decisions.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no decision log at {str(path)!r} (give a run directory or "
                                "its decisions.jsonl)")
    return path


def load_audit(target: Union[str, "os.PathLike[str]"]) -> AuditLog:
    """Read and verify a decision log (see :func:`resolve_log` for ``target``).

    :raises FileNotFoundError: as :func:`resolve_log`.
    """
    path = resolve_log(target)
    read = read_log(path)
    return AuditLog(path=path, records=effective_records(read.records), read=read,
                    chain=verify_log(path))


def parse_steps(spec: Optional[str]) -> Optional[tuple]:
    """``"A:B"`` (inclusive), ``"A:"``, ``":B"`` or ``"A"`` -> ``(lo, hi)`` with ``None`` for an
    open end; ``None`` -> ``None``.

    :raises ValueError: not of that form, or ``A > B``.
    """
    if spec is None:
        return None
    m = re.fullmatch(r"\s*(\d*)\s*(:?)\s*(\d*)\s*", spec)
    if not m or (not m.group(1) and not m.group(3)) or (not m.group(2) and not m.group(1)):
        raise ValueError(f"--steps {spec!r}: expected A:B (inclusive), A:, :B or A, with whole "
                         "numbers")
    lo = int(m.group(1)) if m.group(1) else None
    hi = int(m.group(3)) if m.group(3) else (lo if not m.group(2) else None)
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"--steps {spec!r}: the first step is after the last")
    return lo, hi


def filter_records(records: Iterable[dict], *, rules: Sequence[str] = (),
                   steps: Optional[tuple] = None, events: Sequence[str] = (),
                   actuators: Sequence[str] = ()) -> list:
    """Records matching every given filter (an empty filter matches everything)."""
    out = []
    for r in records:
        if rules and r.get("rule") not in rules:
            continue
        if events and r.get("event") not in events:
            continue
        if actuators and not any(a.get("actuator") in actuators for a in r.get("actions") or ()):
            continue
        if steps is not None:
            step = r.get("step")
            if not isinstance(step, int):
                continue
            lo, hi = steps
            if (lo is not None and step < lo) or (hi is not None and step > hi):
                continue
        out.append(r)
    return out


def summarize(records: Iterable[dict]) -> dict:
    """Counts by rule (per event), by actuator and by event.

    ``{"by_rule": {rule: {event: n, "total": n}}, "by_actuator": {name: {"actions", "applied",
    "clamped", "refused", "failed", "enforced"}}, "by_event": {event: n}}``; an action *failed*
    when its commit raised (``commit_failed``, see :func:`~lbw_policy.records.effective_records`),
    is *refused* when otherwise its ``applied`` is ``false`` or ``null``, *enforced* when its
    record was.
    """
    by_rule: dict = defaultdict(Counter)
    by_act: dict = defaultdict(Counter)
    by_event: Counter = Counter()
    for r in records:
        event = str(r.get("event"))
        by_event[event] += 1
        if r.get("rule") is not None:
            by_rule[str(r["rule"])][event] += 1
            by_rule[str(r["rule"])]["total"] += 1
        for a in r.get("actions") or ():
            c = by_act[str(a.get("actuator"))]
            c["actions"] += 1
            failed = bool(a.get("commit_failed"))
            c["failed"] += failed
            c["applied"] += not failed and a.get("applied") not in (None, False)
            c["refused"] += not failed and a.get("applied") in (None, False)
            c["clamped"] += bool(a.get("clamped"))
            c["enforced"] += bool(r.get("enforced"))
    keys = ("actions", "applied", "clamped", "refused", "failed", "enforced")
    return {"by_rule": {k: dict(v) for k, v in sorted(by_rule.items())},
            "by_actuator": {k: {f: v[f] for f in keys} for k, v in sorted(by_act.items())},
            "by_event": dict(by_event.most_common())}


def flat_rows(records: Iterable[dict]) -> list:
    """One flat row per action (a record without actions gives one row with ``actuator``
    null): the shape DuckDB's ``read_json_auto`` and ``pandas.read_json(lines=True)`` want."""
    rows = []
    described: dict = {}  # run id -> its run_start's policy description
    for r in records:
        pol = r.get("policy") or {}
        run = r.get("run") or {}
        if r.get("event") == "run_start" and isinstance(pol, dict):
            described[run.get("run_id")] = pol.get("description")
        pol = dict(pol, description=pol.get("description", described.get(run.get("run_id"))))
        base = {"id": r.get("id"), "seq": r.get("seq"), "time": r.get("time"),
                "run_id": run.get("run_id"), "rank": run.get("rank"), "step": r.get("step"),
                "event": r.get("event"), "rule": r.get("rule"), "priority": r.get("priority"),
                "policy": pol.get("name"), "revision": pol.get("revision"),
                "owner": pol.get("owner"), "description": pol.get("description"),
                "mode": r.get("mode"), "enforced": r.get("enforced"),
                "signals": r.get("signals")}
        blank = {"actuator": None, "verb": None, "requested": None, "applied": None,
                 "clamped": None, "before": None, "after": None, "commit_failed": None}
        actions = r.get("actions") or []
        for a in actions:
            rows.append(dict(base, actuator=a.get("actuator"), verb=a.get("verb"),
                             requested=a.get("requested"), applied=a.get("applied"),
                             clamped=a.get("clamped"), before=a.get("before"),
                             after=a.get("after"), commit_failed=a.get("commit_failed")))
        if not actions:
            rows.append(dict(base, **blank))
    return rows


# ------------------------------------------------------------------------------ text output


def _policies(records: Sequence[dict]) -> list:
    """Distinct (policy label, mode) pairs in order of first appearance, with record counts."""
    seen: dict = {}
    for r in records:
        if r.get("event") == "checkpoint":  # the log's own records: no policy label
            continue
        pol = r.get("policy") or {}
        key = (pol.get("name"), pol.get("revision"), r.get("mode"))
        if key not in seen:
            seen[key] = {"name": pol.get("name"), "revision": pol.get("revision"),
                         "owner": pol.get("owner"), "description": pol.get("description"),
                         "mode": r.get("mode"), "records": 0}
        seen[key]["records"] += 1
    return list(seen.values())


def _runs(records: Sequence[dict]) -> list:
    seen: dict = {}
    for r in records:
        run = r.get("run") or {}
        key = (run.get("run_id"), run.get("rank"))
        if key not in seen:
            seen[key] = {"run_id": run.get("run_id"), "rank": run.get("rank"),
                         "world_size": run.get("world_size") or 1,
                         "lbw_policy": run.get("lbw_policy"), "torch": run.get("torch"),
                         "records": 0, "first_step": r.get("step"), "last_step": r.get("step")}
        seen[key]["records"] += 1
        seen[key]["last_step"] = r.get("step")
    return list(seen.values())


def _of_world(run: dict) -> str:
    """`` of N`` for a run of a distributed job (rank 0 writes its one log), else ``""``."""
    return f" of {run['world_size']}" if (run.get("world_size") or 1) > 1 else ""


def _chain_text(log: AuditLog) -> str:
    c = log.chain
    text = f"chain OK, head {c.head[:12]}" if c.ok else \
        f"chain FAILED ({len(c.problems)} problem(s): run `lbw-policy verify {log.path}`)"
    if c.warnings:
        text += "; " + "; ".join(c.warnings)
    return text


def _num(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6g}"
    return "null" if v is None else str(v)


def action_text(a: dict) -> str:
    """``lr_scale 1 -> 0.5`` with ``(requested 0.025, clamped)`` or the refusal note."""
    name = a.get("actuator")
    if a.get("commit_failed"):
        failed = a["commit_failed"]
        return f"{name} NOT APPLIED (its commit raised" + \
            (f"; record {failed})" if failed is not True else ")")
    if a.get("applied") in (None, False):
        note = a.get("note") or "refused by its bounds"
        return f"{name} refused ({note})"
    text = f"{name} {_num(a.get('before'))} -> {_num(a.get('after'))}"
    if a.get("clamped"):
        text += f" (requested {_num(a.get('requested'))}, clamped)"
    return text


def _checkpoint_text(r: dict) -> str:
    stmt = r.get("checkpoint") if isinstance(r.get("checkpoint"), dict) else {}
    return (f"signed {'final ' if stmt.get('final') else ''}checkpoint of {stmt.get('count')} "
            f"records by {stmt.get('key')} (lbw-policy verify --public-key checks it)")


def record_text(r: dict) -> str:
    """What a record did, in one line."""
    event = r.get("event")
    if event == "error":
        text = f"{r.get('where')} raised {r.get('error')} [on_error: {r.get('on_error')}]"
        failed = r.get("not_applied")
        if isinstance(failed, dict) and isinstance(failed.get("action"), dict):
            text += (f"; not applied: {action_text(failed['action'])}, decided in record "
                     f"{failed.get('id') if failed.get('id') is not None else '-'}")
        return text
    if event == "halt":
        return str(r.get("message", "halt"))
    if event in _META_EVENTS:
        return {"run_start": f"mode {r.get('mode')}, optimizer {r.get('optimizer', '?')}",
                "run_end": "end of run", "resume": f"resumed at step {r.get('step')}",
                "checkpoint": _checkpoint_text(r)}[event]
    parts = [action_text(a) for a in r.get("actions") or ()]
    parts += [f"{o.get('actuator')} overridden by {o.get('overridden_by')}"
              for o in r.get("overridden") or ()]
    text = "; ".join(parts) or "-"
    if r.get("actions") and r.get("enforced") is False:
        text += " [audit mode: not applied]"
    return text


def format_audit(log: AuditLog, records: Sequence[dict], *, limit: int = 50,
                 filters: Optional[dict] = None, list_meta: bool = False) -> str:
    """The header, the summary tables of ``records`` and up to ``limit`` record lines (0: all)."""
    lines = [f"decision log  {log.path}  ({len(log.records)} records; {_chain_text(log)})"]
    for run in _runs(log.records):
        lines.append(f"run           {run['run_id']} (rank {run['rank']}{_of_world(run)}, steps "
                     f"{run['first_step']}..{run['last_step']}, lbw_policy {run['lbw_policy']}, "
                     f"torch {run['torch']})")
    for pol in _policies(log.records):
        lines.append(f"policy        {pol['name']}  revision {str(pol['revision'])[:12]}  "
                     f"mode {pol['mode']}  ({pol['records']} records)")
        lines.append(f"  owner       {pol['owner'] or '(none given)'}")
        if pol["description"]:
            lines.append(f"  description {pol['description']}")
    active = {k: v for k, v in (filters or {}).items() if v}
    if active:
        lines.append("filters       " + ", ".join(f"{k}={v}" for k, v in active.items()))
    summary = summarize(records)
    lines += ["", *_table("by rule", ["fired", "action", "resolved", "total"],
                          summary["by_rule"])]
    lines += ["", *_table("by actuator", ["actions", "applied", "clamped", "refused", "failed",
                                          "enforced"], summary["by_actuator"])]
    lines += ["", *_table("by event", ["count"],
                          {k: {"count": v} for k, v in summary["by_event"].items()})]
    shown = [r for r in records if list_meta or r.get("event") not in _META_EVENTS]
    lines += ["", f"decisions ({len(shown)})" + ("" if shown else ": none")]
    if shown:
        # consecutive records that say the same thing (a rule clamped at its bound for 40 steps)
        # are one line: "id..id  steps a..b  ... (xN)"
        groups: list = []
        for r in shown:
            key = (r.get("event"), r.get("rule"), record_text(r))
            if groups and groups[-1][0] == key and r.get("event") not in ("error", "halt"):
                groups[-1][1].append(r)
            else:
                groups.append((key, [r]))
        ids = [str(g[0].get("id")) + (f"..{g[-1].get('id')}" if len(g) > 1 else "")
               for _, g in groups]
        width = max(len(i) for i in ids)
        lines.append(f"  {'id':<{width}}  {'step':>9}  {'event':<9} {'rule':<22} what")
        for ident, (key, g) in list(zip(ids, groups))[: limit or None]:
            steps = _num(g[0].get("step")) + (f"..{_num(g[-1].get('step'))}" if len(g) > 1 else "")
            lines.append(f"  {ident:<{width}}  {steps:>9}  {str(key[0]):<9} "
                         f"{str(key[1] or '-'):<22} {key[2]}" + (f"  (x{len(g)})" if len(g) > 1 else ""))
        if limit and len(groups) > limit:
            lines.append(f"  ... {len(groups) - limit} more lines (--limit 0 shows all; filter "
                         "with --rule, --steps, --event)")
    return "\n".join(lines)


def _table(title: str, cols: list, data: dict) -> list:
    if not data:
        return [f"{title}: none"]
    width = max(len(title), *(len(str(k)) for k in data)) + 2
    out = [f"{title:<{width}}" + "".join(f"{c:>10}" for c in cols)]
    for name, counts in data.items():
        out.append(f"{str(name):<{width}}" + "".join(f"{counts.get(c, 0):>10}" for c in cols))
    return out


def audit_json(log: AuditLog, records: Sequence[dict], filters: Optional[dict] = None) -> dict:
    """The audit as one JSON document: log, chain, runs, policies, filters, summary, records."""
    c = log.chain
    return {"log": str(log.path),
            "chain": {"ok": c.ok, "records": c.records, "head": c.head, "problems": c.problems,
                      "warnings": c.warnings},
            "runs": _runs(log.records), "policies": _policies(log.records),
            "filters": {k: v for k, v in (filters or {}).items() if v},
            "summary": summarize(records), "records": list(records)}


# ------------------------------------------------------------------------------ explain


def find_record(records: Sequence[dict], decision_id: str) -> dict:
    """The record whose ``id`` is ``decision_id`` (or whose ``seq`` it is, given as a number).

    :raises KeyError: no such record (the message lists a few ids).
    """
    for r in records:
        if str(r.get("id")) == decision_id:
            return r
    if decision_id.isdigit():
        for r in records:
            if r.get("seq") == int(decision_id):
                return r
    sample = ", ".join(str(r.get("id")) for r in records[1:4])
    raise KeyError(f"no record with id {decision_id!r} in this log (ids look like {sample}; "
                   "`lbw-policy audit` lists them)")


def explain(log: AuditLog, decision_id: str, *, policy_file: Optional[str] = None,
            registry: Any = None) -> dict:
    """Everything behind one decision, as plain data (see :func:`format_explanation`).

    The rule and its condition come from ``policy_file`` (default: the run's ``policy.yaml``
    beside the log) when its revision is the record's; otherwise they are left out with a note.
    Bounds come from the run's ``run_start`` record.

    :raises KeyError: no record with that id.
    """
    records = log.records
    rec = find_record(records, decision_id)
    notes: list = []
    start = None
    for r in records:
        if r.get("event") == "run_start":
            start = r
        if r is rec:
            break
    bounds = dict((start or {}).get("actuators") or {})
    pol_label = dict(rec.get("policy") or {})
    start_label = (start or {}).get("policy") or {}
    if "description" not in pol_label and start_label.get("revision") == pol_label.get("revision"):
        pol_label["description"] = start_label.get("description")  # in run_start only
    policy, why_not = _policy_for(log.path, pol_label.get("revision"), policy_file, registry)
    if why_not:
        notes.append(why_not)
    if policy is not None and not bounds:
        bounds = {n: dict(s.bounds) for n, s in policy.actuators.items()}
    signals = {k: from_json_number(v) for k, v in (rec.get("signals") or {}).items()}
    out = {"id": rec.get("id"), "seq": rec.get("seq"), "time": rec.get("time"),
           "step": rec.get("step"), "event": rec.get("event"), "run": rec.get("run"),
           "policy": pol_label, "mode": rec.get("mode"), "enforced": rec.get("enforced"),
           "rule": None, "condition": None, "signals": rec.get("signals"),
           "actions": [], "overridden": rec.get("overridden") or [], "why": "", "notes": notes,
           "record": rec}
    rule = None
    if policy is not None and rec.get("rule") is not None:
        rule = next((r for r in policy.rules if r.name == rec["rule"]), None)
        if rule is None:
            notes.append(f"rule {rec['rule']!r} is not in the policy file")
    if rule is not None:
        out["rule"] = {"name": rule.name, "path": rule.path, "line": policy.line_of(rule.path),
                       "file": str(policy.source), "priority": rule.priority, "for": rule.for_,
                       "keep_firing_for": rule.keep_firing_for, "cooldown": rule.cooldown,
                       "when": rule.when, "then": [c.to_dict() for c in rule.then]}
        try:
            out["condition"] = explain_condition(rule.when, signals)
        except (TypeError, ValueError) as exc:
            notes.append(f"the condition could not be evaluated on the recorded signals: {exc}")
    for a in rec.get("actions") or ():
        b = bounds.get(a.get("actuator"), {})
        out["actions"].append(dict(a, bounds=b, clamped_by=_clamped_by(a, b)))
    out["why"] = _why(rec, out["rule"], bounds)
    return out


def _policy_for(log_path: Path, revision: Any, policy_file: Optional[str], registry: Any):
    from lbw_policy.errors import PolicyError
    from lbw_policy.policy import load_policy

    path = Path(policy_file) if policy_file else log_path.parent / "policy.yaml"
    if not path.is_file():
        return None, (f"no policy file {str(path)!r}: the rule's condition cannot be shown "
                      "(pass --policy FILE)")
    try:
        policy = load_policy(path, registry=registry)
    except PolicyError as exc:
        return None, f"policy file {str(path)!r} does not load: {exc.problems[0]}"
    if revision is not None and policy.revision != revision:
        return None, (f"policy file {str(path)!r} is revision {policy.revision[:12]}, the record "
                      f"was decided under {str(revision)[:12]}: pass the matching file with "
                      "--policy FILE to see the rule")
    return policy, None


def _clamped_by(a: dict, bounds: dict) -> list:
    """Names of the bounds that explain a clamped or refused action (best effort)."""
    if not a.get("clamped") and a.get("applied") not in (None, False):
        return []
    names = []
    after, before = a.get("after"), a.get("before")
    for key, val in bounds.items():
        if not isinstance(val, (int, float)) or isinstance(val, bool):
            continue
        if isinstance(after, (int, float)) and not isinstance(after, bool) and \
                abs(after - val) <= 1e-12 * max(1.0, abs(val)):
            names.append(key)
        elif isinstance(after, (int, float)) and isinstance(before, (int, float)) and \
                not isinstance(after, bool) and abs(abs(after - before) - val) <= 1e-9 * max(1.0, val):
            names.append(key)
        elif key in str(a.get("note") or ""):
            names.append(key)
    return names


def _why(rec: dict, rule: Optional[dict], bounds: dict) -> str:
    event = rec.get("event")
    enforced = rec.get("enforced")
    done = "carried out" if enforced else "logged but not carried out (audit mode)"
    failed = [a for a in rec.get("actions") or () if a.get("commit_failed")]
    if failed and enforced:
        done += ", except " + ", ".join(
            f"{a.get('actuator')}, whose commit raised (not applied; record "
            f"{a['commit_failed'] if a['commit_failed'] is not True else '-'})" for a in failed)
    if event == "fired":
        held = (f"held for {rule['for']} consecutive evaluation(s) (for: {rule['for']})"
                if rule else "held for the rule's `for` consecutive evaluations")
        return f"the condition {held}, so the rule started firing; its commands were {done}"
    if event == "action":
        return f"the rule was already firing and its condition still held; its commands were {done}"
    if event == "resolved":
        if not rule:
            return ("the condition had been false for more than the rule's keep_firing_for "
                    "evaluations, so the rule stopped firing (its cooldown follows)")
        return (f"the condition had been false for more than keep_firing_for = "
                f"{rule['keep_firing_for']} evaluation(s), so the rule stopped firing; it ignores "
                f"its condition for the next {rule['cooldown']} step(s) (cooldown)")
    if event == "recover":
        names = [a.get("actuator") for a in rec.get("actions") or ()]
        how = "; ".join(f"{n}: recover {json.dumps((bounds.get(n) or {}).get('recover'), sort_keys=True)}"
                        for n in names)
        return (f"no firing rule held {', '.join(map(str, names))}, so it moved back toward its "
                f"neutral value as its bounds allow ({how}); {done}")
    if event == "halt":
        return str(rec.get("message"))
    if event == "error":
        return (f"{rec.get('where')} raised {rec.get('error')}; the policy's on_error = "
                f"{rec.get('on_error')} decided what followed")
    return f"a {event} record"


def format_explanation(ex: dict) -> str:
    """:func:`explain`'s result as text."""
    run = ex.get("run") or {}
    pol = ex.get("policy") or {}
    lines = [f"decision {ex['id']} (seq {ex['seq']}): step {ex['step']}, {ex['event']}, {ex['time']}",
             f"run          {run.get('run_id')} (rank {run.get('rank')}, lbw_policy "
             f"{run.get('lbw_policy')}, torch {run.get('torch')})",
             f"policy       {pol.get('name')}, revision {pol.get('revision')}, mode {ex.get('mode')}",
             f"owner        {pol.get('owner') or '(none given)'}"]
    if pol.get("description"):
        lines.append(f"description  {pol['description']}")
    rule = ex.get("rule")
    if rule:
        where = f"{rule['path']}, {rule['file']} line {rule['line']}"
        lines.append(f"rule         {rule['name']} ({where}): priority {rule['priority']}, for "
                     f"{rule['for']}, keep_firing_for {rule['keep_firing_for']}, cooldown "
                     f"{rule['cooldown']}")
    elif ex["record"].get("rule"):
        lines.append(f"rule         {ex['record']['rule']}")
    lines.append(f"why          {ex['why']}")
    if ex.get("condition") is not None:
        lines.append(f"condition    {_tf(ex['condition']['result'])}")
        lines += _tree(ex["condition"], "  ")
    elif ex.get("signals"):
        lines.append("signals      " + ", ".join(f"{k} = {_num(v)}" for k, v in ex["signals"].items()))
    if ex["actions"]:
        lines.append("actions      " + ("(enforced)" if ex.get("enforced") else "(not applied: audit mode)"))
        for a in ex["actions"]:
            cmd = a.get("command") or {}
            verb = f" {cmd.get('verb')} {_num(cmd.get('value'))}" if cmd.get("value") is not None \
                else ""
            lines.append(f"  {a.get('actuator')}{verb}: before {_num(a.get('before'))}, after "
                         f"{_num(a.get('after'))}; requested {_num(a.get('requested'))}, applied "
                         f"{_num(a.get('applied'))}, {'CLAMPED' if a.get('clamped') else 'not clamped'}")
            if a.get("note"):
                lines.append(f"    note: {a['note']}")
            if a.get("bounds"):
                lines.append(f"    bounds: {_bounds_text(a['bounds'])}")
            if a.get("clamped_by"):
                lines.append(f"    clamped by: {', '.join(a['clamped_by'])}")
    for o in ex.get("overridden") or ():
        lines.append(f"overridden   {o.get('actuator')} {o.get('verb')} {_num(o.get('value'))}: "
                     f"rule {o.get('overridden_by')} outranked it")
    if ex["record"].get("message") and ex["event"] != "halt":
        lines.append(f"message      {ex['record']['message']}")
    for note in ex.get("notes") or ():
        lines.append(f"note         {note}")
    return "\n".join(lines)


def _tf(v: Any) -> str:
    return "TRUE" if v else "false"


def _tree(node: dict, indent: str) -> list:
    for kind in ("all", "any"):
        if kind in node:
            out = [f"{indent}{kind}:{'':<{max(1, 40 - len(indent) - len(kind))}} {_tf(node['result'])}"]
            for child in node[kind]:
                out += _tree(child, indent + "  ")
            return out
    if "not" in node:
        return [f"{indent}not:{'':<{max(1, 40 - len(indent) - 3)}} {_tf(node['result'])}"] + \
            _tree(node["not"], indent + "  ")
    text = f"{node['signal']} {node['op']} {_num(node['value'])}"
    actual = "no value" if node["actual"] is None else _num(node["actual"])
    return [f"{indent}{text:<{max(1, 41 - len(indent))}} {_tf(node['result']):<6} "
            f"({node['signal']} = {actual})"]


def _bounds_text(b: dict) -> str:
    return ", ".join(f"{k} {json.dumps(v, sort_keys=True) if isinstance(v, dict) else _num(v)}"
                     for k, v in b.items()) or "{}"
