"""The rule engine: conditions, ``for`` / ``keep_firing_for`` / ``cooldown``, priorities and
conflict resolution.

Pure Python: it takes signal values (floats, ints, bools or ``None``) and returns
:class:`~lbw_policy.spec.Decision` objects. It imports nothing outside the standard library and
:mod:`lbw_policy.spec`, so rules are unit-testable and replayable from a recorded telemetry file.

Conditions
----------
A condition is a tree of plain dicts:

* ``{"all": [c1, c2, ...]}`` is true when every child is true (``all([])`` is true);
* ``{"any": [c1, c2, ...]}`` is true when at least one child is true (``any([])`` is false);
* ``{"not": c}`` is true when its child is false;
* a leaf ``{"signal": name, "op": op, "value": v}`` with ``op`` one of
  :data:`~lbw_policy.spec.OPS` is true when ``signals[name] op v``.

Leaf values:

* A signal that is **missing** from ``signals``, is ``None``, or is **NaN** makes its leaf
  **false**, whatever the operator (``!=`` included). A ``not`` over such a leaf is therefore
  **true**: ``{"not": {"signal": "x", "op": ">", "value": 4}}`` holds while ``x`` has no value.
  Write ``{"signal": "x", "op": "<=", "value": 4}`` instead of the ``not`` to stay quiet until
  ``x`` exists.
* ``+inf`` and ``-inf`` compare as IEEE floats do: ``+inf > 4`` is true, ``-inf > 4`` is false.
* ``bool`` values (on either side) compare as ``1`` / ``0``: ``True == 1`` and ``True > 0.5``.
* Any other value type raises :class:`TypeError` naming the signal; a malformed node or an
  unknown operator raises :class:`ValueError` naming its path (e.g. ``when.any[1].op``).

Rule life cycle
---------------
Each rule keeps four numbers, all in :meth:`Engine.state_dict`:

* ``pending``: consecutive true evaluations while not firing;
* ``firing``: whether the rule is firing;
* ``clear``: consecutive false evaluations while firing;
* ``resolved_step``: the step at which the rule last resolved (``None`` before that).

On each :meth:`Engine.evaluate` call at step ``t``, per rule:

* **Not firing, in cooldown** (``cooldown > 0`` and ``t <= resolved_step + cooldown``): the
  condition is ignored and ``pending = 0``. No decision.
* **Not firing, condition true**: ``pending += 1``. When ``pending >= for`` the rule fires:
  decision ``event="fired"`` with the rule's commands; ``clear = 0``.
* **Not firing, condition false**: ``pending = 0``. No decision.
* **Firing, condition true**: ``clear = 0``; decision ``event="action"`` with the rule's commands
  (a firing rule keeps acting every evaluation its condition holds).
* **Firing, condition false**: ``clear += 1``. When ``clear > keep_firing_for`` the rule
  resolves: decision ``event="resolved"`` with no commands; ``firing = False``, ``pending = 0``,
  ``clear = 0``, ``resolved_step = t``. Otherwise it stays firing silently (no decision) and
  still holds its actuators (:meth:`Engine.held_actuators`).

``for`` and ``keep_firing_for`` count *evaluations*; ``cooldown`` counts *steps*. Steps are the
caller's and need not be consecutive (a detector running every 50 steps evaluates rarely).

Example, ``for: 2, keep_firing_for: 1, cooldown: 3`` over steps 0..9 with condition
``T T T F T F F T T T``::

    step 0 T  pending=1
    step 1 T  pending=2 -> fired
    step 2 T  action
    step 3 F  clear=1 (<= 1: still firing, silent)
    step 4 T  action (clear=0)
    step 5 F  clear=1 (silent)
    step 6 F  clear=2 -> resolved, resolved_step=6
    step 7 T  cooldown (7 <= 6+3): ignored
    step 8 T  cooldown: ignored
    step 9 T  cooldown: ignored; step 10 T would start pending=1, step 11 T would fire

Conflicts
---------
Within one :meth:`Engine.evaluate` call, decisions are ordered by ``priority`` descending, then
``index`` ascending (earlier in the policy file first; equal indexes keep the order the rules
were given). Walking that order, the first rule to command an actuator owns it for the step;
any later command to that actuator is removed from its decision's ``commands`` and appended to
its ``overridden`` as ``(command, winner_rule_name)``. A decision whose commands were all
overridden is still returned. Two commands of the *same* rule to one actuator are both kept
(the policy schema forbids writing them).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Mapping, Optional, Sequence

from lbw_policy.spec import OPS, Command, Decision, RuleSpec

__all__ = ["Engine", "compile_condition", "evaluate_condition", "explain_condition"]

#: Version of the layout returned by :meth:`Engine.state_dict`.
STATE_VERSION = 1

_COMPARE = {
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}

_KEYS = ("all", "any", "not", "signal")


def _node_kind(node: Any, path: str) -> str:
    """Return which of ``all`` / ``any`` / ``not`` / ``signal`` the node is; ValueError if none."""
    if not isinstance(node, Mapping):
        raise ValueError(f"{path}: expected a condition mapping, found {type(node).__name__}")
    kinds = [k for k in _KEYS if k in node]
    if len(kinds) != 1:
        raise ValueError(
            f"{path}: expected exactly one of 'all', 'any', 'not', 'signal', found "
            f"{sorted(node) if kinds == [] else kinds}"
        )
    kind = kinds[0]
    if kind in ("all", "any") and not isinstance(node[kind], (list, tuple)):
        raise ValueError(f"{path}.{kind}: expected a list, found {type(node[kind]).__name__}")
    if kind == "signal" and node.get("op") not in _COMPARE:
        raise ValueError(f"{path}.op: expected one of {', '.join(OPS)}, found {node.get('op')!r}")
    return kind


def _number(x: Any, what: str) -> Optional[float]:
    """``x`` as a float for comparison; ``None`` when it has no value (None or NaN)."""
    if x is None:
        return None
    if isinstance(x, bool):
        return 1.0 if x else 0.0
    if not isinstance(x, numbers.Real):
        raise TypeError(f"{what}: expected a number, bool or None, found {type(x).__name__} {x!r}")
    f = float(x)
    return None if math.isnan(f) else f


def _leaf(node: Mapping, signals: Mapping, path: str) -> tuple[Any, bool]:
    name = node["signal"]
    actual = signals.get(name)
    a = _number(actual, f"signal {name!r}")
    b = _number(node.get("value"), f"{path}.value")
    if a is None or b is None:
        return actual, False
    return actual, bool(_COMPARE[node["op"]](a, b))


def _evaluate(node: Any, signals: Mapping, path: str) -> bool:
    kind = _node_kind(node, path)
    if kind == "all":
        return all(_evaluate(c, signals, f"{path}.all[{i}]") for i, c in enumerate(node["all"]))
    if kind == "any":
        return any(_evaluate(c, signals, f"{path}.any[{i}]") for i, c in enumerate(node["any"]))
    if kind == "not":
        return not _evaluate(node["not"], signals, f"{path}.not")
    return _leaf(node, signals, path)[1]


def evaluate_condition(node: Mapping, signals: Mapping, path: str = "when") -> bool:
    """Evaluate a condition tree against one step's signals (see the module docstring).

    :param node: ``{"all": [...]}``, ``{"any": [...]}``, ``{"not": {...}}`` or a leaf
        ``{"signal": name, "op": op, "value": v}``.
    :param signals: ``{signal_name: value}``; missing, ``None`` and NaN values make a leaf false.
    :param path: where ``node`` sits, used in error messages (default ``"when"``).
    :returns: whether the condition holds.
    :raises ValueError: a node is malformed or a leaf's ``op`` is not one of ``OPS``.
    :raises TypeError: a signal or leaf value is not a number, bool or ``None``.
    """
    return _evaluate(node, signals, path)


def compile_condition(node: Mapping, path: str = "when") -> Callable[[Mapping], bool]:
    """The condition tree as one function of the signals, equivalent to
    ``lambda signals: evaluate_condition(node, signals, path)`` and checked once, here: the
    engine calls it every step without re-walking the tree's dicts.

    :raises ValueError, TypeError: as :func:`evaluate_condition`, for the tree's shape and its
        leaf values (a signal's type is checked when it is read).
    """
    kind = _node_kind(node, path)
    if kind in ("all", "any"):
        children = tuple(compile_condition(c, f"{path}.{kind}[{i}]") for i, c in enumerate(node[kind]))
        if kind == "all":
            return lambda signals: all(f(signals) for f in children)
        return lambda signals: any(f(signals) for f in children)
    if kind == "not":
        child = compile_condition(node["not"], f"{path}.not")
        return lambda signals: not child(signals)
    name, compare = node["signal"], _COMPARE[node["op"]]
    value = _number(node.get("value"), f"{path}.value")
    what = f"signal {name!r}"
    if value is None:                      # a leaf with no value (None / NaN) is always false
        def leaf(signals: Mapping) -> bool:
            _number(signals.get(name), what)
            return False
        return leaf

    def leaf(signals: Mapping) -> bool:
        actual = signals.get(name)
        if type(actual) is float:          # the usual case, without the checks of _number
            return actual == actual and compare(actual, value)
        a = _number(actual, what)
        return a is not None and bool(compare(a, value))
    return leaf


def explain_condition(node: Mapping, signals: Mapping, path: str = "when") -> dict:
    """The condition tree annotated with what each part evaluated to (for ``audit --explain``).

    Every node gets ``"result"``; every leaf also gets ``"actual"`` (the signal's value as given,
    ``None`` when missing). Unlike :func:`evaluate_condition` every child is evaluated, so the
    explanation is complete::

        {"any": [{"signal": "loss.zscore", "op": ">", "value": 4.0, "actual": 5.1,
                  "result": True}], "result": True}

    :raises ValueError, TypeError: as :func:`evaluate_condition`.
    """
    kind = _node_kind(node, path)
    if kind in ("all", "any"):
        children = [explain_condition(c, signals, f"{path}.{kind}[{i}]")
                    for i, c in enumerate(node[kind])]
        combine = all if kind == "all" else any
        return {kind: children, "result": combine(c["result"] for c in children)}
    if kind == "not":
        child = explain_condition(node["not"], signals, f"{path}.not")
        return {"not": child, "result": not child["result"]}
    actual, result = _leaf(node, signals, path)
    return {"signal": node["signal"], "op": node["op"], "value": node.get("value"),
            "actual": actual, "result": result}


def _fresh_state() -> dict:
    return {"pending": 0, "firing": False, "clear": 0, "resolved_step": None}


class Engine:
    """Evaluates a policy's rules step by step and resolves conflicts between them.

    :param rules: the validated rules (``Policy.rules``). Names must be unique.
    :raises ValueError: duplicate rule names, a negative ``keep_firing_for`` / ``cooldown``,
        ``for`` below 1, or a malformed condition (the message names the rule and the path).

    The engine holds only per-rule timers (see the module docstring); it round-trips through
    :meth:`state_dict` / :meth:`load_state_dict` so a resumed run decides as an uninterrupted one.
    """

    def __init__(self, rules: Sequence[RuleSpec]) -> None:
        self.rules: tuple[RuleSpec, ...] = tuple(rules)
        seen: set[str] = set()
        for rule in self.rules:
            where = f"rule {rule.name!r}" + (f" ({rule.path})" if rule.path else "")
            if rule.name in seen:
                raise ValueError(f"{where}: duplicate rule name; rule names must be unique")
            seen.add(rule.name)
            if rule.for_ < 1:
                raise ValueError(f"{where}: expected for >= 1, found {rule.for_}")
            if rule.keep_firing_for < 0:
                raise ValueError(f"{where}: expected keep_firing_for >= 0, "
                                 f"found {rule.keep_firing_for}")
            if rule.cooldown < 0:
                raise ValueError(f"{where}: expected cooldown >= 0, found {rule.cooldown}")
            try:
                explain_condition(rule.when, {})  # checks every node's shape once, up front
            except (ValueError, TypeError) as err:
                raise ValueError(f"{where}: {err}") from err
        # Winner order for conflicts and output order: priority desc, index asc, given order.
        self._order = sorted(range(len(self.rules)),
                             key=lambda i: (-self.rules[i].priority, self.rules[i].index, i))
        self._signals = [rule.signals() for rule in self.rules]
        self._when = [compile_condition(rule.when) for rule in self.rules]
        self._state: dict[str, dict] = {rule.name: _fresh_state() for rule in self.rules}

    def _step_rule(self, i: int, step: int, signals: Mapping) -> Optional[Decision]:
        """Advance rule ``i`` by one evaluation; return its decision, or None when silent."""
        rule, st = self.rules[i], self._state[self.rules[i].name]
        event: Optional[str] = None
        if st["firing"]:
            if self._when[i](signals):
                st["clear"] = 0
                event = "action"
            else:
                st["clear"] += 1
                if st["clear"] > rule.keep_firing_for:
                    st.update(firing=False, pending=0, clear=0, resolved_step=step)
                    event = "resolved"
        elif (rule.cooldown > 0 and st["resolved_step"] is not None
              and step <= st["resolved_step"] + rule.cooldown):
            st["pending"] = 0
        elif self._when[i](signals):
            st["pending"] += 1
            if st["pending"] >= rule.for_:
                st.update(firing=True, clear=0)
                event = "fired"
        else:
            st["pending"] = 0
        if event is None:
            return None
        return Decision(
            step=step,
            rule=rule.name,
            priority=rule.priority,
            event=event,
            signals={name: signals.get(name) for name in self._signals[i]},
            commands=list(rule.then) if event != "resolved" else [],
        )

    def evaluate(self, step: int, signals: Mapping[str, "float | bool | None"]) -> list[Decision]:
        """Evaluate every rule once at ``step`` and resolve conflicts between their commands.

        :param step: the training step; used for cooldown only, need not be consecutive.
        :param signals: ``{"<detector_id>.<signal>": value}``; a signal absent this step
            (detector not due, not warmed up) may be left out or given as ``None``.
        :returns: the decisions of this step (``fired`` / ``action`` / ``resolved``), ordered by
            priority descending then rule index ascending; rules that stay silent are absent.
        :raises TypeError: a signal a rule reads is neither a number, a bool nor ``None``.
        """
        decisions = [d for d in (self._step_rule(i, step, signals) for i in self._order) if d]
        owner: dict[str, str] = {}  # actuator -> winning rule's name
        for d in decisions:
            kept: list[Command] = []
            for cmd in d.commands:
                winner = owner.setdefault(cmd.actuator, d.rule)
                if winner == d.rule:
                    kept.append(cmd)
                else:
                    d.overridden.append((cmd, winner))
            d.commands = kept
        return decisions

    def firing(self) -> list[str]:
        """Names of the rules currently firing, in policy order (``index``, then given order)."""
        return [r.name for r in sorted(self.rules, key=lambda r: r.index)
                if self._state[r.name]["firing"]]

    def held_actuators(self) -> set[str]:
        """Actuators named in the ``then`` of any currently firing rule.

        The guard suspends these actuators' recovery (e.g. the learning-rate scale creeping back
        to 1) while a rule holds them, including during ``keep_firing_for``.
        """
        return {c.actuator for r in self.rules if self._state[r.name]["firing"] for c in r.then}

    def state_dict(self) -> dict:
        """The rule timers as plain, JSON-serializable data.

        ``{"version": 1, "rules": {name: {"pending": int, "firing": bool, "clear": int,
        "resolved_step": int | None}}}``
        """
        return {"version": STATE_VERSION,
                "rules": {name: dict(st) for name, st in self._state.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore timers saved by :meth:`state_dict` (possibly after a JSON round trip).

        :raises ValueError: the version is not this engine's, or the saved rule names differ from
            this engine's (the message lists what is missing and what is unexpected), or a rule's
            entry lacks a field. Nothing is changed when it raises.
        """
        if not isinstance(state, Mapping) or "rules" not in state:
            raise ValueError("engine state: expected a mapping with 'version' and 'rules', "
                             f"found {type(state).__name__}")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"engine state: expected version {STATE_VERSION}, "
                             f"found {state.get('version')!r}")
        saved = state["rules"]
        mine = [r.name for r in self.rules]
        if set(saved) != set(mine):
            missing = sorted(set(mine) - set(saved))
            unexpected = sorted(set(saved) - set(mine))
            raise ValueError(
                "engine state: rule names do not match this engine's rules: "
                f"missing {missing}, unexpected {unexpected} "
                "(was the state saved with another policy?)"
            )
        new: dict[str, dict] = {}
        for name in mine:
            entry = saved[name]
            absent = [k for k in ("pending", "firing", "clear", "resolved_step") if k not in entry]
            if absent:
                raise ValueError(f"engine state: rule {name!r}: missing fields {absent}")
            rs = entry["resolved_step"]
            new[name] = {"pending": int(entry["pending"]), "firing": bool(entry["firing"]),
                         "clear": int(entry["clear"]),
                         "resolved_step": None if rs is None else int(rs)}
        self._state = new
