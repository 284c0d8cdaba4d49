"""Shadow evaluation: a policy's Governor and real actuators, driven by signal values alone.

``lbw-policy test`` drives it with scripted signal series, ``lbw-policy replay`` with a run's
recorded ``telemetry.jsonl``. Nothing trains: :meth:`Shadow.step` runs the same
:class:`~lbw_policy.governor.Governor` as :meth:`lbw_policy.adapters.guard.Guard.step` (the one
step order: faults, hold, observe, evaluate, plan, record, commit, halt check, recover,
before/after step), with a stand-in step that does nothing:

- a one-weight model and an optimizer over it (the run's class and hyperparameters), never
  stepped, whose learning rate is the run's *scheduled* learning rate of the step when it is
  known (``scheduled_lr``), else 1.0; so ``lr_cap`` sees the run's rates, ``skip_step`` counts
  consecutive skips, ``rollback`` keeps its snapshot ring, and the learning rate during the
  step divided by the scheduled one is the factor the actuators applied;
- an observation carrying the recorded loss and step; the stand-in weight has a zero gradient,
  so actuators that count steps with gradients (``grad_clip``'s warm-up) count them here too;
- the faults the run recorded (a detector's ``compute`` / ``after_step`` error), fed back as
  :class:`~lbw_policy.governor.Fault` values, so ``on_error`` acts as it did in the run.

Actuators are bound to a context without a run directory, so nothing is ever written to disk (no
halt checkpoint).
Records have the guard's layout (``step``, ``signals_step``, ``event``, ``rule``, ``priority``,
``signals``, ``enforced``, ``actions``, ``overridden``; ``error``/``where``/``fault``/``on_error``;
``message``) without the hash-chain fields a :class:`~lbw_policy.decision_log.DecisionLog` adds.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from lbw_policy.base import ActuatorContext
from lbw_policy.errors import ActuatorError
from lbw_policy.governor import Fault, Governor
from lbw_policy.policy import Policy, load_policy
from lbw_policy.engine import evaluate_condition
from lbw_policy.records import from_json_number, gate_action

__all__ = ["Shadow", "ShadowStep", "GateModel", "STAND_IN_HYPERPARAMETERS"]

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
    :param gated: the ``gate: device`` rules that skipped this step on the device (deferred
        transfer; the step is not in ``skipped``, which counts host skips).
    """

    step: int
    records: list = field(default_factory=list)
    skipped: bool = False
    lr_factor: float = 1.0
    lr_scale: float = 1.0
    halted: bool = False
    signals: dict = field(default_factory=dict)
    gated: list = field(default_factory=list)


class GateModel:
    """What the guard's device gate (:mod:`lbw_policy.adapters.gate`) does, on plain values: a
    ``gate: device`` rule fires on the step's own emitted signals (missing and NaN make a leaf
    false, as on the device and in the engine), and ``skip_step``'s ``max_consecutive`` keeps the
    step once that many steps in a row were skipped (gated or host-skipped), as
    :meth:`~lbw_policy.actuators.SkipStep.arm` does on the device.

    :param policy: the validated policy.
    """

    def __init__(self, policy: Policy) -> None:
        self.rules = [r for r in policy.rules if r.gate == "device"]
        self.names = [r.name for r in self.rules]
        bounds = policy.actuators["skip_step"].bounds if "skip_step" in policy.actuators else {}
        self.max_consecutive = int(bounds.get("max_consecutive", 3))
        self.consecutive = 0

    def fire(self, emitted: Mapping[str, Any]) -> list:
        """Names of the gate rules that skip this step (none when max_consecutive keeps it)."""
        fired = [r.name for r in self.rules if evaluate_condition(r.when, emitted)]
        return fired if fired and self.consecutive < self.max_consecutive else []

    def after(self, gated: bool, host_skipped: bool) -> None:
        """Count the step: skipped on the device or the host, or taken."""
        self.consecutive = self.consecutive + 1 if (gated or host_skipped) else 0

    def actions(self, step: int, emitted: Mapping[str, Any], fired: Sequence[str]) -> list:
        """The Governor's ``device_actions`` for ``step``'s gate, recorded one step later."""
        return [gate_action(r, emitted, step) for r in self.rules if r.name in fired]


class Shadow:
    """A policy's Governor and actuators, stepped by hand.

    :param policy: a :class:`~lbw_policy.policy.Policy` or a policy file path.
    :param registry: plugin registry (default :func:`lbw_policy.plugins.get_registry`).
    :param optimizer: the stand-in optimizer's class name: ``"AdamW"`` (default), ``"Adam"`` or
        ``"SGD"`` (others fall back to AdamW).
    :param hyperparameters: the run's param-group hyperparameters (``betas``, ``eps``,
        ``weight_decay``, ``amsgrad``, ``momentum``, ``dampening``, ``nesterov``); others are
        ignored. Actuators that read them (``beta2`` recovers toward the optimizer's own beta2)
        then behave as in the run.
    :param transfer: ``"immediate"`` (default) or ``"deferred"``. With ``deferred`` in
        ``enforce`` mode the policy's ``gate: device`` rules are evaluated as the guard's device
        gate does (:class:`GateModel`), on each step's own signals (``gate_signals`` of
        :meth:`step`), and recorded one step later; the engine leaves them out, as the guard's.
    :raises PolicyError: the policy file is invalid.
    :raises ActuatorError: an actuator cannot be simulated (it refuses the stand-in optimizer).
    :raises ValueError: the hyperparameters are invalid for that optimizer.
    """

    def __init__(self, policy: Union[Policy, str, "os.PathLike[str]"], *, registry: Any = None,
                 optimizer: str = "AdamW", hyperparameters: Optional[Mapping[str, Any]] = None,
                 transfer: str = "immediate") -> None:
        if registry is None:
            from lbw_policy.plugins import get_registry

            registry = get_registry()
        self.policy = load_policy(policy, registry=registry)
        self.enforce = self.policy.mode == "enforce"
        import torch  # the actuators' optimizer seam; nothing is ever stepped

        self.model = torch.nn.Linear(1, 1, bias=False)
        self.model.weight.grad = torch.zeros_like(self.model.weight)  # actuators that count
        # steps with gradients (grad_clip's warm-up) count the shadow's too
        self.optimizer = _stand_in(self.model, optimizer, hyperparameters or {})
        actuators: dict = {}
        for name, spec in self.policy.actuators.items():
            actuator = registry.actuators[name].cls(**dict(spec.bounds))
            try:
                actuator.bind(ActuatorContext(model=self.model))  # no run dir: no checkpoint
                actuator.attach(self.optimizer)
            except ActuatorError as exc:
                raise ActuatorError(f"actuator {name!r} cannot be simulated without a real "
                                    f"training run: {exc}") from exc
            actuators[name] = actuator
        self.actuators = actuators
        self.gate = GateModel(self.policy) if transfer == "deferred" and self.enforce else None
        gated = set(self.gate.names) if self.gate else set()
        self.governor = Governor(self.policy, actuators, _keep,
                                 rules=[r for r in self.policy.rules if r.name not in gated])
        self._in_flight: Optional[tuple] = None  # (step, signals, fired rules) of the last gate
        self.engine = self.governor.engine

    @property
    def latest(self) -> dict:
        """Every signal's held value."""
        return self.governor.latest

    @property
    def halted(self) -> bool:
        return self.governor.halted

    @property
    def skipped_steps(self) -> int:
        return self.governor.skipped_steps

    def step(self, step: int, emitted: Mapping[str, Any], faults: Iterable[Fault] = (), *,
             loss: Any = 0.0, scheduled_lr: Any = None, signals_step: Optional[int] = None,
             after_faults: Iterable[Fault] = (),
             gate_signals: Optional[Mapping[str, Any]] = None) -> ShadowStep:
        """Run one step on the signals emitted for it.

        :param step: the step index (increasing; need not be consecutive).
        :param emitted: ``{"<detector>.<signal>": value}`` emitted this step; numbers, bools,
            ``None`` or the strings ``"NaN"`` / ``"Infinity"`` / ``"-Infinity"``.
        :param faults: the detectors' ``compute`` faults of these signals (their held values are
            dropped; ``on_error`` applies).
        :param loss: the step's loss for the stand-in observation the actuators see.
        :param scheduled_lr: the run's scheduled learning rate at this step (default 1.0).
        :param signals_step: the step the signals were emitted at (deferred transport: one
            before ``step``); default ``step``.
        :param after_faults: the detectors' ``after_step`` faults of this step.
        :param gate_signals: deferred transfer: the signals emitted *at* ``step``, which the
            device gate judges (``emitted`` holds the previous step's, for the host rules).
        :raises RuntimeError: the shadow run has already halted.
        """
        if self.halted:
            raise RuntimeError("the shadow run has halted; build a new Shadow to start again")
        lr = from_json_number(scheduled_lr)
        self.optimizer.param_groups[0]["lr"] = float(lr) if isinstance(lr, (int, float)) else 1.0
        device_actions = self.gate.actions(*self._in_flight) if self._in_flight else []
        self._in_flight = None
        gate_signals = {k: from_json_number(v) for k, v in (gate_signals or {}).items()}
        fired = self.gate.fire(gate_signals) if self.gate else []
        if self.gate and "skip_step" in self.actuators:  # as the guard arms it every step
            self.actuators["skip_step"].expect_device_outcome()
        out = self.governor.step(
            step, {k: from_json_number(v) for k, v in emitted.items()}, faults,
            observation=self._observation(step, loss), optimizer=self.optimizer,
            after_step=lambda stepped: after_faults, signals_step=signals_step,
            device_actions=device_actions)
        gated = fired if not out.skipped else []  # the gate acts on a step the host took
        if self.gate:
            self.gate.after(bool(gated), out.skipped)
            if gated:
                self._in_flight = (step, gate_signals, gated)
        return ShadowStep(step, records=out.records, skipped=out.skipped,
                          lr_factor=out.lr_factor if self.enforce else 1.0,
                          lr_scale=out.lr_scale, halted=out.halted, signals=dict(self.latest),
                          gated=list(gated))

    def _observation(self, step: int, loss: Any) -> Any:
        import torch

        from lbw_policy.telemetry import Telemetry

        loss = from_json_number(loss)
        value = float(loss) if isinstance(loss, (int, float)) else math.nan
        return Telemetry(step, torch.tensor(value), self.optimizer, self.model)


def _keep(record: dict) -> dict:
    """The shadow's sink: records stay in memory."""
    return record


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


