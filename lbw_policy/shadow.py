"""Shadow evaluation: a policy's rule engine and real actuators, driven by signal values alone.

``lbw-policy test`` drives it with scripted signal series, ``lbw-policy replay`` with a run's
recorded ``telemetry.jsonl``. Nothing trains: :meth:`Shadow.step` does what
:meth:`lbw_policy.adapters.torch.Guard.step` does once its detectors have run, in the same
order and with the same classes:

1. **hold**: the signals emitted this step update the latest values (sample-and-hold: a
   detector not due this step keeps its last values); a detector that raised this step loses
   its values, as in the guard.
2. **observe**: each actuator sees the step (a stand-in telemetry) and publishes its own
   signals (``skip_step.exhausted``, ...), which rules read alongside the detectors'; one that
   raises is contained (an ``error`` record, its signals absent), as in the guard.
3. **decide**: :class:`~lbw_policy.engine.Engine` evaluates the rules.
4. **plan / commit**: each command is planned by the policy's real actuator class (clamped to
   the policy's bounds) and, in ``enforce`` mode, committed; an action that halts (``halt``;
   ``rollback`` past its budget) ends the run. A plugin that raises gives an ``error`` record
   and the policy's ``on_error`` decides.
5. **recover**: actuators that no firing rule holds may recover.
6. **step or skip**: ``before_step`` / ``after_step`` (reverse order) run on stand-ins: a
   one-weight model and an AdamW over it at learning rate 1.0, never stepped. So ``skip_step``
   counts consecutive skips, ``rollback`` keeps its snapshot ring, and the stand-in's learning
   rate during the step is the factor ``lr_scale`` applied. Actuators are bound without a
   guard, so nothing is ever written to disk (no halt checkpoint).

Records have the guard's layout (``step``, ``event``, ``rule``, ``priority``, ``signals``,
``enforced``, ``actions``, ``overridden``; ``error``/``where``/``on_error``; ``message``) without
the hash-chain fields a :class:`~lbw_policy.decision_log.DecisionLog` adds.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Union

from lbw_policy.engine import Engine
from lbw_policy.errors import ActuatorError
from lbw_policy.policy import Policy, load_policy

__all__ = ["Shadow", "ShadowStep", "action_rows", "DECISION_EVENTS", "STAND_IN_HYPERPARAMETERS",
           "from_json_number"]

#: Events a :class:`Shadow` (and a guard) records for a step.
DECISION_EVENTS = ("fired", "action", "resolved", "recover", "error", "halt")

_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def from_json_number(value: Any) -> Any:
    """Undo :func:`lbw_policy.decision_log.sanitize` for one value: the strings ``"NaN"``,
    ``"Infinity"`` and ``"-Infinity"`` become floats; anything else is returned unchanged."""
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    return value


@dataclass
class ShadowStep:
    """What :meth:`Shadow.step` did at one step.

    :param step: the step index.
    :param records: the records of this step, in the order the guard writes them.
    :param skipped: the optimizer step would have been skipped.
    :param lr_factor: effective learning rate / scheduled learning rate during the step (every
        actuator that scales it: ``lr_scale``, ``momentum_reset``'s warm-up; 1.0 in ``audit``
        mode).
    :param lr_scale: the ``lr_scale`` actuator's scale in force during the step (1.0 without
        that actuator, and in ``audit`` mode where nothing is committed).
    :param halted: training would have stopped at this step (its optimizer step not taken).
    :param signals: every signal's held value after this step.
    """

    step: int
    records: list = field(default_factory=list)
    skipped: bool = False
    lr_factor: float = 1.0
    lr_scale: float = 1.0
    halted: bool = False
    signals: dict = field(default_factory=dict)


class Shadow:
    """A policy's engine and actuators, stepped by hand.

    :param policy: a :class:`~lbw_policy.policy.Policy` or a policy file path.
    :param registry: plugin registry (default :func:`lbw_policy.plugins.get_registry`).
    :param optimizer: the stand-in optimizer's class name: ``"AdamW"`` (default), ``"Adam"`` or
        ``"SGD"`` (others fall back to AdamW).
    :param hyperparameters: the run's param-group hyperparameters (``betas``, ``eps``,
        ``weight_decay``, ``amsgrad``, ``momentum``, ``dampening``, ``nesterov``); others are
        ignored, ``lr`` is always 1.0. Actuators that read them (``beta2`` recovers toward the
        optimizer's own beta2) then behave as in the run.
    :raises PolicyError: the policy file is invalid.
    :raises ActuatorError: an actuator cannot be simulated (it refuses the stand-in optimizer).
    :raises ValueError: the hyperparameters are invalid for that optimizer.
    """

    def __init__(self, policy: Union[Policy, str, "os.PathLike[str]"], *, registry: Any = None,
                 optimizer: str = "AdamW", hyperparameters: Optional[Mapping[str, Any]] = None) -> None:
        if registry is None:
            from lbw_policy.plugins import get_registry

            registry = get_registry()
        self.policy = load_policy(policy, registry=registry)
        self.enforce = self.policy.mode == "enforce"
        import torch  # the actuators' optimizer seam; nothing is ever stepped

        self.model = torch.nn.Linear(1, 1, bias=False)
        self.optimizer = _stand_in(self.model, optimizer, hyperparameters or {})
        self.actuators: dict = {}
        for name, spec in self.policy.actuators.items():
            actuator = registry.actuators[name].cls(**dict(spec.bounds))
            try:
                actuator.bind(model=self.model, guard=None)
                actuator.attach(self.optimizer)
            except ActuatorError as exc:
                raise ActuatorError(f"actuator {name!r} cannot be simulated without a real "
                                    f"training run: {exc}") from exc
            self.actuators[name] = actuator
        self.engine = Engine(self.policy.rules)
        self.latest: dict = {}
        self.halted = False
        self.skipped_steps = 0

    def step(self, step: int, emitted: Mapping[str, Any], failed: Iterable[str] = (),
             loss: Any = 0.0) -> ShadowStep:
        """Run one step on the signals emitted at it.

        :param step: the step index (increasing; need not be consecutive).
        :param emitted: ``{"<detector>.<signal>": value}`` emitted this step; numbers, bools,
            ``None`` or the strings ``"NaN"`` / ``"Infinity"`` / ``"-Infinity"``.
        :param failed: ids of detectors that raised this step (their held values are dropped).
        :param loss: the step's loss for the stand-in telemetry the actuators observe.
        :raises RuntimeError: the shadow run has already halted.
        """
        if self.halted:
            raise RuntimeError("the shadow run has halted; build a new Shadow to start again")
        out = ShadowStep(step)
        failed = set(failed)
        if failed:
            self.latest = {k: v for k, v in self.latest.items() if k.split(".", 1)[0] not in failed}
        self.latest.update({k: from_json_number(v) for k, v in emitted.items()})
        skip = False
        readable = dict(self.latest)
        tel = self._telemetry(step, loss)
        for name, actuator in self.actuators.items():
            try:
                actuator.observe(tel)
                for sig, val in actuator.signal_values().items():
                    readable[f"{name}.{sig}"] = val
            except Exception as exc:  # contained, as in the guard; its signals are absent
                skip |= self._error(out, f"actuator {name} signals", f"actuator {name!r} signals", exc)
                if out.halted:
                    return self._end(out)
        decisions = self.engine.evaluate(step, readable)
        commanded: set = set()
        halt_by = None
        for d in decisions:
            planned = []
            for cmd in d.commands:
                commanded.add(cmd.actuator)
                try:
                    planned.append((self.actuators[cmd.actuator].plan(cmd.verb, cmd.value, step), cmd))
                except Exception as exc:  # contained, as in the guard
                    skip |= self._error(out, f"actuator {cmd.actuator} plan",
                                        f"actuator {cmd.actuator!r}", exc)
                    if out.halted:
                        return self._end(out)
            out.records.append({
                "step": step, "event": d.event, "rule": d.rule, "priority": d.priority,
                "signals": dict(d.signals), "enforced": self.enforce,
                "actions": [dict(_action_dict(a), command={"verb": c.verb, "value": c.value})
                            for a, c in planned],
                "overridden": [{"actuator": c.actuator, "verb": c.verb, "value": c.value,
                                "overridden_by": winner} for c, winner in d.overridden]})
            if not self.enforce:
                continue
            for action, _ in planned:
                try:
                    self.actuators[action.actuator].commit(action)
                except Exception as exc:
                    skip |= self._error(out, f"actuator {action.actuator} commit",
                                        f"actuator {action.actuator!r}", exc)
                    if out.halted:
                        return self._end(out)
                halts = action.extra.get("halt") or (action.actuator == "halt" and action.applied)
                if halts and halt_by is None:
                    halt_by = (d.rule, dict(d.signals))
        if halt_by is not None:
            rule, signals = halt_by
            self._halt_record(out, rule, signals, f"rule {rule!r}")
            return self._end(out)

        held = self.engine.held_actuators() | commanded
        for name, actuator in self.actuators.items():
            if name in held:
                continue
            try:
                action = actuator.recover(step)
            except Exception as exc:
                skip |= self._error(out, f"actuator {name} recover",
                                    f"actuator {name!r} recover", exc)
                if out.halted:
                    return self._end(out)
                continue
            if action is None:
                continue
            out.records.append({"step": step, "event": "recover", "rule": None,
                                "enforced": self.enforce, "actions": [_action_dict(action)]})
            if self.enforce:
                try:
                    actuator.commit(action)
                except Exception as exc:
                    skip |= self._error(out, f"actuator {name} recover commit",
                                        f"actuator {name!r} recover commit", exc)
                    if out.halted:
                        return self._end(out)

        proceed = not skip
        group = self.optimizer.param_groups[0]
        group["lr"] = 1.0
        entered = []
        unwind_errors = []
        try:
            if self.enforce:
                for name, actuator in self.actuators.items():
                    entered.append((name, actuator))
                    try:
                        ok = actuator.before_step(self.optimizer)
                    except Exception as exc:
                        ok = not self._error(out, f"actuator {name} before_step",
                                             f"actuator {name!r} before_step", exc)
                        if out.halted:
                            break
                    proceed = ok and proceed
            out.lr_factor = float(group["lr"])
            if "lr_scale" in self.actuators:
                out.lr_scale = float(self.actuators["lr_scale"].state_dict().get("scale", 1.0))
        finally:
            for name, actuator in reversed(entered):
                try:
                    actuator.after_step(self.optimizer, proceed and not out.halted)
                except Exception as exc:
                    unwind_errors.append((name, exc))
        if out.halted:
            return self._end(out)
        for name, exc in unwind_errors:
            self._error(out, f"actuator {name} after_step", f"actuator {name!r} after_step", exc)
            if out.halted:
                return self._end(out)
        out.skipped = not proceed
        self.skipped_steps += out.skipped
        out.signals = dict(self.latest)
        return out

    # ------------------------------------------------------------------ helpers
    def _telemetry(self, step: int, loss: Any) -> Any:
        import torch

        from lbw_policy.telemetry import Telemetry

        loss = from_json_number(loss)
        value = float(loss) if isinstance(loss, (int, float)) else math.nan
        return Telemetry(step, torch.tensor(value), self.optimizer, self.model)

    def _error(self, out: ShadowStep, where: str, who: str, exc: BaseException) -> bool:
        """Record a contained plugin error; apply on_error; return True to skip the step."""
        on_error = self.policy.on_error
        out.records.append({"step": out.step, "event": "error", "rule": None, "where": where,
                            "error": f"{type(exc).__name__}: {exc}", "on_error": on_error})
        if on_error == "halt" and self.enforce:
            self._halt_record(out, None, {}, f"on_error=halt after {who} raised "
                              f"{type(exc).__name__}: {exc}")
        return on_error == "skip_step" and self.enforce

    def _halt_record(self, out: ShadowStep, rule: Optional[str], signals: dict, reason: str) -> None:
        message = f"training halted at step {out.step} by {reason}"
        out.records.append({"step": out.step, "event": "halt", "rule": rule, "signals": signals,
                            "message": message})
        out.halted = True

    def _end(self, out: ShadowStep) -> ShadowStep:
        self.halted = True
        out.skipped = True
        out.signals = dict(self.latest)
        return out


#: Optimizers a shadow can stand in for, with the hyperparameters it copies from the run.
STAND_IN_HYPERPARAMETERS = {"AdamW": ("betas", "eps", "weight_decay", "amsgrad"),
                            "Adam": ("betas", "eps", "weight_decay", "amsgrad"),
                            "SGD": ("momentum", "dampening", "weight_decay", "nesterov")}


def _stand_in(model: Any, kind: str, hyper: Mapping[str, Any]) -> Any:
    """A never-stepped optimizer over the stand-in model, learning rate 1.0."""
    import torch

    kind = kind if kind in STAND_IN_HYPERPARAMETERS else "AdamW"
    kw = {k: from_json_number(hyper[k]) for k in STAND_IN_HYPERPARAMETERS[kind] if k in hyper}
    if "betas" in kw:
        kw["betas"] = tuple(float(b) for b in kw["betas"])
    return getattr(torch.optim, kind)(model.parameters(), lr=1.0, **kw)


def _action_dict(action: Any) -> dict:
    d = action.to_dict()
    d.pop("step", None)
    return d


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
