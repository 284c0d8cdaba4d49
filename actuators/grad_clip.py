"""``grad_clip``: clip the global gradient norm to ``k`` times its running mean, under an
optional fixed ceiling ``max_norm``.

Fixed-threshold clipping (``clip_grad_norm_(params, 1.0)``) needs a threshold tuned per model and
per phase of training; ZClip (Kumar et al., "ZClip: Adaptive Spike Mitigation for LLM
Pre-Training", arXiv 2504.02507) clips relative to running statistics of the norm instead. Here
the threshold is ``k * m``, where ``m`` is an EMA of the global L2 grad norm and ``k`` is set by
the policy's rules, within bounds.

Per step (enforce mode), right before ``optimizer.step()``, all on the gradients' device with no
host sync:

- ``g`` = the global L2 norm of every gradient as it is now (the step's telemetry value,
  shared with the detectors: no extra reduction when a detector already read it; the norm an
  earlier actuator left when it rescaled the gradients this step, e.g. ``grad_normalize``
  declared before ``grad_clip``).
- The threshold ``T``: ``k * m`` when ``k`` is set and at least ``warmup`` steps were observed,
  ``max_norm`` when that bound is set, the smaller of the two when both hold; none otherwise.
- With a threshold: ``coef = min(1, T / (g + 1e-6))`` and every gradient is multiplied by
  ``coef`` (the formula of ``torch.nn.utils.clip_grad_norm_``). A non-finite ``g`` is left alone
  (that is ``skip_step``'s case).
- The EMA is updated with the norm *after* clipping, ``min(g, T)`` (ZClip's choice: a spike
  does not drag the mean up), or ``g`` without a threshold: ``m = alpha * m + (1 - alpha) * x``,
  started at the first finite ``x``; non-finite norms are ignored. (With ``max_norm`` set and
  norms mostly above it, ``m`` settles near ``max_norm``, so ``k >= 1`` rarely acts below it.)
- The norm after clipping, ``g * coef``, is kept for the step (the telemetry's
  ``grad_norm_after``), so a later actuator and the guard's own fixed clip
  (``Guard(clip_grad_norm=)``) use it instead of reducing again.

In audit mode the guard never calls :meth:`GradClip.before_step`: nothing is clipped and the
mean is not tracked.

Commands: ``{actuator: grad_clip, set: k}`` (``k > 0``): clip at ``k`` x the running mean;
``{actuator: grad_clip, multiply: f}`` (``f > 0``): ``k * f`` (from ``default`` when off).

Bounds (``actuators.grad_clip``):

- ``min`` (default 1.0), ``max`` (default 10.0): ``k`` stays in ``[min, max]`` (``0 < min <=
  max``). ``k < 1`` would clip every step below the mean; allowed when ``min`` allows it.
- ``default`` (number in ``[min, max]`` or ``null``, default ``null``): ``k`` when no rule has
  set it; ``null`` means no relative clipping (the actuator tracks the mean; ``max_norm`` still
  applies).
- ``alpha`` (in (0, 1), default 0.97): EMA factor of the running mean.
- ``warmup`` (int >= 1, default 25): steps observed before clipping may act.
- ``recover: {every}`` (default none): while no firing rule holds ``grad_clip``, ``every`` steps
  after the last change ``k`` returns to ``default`` (one logged move).
- ``max_norm`` (number > 0 or ``null``, default ``null``): a fixed ceiling on the norm, in the
  gradients' own units, applied at every step from the first, whether or not ``k`` is set
  (``torch.nn.utils.clip_grad_norm_(params, max_norm)``, the field's usual 1.0: nanoGPT, HF
  Trainer's ``max_grad_norm``). With ``k`` active the threshold is ``min(k * m, max_norm)``. Not
  commanded by rules: it is part of the policy's revision, like every bound.

Signals: ``grad_clip.k`` (``k`` in force, ``-1`` when off) and ``grad_clip.active`` (1 when
clipping can act this step: a relative threshold past its warm-up, or ``max_norm``). The per-step clip coefficient and the running mean stay on the
device (``state_dict()`` reads the mean: call it at checkpoint time). Works with any optimizer.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Optional

from lbw_policy.base import Action, Actuator
from lbw_policy.errors import ActuatorError

__all__ = ["GradClip"]


class GradClip(Actuator):
    """Running-mean-relative gradient clipping with a rule-set multiple ``k`` (module docstring).

    :param min: smallest ``k`` (default 1.0).
    :param max: largest ``k`` (default 10.0).
    :param default: ``k`` when no rule set it, or ``None`` (off, the default).
    :param alpha: EMA factor (default 0.97).
    :param warmup: steps observed before clipping acts (default 25).
    :param recover: ``{"every": n}`` or ``None``.
    :param max_norm: fixed ceiling on the global L2 grad norm (gradient units), or ``None`` (the
        default).
    :raises ValueError: ``min > max``, or ``default`` outside ``[min, max]``.
    """

    name = "grad_clip"
    bounds_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "min": {"type": "number", "exclusiveMinimum": 0, "description": "smallest k; default 1.0"},
            "max": {"type": "number", "exclusiveMinimum": 0, "description": "largest k; default 10.0"},
            "default": {"type": ["number", "null"], "exclusiveMinimum": 0,
                        "description": "k when no rule set it; null: no clipping (default)"},
            "alpha": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1,
                      "description": "EMA factor of the running mean; default 0.97"},
            "warmup": {"type": "integer", "minimum": 1,
                       "description": "steps observed before clipping acts; default 25"},
            "max_norm": {"type": ["number", "null"], "exclusiveMinimum": 0,
                         "description": "fixed ceiling on the global grad norm, every step; null: none (default)"},
            "recover": {"type": "object", "additionalProperties": False, "required": ["every"],
                        "description": "return k to `default` `every` steps after the last change",
                        "properties": {"every": {"type": "integer", "minimum": 1}}},
        },
    }
    commands = {
        "set": {"type": "number", "exclusiveMinimum": 0},
        "multiply": {"type": "number", "exclusiveMinimum": 0},
    }
    signals = ("k", "active")

    def __init__(self, min: float = 1.0, max: float = 10.0, default: Optional[float] = None,
                 alpha: float = 0.97, warmup: int = 25, recover: Optional[dict] = None,
                 max_norm: Optional[float] = None) -> None:
        super().__init__(min=min, max=max, default=default, alpha=alpha, warmup=warmup,
                         recover=recover, max_norm=max_norm)
        self.validate_bounds(self.bounds)
        self.min, self.max = float(min), float(max)
        self.default = None if default is None else float(default)
        self.alpha = float(alpha)
        self.warmup = int(warmup)
        self.recover_every = None if not recover else int(recover["every"])
        self.max_norm = None if max_norm is None else float(max_norm)
        self.k: Optional[float] = self.default
        self.last_change_step = -1
        self.observed = 0           # steps whose norm was observed (host count)
        self._mean = None           # 0-dim float32 tensor on the gradients' device
        self._seen = None           # 0-dim bool: the mean holds at least one finite sample
        self._saved_mean = (0.0, False)
        self._tel = None            # weak reference to the step's telemetry (observe)

    @classmethod
    def validate_bounds(cls, bounds) -> None:
        lo, hi = bounds.get("min", 1.0), bounds.get("max", 10.0)
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"min ({lo}) must be <= max ({hi})")
        d = bounds.get("default")
        if d is not None and not (lo <= d <= hi):
            raise ValueError(f"default ({d}) must lie in [min, max] = [{lo}, {hi}]")

    def attach(self, optimizer) -> None:
        if not getattr(optimizer, "param_groups", None):
            raise ActuatorError(f"grad_clip needs a torch.optim.Optimizer with param_groups, "
                                f"got {type(optimizer).__name__}")
        self.optimizer = optimizer

    def signal_values(self) -> dict:
        return {"k": -1.0 if self.k is None else self.k,
                "active": int((self.k is not None and self.observed >= self.warmup)
                              or self.max_norm is not None)}

    def observe(self, telemetry) -> None:
        # a weak reference: the step's telemetry holds its gradients, and in audit mode no
        # before_step comes to let go of them (they must be freed by the user's zero_grad)
        self._tel = weakref.ref(telemetry)

    # ---------------------------------------------------------------- commands
    def _clamp(self, k: float) -> float:
        return float(f"{min(self.max, max(self.min, k)):.12g}")

    def plan(self, verb: str, value: Any, step: int) -> Action:
        if verb == "set":
            target = float(value)
        elif verb == "multiply":
            base = self.k if self.k is not None else (self.default or self.max)
            target = base * float(value)
        else:
            raise ValueError(f"grad_clip: unknown verb {verb!r}; expected 'set' or 'multiply'")
        target = float(f"{target:.12g}")
        applied = self._clamp(target)
        return Action(self.name, verb, requested=target, applied=applied,
                      clamped=not math.isclose(applied, target, rel_tol=1e-12, abs_tol=0.0),
                      before=self.k, after=applied, step=step)

    def commit(self, action: Action) -> None:
        self.last_change_step = (action.step if action.step is not None else self.last_change_step)
        self.k = None if action.after is None else float(action.after)

    def recover(self, step: int) -> Optional[Action]:
        if self.recover_every is None or self.k == self.default:
            return None
        if step - self.last_change_step < self.recover_every:
            return None
        return Action(self.name, "recover", requested=self.default, applied=self.default,
                      before=self.k, after=self.default, step=step)

    # ---------------------------------------------------------------- the step
    def before_step(self, optimizer, step: int) -> bool:
        import torch

        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        tel = self._tel() if self._tel is not None else None
        if tel is not None:
            norm = tel.current_grad_norm
        else:  # no guard: reduce here
            norm = torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)
        norm = norm.detach().float()
        if self._mean is None:
            # fills on the device (torch.tensor would copy from the host: a sync)
            self._mean = torch.full((), self._saved_mean[0], dtype=torch.float32, device=norm.device)
            self._seen = torch.full((), self._saved_mean[1], dtype=torch.bool, device=norm.device)
        finite = torch.isfinite(norm)
        sample = norm
        threshold = None
        if self.k is not None and self.observed >= self.warmup:
            # no finite sample yet: no relative threshold (inf / norm clamps to a coefficient of 1)
            threshold = torch.where(self._seen, self.k * self._mean, torch.full_like(self._mean, math.inf))
        if self.max_norm is not None:
            ceiling = torch.full_like(norm, self.max_norm)
            threshold = ceiling if threshold is None else torch.minimum(threshold, ceiling)
        if threshold is not None:
            coef = torch.clamp(threshold / (norm + 1e-6), max=1.0)
            coef = torch.where(finite, coef, torch.ones_like(coef))
            with torch.no_grad():       # one fused multiply per (device, dtype), as clip_grad_norm_
                kinds: dict = {}
                for grad in grads:
                    kinds.setdefault((grad.device, grad.dtype), []).append(grad)
                for (device, dtype), group in kinds.items():
                    torch._foreach_mul_(group, coef.to(device=device, dtype=dtype))
            sample = torch.minimum(norm, threshold)
            if tel is not None:
                tel.grad_norm_after = norm * coef
        updated = torch.where(self._seen, self.alpha * self._mean + (1 - self.alpha) * sample, sample)
        self._mean = torch.where(finite, updated, self._mean)
        self._seen = self._seen | finite
        self.observed += 1
        self._tel = None
        return True

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        if self._mean is not None:  # host-device sync (checkpoint time only)
            mean, seen = float(self._mean), bool(self._seen)
        else:
            mean, seen = self._saved_mean
        return {"k": self.k, "last_change_step": self.last_change_step,
                "observed": self.observed, "mean": mean, "seen": seen}

    def load_state_dict(self, state) -> None:
        self.k = None if state["k"] is None else float(state["k"])
        self.last_change_step = int(state["last_change_step"])
        self.observed = int(state["observed"])
        self._saved_mean = (float(state["mean"]), bool(state["seen"]))
        self._mean = self._seen = None
