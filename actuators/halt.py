"""``halt``: stop training, with a checkpoint and a clear exception, once the decision is on disk.

Command: ``{actuator: halt}`` (bare).

Bounds: ``checkpoint`` (bool, default true): save ``<log_dir>/halt-checkpoint.pt`` (model,
optimizer and guard state; format in ``actuators/_checkpoint.py``) before training stops.

When a rule commands it (enforce mode), the guard has already flushed the rule's decision
record, whose action names the checkpoint path; committing saves the checkpoint; the guard then
writes the final ``halt`` record (with ``checkpoint``) and raises
:class:`lbw_policy.TrainingHalted`, whose message names the rule, the step and the signal
values. The halted step's ``optimizer.step()`` never runs, so the checkpoint holds the last
weights before it. In audit mode the decision is logged and training continues.

Works with any optimizer. ``rollback`` escalates to the same halt (and the same checkpoint)
when its anti-thrash budget is spent.
"""

from __future__ import annotations

from typing import Any

from lbw_policy.base import Action, Actuator

from ._checkpoint import checkpoint_path, save_checkpoint

__all__ = ["Halt"]


class Halt(Actuator):
    """Stop training (module docstring).

    :param checkpoint: save ``halt-checkpoint.pt`` in the run directory first (default true).
    """

    name = "halt"
    bounds_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "checkpoint": {"type": "boolean",
                           "description": "save <log_dir>/halt-checkpoint.pt; default true"},
        },
    }
    commands = {"apply": {"type": "null"}}

    def __init__(self, checkpoint: bool = True) -> None:
        super().__init__(checkpoint=checkpoint)
        self.checkpoint = bool(checkpoint)
        self.halted = False

    def plan(self, verb: str, value: Any, step: int) -> Action:
        path = checkpoint_path(self) if self.checkpoint else None
        return Action(self.name, verb, requested=True, applied=True, before=False, after=True,
                      step=step, halt=True, extra={"checkpoint": path})

    def commit(self, action: Action) -> None:
        self.halted = True
        path = action.extra.get("checkpoint")
        if path is not None:
            save_checkpoint(self, path, (action.step if action.step is not None else -1))

    def state_dict(self) -> dict:
        return {"halted": self.halted}

    def load_state_dict(self, state) -> None:
        self.halted = bool(state.get("halted", False))
