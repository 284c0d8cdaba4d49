"""``momentum_reset``: zero the optimizer's momentum, then optionally warm the learning rate up.

SPAM (Huang et al., "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training",
arXiv 2501.06842) shows that a gradient spike poisons Adam's moments for many steps (``beta2 =
0.999`` remembers a spike for ~1000 steps) and resets them, followed by a short learning-rate
warm-up so the first updates from fresh moments stay small.

What it changes, in the selected param groups' optimizer state (``optimizer.state[p]``):

- Adam / AdamW: ``exp_avg`` is zeroed; with ``second_moment: true`` also ``exp_avg_sq`` (and
  ``max_exp_avg_sq`` when ``amsgrad=True``). ``step`` is kept: bias correction continues, so the
  first update after a reset is about ``(1 - beta1) * g / sqrt(v)`` (moments only) or
  ``(1 - beta1) / sqrt(1 - beta2)`` times ``sign(g)`` (both zeroed: large, hence the warm-up).
- SGD with momentum: ``momentum_buffer`` is zeroed (``second_moment`` is refused: SGD has none).
- Parameters with no state yet have nothing to reset.

Command: ``{actuator: momentum_reset}`` (bare).

Bounds (``actuators.momentum_reset``):

- ``second_moment`` (bool, default false): also zero the second moment (Adam / AdamW).
- ``groups`` (list of param-group indices, default all): the groups reset (and warmed up).
- ``warmup`` (int >= 0 steps, default 0): after a reset, the learning rate of the reset groups
  is multiplied by ``k / warmup`` on the k-th optimizer step after it (k = 1 .. warmup; the step
  of the reset is k = 1), applied around ``optimizer.step()`` like ``lr_scale`` (the user's
  ``lr`` is never overwritten; it composes with ``lr_scale`` by multiplication). The warm-up
  advances on taken steps only; a new reset restarts it. It is a fixed schedule stated in the
  reset's record (``after.lr_factor``, ``after.warmup``), not a recovery: it proceeds while a
  rule holds the actuator. The per-step effective learning rate is in ``telemetry.jsonl``.
- ``min_interval`` (int >= 1 steps, default 1): a reset sooner than this after the previous one
  is refused (``applied: false, clamped: true``), so a rule that keeps firing does not wipe the
  moments every step.

Signals: ``momentum_reset.resets`` (resets so far), ``momentum_reset.warmup_left`` (warm-up
steps left, including the current one's factor), ``momentum_reset.since`` (steps since the last
reset; -1 before any).

:raises ActuatorError: at attach, for an optimizer other than Adam, AdamW (and subclasses) or
    SGD, for SGD without momentum in a selected group, for ``second_moment`` on SGD, and for a
    group index the optimizer does not have.
"""

from __future__ import annotations

from typing import Any, Optional

from lbw_policy.base import Action, Actuator
from lbw_policy.errors import ActuatorError

__all__ = ["MomentumReset"]


class MomentumReset(Actuator):
    """Zero momentum buffers on command, then warm the learning rate up (module docstring).

    :param second_moment: also zero ``exp_avg_sq`` (default ``False``).
    :param groups: indices of the param groups to reset (default ``None``: all).
    :param warmup: linear LR warm-up length in optimizer steps after a reset (default 0: none).
    :param min_interval: steps between two resets (default 1).
    """

    name = "momentum_reset"
    bounds_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "second_moment": {"type": "boolean",
                              "description": "also zero exp_avg_sq (Adam, AdamW); default false"},
            "groups": {"type": "array", "items": {"type": "integer", "minimum": 0},
                       "minItems": 1, "uniqueItems": True,
                       "description": "param-group indices to reset; default all"},
            "warmup": {"type": "integer", "minimum": 0,
                       "description": "steps of linear LR warm-up after a reset; default 0"},
            "min_interval": {"type": "integer", "minimum": 1,
                             "description": "fewest steps between two resets; default 1"},
        },
    }
    commands = {"apply": {"type": "null"}}
    signals = ("resets", "warmup_left", "since")

    def __init__(self, second_moment: bool = False, groups: Optional[list] = None,
                 warmup: int = 0, min_interval: int = 1) -> None:
        super().__init__(second_moment=second_moment, groups=groups, warmup=warmup,
                         min_interval=min_interval)
        self.second_moment = bool(second_moment)
        self.groups = None if groups is None else [int(g) for g in groups]
        self.warmup = int(warmup)
        self.min_interval = int(min_interval)
        self.resets = 0
        self.last_reset_step: Optional[int] = None
        self.warmup_left = 0
        self._step = 0
        self._keys: tuple = ()
        self._saved: Optional[list] = None

    def attach(self, optimizer) -> None:
        import torch

        kind = type(optimizer).__name__
        groups = optimizer.param_groups
        selected = range(len(groups)) if self.groups is None else self.groups
        for g in selected:
            if g >= len(groups):
                raise ActuatorError(f"momentum_reset: groups lists param group {g}, but "
                                    f"{kind} has {len(groups)} param group(s)")
        if isinstance(optimizer, torch.optim.Adam):  # AdamW is a subclass
            keys = ("exp_avg",)
            if self.second_moment:
                keys += ("exp_avg_sq", "max_exp_avg_sq")
        elif isinstance(optimizer, torch.optim.SGD):
            if self.second_moment:
                raise ActuatorError("momentum_reset: second_moment needs an optimizer with a "
                                    "second moment (Adam, AdamW); SGD has none")
            for g in selected:
                if not groups[g].get("momentum"):
                    raise ActuatorError(f"momentum_reset: param group {g} of SGD has momentum=0, "
                                        "so there is no momentum buffer to reset; build SGD with "
                                        "momentum > 0 or leave the group out of `groups`")
            keys = ("momentum_buffer",)
        else:
            raise ActuatorError(f"momentum_reset knows Adam, AdamW (exp_avg, exp_avg_sq) and SGD "
                                f"with momentum (momentum_buffer); got {kind}")
        if self.warmup and any("lr" not in groups[g] for g in selected):
            raise ActuatorError(f"momentum_reset: warmup needs 'lr' in every selected param "
                                f"group of {kind}")
        self._keys = keys
        self._selected = list(selected)
        self.optimizer = optimizer

    def _lr_factor(self) -> float:
        if self.warmup_left <= 0:
            return 1.0
        return (self.warmup - self.warmup_left + 1) / self.warmup

    def _state(self) -> dict:
        return {"resets": self.resets, "lr_factor": self._lr_factor(),
                "warmup_left": self.warmup_left}

    def signal_values(self) -> dict:
        since = -1 if self.last_reset_step is None else self._step - self.last_reset_step
        return {"resets": self.resets, "warmup_left": self.warmup_left, "since": since}

    def observe(self, telemetry) -> None:
        self._step = int(telemetry.step)

    def plan(self, verb: str, value: Any, step: int) -> Action:
        if verb != "apply":
            raise ValueError(f"momentum_reset: unknown verb {verb!r}; expected a bare command")
        last = self.last_reset_step
        allowed = last is None or step - last >= self.min_interval
        before = self._state()
        after = {"resets": self.resets + 1, "lr_factor": (1 / self.warmup) if self.warmup else 1.0,
                 "warmup_left": self.warmup} if allowed else before
        zeroed = [k for k in self._keys if k != "max_exp_avg_sq"] if self._keys else []
        return Action(self.name, verb, requested=True, applied=allowed, clamped=not allowed,
                      before=before, after=after,
                      note=None if allowed else f"min_interval={self.min_interval} steps since "
                      f"the reset at step {last} not reached; refused",
                      step=step, extra={"zeroed": zeroed, "groups": list(getattr(
                          self, "_selected", self.groups or [])), "warmup": self.warmup})

    def commit(self, action: Action) -> None:
        if not action.applied:
            return
        import torch

        opt = self.optimizer
        with torch.no_grad():
            for g in self._selected:
                for p in opt.param_groups[g]["params"]:
                    state = opt.state.get(p)
                    if not state:
                        continue
                    for key in self._keys:
                        buf = state.get(key)
                        if isinstance(buf, torch.Tensor):
                            buf.zero_()
        self.resets += 1
        self.last_reset_step = (action.step if action.step is not None else self._step)
        self.warmup_left = self.warmup

    def before_step(self, optimizer, step: int) -> bool:
        if self.warmup_left > 0:
            factor = self._lr_factor()
            self._saved = [(g, optimizer.param_groups[g]["lr"]) for g in self._selected]
            for g, lr in self._saved:
                optimizer.param_groups[g]["lr"] = lr * factor
        return True

    def after_step(self, optimizer, stepped: bool, step: int) -> None:
        if self._saved is not None:
            for g, lr in self._saved:
                optimizer.param_groups[g]["lr"] = lr
            self._saved = None
            if stepped:
                self.warmup_left -= 1
        self._step = step + 1

    def state_dict(self) -> dict:
        return {"resets": self.resets, "last_reset_step": self.last_reset_step,
                "warmup_left": self.warmup_left, "step": self._step}

    def load_state_dict(self, state) -> None:
        self.resets = int(state["resets"])
        last = state.get("last_reset_step")
        self.last_reset_step = None if last is None else int(last)
        self.warmup_left = int(state["warmup_left"])
        self._step = int(state.get("step", 0))
