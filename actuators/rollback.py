"""``rollback``: restore the model and optimizer from an in-memory snapshot, then skip batches.

Snapshots: right before the optimizer step of every step ``t`` with ``t % every == 0`` (step 0
included), the actuator copies ``model.state_dict()`` (parameters and buffers) and
``optimizer.state_dict()`` (moments, step counts) into a ring of the ``keep`` newest snapshots,
on the CPU or on the model's device. A snapshot labelled ``t`` is the state *before* step
``t``'s update. No snapshot is taken while batches are being skipped after a rollback.

Command: ``{actuator: rollback}`` (bare), at step ``t``:

1. the newest snapshot at least ``min_age`` steps old (``snapshot.step <= t - min_age``) is
   chosen; none: refused (``applied: false``, with a note);
2. the model's ``load_state_dict`` and the optimizer's ``load_state_dict`` restore it. The param
   groups' hyperparameters (``lr``, ``weight_decay``, ``betas``, ...) are kept as they are now,
   so the user's LR scheduler is not rewound; only weights, buffers and optimizer state go back.
   Snapshots newer than the restored one (the abandoned trajectory) are dropped;
3. the current step (its gradients belong to the abandoned weights) and the next
   ``skip_batches`` steps are skipped: the guard does not call ``optimizer.step()``, while the
   training loop keeps feeding batches (and the LR scheduler keeps stepping), so the run moves
   past the data that led to the trouble.

The other actuators keep their state (an ``lr_scale`` brake stays on). Within one step commands
are committed in rule-priority order: a ``momentum_reset`` committed *before* a rollback is
undone by it (give the rollback rule the higher priority, or put ``rollback`` first in
``then``).

Anti-thrash: at most ``max_rollbacks`` rollbacks within ``window`` steps. A further command
escalates (``on_exhausted: halt``, the default): the action is logged ``applied: false,
halt: true``, the halt checkpoint is saved (as ``halt`` does, ``<log_dir>/halt-checkpoint.pt``)
and the guard raises :class:`~lbw_policy.errors.TrainingHalted`; with ``on_exhausted: refuse``
it is refused and the policy escalates itself with a rule on ``rollback.exhausted``.

Bounds (``actuators.rollback``): ``every`` (steps between snapshots, default 50), ``keep``
(snapshots kept, default 2), ``device`` (``cpu`` default, or ``same``: the model's device),
``min_age`` (default 0), ``skip_batches`` (default 0), ``max_rollbacks`` (default 3),
``window`` (steps, default 1000), ``on_exhausted`` (``halt`` | ``refuse``), ``save_snapshots``
(default true), ``checkpoint`` (default true).

Cost: ``keep`` copies of (model + optimizer state) in memory (AdamW: ``keep * 3`` x the
parameter bytes); one copy of them every ``every`` steps. With ``device: cpu`` on CUDA that copy
is a device-to-host transfer, a host sync every ``every`` steps; ``device: same`` avoids the sync
and costs device memory.

Resume: with ``save_snapshots: true`` the ring is part of ``state_dict()`` as tensors, so a
resumed run can roll back to a snapshot taken before the save and decides exactly as an
uninterrupted run; save the guard's state with ``torch.save`` (not JSON). ``false`` keeps the
state plain data and a resumed run starts with an empty ring.

Signals: ``rollback.count_in_window``, ``rollback.exhausted`` (1 when a rollback now would be
refused or escalate), ``rollback.snapshots`` (snapshots held), ``rollback.skipping`` (steps
still to skip). Works with any optimizer; needs the model (``Guard(..., model=model)``).
"""

from __future__ import annotations

from typing import Any, Optional

from lbw_policy.base import Action, Actuator
from lbw_policy.errors import ActuatorError

from ._checkpoint import checkpoint_path, save_checkpoint

__all__ = ["Rollback"]


def _copy_tree(obj: Any, device: Any = None) -> Any:
    """A copy of nested dicts / lists / tuples with every tensor cloned (to ``device``)."""
    import torch

    if isinstance(obj, torch.Tensor):
        out = obj.detach()
        return out.to(device, copy=True) if device is not None else out.clone()
    if isinstance(obj, dict):
        return {k: _copy_tree(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy_tree(v, device) for v in obj)
    return obj


class Rollback(Actuator):
    """In-memory snapshot ring with restore on command (module docstring)."""

    name = "rollback"
    bounds_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "every": {"type": "integer", "minimum": 1, "description": "steps between snapshots; default 50"},
            "keep": {"type": "integer", "minimum": 1, "description": "snapshots kept; default 2"},
            "device": {"enum": ["cpu", "same"], "description": "where snapshots live; default cpu"},
            "min_age": {"type": "integer", "minimum": 0,
                        "description": "restore the newest snapshot at least this many steps "
                                       "old; default 0"},
            "skip_batches": {"type": "integer", "minimum": 0,
                             "description": "steps skipped after a restore, besides the current "
                                            "one; default 0"},
            "max_rollbacks": {"type": "integer", "minimum": 1,
                              "description": "most rollbacks within `window` steps; default 3"},
            "window": {"type": "integer", "minimum": 1, "description": "anti-thrash window in steps; default 1000"},
            "on_exhausted": {"enum": ["halt", "refuse"],
                             "description": "what a rollback past max_rollbacks does; default halt"},
            "save_snapshots": {"type": "boolean",
                               "description": "keep the snapshot ring in state_dict (tensors); default true"},
            "checkpoint": {"type": "boolean",
                           "description": "save halt-checkpoint.pt when escalating to halt; default true"},
        },
    }
    commands = {"apply": {"type": "null"}}
    signals = ("count_in_window", "exhausted", "snapshots", "skipping")

    def __init__(self, every: int = 50, keep: int = 2, device: str = "cpu", min_age: int = 0,
                 skip_batches: int = 0, max_rollbacks: int = 3, window: int = 1000,
                 on_exhausted: str = "halt", save_snapshots: bool = True,
                 checkpoint: bool = True) -> None:
        super().__init__(every=every, keep=keep, device=device, min_age=min_age,
                         skip_batches=skip_batches, max_rollbacks=max_rollbacks, window=window,
                         on_exhausted=on_exhausted, save_snapshots=save_snapshots,
                         checkpoint=checkpoint)
        self.every, self.keep, self.device = int(every), int(keep), device
        self.min_age, self.skip_batches = int(min_age), int(skip_batches)
        self.max_rollbacks, self.window = int(max_rollbacks), int(window)
        self.on_exhausted, self.save_snapshots = on_exhausted, bool(save_snapshots)
        self.checkpoint = bool(checkpoint)
        self.snapshots: list = []   # [{"step": int, "model": {...}, "optimizer": {...}}], oldest first
        self.history: list = []     # steps of the rollbacks done (within the window)
        self.skipping = 0
        self._step = 0              # index of the current / next step

    def attach(self, optimizer) -> None:
        model = getattr(self, "model", None)
        if model is None:
            raise ActuatorError("rollback needs the model to snapshot and restore: build the guard "
                                "with Guard(optimizer, policy, model=model)")
        own = {id(p) for p in model.parameters()}
        for i, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if id(p) not in own:
                    raise ActuatorError(
                        f"rollback restores the model's state_dict, but param group {i} of "
                        f"{type(optimizer).__name__} holds a tensor of shape {tuple(p.shape)} "
                        "that is not a parameter of the model")
        self.optimizer = optimizer

    # ---------------------------------------------------------------- signals
    def count_in_window(self, step: int) -> int:
        """Rollbacks done in the ``window`` steps up to ``step``."""
        return sum(1 for h in self.history if h > step - self.window)

    def signal_values(self) -> dict:
        count = self.count_in_window(self._step)
        return {"count_in_window": count, "exhausted": int(count >= self.max_rollbacks),
                "snapshots": len(self.snapshots), "skipping": self.skipping}

    def observe(self, telemetry) -> None:
        self._step = int(telemetry.step)

    # ---------------------------------------------------------------- commands
    def plan(self, verb: str, value: Any, step: int) -> Action:
        if verb != "apply":
            raise ValueError(f"rollback: unknown verb {verb!r}; expected a bare command")
        count = self.count_in_window(step)
        extra = {"count_in_window": count}
        if count >= self.max_rollbacks:
            note = f"max_rollbacks={self.max_rollbacks} within window={self.window} steps reached"
            halt = self.on_exhausted == "halt"
            if halt:
                extra.update(checkpoint=checkpoint_path(self) if self.checkpoint else None)
                note += "; escalating to halt"
            else:
                note += "; refused"
            return Action(self.name, verb, requested=True, applied=False, clamped=True,
                          before=step, after=step, note=note, step=step, halt=halt, extra=extra)
        candidates = [s for s in self.snapshots if s["step"] <= step - self.min_age]
        if not candidates:
            return Action(self.name, verb, requested=True, applied=False, clamped=True,
                          before=step, after=step, step=step, extra=extra,
                          note=f"no snapshot at least min_age={self.min_age} steps old "
                               f"(snapshots at steps {[s['step'] for s in self.snapshots]}); refused")
        target = candidates[-1]["step"]
        extra.update(count_in_window=count + 1, skip_steps=1 + self.skip_batches)
        return Action(self.name, verb, requested=True, applied=True, before=step, after=target,
                      step=step, extra=extra)

    def commit(self, action: Action) -> None:
        step = (action.step if action.step is not None else self._step)
        if action.halt:
            if action.extra.get("checkpoint"):
                save_checkpoint(self, action.extra["checkpoint"], step)
            return
        if not action.applied:
            return
        index = next(i for i, s in enumerate(self.snapshots) if s["step"] == action.after)
        snap = self.snapshots[index]
        self._restore(snap)
        del self.snapshots[index + 1:]
        self.history = [h for h in self.history if h > step - self.window] + [step]
        self.skipping = int(action.extra.get("skip_steps", 1 + self.skip_batches))

    def _restore(self, snap: dict) -> None:
        import torch

        opt = self.optimizer
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        with torch.no_grad():
            self.model.load_state_dict(snap["model"])
        opt.load_state_dict(_copy_tree(snap["optimizer"]))  # a copy: the ring stays intact
        for group, values in zip(opt.param_groups, hyper):
            group.update(values)

    def _take_snapshot(self) -> None:
        device = "cpu" if self.device == "cpu" else None
        snap = {"step": self._step,
                "model": _copy_tree(self.model.state_dict(), device),
                "optimizer": _copy_tree(self.optimizer.state_dict(), device)}
        self.snapshots = (self.snapshots + [snap])[-self.keep:]

    # ---------------------------------------------------------------- the step
    def before_step(self, optimizer, step: int) -> bool:
        self._step = step
        if self.skipping > 0:
            return False
        if self._step % self.every == 0 and not (self.snapshots and
                                                 self.snapshots[-1]["step"] == self._step):
            self._take_snapshot()
        return True

    def after_step(self, optimizer, stepped: bool, step: int) -> None:
        if self.skipping > 0:
            self.skipping -= 1
        self._step = step + 1

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        state = {"history": list(self.history), "skipping": self.skipping, "step": self._step,
                 "snapshot_steps": [s["step"] for s in self.snapshots]}
        if self.save_snapshots:
            state["snapshots"] = [_copy_tree(s) for s in self.snapshots]
        return state

    def load_state_dict(self, state) -> None:
        self.history = [int(h) for h in state["history"]]
        self.skipping = int(state["skipping"])
        self._step = int(state["step"])
        device = "cpu"
        if self.device == "same":
            device = next(iter(self.model.parameters())).device
        self.snapshots = [_copy_tree(s, device) for s in state.get("snapshots", [])]
