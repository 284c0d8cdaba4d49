"""``grad_normalize``: adaptive per-tensor gradient normalization (AdaGN, from Stable-SPAM).

Source: Huang et al., "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam",
arXiv 2502.17055, its AdaGN step (also in PyPI ``pytorch_optimizer``'s ``StableSPAM``, which
this follows; written from the paper's formulas).

Every step (enforce mode), right before ``optimizer.step()``, for every parameter tensor ``i``
with a gradient ``g_i``, on the gradients' device with no host sync:

- ``n_i = ||g_i||_2`` (the tensor's L2 norm, gradient units);
- ``m_i <- gamma1 * m_i + (1 - gamma1) * n_i`` and ``v_i <- gamma2 * v_i + (1 - gamma2) * n_i**2``
  (EMAs of the norm and of its square, from 0; ``t_i`` counts their updates);
- ``c_i = (m_i / (1 - gamma1**t_i)) / (sqrt(v_i / (1 - gamma2**t_i)) + eps)`` (bias-corrected);
- ``g_i <- g_i * c_i / n_i``.

So each tensor's gradient keeps its direction and takes the norm ``c_i``: about 1 while ``n_i``
is steady, less while it swings (``c_i`` is the mean of recent norms over their root mean
square). The optimizer sees gradients whose scale does not jump from step to step, and one tensor
whose gradient grows does not take over Adam's second moment. A tensor whose ``n_i`` is 0 or not
finite is left alone and its statistics do not move (a non-finite step is ``skip_step``'s case).

Order: the guard calls actuators in the policy's order; declared after ``grad_clip``, it
normalizes the clipped gradients (a global clip then changes only the norms its statistics see,
not the step's direction). The detectors read the gradients before any actuator.

Bounds (``actuators.grad_normalize``):

- ``gamma1`` (in (0, 1), default 0.7): EMA factor of the norm (the paper's).
- ``gamma2`` (in (0, 1), default 0.9): EMA factor of the squared norm (the paper's).
- ``eps`` (> 0, default 1e-8): added to the root mean square.

No commands (always on in enforce mode, like ``grad_clip``'s ``max_norm``), no signals. In audit
mode nothing is changed and the statistics are not tracked. Works with any optimizer. Refused
(:class:`~lbw_policy.errors.ActuatorError` at attach) on sharded parameters (DTensor, FSDP2):
a shard's norm is not the tensor's, and reducing each tensor's norm across ranks would cost one
collective per tensor. ``state_dict()`` reads the statistics from the device (checkpoint time).
"""

from __future__ import annotations

from typing import Any, Optional

from lbw_policy.base import Actuator
from lbw_policy.errors import ActuatorError

__all__ = ["GradNormalize"]


class GradNormalize(Actuator):
    """Adaptive per-tensor gradient normalization, AdaGN (arXiv 2502.17055; module docstring).

    :param gamma1: EMA factor of each tensor's gradient norm, in (0, 1) (default 0.7).
    :param gamma2: EMA factor of its square, in (0, 1) (default 0.9).
    :param eps: added to the root mean square of the norm, > 0 (default 1e-8).
    """

    name = "grad_normalize"
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
        self.gamma1, self.gamma2, self.eps = float(gamma1), float(gamma2), float(eps)
        self._params: list = []
        #: per device: {"idx": positions (tensor), "m", "v", "t": statistics of those params}
        self._state: dict = {}
        self._loaded: Optional[dict] = None  # host statistics from load_state_dict, per position

    def attach(self, optimizer) -> None:
        groups = getattr(optimizer, "param_groups", None)
        if not groups:
            raise ActuatorError(f"grad_normalize needs a torch.optim.Optimizer with param_groups, "
                                f"got {type(optimizer).__name__}")
        params = [p for g in groups for p in g["params"]]
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # torch without DTensor: nothing can be sharded
            DTensor = ()
        if DTensor and any(isinstance(p, DTensor) for p in params):
            raise ActuatorError(
                "grad_normalize: the parameters are sharded (DTensor, e.g. FSDP2); a shard's "
                "gradient norm is not the tensor's, so per-tensor normalization cannot run on "
                "shards; remove grad_normalize from the policy for this run")
        self.optimizer = optimizer
        self._params = params

    def _device_state(self, device, positions: tuple) -> dict:
        import torch

        st = self._state.get(device)
        if st is None or st["positions"] != positions:
            m = [0.0] * len(positions)
            v = [0.0] * len(positions)
            t = [0] * len(positions)
            old = self._host_stats()  # positions seen before (another pattern), or loaded
            for j, pos in enumerate(positions):
                if pos in old:
                    m[j], v[j], t[j] = old[pos]
            # one host-to-device copy, when the set of params with gradients changes
            st = {"positions": positions,
                  "m": torch.tensor(m, dtype=torch.float32, device=device),
                  "v": torch.tensor(v, dtype=torch.float32, device=device),
                  "t": torch.tensor(t, dtype=torch.float32, device=device)}
            self._state[device] = st
            self._loaded = old
        return st

    def _host_stats(self) -> dict:
        """``{position: (m, v, t)}`` of every param with statistics (a device sync)."""
        stats = dict(self._loaded or {})
        for st in self._state.values():
            for pos, m, v, t in zip(st["positions"], st["m"].tolist(), st["v"].tolist(),
                                    st["t"].tolist()):
                stats[pos] = (m, v, int(t))
        return stats

    def before_step(self, optimizer: Any, step: int) -> bool:
        import torch

        by_device: dict = {}
        for pos, p in enumerate(self._params):
            if p.grad is not None:
                positions, grads = by_device.setdefault(p.grad.device, ([], []))
                positions.append(pos)
                grads.append(p.grad)
        g1, g2 = self.gamma1, self.gamma2
        with torch.no_grad():
            for device, (positions, grads) in by_device.items():
                st = self._device_state(device, tuple(positions))
                norms = torch.stack(torch._foreach_norm(grads)).float()
                ok = torch.isfinite(norms) & (norms > 0)
                t = st["t"] + ok.float()
                m = torch.where(ok, g1 * st["m"] + (1 - g1) * norms, st["m"])
                v = torch.where(ok, g2 * st["v"] + (1 - g2) * norms * norms, st["v"])
                tc = torch.clamp(t, min=1.0)  # where t is 0 the coefficient is 1 anyway
                c = (m / (1 - g1 ** tc)) / (torch.sqrt(v / (1 - g2 ** tc)) + self.eps)
                coef = torch.where(ok, c / torch.where(ok, norms, torch.ones_like(norms)),
                                   torch.ones_like(norms))
                st["m"], st["v"], st["t"] = m, v, t
                kinds: dict = {}
                for j, grad in enumerate(grads):
                    kinds.setdefault(grad.dtype, []).append(j)
                for dtype, js in kinds.items():  # one fused multiply per dtype
                    scales = coef.to(dtype)
                    torch._foreach_mul_([grads[j] for j in js], [scales[j] for j in js])
        return True

    def state_dict(self) -> dict:
        stats = self._host_stats()
        return {"stats": {str(pos): list(s) for pos, s in sorted(stats.items())}}

    def load_state_dict(self, state) -> None:
        self._loaded = {int(pos): (float(s[0]), float(s[1]), int(s[2]))
                        for pos, s in state["stats"].items()}
        self._state = {}
