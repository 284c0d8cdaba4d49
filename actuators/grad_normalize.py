"""``grad_normalize``: adaptive per-tensor gradient normalization (AdaGN, from Stable-SPAM).

Source: Huang et al., "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam",
arXiv 2502.17055, its AdaGN step, written from the paper's formulas.

Every step (enforce mode), right before ``optimizer.step()``, for every parameter tensor ``i``
with a gradient ``g_i``, on the gradients' device with no host sync:

- ``n_i = ||g_i||_2`` (the tensor's L2 norm in float32, gradient units);
- ``m_i <- gamma1 * m_i + (1 - gamma1) * n_i`` and ``v_i <- gamma2 * v_i + (1 - gamma2) * n_i**2``
  (EMAs of the norm and of its square, from 0; ``t_i`` counts their updates);
- ``c_i = (m_i / (1 - gamma1**t_i)) / (sqrt(v_i / (1 - gamma2**t_i)) + eps)`` (bias-corrected);
- ``g_i <- g_i * c_i / n_i``.

So each tensor's gradient keeps its direction and takes the norm ``c_i``, a ratio of recent
norms to their root mean square: 1 at a tensor's first update, near 1 while ``n_i`` is steady,
below 1 for a while after a spike, a little above 1 after a lasting rise (``gamma1 < gamma2``:
the mean follows faster). The gradient's absolute scale is dropped: every tensor's gradient has
a norm of about 1 whatever its size, so a spike in one tensor's gradient does not inflate its
own Adam second moment (``exp_avg_sq``) for the next ``1 / (1 - beta2)`` steps. With SGD the
learning rate becomes each tensor's step length. The global norm after it is about
``sqrt(number of tensors)``: a ``grad_clip`` or ``Guard(clip_grad_norm=)`` that acts after it
sees that norm (the step's telemetry keeps it, ``grad_norm_after``: no second reduction).

Statistics: a tensor whose ``n_i`` is 0 or not finite (or whose square overflows float32) is
left alone and its statistics do not move. The statistics computed in ``before_step`` are kept
only when the optimizer step is taken (``after_step``): a step ``skip_step`` (or ``rollback``'s
batch skipping) refuses does not move them. A ``gate: device`` skip is decided on the device
after the host saw the step as taken, so such a step does move them (its gradient is not
applied). ``bias_correction`` uses each tensor's own update count ``t_i``, so a tensor that
first gets a gradient late starts at ``c_i = 1``. Differences from PyPI ``pytorch_optimizer``'s
``StableSPAM``: there AdaGN follows AdaClip (an element-wise spike clip) and the bias correction
counts optimizer steps; an L2 ``weight_decay`` that the optimizer adds to the gradient inside
``step()`` (Adam, SGD) is added after the normalization, not normalized with it.

Order: the guard calls actuators in the policy's order; declared after ``grad_clip``, it
normalizes the clipped gradients (a global clip then changes only the norms its statistics see,
not the step's direction). The detectors read the gradients before any actuator.

Bounds (``actuators.grad_normalize``):

- ``gamma1`` (in (0, 1), default 0.7): EMA factor of the norm (the paper's).
- ``gamma2`` (in (0, 1), default 0.9): EMA factor of the squared norm (the paper's).
- ``eps`` (> 0, default 1e-8): added to the root mean square.

No commands (always on in enforce mode, like ``grad_clip``'s ``max_norm``), no signals. In audit
mode nothing is changed and the statistics are not tracked. Works with any optimizer; params
added with ``optimizer.add_param_group`` later are normalized from their first gradient. Runs
in a single process or under DDP (gradients all-reduced before the step: every rank computes the
same scales). Refused on sharded parameters (DTensor, FSDP2): a shard's norm is not the
tensor's (by the guard, a ``ValueError`` before anything attaches, through ``sharding``; used
without a guard, :class:`~lbw_policy.errors.ActuatorError` at attach). FSDP1 and DeepSpeed ZeRO flat
parameters are not detected: there it would normalize each rank's shard, do not use it.
``state_dict()`` reads the statistics from the device (checkpoint time).
"""

from __future__ import annotations

import weakref
from typing import Any

from lbw_policy.base import Actuator
from lbw_policy.errors import ActuatorError

__all__ = ["GradNormalize"]


class GradNormalize(Actuator):
    """Adaptive per-tensor gradient normalization, AdaGN (arXiv 2502.17055; module docstring).

    :param gamma1: EMA factor of each tensor's gradient norm, in (0, 1) (default 0.7).
    :param gamma2: EMA factor of its square, in (0, 1) (default 0.9).
    :param eps: added to the root mean square of the norm, > 0 (default 1e-8).
    :raises ValueError: a factor outside (0, 1) or ``eps <= 0``.
    """

    name = "grad_normalize"
    sharding = ("it needs each tensor's whole gradient norm; a shard's norm is not the "
                "tensor's")
    bounds_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "gamma1": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1,
                       "description": "EMA factor of each tensor's gradient norm; default 0.7"},
            "gamma2": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1,
                       "description": "EMA factor of the squared norm; default 0.9"},
            "eps": {"type": "number", "exclusiveMinimum": 0,
                    "description": "added to the norm's root mean square; default 1e-8"},
        },
    }

    def __init__(self, gamma1: float = 0.7, gamma2: float = 0.9, eps: float = 1e-8) -> None:
        super().__init__(gamma1=gamma1, gamma2=gamma2, eps=eps)
        for key, value in (("gamma1", gamma1), ("gamma2", gamma2)):
            if not 0.0 < float(value) < 1.0:
                raise ValueError(f"grad_normalize: {key} must lie in (0, 1), got {value}")
        if not float(eps) > 0.0:
            raise ValueError(f"grad_normalize: eps must be > 0, got {eps}")
        self.gamma1, self.gamma2, self.eps = float(gamma1), float(gamma2), float(eps)
        #: per param position (param-group order): a float32 tensor [m, v, t] on its device
        self._stats: dict = {}
        #: host values from load_state_dict, moved to the device at the param's next gradient
        self._loaded: dict = {}
        self._pending: list = []    # (stat tensors, new values) of this step, kept if stepped
        self._tel = None            # weak reference to the step's telemetry (observe)

    def attach(self, optimizer) -> None:
        groups = getattr(optimizer, "param_groups", None)
        if not groups:
            raise ActuatorError(f"grad_normalize needs a torch.optim.Optimizer with param_groups, "
                                f"got {type(optimizer).__name__}")
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # torch without DTensor: nothing can be sharded
            DTensor = None
        if DTensor is not None and any(isinstance(p, DTensor) for g in groups for p in g["params"]):
            raise ActuatorError(
                "grad_normalize: the parameters are sharded (DTensor, e.g. FSDP2); a shard's "
                "gradient norm is not the tensor's, so per-tensor normalization cannot run on "
                "shards; remove grad_normalize from the policy for this run")
        self.optimizer = optimizer

    def observe(self, telemetry) -> None:
        self._tel = weakref.ref(telemetry)

    def _stat(self, pos: int, device) -> Any:
        import torch

        stat = self._stats.get(pos)
        if stat is None:
            m, v, t = self._loaded.pop(pos, (0.0, 0.0, 0))
            # filled on the device (torch.tensor would copy from pageable host memory: a sync)
            stat = torch.stack([torch.full((), float(x), dtype=torch.float32, device=device)
                                for x in (m, v, t)])
            self._stats[pos] = stat
        return stat

    def before_step(self, optimizer: Any, step: int) -> bool:
        import torch

        self._pending = []
        by_device: dict = {}
        for pos, p in enumerate(q for g in optimizer.param_groups for q in g["params"]):
            if p.grad is not None:
                positions, grads = by_device.setdefault(p.grad.device, ([], []))
                positions.append(pos)
                grads.append(p.grad)
        g1, g2 = self.gamma1, self.gamma2
        squares_after = []
        with torch.no_grad():
            for device, (positions, grads) in by_device.items():
                stats = [self._stat(pos, device) for pos in positions]
                m, v, t = torch.stack(stats).unbind(1)
                norms = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))
                ok = torch.isfinite(norms) & (norms > 0) & torch.isfinite(norms * norms)
                t = t + ok.float()
                m = torch.where(ok, g1 * m + (1 - g1) * norms, m)
                v = torch.where(ok, g2 * v + (1 - g2) * norms * norms, v)
                tc = torch.clamp(t, min=1.0)  # t is 0 only where ok is False (coefficient 1)
                c = (m / (1 - g1 ** tc)) / (torch.sqrt(v / (1 - g2 ** tc)) + self.eps)
                safe = torch.where(ok, norms, torch.ones_like(norms))
                coef = torch.where(ok, c / safe, torch.ones_like(norms))
                self._pending.append((stats, torch.stack([m, v, t], dim=1)))
                kinds: dict = {}
                for j, grad in enumerate(grads):
                    kinds.setdefault(grad.dtype, []).append(j)
                for dtype, js in kinds.items():  # one multiply per tensor (0-dim scales)
                    scales = coef.to(dtype).unbind(0)
                    torch._foreach_mul_([grads[j] for j in js], [scales[j] for j in js])
                squares_after.append(torch.sum(torch.square(coef * norms)))
        tel = self._tel() if self._tel is not None else None
        if tel is not None and squares_after:  # the global norm now, for a later clip
            first = squares_after[0].device
            tel.grad_norm_after = torch.sqrt(sum(sq.to(first) for sq in squares_after))
        self._tel = None
        return True

    def after_step(self, optimizer: Any, stepped: bool, step: int) -> None:
        import torch

        if stepped:
            for stats, new in self._pending:
                torch._foreach_copy_(stats, list(new.unbind(0)))
        self._pending = []

    def state_dict(self) -> dict:
        stats = {pos: tuple(s) for pos, s in self._loaded.items()}
        for pos, stat in self._stats.items():  # a device sync (checkpoint time)
            m, v, t = stat.tolist()
            stats[pos] = (m, v, int(t))
        return {"stats": {str(pos): [m, v, t] for pos, (m, v, t) in sorted(stats.items())}}

    def load_state_dict(self, state) -> None:
        """:raises ValueError: ``state`` is not ``{"stats": {position: [m, v, t]}}`` with
        positions of this optimizer's params (when attached), ``m, v >= 0`` and ``t`` an integer
        >= 0; nothing is changed then."""
        loaded = {}
        try:
            items = dict(state["stats"]).items()
            n_params = (sum(len(g["params"]) for g in self.optimizer.param_groups)
                        if getattr(self, "optimizer", None) is not None else None)
            for key, value in items:
                pos = int(key)
                m, v, t = (float(value[0]), float(value[1]), int(value[2]))
                if pos < 0 or (n_params is not None and pos >= n_params) or m < 0 or v < 0 \
                        or t < 0 or len(value) != 3:
                    raise ValueError(f"entry {key!r}: {value!r}")
                loaded[pos] = (m, v, t)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"grad_normalize: bad state_dict ({exc}); expected {{'stats': "
                             "{position: [m, v, t]}} for this optimizer's params") from None
        self._loaded, self._stats, self._pending = loaded, {}, []
