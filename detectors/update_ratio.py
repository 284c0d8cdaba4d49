"""``update_ratio``: size of an optimizer update relative to the weights it changes.

For the optimizer step taken at a due step ``t``, with ``W_p`` a parameter tensor before the
step and ``dW_p`` its change by the step::

    ratio_p        = ||dW_p||_2 / max(||W_p||_2, eps)                       # one tensor
    ratio (global) = sqrt(sum_p ||dW_p||^2) / max(sqrt(sum_p ||W_p||^2), eps)   # all parameters
    group<i>.ratio = the same over parameter group i's tensors

The sums run over the weight matrices only (tensors of 2 or more dims) unless
``matrices_only: false``: biases and normalization gains often start at exactly 0, where the
ratio is meaningless (``||dW|| / eps``), and are not what the heuristic watches.

Signals (0-dim tensors, dimensionless): ``ratio`` (global), ``max`` (largest ``ratio_p``),
``worst`` (index of that tensor in the optimizer's parameter order over *all* its tensors, from
0), and for each ``i < groups``: ``group<i>.ratio`` and ``group<i>.max`` (0 and -inf for a group
with no measured tensor). Healthy AdamW training keeps the
ratio near ``lr`` (about 1e-3 per step); a ratio far above it means the step rewrites the weights
(Karpathy's "update:data ratio" heuristic; the per-tensor view of LARS, You et al. 1708.03888).

Timing: at a due step :meth:`compute` copies the weights (one copy of the parameters, held only
until the step is taken) and :meth:`after_step` measures the change, on the weights' device. The
values are therefore emitted at the *next* due step: the ratio read at step ``t`` is that of
the step taken at the previous evaluation (one step earlier with ``every: 1``). A skipped step
has ratio 0. Without an ``after_step`` call (a harness other than the guard), the next
:meth:`compute` measures the change since the copy instead. The first evaluation emits
nothing (the signals are absent until then).

Params: ``groups`` (per-group signals for the first ``groups`` parameter groups, default 1),
``matrices_only`` (default true), ``eps`` (floor on a weight norm, default 1e-12).

:raises ValueError: (in :meth:`setup`) the optimizer has fewer than ``groups`` parameter groups.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from lbw_policy.base import Detector

__all__ = ["UpdateRatio"]


class UpdateRatio(Detector):
    name = "update_ratio"
    signals = ("ratio", "max", "worst")
    params_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "groups": {"type": "integer", "minimum": 0, "maximum": 64,
                       "description": "per-group signals for the first `groups` param groups; default 1"},
            "matrices_only": {"type": "boolean",
                              "description": "measure tensors of >= 2 dims only; default true"},
            "eps": {"type": "number", "exclusiveMinimum": 0,
                    "description": "floor on a weight norm; default 1e-12"},
        },
    }

    @classmethod
    def signals_for(cls, params: Mapping[str, Any]) -> tuple[str, ...]:
        names = list(cls.signals)
        for i in range(int(params.get("groups", 1))):
            names += [f"group{i}.ratio", f"group{i}.max"]
        return tuple(names)

    def __init__(self, groups: int = 1, matrices_only: bool = True, eps: float = 1e-12) -> None:
        super().__init__(groups=groups, matrices_only=matrices_only, eps=eps)
        self.groups = int(groups)
        self.matrices_only = bool(matrices_only)
        self.eps = float(eps)
        self._snap: Optional[list] = None     # [(group, index, param, copy before the step)]
        self._pending: Optional[dict] = None  # signals measured, emitted at the next compute
        self._layout = None                   # (key, tensor index, group id) of the measured tensors

    def setup(self, model, optimizer) -> None:
        n = len(optimizer.param_groups)
        if self.groups > n:
            raise ValueError(f"update_ratio: params.groups is {self.groups} but the optimizer has {n} "
                             "parameter group(s)")
        self._layout_for(self._measured(optimizer))

    def _measured(self, optimizer) -> list:
        """``[(group, index in parameter order, param)]`` of the tensors measured."""
        params = [(g, p) for g, group in enumerate(optimizer.param_groups) for p in group["params"]]
        return [(g, i, p) for i, (g, p) in enumerate(params) if p.dim() >= 2 or not self.matrices_only]

    def _layout_for(self, measured: list):
        """Index and group-id tensors of ``measured`` on its device, built once (a host-to-device
        copy) and reused while the parameter layout stays the same."""
        if not measured:
            return None
        dev = measured[0][2].device
        key = (dev, tuple((g, i) for g, i, _ in measured))
        if self._layout is None or self._layout[0] != key:
            dtype = torch.float64 if dev.type != "mps" else torch.float32
            self._layout = (key, torch.tensor([i for _, i, _ in measured], device=dev, dtype=dtype),
                            torch.tensor([g for g, _, _ in measured], device=dev))
        return self._layout

    @torch.no_grad()
    def compute(self, telemetry) -> dict:
        if self._snap is not None:          # no after_step since the copy: measure the change now
            self._measure()
        out = self._pending or {}
        self._pending = None
        self._snap = [(g, i, p, p.detach().clone()) for g, i, p in self._measured(telemetry.optimizer)]
        return out

    def after_step(self, telemetry, stepped: bool) -> None:
        if self._snap is not None:
            self._measure()

    @torch.no_grad()
    def _measure(self) -> None:
        snap, self._snap = self._snap, None
        if not snap:
            return
        dev = snap[0][2].device
        dn = torch.stack([torch.linalg.vector_norm((p.detach() - w0).float()).to(dev) for _, _, p, w0 in snap])
        wn = torch.stack([torch.linalg.vector_norm(w0.float()).to(dev) for _, _, _, w0 in snap])
        dn, wn = dn.double() if dev.type != "mps" else dn, wn.double() if dev.type != "mps" else wn
        per = dn / torch.clamp(wn, min=self.eps)
        _, index, gid = self._layout_for([(g, i, p) for g, i, p, _ in snap])
        out = {"ratio": _global(dn, wn, self.eps), "max": per.max(), "worst": torch.take(index, per.argmax())}
        for i in range(self.groups):
            sel = gid == i
            zero = torch.zeros_like(dn)   # masks, not boolean indexing: no host sync on CUDA
            out[f"group{i}.ratio"] = _global(torch.where(sel, dn, zero), torch.where(sel, wn, zero), self.eps)
            out[f"group{i}.max"] = torch.where(sel, per, torch.full_like(per, -torch.inf)).max()
        self._pending = out

    def state_dict(self) -> dict:
        # Guard checkpoints are taken between steps: the copy exists only inside a step.
        return {"pending": None if self._pending is None else {k: float(v) for k, v in self._pending.items()}}

    def load_state_dict(self, state) -> None:
        p = state.get("pending")
        self._pending = None if p is None else {k: torch.tensor(float(v), dtype=torch.float64)
                                                for k, v in p.items()}
        self._snap = None


def _global(dn: torch.Tensor, wn: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.sqrt((dn * dn).sum()) / torch.clamp(torch.sqrt((wn * wn).sum()), min=eps)
