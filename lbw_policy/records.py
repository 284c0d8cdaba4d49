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

__all__ = ["DECISION_EVENTS", "action_dict", "action_rows", "from_json_number", "gate_action"]

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


def action_rows(records: Iterable[Mapping]) -> list[dict]:
    """Flatten decision records into comparison rows, one per action.

    A record with actions gives one row per action: ``{step, rule, event, actuator, value,
    clamped}`` where ``value`` is the action's ``applied`` value; a record without actions
    (``resolved``, ``halt``, ``error``) gives one row ``{step, rule, event}``. Records of
    other events (``run_start``, ``run_end``, ``resume``) give none.
    """
    rows = []
    for rec in records:
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
