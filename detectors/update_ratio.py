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

Timing: at a due step :meth:`compute` copies the weights into buffers allocated once (one copy
of the measured parameters, kept for reuse) and :meth:`after_step` measures the change in place,
on the weights' device, with ``torch._foreach_*`` reductions (the norms accumulate in float32, or
float64 for float64 weights). The
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
        self._armed: Optional[list] = None    # the measured params while the copy is current
        self._pending: Optional[dict] = None  # signals measured, emitted at the next compute
        self._layout = None                   # see _layout_for

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
        """``(key, buffers, index, groups, how)`` for ``measured``, built once (allocations and a
        host-to-device copy) and reused while the parameters stay the same: ``buffers`` hold
        the copy of the weights, ``index`` (float, on the device) maps a measured tensor to its
        index in parameter order, ``groups[i]`` is ``None`` when group ``i`` holds every
        measured tensor, an empty tuple when it holds none, else the positions of its tensors
        (a device index tensor); ``how`` says how :func:`_norms` reduces the buffers."""
        if not measured:
            return None
        dev = measured[0][2].device
        key = tuple((g, i, id(p), p.shape, p.dtype, p.device) for g, i, p in measured)
        if self._layout is None or self._layout[0] != key:
            dtype = torch.float64 if dev.type != "mps" else torch.float32
            buffers = [torch.empty_like(p, memory_format=torch.contiguous_format) for _, _, p in measured]
            index = torch.tensor([i for _, i, _ in measured], device=dev, dtype=dtype)
            groups = []
            for gi in range(self.groups):
                pos = [k for k, (g, _, _) in enumerate(measured) if g == gi]
                groups.append(None if len(pos) == len(measured) else
                              () if not pos else torch.tensor(pos, device=dev))
            dtypes = {p.dtype for _, _, p in measured}
            norm_dtype = (torch.float32 if dtypes <= {torch.float16, torch.bfloat16, torch.float32} else
                          torch.float64 if dtypes == {torch.float64} else None)  # None: one by one
            one_device = all(p.device == dev for _, _, p in measured)
            self._layout = (key, buffers, index, groups, (norm_dtype, one_device))
        return self._layout

    @torch.no_grad()
    def compute(self, telemetry) -> dict:
        if self._armed is not None:         # no after_step since the copy: measure the change now
            self._measure()
        out = self._pending or {}
        self._pending = None
        measured = self._measured(telemetry.optimizer)
        layout = self._layout_for(measured)
        if layout is None:
            return out
        params = [p.detach() for _, _, p in measured]
        torch._foreach_copy_(layout[1], params)
        self._armed = params
        return out

    def after_step(self, telemetry, stepped: bool) -> None:
        if self._armed is not None:
            self._measure()

    @torch.no_grad()
    def _measure(self) -> None:
        params, self._armed = self._armed, None
        _, buffers, index, groups, how = self._layout
        dev = params[0].device
        wn = _norms(buffers, how, dev)
        torch._foreach_sub_(buffers, params)             # W_before - W_after, in place
        dn = _norms(buffers, how, dev)
        dn, wn = dn.double() if dev.type != "mps" else dn, wn.double() if dev.type != "mps" else wn
        per = dn / torch.clamp(wn, min=self.eps)
        ratio, top = _global(dn, wn, self.eps), per.max()
        out = {"ratio": ratio, "max": top, "worst": torch.take(index, per.argmax())}
        for i, pos in enumerate(groups):
            if pos is None:                 # the group holds every measured tensor
                out[f"group{i}.ratio"], out[f"group{i}.max"] = ratio, top
            elif len(pos) == 0:             # none: the documented 0 and -inf
                out[f"group{i}.ratio"] = torch.zeros((), dtype=dn.dtype, device=dev)
                out[f"group{i}.max"] = torch.full((), -torch.inf, dtype=dn.dtype, device=dev)
            else:                           # index_select, not boolean indexing: no host sync
                out[f"group{i}.ratio"] = _global(dn.index_select(0, pos), wn.index_select(0, pos), self.eps)
                out[f"group{i}.max"] = per.index_select(0, pos).max()
        self._pending = out

    def state_dict(self) -> dict:
        # Guard checkpoints are taken between steps: the copy is current only inside a step.
        return {"pending": None if self._pending is None else {k: float(v) for k, v in self._pending.items()}}

    def load_state_dict(self, state) -> None:
        p = state.get("pending")
        self._pending = None if p is None else {k: torch.tensor(float(v), dtype=torch.float64)
                                                for k, v in p.items()}
        self._armed = None


def _norms(tensors: list, how: tuple, dev: torch.device) -> torch.Tensor:
    """L2 norm of each tensor, a float32 (float64 for float64 weights) vector on ``dev``: one
    ``torch._foreach_norm`` when the dtypes allow one accumulation dtype, else one by one (half
    precision accumulated in float32)."""
    dtype, one_device = how
    if dtype is not None:
        norms = torch._foreach_norm(tensors, 2, dtype=dtype)
    else:
        norms = [torch.linalg.vector_norm(t, dtype=torch.float32 if t.dtype in (torch.float16, torch.bfloat16)
                                          else None) for t in tensors]
    return torch.stack(norms if one_device else [n.to(dev) for n in norms])


def _global(dn: torch.Tensor, wn: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.sqrt((dn * dn).sum()) / torch.clamp(torch.sqrt((wn * wn).sum()), min=eps)
