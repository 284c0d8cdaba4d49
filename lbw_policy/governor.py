"""Stage 5 of a governed step: the one place that knows the order of a step.

``Guard`` (live training), ``replay`` (a recorded ``telemetry.jsonl``) and ``lbw-policy test``
(scripted signal series) all drive a :class:`Governor`; what a replay or a policy test shows is
what the live guard does, by construction. Plain numbers in, records and actions out: this
module imports no torch (DESIGN.md, "Data flow").

One call of :meth:`Governor.step`, in this order:

1. **faults**: the sensing side's plugin errors of the step (a detector's ``compute``), as
   :class:`Fault` values, each written as an ``error`` record and handled by ``on_error``.
2. **hold**: the signals emitted this step update the latest values (sample-and-hold: a
   detector not due keeps its last values; one that raised loses them).
3. **observe**: every actuator sees the step's observation (the torch ``Telemetry`` in a live
   run, a stand-in carrying recorded values in replay) and publishes its own signals.
4. **evaluate**: the rule engine decides on plain floats.
5. **plan**: each command is planned by its actuator (clamped to the policy's bounds).
6. **write-ahead**: the decision's record goes to the sink (the decision log) *before* anything
   changes; a failing sink is fatal: the Governor halts, nothing more is committed, and the
   optimizer step is not taken.
7. **commit** (``enforce`` mode): the planned actions are applied. A commit that raises leaves
   the write-ahead record saying what was decided (the log is append-only); the ``error``
   record that follows it carries ``not_applied``: the record's ``id`` / ``seq`` / ``rule`` and
   the action that did not take effect (:func:`lbw_policy.records.effective_records` reads the
   two together).
8. **halt check**: an action that halts (``halt``; ``rollback`` past its budget) ends the step.
9. **recover**: actuators that no firing rule holds may recover (logged the same way).
10. **step**: every actuator's ``before_step`` (any may veto), the step function the caller gave
    (``optimizer.step()`` live; nothing in a shadow), then ``after_step`` in reverse order, even
    on a veto or an error, with whether the step ran.
11. **after**: the caller's post-step hook (detectors' ``after_step``) returns its faults, handled
    like the others (the step is already taken: ``skip_step`` cannot apply any more).

Containment (:meth:`Governor._contain`, the one helper): a plugin error becomes an ``error``
record with a structured ``fault`` ``{plugin, name, phase}``; ``on_error: continue`` goes on
without that plugin's output this step, ``skip_step`` skips the optimizer step (before it is
taken), ``halt`` writes a ``halt`` record and ends the step. Nothing inside :meth:`step` raises
except a programming error of this module; the caller raises
:class:`~lbw_policy.errors.TrainingHalted` / the sink's error from the returned
:class:`StepOutcome`.

Deferred transport: with a transport delay, the caller evaluates the signals of step
``signals_step`` at step ``step`` (one later); records carry both. An action the device took by
itself at ``signals_step`` (the same-step gate) is passed in as ``device_actions`` and recorded
now, marked ``device: true``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from lbw_policy.base import Action
from lbw_policy.engine import Engine
from lbw_policy.records import action_dict

__all__ = ["Governor", "Fault", "StepOutcome", "DETECTOR_PHASES", "ACTUATOR_PHASES"]

#: Phases in which a detector plugin runs (``compute`` on due steps, ``after_step`` every step).
DETECTOR_PHASES = ("compute", "after_step")
#: Phases in which an actuator plugin runs, in step order.
ACTUATOR_PHASES = ("device_applied", "signals", "plan", "commit", "recover", "recover_commit",
                   "before_step", "after_step")


@dataclass(frozen=True)
class Fault:
    """A plugin error, as data (never prose parsed back).

    :param plugin: ``"detector"`` or ``"actuator"``.
    :param name: the detector id or the actuator name.
    :param phase: one of :data:`DETECTOR_PHASES` / :data:`ACTUATOR_PHASES`.
    :param error: ``"<ExceptionType>: <message>"``.
    :param type: the detector's plugin type (``loss_spike``), for the record's prose.
    :param rank: the rank that raised (distributed runs), or ``None``.
    """

    plugin: str
    name: str
    phase: str
    error: str
    type: Optional[str] = None
    rank: Optional[int] = None

    @classmethod
    def of(cls, plugin: str, name: str, phase: str, exc: BaseException,
           type: Optional[str] = None) -> "Fault":
        return cls(plugin, name, phase, f"{type_name(exc)}: {exc}", type)

    @property
    def where(self) -> str:
        """The record's human-readable ``where`` (``detector loss (loss_spike)``,
        ``actuator lr_scale commit``)."""
        if self.plugin == "detector" and self.phase == "compute":
            return f"detector {self.name} ({self.type})" if self.type else f"detector {self.name}"
        return f"{self.plugin} {self.name} {self.phase.replace('_commit', ' commit')}"

    def to_dict(self) -> dict:
        d = {"plugin": self.plugin, "name": self.name, "phase": self.phase, "error": self.error}
        if self.type is not None:
            d["type"] = self.type
        if self.rank is not None:
            d["rank"] = self.rank
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "Fault":
        """Inverse of :meth:`to_dict`. :raises KeyError, TypeError: not a fault mapping."""
        return cls(str(d["plugin"]), str(d["name"]), str(d["phase"]), str(d["error"]),
                   d.get("type"), d.get("rank"))


def type_name(exc: BaseException) -> str:
    return type(exc).__name__


@dataclass
class StepOutcome:
    """What :meth:`Governor.step` did.

    :param step: the step at which the actions apply.
    :param signals_step: the step whose signals were read (``step`` minus the transport delay).
    :param records: the records written this step, in order (as returned by the sink).
    :param stepped: the step function ran (the optimizer step was taken).
    :param skipped: the optimizer step was not taken (a veto, ``on_error: skip_step`` or a halt).
    :param halted: training stops at this step.
    :param halt: ``{rule, signals, message, checkpoint}`` of the halt, or ``None``.
    :param fatal: the sink's exception when writing a record failed (the Governor is halted).
    :param lr: the first param group's learning rate during the step (after every actuator's
        ``before_step``), or ``None`` when the optimizer has none.
    :param scheduled_lr: the first param group's learning rate before the actuators changed it.
    :param lr_scale: the ``lr_scale`` actuator's scale in force during the step (1.0 without it).
    """

    step: int
    signals_step: int
    records: list = field(default_factory=list)
    stepped: bool = False
    skipped: bool = True
    halted: bool = False
    halt: Optional[dict] = None
    fatal: Optional[BaseException] = None
    lr: Optional[float] = None
    scheduled_lr: Optional[float] = None
    lr_scale: float = 1.0

    @property
    def lr_factor(self) -> float:
        """Effective / scheduled learning rate during the step (1.0 when unknown)."""
        if self.lr is None or not self.scheduled_lr:
            return 1.0
        return self.lr / self.scheduled_lr


class _Stop(Exception):
    """Internal: the step ends here (a halt or a failed sink)."""


class Governor:
    """A policy's rule engine and actuators, stepped in the one step order.

    :param policy: the validated :class:`~lbw_policy.policy.Policy`.
    :param actuators: ``{name: Actuator}`` built from the policy, bound and attached.
    :param sink: ``sink(record) -> record``: writes a record (the decision log adds the chain
        fields and returns the written record). Any exception it raises is fatal.
    :param rules: the rules the host engine evaluates (default: all of the policy's). The guard
        leaves out the rules a device gate carries out.
    """

    def __init__(self, policy: Any, actuators: Mapping[str, Any],
                 sink: Callable[[dict], dict], *, rules: Optional[Sequence] = None) -> None:
        self.policy = policy
        self.enforce = policy.mode == "enforce"
        self.on_error = policy.on_error
        self.actuators = dict(actuators)
        self.sink = sink
        self.engine = Engine(policy.rules if rules is None else rules)
        self.latest: dict = {}
        self.halted = False
        self.skipped_steps = 0          # optimizer steps the host did not take
        self.gated_steps = 0            # steps the device gate undid (learnt one step late)
        self.counts: Counter = Counter()  # decisions by "event:", "rule:", "actuator:"

    # ------------------------------------------------------------------ the step
    def step(self, step: int, emitted: Mapping[str, Any], faults: Iterable[Fault] = (), *,
             observation: Any = None, optimizer: Any = None,
             step_fn: Optional[Callable[[], None]] = None,
             after_step: Optional[Callable[[bool], Iterable[Fault]]] = None,
             signals_step: Optional[int] = None,
             device_actions: Sequence[Mapping] = ()) -> StepOutcome:
        """Govern one step (see the module docstring for the order).

        :param step: the step index at which actions apply (increasing).
        :param emitted: ``{"<detector>.<signal>": value}`` emitted at ``signals_step``: floats,
            bools or ``None`` (sample-and-hold: absent names keep their last value).
        :param faults: the detectors' ``compute`` faults of ``signals_step``.
        :param observation: what actuators' ``observe`` receives (a ``Telemetry`` or stand-in).
        :param optimizer: what actuators' ``before_step`` / ``after_step`` receive.
        :param step_fn: takes the optimizer step; called only when no actuator vetoes it. It may
            return ``False`` to say it took no step after all (GradScaler's inf/NaN gradients):
            the step then counts as skipped and ``after_step`` hooks see ``stepped=False``.
        :param after_step: ``after_step(stepped) -> faults``: the caller's post-step hook
            (detectors' ``after_step``), called once the actuators are unwound.
        :param signals_step: the step whose signals ``emitted`` holds (default ``step``).
        :param device_actions: gate outcomes of ``signals_step`` taken on the device:
            ``{rule, signals, action: Action}`` each (the action's ``applied_step`` set);
            recorded as ``device: true``.
        :returns: :class:`StepOutcome`. Never raises for a plugin's or the sink's error; an
            exception of ``step_fn`` itself propagates, after every actuator is unwound.
        :raises RuntimeError: the Governor has already halted.
        """
        if self.halted:
            raise RuntimeError("the governed run has halted; build a new one to continue")
        out = StepOutcome(step, step if signals_step is None else signals_step)
        group = _first_group(optimizer)
        if group is not None:
            out.scheduled_lr = _float(group.get("lr"))
        self._out = out
        self._skip = False
        try:
            self._govern(out, dict(emitted), list(faults), observation, device_actions)
            self._take_step(out, optimizer, group, step_fn)
            if after_step is not None:
                for fault in after_step(out.stepped):
                    self._contain(fault)
        except _Stop:
            pass
        out.skipped = not out.stepped
        self.skipped_steps += out.skipped and not out.halted
        if "lr_scale" in self.actuators and self.enforce:
            out.lr_scale = float(self.actuators["lr_scale"].state_dict().get("scale", 1.0))
        return out

    def _govern(self, out: StepOutcome, emitted: dict, faults: list, observation: Any,
                device_actions: Sequence[Mapping]) -> None:
        step = out.step
        self._record_device(out, device_actions)
        failed = {f.name for f in faults if f.plugin == "detector" and f.phase == "compute"}
        for fault in faults:
            self._contain(fault)
        # hold: no stale values from a detector that raised; the others sample-and-hold
        if failed:
            self.latest = {k: v for k, v in self.latest.items() if k.split(".", 1)[0] not in failed}
        self.latest.update(emitted)
        # observe: actuators see the step and publish their own state as signals
        readable = dict(self.latest)
        for name, actuator in self.actuators.items():
            try:
                actuator.observe(observation)
                for sig, val in actuator.signal_values().items():
                    readable[f"{name}.{sig}"] = _signal_value(val, f"{name}.{sig}")
            except Exception as exc:  # contained; its signals are absent this step
                self._contain(Fault.of("actuator", name, "signals", exc))
        # evaluate -> plan -> write-ahead -> commit
        commanded: set = set()
        halt_by: Optional[tuple] = None
        for d in self.engine.evaluate(step, readable):
            planned: list = []  # (action, command); a command whose plan raised has none
            for cmd in d.commands:
                commanded.add(cmd.actuator)
                try:
                    planned.append((self.actuators[cmd.actuator].plan(cmd.verb, cmd.value, step), cmd))
                except Exception as exc:
                    self._contain(Fault.of("actuator", cmd.actuator, "plan", exc))
            decided = self._write({
                "step": step, "signals_step": out.signals_step, "event": d.event,
                "rule": d.rule, "priority": d.priority, "signals": d.signals,
                "enforced": self.enforce,
                "actions": [dict(action_dict(a), command={"verb": c.verb, "value": c.value})
                            for a, c in planned],
                "overridden": [{"actuator": c.actuator, "verb": c.verb, "value": c.value,
                                "overridden_by": winner} for c, winner in d.overridden]})
            self._count(d.event, d.rule, [a for a, _ in planned])
            if not self.enforce:
                continue
            for action, _ in planned:
                committed = self._commit(action, "commit", decided)
                # an action marked halt (the halt actuator; rollback past its budget) stops
                # training, even when its commit (the checkpoint) failed
                if _halts(action) and halt_by is None:
                    halt_by = (d.rule, d.signals,
                               action.extra.get("checkpoint") if committed else None)
        if halt_by is not None:
            self._halt(halt_by[0], halt_by[1], f"rule {halt_by[0]!r}", checkpoint=halt_by[2])
        # recover: actuators that no firing rule holds
        held = self.engine.held_actuators() | commanded
        for name, actuator in self.actuators.items():
            if name in held:
                continue
            try:
                action = actuator.recover(step)
            except Exception as exc:
                self._contain(Fault.of("actuator", name, "recover", exc))
                continue
            if action is None:
                continue
            decided = self._write({"step": step, "signals_step": out.signals_step,
                                   "event": "recover", "rule": None, "enforced": self.enforce,
                                   "actions": [action_dict(action)]})
            self.counts["event:recover"] += 1
            if self.enforce:
                self._commit(action, "recover_commit", decided)

    def _record_device(self, out: StepOutcome, device_actions: Sequence[Mapping]) -> None:
        """What the device gate did at ``signals_step``, learnt now: recorded first, so that a
        fault that halts after it cannot hide it; the actuator counts it."""
        self.gated_steps += bool(device_actions)  # one step's gate, however many rules fired
        for dev in device_actions:
            action = dev["action"]
            self._write({"step": out.step, "signals_step": out.signals_step, "event": "action",
                         "rule": dev["rule"], "priority": dev.get("priority", 0),
                         "signals": dict(dev.get("signals") or {}), "enforced": self.enforce,
                         "device": True,
                         "actions": [action_dict(action)]})
            self._count("action", dev["rule"], [action])
            try:  # the actuator counts it (skip_step: max_consecutive over both kinds)
                self.actuators[action.actuator].device_applied(action)
            except Exception as exc:
                self._contain(Fault.of("actuator", action.actuator, "device_applied", exc))

    def record_device(self, step: int, signals_step: int,
                      device_actions: Sequence[Mapping]) -> list:
        """Record the device gate's outcome of the last step when no step follows (the guard's
        ``close()``). :returns: the records written."""
        out = StepOutcome(step, signals_step)
        self._out = out
        try:
            self._record_device(out, device_actions)
        except _Stop:
            pass
        return out.records

    def record_scaler_skip(self, step: int) -> StepOutcome:
        """A step a mixed-precision loss scaler skipped (overflowed gradients; the scaler's
        normal business): one ``scaler_skipped`` record, counted as ``event:scaler_skipped``;
        nothing is held, observed, evaluated or recovered, so no rule timer or actuator moves.
        :returns: the outcome (``skipped``; ``fatal`` when the record could not be written)."""
        if self.halted:
            raise RuntimeError("the governed run has halted; build a new one to continue")
        out = StepOutcome(step, step)
        self._out = out
        try:
            self._write({"step": step, "event": "scaler_skipped", "rule": None,
                         "enforced": self.enforce})
            self.counts["event:scaler_skipped"] += 1
        except _Stop:
            pass
        return out

    def _take_step(self, out: StepOutcome, optimizer: Any, group: Optional[dict],
                   step_fn: Optional[Callable[[], None]]) -> None:
        """before_step (any may veto) -> the step -> after_step in reverse order, always."""
        proceed = not self._skip
        entered: list = []
        stop: Optional[_Stop] = None
        try:
            if self.enforce:
                for name, actuator in self.actuators.items():
                    entered.append((name, actuator))
                    try:
                        ok = actuator.before_step(optimizer, out.step)
                    except Exception as exc:
                        self._contain(Fault.of("actuator", name, "before_step", exc))
                        ok = not self._skip
                    proceed = bool(ok) and proceed and not self._skip
            if group is not None:
                out.lr = _float(group.get("lr"))
            if proceed and step_fn is not None:
                proceed = step_fn() is not False  # a step function may report it took none
            out.stepped = proceed
        except _Stop as exc:  # a halt (or a failed sink) during before_step: not stepped
            stop = exc
        except BaseException as exc:  # the step function itself raised: unwind, then re-raise
            stop = exc
        faults = []
        for name, actuator in reversed(entered):  # unwind param-group changes in reverse order
            try:
                actuator.after_step(optimizer, out.stepped, out.step)
            except Exception as exc:
                faults.append(Fault.of("actuator", name, "after_step", exc))
        if stop is not None:
            raise stop
        for fault in faults:
            self._contain(fault)

    # ------------------------------------------------------------------ containment
    def _contain(self, fault: Fault, not_applied: Optional[dict] = None) -> None:
        """The one place ``on_error`` is applied: an ``error`` record (with ``not_applied`` when
        a commit failed), then continue / skip / halt. :raises _Stop: on halt."""
        self.counts["event:error"] += 1
        record = {"step": self._out.step, "signals_step": self._out.signals_step,
                  "event": "error", "rule": None, "where": fault.where,
                  "fault": fault.to_dict(), "error": fault.error, "on_error": self.on_error}
        if not_applied is not None:
            record["not_applied"] = not_applied
        self._write(record)
        if not self.enforce:
            return
        if self.on_error == "halt":
            who = f"{fault.plugin} {fault.name!r}"
            phase = "" if fault.phase == "compute" else \
                " " + fault.phase.replace("recover_commit", "recover commit")
            self._halt(None, {}, f"on_error=halt after {who}{phase} raised {fault.error}")
        if self.on_error == "skip_step":
            self._skip = True

    def _commit(self, action: Action, phase: str, decided: Mapping) -> bool:
        """Apply ``action``, logged ahead in the record ``decided``. A commit that raises is
        contained; its ``error`` record names ``decided`` and the action, as not applied."""
        decided = decided if isinstance(decided, Mapping) else {}
        try:
            self.actuators[action.actuator].commit(action)
            return True
        except Exception as exc:
            self._contain(Fault.of("actuator", action.actuator, phase, exc), not_applied={
                "id": decided.get("id"), "seq": decided.get("seq"), "step": decided.get("step"),
                "event": decided.get("event"), "rule": decided.get("rule"),
                "action": action_dict(action)})
            return False

    def _halt(self, rule: Optional[str], signals: Mapping, reason: str,
              checkpoint: Optional[str] = None) -> None:
        out = self._out
        message = f"training halted at step {out.step} by {reason}"
        if signals:
            message += "; signals: " + ", ".join(f"{k}={_fmt(v)}" for k, v in signals.items())
        record = {"step": out.step, "signals_step": out.signals_step, "event": "halt",
                  "rule": rule, "signals": dict(signals), "message": message}
        if checkpoint is not None:
            record["checkpoint"] = checkpoint  # written by the halting action (halt, rollback)
        out.halt = {"rule": rule, "signals": dict(signals), "message": message,
                    "checkpoint": checkpoint}
        out.halted = self.halted = True
        self._write(record)
        raise _Stop()

    def _write(self, record: dict) -> dict:
        """Write ``record`` through the sink; returns what the sink wrote (with ``id`` and
        ``seq`` from a decision log). :raises _Stop: the sink failed (fatal)."""
        try:
            written = self.sink(record)
            self._out.records.append(written)
            return written
        except Exception as exc:  # the decision log failed: fatal, never half-stepped
            out = self._out
            out.fatal = exc
            out.halted = self.halted = True
            raise _Stop() from exc

    def _count(self, event: str, rule: Optional[str], actions: Iterable[Action]) -> None:
        self.counts[f"event:{event}"] += 1
        if rule is not None:
            self.counts[f"rule:{rule}"] += 1
        for a in actions:
            self.counts[f"actuator:{a.actuator}"] += 1

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"latest": dict(self.latest), "engine": self.engine.state_dict(),
                "actuators": {k: a.state_dict() for k, a in self.actuators.items()},
                "counts": dict(self.counts), "skipped_steps": self.skipped_steps,
                "gated_steps": self.gated_steps}

    def check_state(self, state: Mapping) -> None:
        """Raise ``ValueError`` when ``state`` cannot be loaded (nothing changed)."""
        if set(state["actuators"]) != set(self.actuators):
            raise ValueError(f"guard state has actuators {sorted(state['actuators'])}, "
                             f"policy has {sorted(self.actuators)}")
        Engine(self.engine.rules).load_state_dict(state["engine"])  # validates, then dropped

    def load_state_dict(self, state: Mapping) -> None:
        self.engine.load_state_dict(state["engine"])
        for name, act in self.actuators.items():
            act.load_state_dict(state["actuators"][name])
        self.latest = {k: (float(v) if v is not None else None)
                       for k, v in state["latest"].items()}
        self.counts = Counter(state.get("counts", {}))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.gated_steps = int(state.get("gated_steps", 0))


def _first_group(optimizer: Any) -> Optional[dict]:
    groups = getattr(optimizer, "param_groups", None)
    return groups[0] if groups else None


def _float(v: Any) -> Optional[float]:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _halts(action: Action) -> bool:
    return bool(action.halt)


def _signal_value(val: Any, name: str) -> Any:
    """An actuator's published signal: a Python number, bool or ``None``.
    :raises TypeError: anything else (a tensor, a string), contained as the actuator's fault."""
    if val is None or isinstance(val, (bool, int, float)):
        return val
    raise TypeError(f"signal {name!r} must be a number, bool or None, found "
                    f"{type(val).__name__} {val!r:.60}")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)
