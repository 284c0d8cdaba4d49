"""``halt``: stop training with a clear exception once the decision is on disk.

Command: ``{actuator: halt}`` (bare). No bounds.

When committed (enforce mode) the guard has already flushed the rule's decision record; the
guard then writes a final ``halt`` record and raises :class:`lbw_policy.TrainingHalted`, whose
message names the rule, the step and the signal values. In audit mode the decision is logged and
training continues.
"""

from __future__ import annotations

from typing import Any

from lbw_policy.base import Action, Actuator


class Halt(Actuator):
    name = "halt"
    commands = {"apply": {"type": "null"}}

    def __init__(self) -> None:
        super().__init__()
        self.halted = False

    def plan(self, verb: str, value: Any, step: int) -> Action:
        return Action(self.name, verb, requested=True, applied=True, before=False, after=True)

    def commit(self, action: Action) -> None:
        self.halted = True

    def state_dict(self) -> dict:
        return {"halted": self.halted}

    def load_state_dict(self, state) -> None:
        self.halted = bool(state.get("halted", False))
