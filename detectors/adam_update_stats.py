"""``adam_update_stats``: the distribution of Adam's normalized update, for the step about to be
taken.

With the current gradient ``g``, the moments ``m``, ``v`` and step count ``k`` held in the
optimizer state after the previous step, and the group's ``betas``, ``eps``, the update the
optimizer will apply (before the learning rate and weight decay) is, elementwise::

    m'    = beta1 m + (1 - beta1) g          v' = beta2 v + (1 - beta2) g^2
    m_hat = m' / (1 - beta1^(k+1))           v_hat = v' / (1 - beta2^(k+1))     # AMSGrad: max(v_max, v')
    u     = m_hat / (sqrt(v_hat) + eps)

Signals (0-dim tensors, dimensionless), over every entry of every parameter that has a
gradient:

- ``rms``: ``sqrt(mean u^2)``. Between 0 and 1; far below 1 when gradients are noisy.
- ``frac_large``: fraction of entries with ``|u| > large`` (default 0.9). Adam's update is
  near +-1 when successive gradients are correlated in time; a large mass there is the bimodal
  update distribution that precedes Adam instability (Molybog et al. 2304.09871).
- ``max_frac_large``: the largest ``frac_large`` of a single parameter tensor (a shallow layer's
  collapse is diluted in the global fraction).
- ``frac_v_small``: fraction of entries with ``sqrt(v_hat) < v_floor * eps`` (default
  ``v_floor`` 10): the second moment has fallen to the scale of ``eps``, so ``eps`` rather than
  the gradient sets the step (Molybog et al., sec. 4).

On the first step (empty state) ``u = g / (|g| + eps)``: every entry is near +-1, as Adam's
first step is, and the fraction stays high for the first few steps while the moments fill.
Warm-up: during the first ``warmup`` evaluations (default 0) every signal is ``0.0`` (never
fires). NaN or Inf gradients make ``rms`` NaN and drop out of the fractions' numerators. State:
the evaluation count.

Cost: per parameter, about ten elementwise passes (as an Adam step, without the writes), on the
parameters' device, no host sync (a step count kept on the CPU, as torch's default, is read on
the host; a ``capturable`` one stays on the device).

Params: ``large`` (default 0.9), ``v_floor`` (default 10), ``warmup`` (default 0).

:raises ValueError: (in :meth:`setup`) the optimizer's parameter groups lack ``betas`` and
    ``eps`` (not an Adam-family optimizer).
"""

from __future__ import annotations

import torch

from lbw_policy.base import Detector

from ._ring import stat_dtype

__all__ = ["AdamUpdateStats"]


class AdamUpdateStats(Detector):
    name = "adam_update_stats"
    signals = ("rms", "frac_large", "max_frac_large", "frac_v_small")
    reductions = {"max_frac_large": "max"}  # the others: mean over ranks
    params_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "large": {"type": "number", "exclusiveMinimum": 0,
                      "description": "|u| above which an entry counts as large; default 0.9"},
            "v_floor": {"type": "number", "exclusiveMinimum": 0,
                        "description": "sqrt(v_hat) below v_floor * eps counts as small; default 10"},
            "warmup": {"type": "integer", "minimum": 0,
                       "description": "evaluations during which every signal is 0; default 0"},
        },
    }

    def __init__(self, large: float = 0.9, v_floor: float = 10.0, warmup: int = 0) -> None:
        super().__init__(large=large, v_floor=v_floor, warmup=warmup)
        self.large = float(large)
        self.v_floor = float(v_floor)
        self.warmup = int(warmup)
        self.evals = 0

    def setup(self, model, optimizer, every: int = 1) -> None:
        self.every = int(every)
        for i, group in enumerate(optimizer.param_groups):
            if "betas" not in group or "eps" not in group:
                raise ValueError(f"adam_update_stats needs an Adam-family optimizer (param groups with 'betas' "
                                 f"and 'eps'); param_groups[{i}] of {type(optimizer).__name__} has "
                                 f"{sorted(k for k in group if k != 'params')}")

    @torch.no_grad()
    def compute(self, telemetry) -> dict:
        self.evals += 1
        if self.evals <= self.warmup:
            zero = torch.zeros((), dtype=stat_dtype(telemetry.device), device=telemetry.device)
            return {name: zero for name in self.signals}
        opt = telemetry.optimizer
        sq = large = small = total = None
        fracs = []
        for group in opt.param_groups:
            b1, b2 = group["betas"]
            eps = group["eps"]
            ams = group.get("amsgrad", False)
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise ValueError("adam_update_stats does not handle sparse gradients")
                st = opt.state.get(p, {})
                g = g.float()
                m, v = st.get("exp_avg"), st.get("exp_avg_sq")
                m = (1 - b1) * g if m is None else b1 * m.float() + (1 - b1) * g
                v = (1 - b2) * g * g if v is None else b2 * v.float() + (1 - b2) * g * g
                if ams and st.get("max_exp_avg_sq") is not None:
                    v = torch.maximum(st["max_exp_avg_sq"].float(), v)
                k = st.get("step", 0)
                if isinstance(k, torch.Tensor) and k.device.type != "cpu":
                    k1 = k.to(g.device, torch.float32) + 1            # capturable: stays on the device
                    bc1, bc2 = 1 - torch.pow(b1, k1), 1 - torch.pow(b2, k1)
                else:
                    k1 = float(k) + 1                                  # CPU scalar: no device sync
                    bc1, bc2 = 1 - b1 ** k1, 1 - b2 ** k1
                vhat_sqrt = torch.sqrt(v / bc2)
                u = (m / bc1) / (vhat_sqrt + eps)
                dtype = stat_dtype(u.device)
                s2 = (u * u).sum(dtype=dtype)
                nl = (u.abs() > self.large).sum(dtype=dtype)
                ns = (vhat_sqrt < self.v_floor * eps).sum(dtype=dtype)
                fracs.append(nl / u.numel())
                sq = s2 if sq is None else sq + s2.to(sq.device)
                large = nl if large is None else large + nl.to(large.device)
                small = ns if small is None else small + ns.to(small.device)
                total = u.numel() if total is None else total + u.numel()
        if total is None:
            return {}
        return {"rms": torch.sqrt(sq / total), "frac_large": large / total,
                "max_frac_large": torch.stack([f.to(sq.device) for f in fracs]).max(),
                "frac_v_small": small / total}

    def state_dict(self) -> dict:
        return {"evals": self.evals}

    def load_state_dict(self, state) -> None:
        self.evals = int(state.get("evals", 0))
