"""Decision records as plain data: the helpers every reader and writer of them shares.

The Governor writes records (:func:`action_dict` for each action); the decision log adds the
chain fields; replay, ``lbw-policy test`` and the audit read them back (:func:`from_json_number`
undoes the log's non-finite encoding; :func:`action_rows` flattens records for comparison). No
torch here.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from lbw_policy.base import Action

__all__ = ["DECISION_EVENTS", "action_dict", "action_rows", "effective_records", "from_json_number",
           "gate_action"]

#: Events the Governor records for a step (the others: ``run_start``, ``resume``, ``run_end``).
DECISION_EVENTS = ("fired", "action", "resolved", "recover", "error", "halt")

_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def from_json_number(value: Any) -> Any:
    """Undo :func:`lbw_policy.decision_log.sanitize` for one value: the strings ``"NaN"``,
    ``"Infinity"`` and ``"-Infinity"`` become floats; anything else is returned unchanged."""
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    return value


def gate_action(rule: Any, emitted: Mapping, step: int, mode: Any = None) -> dict:
    """What the device gate did at ``step`` for ``rule`` (a ``gate: device``
    :class:`~lbw_policy.spec.RuleSpec`), as the Governor's ``device_actions`` entry: the rule,
    the signals it read with their values, and a ``skip_step`` action applied at ``step``."""
    return {"rule": rule.name, "priority": rule.priority,
            "signals": {s: emitted.get(s) for s in rule.signals()},
            "action": Action("skip_step", "apply", requested=True, applied=True, before=False,
                             after=True, applied_step=step,
                             extra={} if mode is None else {"gate": mode})}


def action_dict(action: Action) -> dict:
    """An action as logged in a record (:meth:`~lbw_policy.base.Action.to_dict`)."""
    return action.to_dict()


def effective_records(records: Iterable[Mapping]) -> list[dict]:
    """The records with each action whose commit failed marked as not applied.

    The Governor writes a decision's record *before* it commits the actions (write-ahead), and
    the log is append-only: when a commit raises, the earlier record still shows the action as
    decided, and the ``error`` record that follows carries ``not_applied`` ``{id, seq, step,
    event, rule, action}`` naming it. This joins the two: in a copy of the decided record, that
    action gets ``applied: null``, ``after`` = ``before``, ``commit_failed`` (the error record's
    ``id``, or ``True`` when records have no ids, as in a shadow run) and a ``note``. The record
    is found by ``seq`` when both have one, else it is the latest earlier record with an action
    of that actuator. Records nothing refers to are returned as they are (not copied).

    :param records: decision records in log order.
    :returns: a new list of the same length and order.
    """
    out = list(records)
    by_seq = {r.get("seq"): i for i, r in enumerate(out)
              if isinstance(r, Mapping) and isinstance(r.get("seq"), int)}
    copied: set = set()
    for i, rec in enumerate(out):
        failed = rec.get("not_applied") if isinstance(rec, Mapping) else None
        if not isinstance(failed, Mapping) or not isinstance(failed.get("action"), Mapping):
            continue
        name = failed["action"].get("actuator")
        j = by_seq.get(failed.get("seq")) if isinstance(failed.get("seq"), int) else None
        if j is None or j >= i:
            j = next((k for k in range(i - 1, -1, -1) if isinstance(out[k], Mapping) and any(
                isinstance(a, Mapping) and a.get("actuator") == name
                for a in out[k].get("actions") or ())), None)
        if j is None:
            continue
        if j not in copied:  # copy once, then mark in place
            out[j] = dict(out[j], actions=[dict(a) if isinstance(a, Mapping) else a
                                           for a in out[j].get("actions") or ()])
            copied.add(j)
        for a in out[j]["actions"]:
            if isinstance(a, Mapping) and a.get("actuator") == name and "commit_failed" not in a:
                a.update(applied=None, after=a.get("before"),
                         commit_failed=True if rec.get("id") is None else rec["id"],
                         note=f"not applied: its commit raised {rec.get('error')}")
                break
    return out


def action_rows(records: Iterable[Mapping]) -> list[dict]:
    """Flatten decision records into comparison rows, one per action.

    A record with actions gives one row per action: ``{step, rule, event, actuator, value,
    clamped}`` where ``value`` is the action's ``applied`` value; a record without actions
    (``resolved``, ``halt``, ``error``) gives one row ``{step, rule, event}``. Records of
    other events (``run_start``, ``run_end``, ``resume``) give none. An action whose commit
    failed has ``value`` ``None`` (:func:`effective_records`).
    """
    rows = []
    for rec in effective_records(records):
        if rec.get("event") not in DECISION_EVENTS:
            continue
        base = {"step": rec.get("step"), "rule": rec.get("rule"), "event": rec.get("event")}
        actions = rec.get("actions") or []
        if not actions:
            rows.append(base)
        for a in actions:
            rows.append(dict(base, actuator=a.get("actuator"),
                             value=from_json_number(a.get("applied")),
                             clamped=bool(a.get("clamped"))))
    return rows
