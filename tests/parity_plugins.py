"""Scripted-fault plugins for the guard / shadow parity tests (tests/test_parity.py).

``FaultyDetector`` (type ``faulty``) emits scripted signals and raises at configured steps in a
configured phase; ``FaultyActuator`` (``faulty_act``) counts its commits and raises at a
configured step in a configured phase. Every hook call an actuator receives is kept in its
``calls`` list (and in the module's ``JOURNAL``), so a test can check what the guard and the
shadow asked of the same plugin, and in which order.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from lbw_policy.base import Action, Actuator, Detector
from lbw_policy.plugins import Registration, Registry, get_registry

DETECTOR_PHASES = ("compute", "after_step")
ACTUATOR_PHASES = ("observe", "signal_values", "plan", "commit", "recover", "before_step",
                   "after_step")

#: Every hook call of every FaultyActuator, in order: (actuator id, phase, step, detail).
#: Tests that need the interleaving with log writes append their own entries too.
JOURNAL: list = []


class ScriptedFault(RuntimeError):
    """What the faulty plugins raise."""


class FaultyDetector(Detector):
    """``faulty``: for each ``name: [v0, v1, ...]`` of ``values`` emits ``name = values[step]``
    (0.0 past the end of the list); raises :class:`ScriptedFault` at the steps ``fail_at`` in the
    phase ``fail_in`` (``compute`` or ``after_step``; ``never``: no fault)."""

    name = "faulty"
    params_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "values": {"type": "object"},
            "fail_at": {"type": "array", "items": {"type": "integer"}},
            "fail_in": {"enum": ["never", *DETECTOR_PHASES]},
        },
    }

    def __init__(self, values=None, fail_at=(), fail_in: str = "never") -> None:
        super().__init__(values=values or {}, fail_at=list(fail_at), fail_in=fail_in)
        self.values = {k: [float(x) for x in v] for k, v in (values or {}).items()}
        self.fail_at = set(fail_at)
        self.fail_in = fail_in

    @classmethod
    def signals_for(cls, params):
        return tuple(params.get("values", {}))

    def _maybe_fail(self, phase: str, step: int) -> None:
        if phase == self.fail_in and step in self.fail_at:
            raise ScriptedFault(f"scripted fault in detector {phase} at step {step}")

    def compute(self, telemetry):
        step = int(telemetry.step)
        self._maybe_fail("compute", step)
        return {k: torch.tensor(v[step] if step < len(v) else 0.0, dtype=torch.float64)
                for k, v in self.values.items()}

    def after_step(self, telemetry, stepped):
        self._maybe_fail("after_step", int(telemetry.step))


class FaultyActuator(Actuator):
    """``faulty_act``: a bare command (``{actuator: faulty_act}``) that counts commits; raises
    :class:`ScriptedFault` at step ``fail_at`` in phase ``fail_in`` (one of
    :data:`ACTUATOR_PHASES`, or ``never``). The step of ``before_step`` / ``after_step`` (which
    receive none) is the one ``observe`` saw last. Publishes ``faulty_act.commits``."""

    name = "faulty_act"
    bounds_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "fail_at": {"type": "integer"},
            "fail_in": {"enum": ["never", *ACTUATOR_PHASES]},
        },
    }
    commands = {"apply": {"type": "null"}}
    signals = ("commits",)

    #: every instance built, in order (a guard's, then a replay's shadow's, ...)
    instances: list = []

    def __init__(self, fail_at: int = -1, fail_in: str = "never") -> None:
        super().__init__(fail_at=fail_at, fail_in=fail_in)
        self.fail_at = int(fail_at)
        self.fail_in = fail_in
        self.step: Optional[int] = None
        self.commits = 0
        self.calls: list = []      # (phase, step, detail)
        FaultyActuator.instances.append(self)

    def _call(self, phase: str, step: Any, detail: Any = None) -> None:
        self.calls.append((phase, step, detail))
        JOURNAL.append((id(self), phase, step, detail))
        if phase == self.fail_in and step == self.fail_at:
            raise ScriptedFault(f"scripted fault in faulty_act.{phase} at step {step}")

    def observe(self, telemetry) -> None:
        self.step = int(telemetry.step)
        self._call("observe", self.step)

    def signal_values(self):
        self._call("signal_values", self.step)
        return {"commits": self.commits}

    def plan(self, verb, value, step):
        self._call("plan", step)
        return Action(self.name, verb, requested=True, applied=True, before=self.commits,
                      after=self.commits + 1, extra={"step": step})

    def commit(self, action):
        self._call("commit", action.step)
        self.commits += 1

    def recover(self, step):
        self._call("recover", step)
        return None

    def before_step(self, optimizer, step):
        self._call("before_step", step)
        return True

    def after_step(self, optimizer, stepped, step):
        self._call("after_step", step, bool(stepped))

    def state_dict(self):
        return {"commits": self.commits}

    def load_state_dict(self, state):
        self.commits = int(state["commits"])


def registry() -> Registry:
    """The built-in plugins plus these two, in a registry of its own (the default one is left
    alone)."""
    base = get_registry()
    dets = dict(base.detectors)
    acts = dict(base.actuators)
    dets[FaultyDetector.name] = Registration(FaultyDetector.name, "detector", FaultyDetector,
                                             "tests.parity", "0.0.1")
    acts[FaultyActuator.name] = Registration(FaultyActuator.name, "actuator", FaultyActuator,
                                             "tests.parity", "0.0.1")
    return Registry(detectors=dets, actuators=acts)
