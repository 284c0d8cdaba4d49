"""``update_ratio``: size of an optimizer update relative to the weights it changes.

For the optimizer step taken at a due step ``t``, with ``W_p`` a parameter tensor before the
step and ``dW_p`` its change by the step::

    ratio_p        = ||dW_p||_2 / max(||W_p||_2, eps)                       # one tensor
    ratio (global) = sqrt(sum_p ||dW_p||^2) / max(sqrt(sum_p ||W_p||^2), eps)   # all parameters
    group<i>.ratio = the same over parameter group i's tensors

and the update's RMS per weight element, in the weights' own units (not relative to them)::

    rms = sqrt(sum_p ||dW_p||^2 / sum_p numel(W_p))                           # all parameters

The ratio depends on the scale the weights were initialized at: the same Adam step (about
``lr`` per element, whatever the gradient's scale) is a four times smaller ratio on weights
drawn with std ``1 / sqrt(128)`` than with std 0.02. ``rms`` does not: under Adam-family
optimizers it is about the learning rate times the RMS of Adam's normalized step ``m / sqrt(v)``
(exactly the learning rate at Adam's first step, where that step is ``sign(g)``), whatever the
initialization or the loss's scale (issue 15: a brake on ``rms`` transfers across
initializations where one on ``ratio`` does not). Tensors, or rows of an embedding, that get
little or no gradient lower it. Under SGD it is the learning rate times the gradient's RMS, not
scale-free.

The same RMS times the model's width ``n`` (``width`` below), the update's RMS with the
width's effect taken out::

    rms_mup = rms * n

Under Adam, the update per element that a hidden weight matrix tolerates shrinks as 1/width:
the Maximal Update Parametrization (muP, Yang et al., arXiv 2203.03466, Table 3) scales Adam's
learning rate of hidden matrices by ``1 / fan_in``, and the spectral condition (Yang, Simon &
Bernstein, arXiv 2310.17813) asks ``||dW||_2 ~ sqrt(fan_out / fan_in)``, which for a low-rank
``dW`` is an RMS of about ``1 / fan_in``. So a threshold on ``rms_mup`` (tuned at one width)
carries over to wider or narrower models of the same family, where one on ``rms`` asks a wider
model for a larger step than it tolerates (issue 15: at d 192 the update RMS at a learning rate
that stalls training, about 1e-3, stayed below a brake set at 1.5e-3 on d 128 models). GPT-3's
learning rates (Brown et al., arXiv 2005.14165, Table 2.1) fall about as 1/width: 6e-4 at d
768, 1.2e-4 at d 4096. The width ``n`` is the ``width`` param, else inferred once from the
measured tensors' shapes: the most frequent size among the first two dims of the tensors of
2 or more dims (a transformer's hidden size, which every one of its matrices has; ties go to
the smaller size; for convolutional or recurrent models set ``width``); with no such tensor
and no ``width``, ``rms_mup`` is NaN (a rule on it does not fire; :meth:`setup` warns).
Units: the weights' units times elements of width. Embeddings and the output head are in the
sum too, though muP keeps their Adam learning rate independent of the width (about a third
of GPT-2 small's parameters, a few percent of a small character model's).

The same RMS per unit of learning rate: each tensor's change divided by the learning rate
``lr_g`` of its parameter group as the optimizer step used it (inside a ``Guard``, after
``lr_scale`` or ``lr_cap`` changed it for the step: ``Telemetry.step_lrs``; elsewhere the
group's ``lr`` at :meth:`after_step`)::

    rms_per_lr = sqrt(sum_p ||dW_p / lr_g(p)||^2 / sum_p numel(W_p))    # over groups with lr_g != 0

A group whose learning rate is 0, ``None`` or not a number (Adafactor's ``relative_step``) is
left out; with none left, ``rms_per_lr`` is NaN (no value: a rule on it does not fire). Units:
the weights' units per unit of learning rate, dimensionless under Adam-family optimizers.
Under ``torch.optim.AdamW`` (decoupled weight decay, Loshchilov & Hutter, arXiv 1711.05101:
``W <- W (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)``) it is exactly the RMS of
``m_hat / (sqrt(v_hat) + eps) + wd W`` with ``W`` the weights before the step (without
AMSGrad; in bf16/fp16 weights, after rounding; an estimate for a sketched tensor). Its Adam
part is about 1 per element where each gradient's sign and size hold from step to step, and
smaller where the sign flips (the moments average it away). Under Adam with L2 weight decay
the decay is inside ``m`` and ``v``; under SGD ``rms_per_lr`` is the gradient's (or the
momentum buffer's) RMS, in the gradient's units. It separates two reasons the update ratio
can rise (issue 16): a learning rate creeping up raises ``ratio`` with ``rms_per_lr`` flat or
falling, while a model leaving a loss plateau raises ``ratio`` because its gradients turn
consistent, and ``rms_per_lr`` rises with it. A weight decay that grows raises both (its
``wd W`` term is in ``rms_per_lr``). Its Adam part is the same normalized step as
``adam_update_stats``' ``rms`` (arXiv 2304.09871), there over every tensor and without the
decay term.

The sums run over the weight matrices only (tensors of 2 or more dims) unless
``matrices_only: false``: biases and normalization gains often start at exactly 0, where the
ratio is meaningless (``||dW|| / eps``), and are not what the heuristic watches.

Signals (0-dim tensors; ``rms`` and ``wnorm`` in the weights' units, ``rms_per_lr`` in the
weights' units per unit of learning rate, the others dimensionless): ``ratio`` (global), ``rms``
(global, above), ``rms_mup`` and ``width`` (above; ``width`` the ``n`` used, a constant),
``rms_per_lr`` (above), ``wnorm`` (``sqrt(sum_p
||W_p||^2)``, the measured weights' global L2 norm before the step), ``max`` (largest ``ratio_p``),
``worst`` (index of that tensor in the optimizer's parameter order over *all* its tensors, from
0), and for each ``i < groups``: ``group<i>.ratio`` and ``group<i>.max`` (0 and -inf for a group
with no measured tensor). Healthy AdamW training keeps the
ratio near ``lr`` (about 1e-3 per step); a ratio far above it means the step rewrites the weights
(Karpathy's "update:data ratio" heuristic; the per-tensor view of LARS, You et al. 1708.03888).

Memory: no second copy of the model. A tensor of ``n <= sketch`` elements (default
``sketch: 65536``, every tensor of the demo GPT) is measured exactly: a copy of it is kept.
A larger tensor is measured on a fixed systematic sample of at most ``m = sketch`` of its
elements, chosen once when the layout is built: in memory order, every ``s``-th element from
a random start ``o``, where ``s`` is the smallest integer ``>= n / m`` that shares no factor
with ``n`` and ``o`` is drawn uniformly in ``[0, s)`` (seeded by ``seed``)::

    S_p = {o + j s : 0 <= j < m'},   m' = ceil((n - o) / s) <= m
    ||W_p||^2  ~  s * sum_{i in S_p} W_p[i]^2          (the same for dW_p)

Every element is in the sample with probability ``1 / s``, so each estimate is unbiased (the
Horvitz-Thompson estimator of a systematic sample); for entries without a structure
aligned with the stride its relative standard deviation is about ``CV(x^2) / sqrt(m')``
(``CV``: coefficient of variation of the squared entries; ``sqrt(2 / m')`` for Gaussian
entries). The stride shares no factor with ``n``, hence none with a row's length or a head's
width, so every column, head and block of rows is sampled in proportion. ``ratio_p`` is the
square root of the ratio of the two estimates (``s`` cancels), with a bias of order
``1 / m'``. Measured on a 768 x 3072 matrix under AdamW (``docs/detectors.md``): relative
error of the ratio under 1 % with ``m = 65536`` (0.3 % RMS), under 4 % with ``m = 4096``. It
degrades where the update is concentrated in far fewer than ``m'`` elements (an embedding
with a few live rows), where the norm rests on the few sampled live elements. Source:
systematic sampling and the Horvitz-Thompson estimator (Horvitz & Thompson 1952; Cochran,
*Sampling Techniques*, 1977, ch. 8). Memory per sketched tensor: its ``m'`` sampled values in
the weight's dtype, ``m' * itemsize`` bytes (at most 128 KiB in bfloat16, 256 KiB in float32
at the default) against ``n * itemsize`` for a copy (24 MiB for a bf16 4096 x 3072 matrix);
no index is stored (the sample is a strided view of the weight), and no temporary is
allocated. A tensor whose elements have gaps in memory (a strided view) is measured exactly.
``sketch: 0`` (or ``null``) measures every tensor exactly (a full copy, the former
behaviour).

Timing: at a due step :meth:`compute` copies the measured weights (exact) or their sampled
elements (sketched, a strided view) into buffers allocated once and kept for reuse, and
:meth:`after_step` measures the change in place, on the weights' device, with
``torch._foreach_*`` copies and reductions (the norms accumulate in float32, or float64 for
float64 weights): no host sync. The
values are therefore emitted at the *next* due step: the ratio read at step ``t`` is that of
the step taken at the previous evaluation (one step earlier with ``every: 1``). A skipped step
has ratio 0. Without an ``after_step`` call (a harness other than the guard), the next
:meth:`compute` measures the change since the copy instead (and ``rms_per_lr`` divides by the
learning rates in force then, which a scheduler or an actuator may have changed since the
step). The first evaluation emits
nothing (the signals are absent until then).

Trend (off unless ``trend_window`` is set): over the last ``trend_window`` finite, positive
global ratios, ``y_i = ln(ratio_i)`` against the step ``x_i`` at which each was measured, the
Theil-Sen slope and the Mann-Kendall test of :mod:`grad_norm_trend` (the same computation, on
the device)::

    trend_slope  = median over pairs of (y_j - y_i) / (x_j - x_i)     # ln units per step
    trend_growth = exp(trend_slope * (max x - min x)) - 1              # relative growth over the window
    trend_p      = the Mann-Kendall two-sided p-value

and the same of ``ln(wnorm)``: ``wnorm_trend_slope``, ``wnorm_trend_growth``, ``wnorm_trend_p``
(over the last ``wnorm_trend_window`` weight norms when that is set, else ``trend_window``;
emitted from ``min(trend_min_points, wnorm_trend_window)`` values on), and of ``ln(rms_per_lr)``: ``rms_per_lr_trend_slope``, ``rms_per_lr_trend_growth``,
``rms_per_lr_trend_p`` (``policies/early-warning.yaml``'s ``update-growth`` holds off while
it rises too).

A ln slope is scale-free: it does not depend on the learning rate's level nor on the init's
scale, only on how fast the update grows relative to the weights. After a warm-up, a
decaying or constant schedule makes the ratio flat or falling, so a significant, steady rise
says the effective step is growing (a learning rate or weight decay that creeps up, or
curvature that grows under it): issue 16's slow-onset faults, measured in
``docs/results.md``. The weight norm's slope is the other side: decoupled weight decay shrinks
every weight by ``lr * wd`` a step (3e-4 at lr 3e-3 and wd 0.1), so a norm falling faster
than that says the decay, or something else, is eating the weights. The weight norm moves
smoothly from step to step (Adam's momentum averages the update, and the norm sums every
weight), so its trend needs a far shorter window than the ratio's to be significant: a steady
fall over 8 values has a Mann-Kendall p of 8e-4, and a short window sees a turn within a few
steps (``policies/early-warning.yaml``: 8 values, against 48 for the ratio; issue 16). During a learning-rate warm-up the ratio rises by design: start the
window after it (``trend_start``). Until ``trend_min_points`` ratios are in the window (and
before ``trend_start``) ``trend_slope = trend_growth = 0`` and ``trend_p = 1`` (never fires).
A skipped step's ratio (0) is not entered. Sources: Theil (1950), Sen (1968), Mann (1945),
Kendall (1975), as in ``grad_norm_trend``.

Params: ``groups`` (per-group signals for the first ``groups`` parameter groups, default 1),
``matrices_only`` (default true), ``eps`` (floor on a weight norm, default 1e-12), ``sketch``
(most elements sampled from a tensor larger than it, default 65536; 0 or null: every tensor
exactly), ``seed`` (of the samples' starts, default 0), ``trend_window`` (evaluations kept for
the trends, 4..1024; default 0: no trend signals), ``wnorm_trend_window`` (evaluations kept for
the weight norm's trend, 4..1024; default ``trend_window``; needs it), ``trend_min_points`` (values in a window
before its trend is emitted, 3..``trend_window``; default ``trend_window``), ``trend_start``
(first step whose values enter the windows, default 0), ``width`` (the model's width ``n`` of
``rms_mup``, an integer >= 1; default: inferred from the shapes, above).

:raises ValueError: (in :meth:`setup`) the optimizer has fewer than ``groups`` parameter groups.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, NamedTuple, Optional

import torch

from lbw_policy.base import Detector

from ._ring import Ring, to_device
from .grad_norm_trend import theil_sen_mann_kendall

__all__ = ["UpdateRatio", "infer_width"]

#: default ``sketch``: the largest tensor of the demo GPT (512 x 128), so it is measured exactly
DEFAULT_SKETCH = 65536


class _Layout(NamedTuple):
    """What :meth:`UpdateRatio._layout_for` builds once per set of measured parameters.

    ``buffers[q]`` holds measured tensor ``q``'s copy (exact) or its sampled elements
    (sketched), in the weight's dtype; ``index`` (float, on the device) maps a measured tensor
    to its index in parameter order; ``groups[i]`` is ``None`` when group ``i`` holds every
    measured tensor, an empty tuple when it holds none, else the positions of its tensors (a
    device index tensor); ``how`` says how :func:`_norms` reduces the buffers. ``exact`` and
    ``sketched`` are the positions of the tensors measured each way, ``width`` the ``n`` of
    ``rms_mup`` (the param, else inferred from the shapes; ``None``: neither), ``samples[k]`` the
    ``(stride s, start o, count m')`` of sketched tensor ``k``, and ``scale`` (float, on the
    device; ``None`` when nothing is sketched) ``sqrt(s)`` per measured tensor (1 for an exact
    one), which turns a sample's norm into the estimate of the tensor's; ``count`` the number of
    elements measured (whole tensors, sketched or not); ``lr_groups`` one ``(group, positions,
    count)`` per parameter group with a measured tensor (positions ``None`` when that group holds
    every measured tensor, else a device index tensor; count: the number of elements of its
    measured tensors, whole tensors, sketched or not)."""
    key: tuple
    buffers: list
    index: torch.Tensor
    groups: list
    how: tuple
    exact: tuple
    sketched: tuple
    samples: tuple
    scale: Optional[torch.Tensor]
    count: float
    lr_groups: tuple
    width: Optional[int]


class UpdateRatio(Detector):
    name = "update_ratio"
    signals = ("ratio", "max", "worst", "rms", "rms_mup", "width", "rms_per_lr", "wnorm")
    #: the trend signals, emitted with ``trend_window``: of ln(ratio), of ln(wnorm), of ln(rms_per_lr)
    trend_signals = ("trend_slope", "trend_growth", "trend_p",
                     "wnorm_trend_slope", "wnorm_trend_growth", "wnorm_trend_p",
                     "rms_per_lr_trend_slope", "rms_per_lr_trend_growth", "rms_per_lr_trend_p")
    reductions = {name: "same" for name in signals + trend_signals}   # replicated weights (DDP)
    optional_signals = {name: "trend_window: N (e.g. 48)" for name in trend_signals}
    sharding = ("it compares whole parameter tensors before and after the step; on FSDP2 "
                "shards each rank would see a part of every ratio")
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
            "sketch": {"type": ["integer", "null"], "minimum": 0,
                       "description": "a tensor of more elements than this is measured on a fixed "
                                      "sample of at most this many of them (memory O(sketch) per "
                                      "tensor, not a copy); 0 or null: every tensor exactly; "
                                      f"default {DEFAULT_SKETCH}"},
            "seed": {"type": "integer", "minimum": 0,
                     "description": "seed of the samples' random starts; default 0"},
            "width": {"type": ["integer", "null"], "minimum": 1,
                      "description": "the model's width n of rms_mup = rms * n; default: the most "
                                     "frequent size among the first two dims of the measured "
                                     "matrices (the hidden size)"},
            "trend_window": {"type": "integer", "minimum": 0, "maximum": 1024,
                             "description": "evaluations kept for the trend signals (Theil-Sen "
                                            "slope and Mann-Kendall p of ln ratio, ln wnorm "
                                            "and ln rms_per_lr); 0: no trend; default 0"},
            "wnorm_trend_window": {"type": "integer", "minimum": 4, "maximum": 1024,
                                   "description": "evaluations kept for the weight norm's trend "
                                                  "(wnorm_trend_*), when it should be shorter or "
                                                  "longer than the others'; needs trend_window; "
                                                  "default trend_window"},
            "trend_min_points": {"type": "integer", "minimum": 3,
                                 "description": "values in a trend window before its slope and "
                                                "growth stop reading 0 (and p 1); default "
                                                "trend_window"},
            "trend_start": {"type": "integer", "minimum": 0,
                            "description": "first step whose ratio, weight norm and rms_per_lr enter the "
                                           "trend windows (after a learning-rate warm-up); "
                                           "default 0"},
        },
    }

    @classmethod
    def validate_params(cls, params: Mapping[str, Any]) -> None:
        """Checks the schema cannot express (a policy's params pass the schema first; the
        constructor calls this with its own arguments). :raises ValueError: on a bad combination."""
        window = int(params.get("trend_window", 0) or 0)
        if not 0 <= window <= 1024 or 0 < window < 4:
            raise ValueError(f"trend_window must be 0 (off) or 4..1024, not {window}")
        given = {k: params[k] for k in ("trend_min_points", "trend_start", "wnorm_trend_window")
                 if params.get(k) is not None}
        if given and not window:
            raise ValueError(f"{' and '.join(given)} need trend_window > 0")
        mp = int(given.get("trend_min_points", window))
        if window and not 3 <= mp <= window:
            raise ValueError(f"trend_min_points ({mp}) must be in 3..trend_window ({window})")
        if int(given.get("trend_start", 0)) < 0:
            raise ValueError(f"trend_start must be >= 0, not {given['trend_start']}")
        ww = int(given.get("wnorm_trend_window", window or 4))
        if not 4 <= ww <= 1024:
            raise ValueError(f"wnorm_trend_window must be in 4..1024, not {ww}")

    @classmethod
    def signals_for(cls, params: Mapping[str, Any]) -> tuple[str, ...]:
        names = list(cls.signals)
        for i in range(int(params.get("groups", 1))):
            names += [f"group{i}.ratio", f"group{i}.max"]
        if params.get("trend_window"):
            names += list(cls.trend_signals)
        return tuple(names)

    def __init__(self, groups: int = 1, matrices_only: bool = True, eps: float = 1e-12,
                 sketch: Optional[int] = DEFAULT_SKETCH, seed: int = 0, trend_window: int = 0,
                 trend_min_points: Optional[int] = None, trend_start: int = 0,
                 width: Optional[int] = None, wnorm_trend_window: Optional[int] = None) -> None:
        self.validate_params({"trend_window": trend_window, "trend_min_points": trend_min_points,
                              "trend_start": trend_start or None, "wnorm_trend_window": wnorm_trend_window})
        trend = {} if not trend_window else {"trend_window": trend_window, "trend_start": trend_start,
                                             "trend_min_points": trend_min_points or trend_window,
                                             "wnorm_trend_window": wnorm_trend_window or trend_window}
        if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
            raise ValueError(f"width must be an integer >= 1 (or omitted), not {width!r}")
        super().__init__(groups=groups, matrices_only=matrices_only, eps=eps, sketch=sketch, seed=seed,
                         **trend, **({} if width is None else {"width": width}))
        self.width = width                    # None: inferred from the shapes
        self.trend = Ring(int(trend_window)) if trend_window else None        # ln(ratio)
        self.wnorm_trend = Ring(int(wnorm_trend_window or trend_window)) if trend_window else None  # ln(wnorm)
        self.rms_per_lr_trend = Ring(int(trend_window)) if trend_window else None    # ln(rms_per_lr)
        self.trend_min_points = int(trend_min_points or trend_window or 0)
        # the weight norm's window may be shorter than the points the others wait for
        self.wnorm_min_points = min(self.trend_min_points, int(wnorm_trend_window or trend_window or 0))
        self.trend_start = int(trend_start)
        self._armed_step = 0                # the step whose copy is armed
        self.groups = int(groups)
        self.matrices_only = bool(matrices_only)
        self.eps = float(eps)
        self.sketch = int(sketch or 0)        # 0: every tensor exactly
        self.seed = int(seed)
        self._armed: Optional[list] = None    # what was copied (params, sample views) while current
        self._pending: Optional[dict] = None  # signals measured, emitted at the next compute
        self._layout: Optional[_Layout] = None

    def setup(self, model, optimizer, every: int = 1) -> None:
        self.every = int(every)
        n = len(optimizer.param_groups)
        if self.groups > n:
            raise ValueError(f"update_ratio: params.groups is {self.groups} but the optimizer has {n} "
                             "parameter group(s)")
        layout = self._layout_for(self._measured(optimizer))
        if layout is not None and layout.width is None:
            warnings.warn("update_ratio: no weight matrix to infer the width from and no `width` param: "
                          "rms_mup is NaN and a rule on it never fires", stacklevel=2)

    def _measured(self, optimizer) -> list:
        """``[(group, index in parameter order, param)]`` of the tensors measured."""
        params = [(g, p) for g, group in enumerate(optimizer.param_groups) for p in group["params"]]
        return [(g, i, p) for i, (g, p) in enumerate(params) if p.dim() >= 2 or not self.matrices_only]

    def _layout_for(self, measured: list) -> Optional[_Layout]:
        """The :class:`_Layout` for ``measured``, built once (allocations, the samples and a
        host-to-device copy) and reused while the parameters stay the same."""
        if not measured:
            return None
        dev = measured[0][2].device
        key = tuple((g, i, id(p), p.shape, p.stride(), p.dtype, p.device) for g, i, p in measured)
        if self._layout is None or self._layout.key != key:
            self._layout = None             # free the old buffers before allocating new ones
            dtype = torch.float64 if dev.type != "mps" else torch.float32
            gen = torch.Generator().manual_seed(self.seed)
            buffers, exact, sketched, samples, scale = [], [], [], [], []
            for q, (_, _, p) in enumerate(measured):
                n = p.numel()
                if self.sketch and n > self.sketch and _dense(p):
                    s = _stride_for(n, self.sketch)
                    o = int(torch.randint(s, (), generator=gen))
                    samples.append((s, o, -(-(n - o) // s)))
                    sketched.append(q)
                    scale.append(math.sqrt(s))
                    buffers.append(torch.empty(samples[-1][2], dtype=p.dtype, device=p.device))
                else:
                    exact.append(q)
                    scale.append(1.0)
                    buffers.append(torch.empty_like(p, memory_format=torch.contiguous_format))
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
            lr_groups = []
            for g in sorted({g for g, _, _ in measured}):
                pos = [k for k, (gk, _, _) in enumerate(measured) if gk == g]
                lr_groups.append((g, None if len(pos) == len(measured) else torch.tensor(pos, device=dev),
                                  float(sum(measured[k][2].numel() for k in pos))))
            self._layout = _Layout(key, buffers, index, groups, (norm_dtype, one_device), tuple(exact),
                                   tuple(sketched), tuple(samples),
                                   torch.tensor(scale, device=dev, dtype=dtype) if sketched else None,
                                   float(sum(p.numel() for _, _, p in measured)), tuple(lr_groups),
                                   self.width or infer_width([p.shape for _, _, p in measured]))
        return self._layout

    @torch.no_grad()
    def compute(self, telemetry) -> dict:
        if self._armed is not None:         # no after_step since the copy: measure the change now
            self._measure([g.get("lr") for g in telemetry.optimizer.param_groups])
        out = self._pending or {}
        self._pending = None
        measured = self._measured(telemetry.optimizer)
        layout = self._layout_for(measured)
        if layout is None:
            return out
        sources = [p.detach() for _, _, p in measured]
        if not layout.sketched:
            torch._foreach_copy_(layout.buffers, sources)
        else:                               # exact ones in one fused copy, then the strided samples
            for q, (s, o, m) in zip(layout.sketched, layout.samples):
                p = sources[q]
                sources[q] = p.as_strided((m,), (s,), p.storage_offset() + o)
            for part in (layout.exact, layout.sketched):
                if part:
                    torch._foreach_copy_([layout.buffers[q] for q in part], [sources[q] for q in part])
        self._armed = sources
        self._armed_step = int(telemetry.step)
        return out

    def after_step(self, telemetry, stepped: bool) -> None:
        if self._armed is not None:
            lrs = getattr(telemetry, "step_lrs", None)   # the Guard's: as the step used them
            self._measure(lrs if lrs is not None else [g.get("lr") for g in telemetry.optimizer.param_groups])

    @torch.no_grad()
    def _measure(self, lrs: list) -> None:
        """Measure the step's change (the copy armed at :meth:`compute` against the weights
        now); ``lrs``: each parameter group's learning rate as the step used it."""
        sources, self._armed = self._armed, None
        _, buffers, index, groups, how, exact, sketched, _, scale, count, lr_groups, width = self._layout
        dev = sources[0].device
        wn = _norms(buffers, how, dev)
        if not sketched:
            torch._foreach_sub_(buffers, sources)        # W_before - W_after, in place
        else:
            for part in (exact, sketched):
                if part:
                    torch._foreach_sub_([buffers[q] for q in part], [sources[q] for q in part])
        dn = _norms(buffers, how, dev)
        dn, wn = dn.double() if dev.type != "mps" else dn, wn.double() if dev.type != "mps" else wn
        if scale is not None:                            # a sample's norm -> the tensor's estimate
            dn, wn = dn * scale, wn * scale
        per = dn / torch.clamp(wn, min=self.eps)
        ratio, top = _global(dn, wn, self.eps), per.max()
        rms = torch.sqrt((dn * dn).sum() / count)
        n = math.nan if width is None else float(width)
        out = {"ratio": ratio, "max": top, "worst": torch.take(index, per.argmax()),
               "rms": rms, "rms_mup": rms * n, "width": torch.full((), n, dtype=rms.dtype, device=dev),
               "wnorm": torch.sqrt((wn * wn).sum()), "rms_per_lr": _rms_per_lr(dn, lr_groups, lrs)}
        if self.trend is not None:
            out.update(self._trends(ratio, out["wnorm"], out["rms_per_lr"]))
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

    def _trends(self, ratio: torch.Tensor, wnorm: torch.Tensor, rms_per_lr: torch.Tensor) -> dict:
        """Enter ``ln(ratio)``, ``ln(wnorm)`` and ``ln(rms_per_lr)`` (measured for the step armed at
        ``_armed_step``) into their windows and return the three trends' signals, fitted in one
        batched pass; nothing enters before ``trend_start``, nor a value that is 0 (a skipped
        step's ratio and rms_per_lr) or not finite."""
        rings = (self.trend, self.wnorm_trend, self.rms_per_lr_trend)
        for ring, value in zip(rings, (ratio, wnorm, rms_per_lr)):
            ring.ensure(value.device)       # (a ring restored on the CPU moves to the device)
            if self._armed_step >= self.trend_start:
                ring.push(torch.log(value), self._armed_step)
        size = max(r.size for r in rings)     # a shorter weight-norm window: padded with invalid slots
        pad = lambda t, r: t if r.size == size else torch.cat((t, t.new_zeros(size - r.size)))  # noqa: E731
        st = theil_sen_mann_kendall(torch.stack([pad(r.values, r) for r in rings]),
                                    torch.stack([pad(r.steps, r) for r in rings]),
                                    torch.stack([pad(r.valid, r) for r in rings]))
        need = torch.tensor([self.trend_min_points, self.wnorm_min_points, self.trend_min_points],
                            device=st["n"].device)
        warm = st["n"] >= need
        slope = torch.where(warm, torch.nan_to_num(st["slope"], nan=0.0), 0.0)
        growth = torch.where(warm, torch.expm1(slope * st["span"]), 0.0)
        p = torch.where(warm, st["p"], 1.0)
        out = {}
        for i, prefix in enumerate(("trend_", "wnorm_trend_", "rms_per_lr_trend_")):
            out[prefix + "slope"], out[prefix + "growth"], out[prefix + "p"] = slope[i], growth[i], p[i]
        return out

    def state_dict(self) -> dict:
        # Guard checkpoints are taken between steps: the copy is current only inside a step.
        state = {"pending": None if self._pending is None else
                 {k: float(v) for k, v in self._pending.items()}}
        if self.trend is not None:
            state["trend"] = self.trend.state_dict()
            state["wnorm_trend"] = self.wnorm_trend.state_dict()
            state["rms_per_lr_trend"] = self.rms_per_lr_trend.state_dict()
        return state

    def load_state_dict(self, state) -> None:
        p = state.get("pending")
        self._pending = None if p is None else {k: torch.tensor(float(v), dtype=torch.float64)
                                                for k, v in p.items()}
        self._armed = None
        if self.trend is not None:
            self.trend.load_state_dict(state.get("trend", {}))
            self.wnorm_trend.load_state_dict(state.get("wnorm_trend", {}))
            self.rms_per_lr_trend.load_state_dict(state.get("rms_per_lr_trend", {}))   # absent before rms_per_lr


def infer_width(shapes) -> Optional[int]:
    """The width ``n`` of ``rms_mup``: the most frequent size among the first two dims of the
    shapes of 2 or more dims (ties: the smaller size); ``None`` when there is none. For a
    transformer, its hidden size: every projection, MLP matrix, embedding and output head has
    it as one of its two dims (``nn.Linear`` stores ``(out, in)``, HF's ``Conv1D`` ``(in, out)``:
    both count). The first two dims of a convolution's ``(out, in, *kernel)`` weight are its
    channels, not the kernel. Meant for transformers: for other models (convolutional,
    recurrent: an LSTM's ``(4h, h)`` matrices) set the ``width`` param."""
    counts: dict = {}
    for shape in shapes:
        if len(shape) >= 2:
            for size in tuple(shape)[:2]:
                counts[int(size)] = counts.get(int(size), 0) + 1
    if not counts:
        return None
    return min(counts, key=lambda size: (-counts[size], size))


def _stride_for(n: int, m: int) -> int:
    """The smallest ``s >= n / m`` sharing no factor with ``n``: ``ceil((n - o) / s) <= m``
    samples, spread evenly over every period that divides ``n`` (rows, columns, heads)."""
    s = -(-n // m)
    while math.gcd(s, n) != 1:
        s += 1
    return s


def _dense(p: torch.Tensor) -> bool:
    """Whether ``p``'s elements fill a contiguous block of memory in some order of its dims
    (contiguous, channels-last, transposed): then a stride over memory samples its elements."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(p.shape, p.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


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


def _rms_per_lr(dn: torch.Tensor, lr_groups: tuple, lrs: list) -> torch.Tensor:
    """``sqrt(sum_p (dn_p / lr_g(p))^2 / sum_p numel_p)`` over the groups whose learning rate
    is a nonzero number or tensor; NaN when none is. A float lr is a kernel argument; a tensor
    lr is moved to ``dn``'s device without a blocking copy on CUDA (``to_device``), then
    compared and divided there: no host sync. Returns a 0-dim tensor of ``dn``'s dtype."""
    sq = dn * dn
    total = torch.zeros((), dtype=dn.dtype, device=dn.device)
    count = torch.zeros((), dtype=dn.dtype, device=dn.device)
    for g, pos, n in lr_groups:
        lr = lrs[g] if g < len(lrs) else None
        if torch.is_tensor(lr):
            lr = to_device(lr.detach(), dn.device, dn.dtype).reshape(())
            live = lr != 0
            part = (sq if pos is None else sq.index_select(0, pos)).sum()
            total = total + torch.where(live, part / torch.where(live, lr * lr, 1.0), 0.0)
            count = count + torch.where(live, n, 0.0)
        elif isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr != 0:
            total = total + (sq if pos is None else sq.index_select(0, pos)).sum() / (float(lr) ** 2)
            count = count + n
    return torch.where(count > 0, torch.sqrt(total / torch.clamp(count, min=1.0)), torch.nan)


def _global(dn: torch.Tensor, wn: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.sqrt((dn * dn).sum()) / torch.clamp(torch.sqrt((wn * wn).sum()), min=eps)
