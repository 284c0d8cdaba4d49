"""``logit_divergence``: drift of the mean log-partition ``log Z`` of the output logits.

For output logits ``z`` ``(..., V)`` at each position::

    log Z      = logsumexp_v z_v                                 # nats
    logz_t     = mean of log Z over the positions captured for evaluation t
    drift_t    = logz_t - baseline                               # nats

where ``baseline`` is the mean of ``logz`` over the first ``warmup`` evaluations (default 3) at
guard steps ``>= start`` (a step index, default 0); ``drift`` is ``0.0`` until the baseline is
complete (never fires). ``start`` keeps the first fast phase of training out of the baseline:
while a model learns the unigram statistics its ``log Z`` moves by several nats in a few tens of
steps, more the larger its init (an HF GPT-2 with fan-in init at lr 9e-3: more than +3 nats above
its step-0 value by steps 30-40, peaks +3.1 to +3.4, a healthy run), which a baseline taken at step 0 would read as divergence. Softmax
cross-entropy is invariant to a shift of the logits, so nothing in the loss holds ``log Z`` in place: its drift far from its early
value is the "output logit divergence" that precedes loss divergence; PaLM's z-loss
``1e-4 * (log Z)^2`` exists to hold it near 0 (Wortsman et al. 2309.14322, sec. 3.4;
Chowdhery et al. 2204.02311).

Signals (0-dim tensors): ``logz`` (nats), ``drift`` (nats), ``max_logz`` (largest ``log Z`` of a
single captured position, nats).

Capture and cost: a forward hook on the output head, found without configuration
(``detectors/_attention.py``, :func:`find_output_head`: HF ``get_output_embeddings()``, else the
last ``nn.Linear`` onto the vocabulary, tied to the input embedding or not), or on the module
named by ``module`` (an override: an ``fnmatch`` pattern matching exactly one module; ``""`` is
the model itself). Its output must be the
logits tensor ``(B, ..., V)``, or a tuple/list whose first element is (the demo GPT returns
``(logits, loss)``). On every training-mode forward of a due step the hook reduces the first
``max_batch`` sequences (default 8) to per-position ``log Z`` and adds them to device
accumulators: about ``3 * max_batch * T * V`` flops per forward, no host sync, no tensor kept.
The forwards of steps the detector is not due on are not captured: after each step the guard's
call to :meth:`after_step` arms the hook only when the next step is due (``every:``, set by the
guard; without a guard every training forward is captured and averaged). With gradient
accumulation every micro-batch of the due step is averaged. A due step with no capture since
the previous evaluation emits nothing.

:raises ValueError: (in the constructor) ``warmup < 1``, ``start < 0`` or ``max_batch < 1``;
    (in :meth:`setup`) no output head found, or the pattern matches no module or several; (in
    :meth:`compute`) the hooked module's output is not a tensor of logits.
"""

from __future__ import annotations

import fnmatch
from typing import Optional

import torch

from lbw_policy.base import Detector

from ._attention import find_output_head
from ._ring import stat_dtype

__all__ = ["LogitDivergence"]


def _on(v, like: torch.Tensor) -> torch.Tensor:
    """A statistic (a 0-dim tensor, or a float restored by :meth:`LogitDivergence.load_state_dict`)
    as a tensor on ``like``'s device and dtype. A float is written there by a fill
    (``torch.full``: the value travels as a kernel argument, no copy, no sync)."""
    if isinstance(v, torch.Tensor):
        return v.to(device=like.device, dtype=like.dtype)
    return torch.full((), v, dtype=like.dtype, device=like.device)


class LogitDivergence(Detector):
    name = "logit_divergence"
    signals = ("logz", "drift", "max_logz")
    reductions = {"max_logz": "max"}  # logz, drift: mean over ranks
    params_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "module": {"type": "string",
                       "description": "fnmatch pattern naming the module that outputs the logits; default: "
                                      "the output head (get_output_embeddings, else the last Linear onto the vocabulary)"},
            "warmup": {"type": "integer", "minimum": 1,
                       "description": "evaluations averaged into the baseline; default 3"},
            "start": {"type": "integer", "minimum": 0,
                      "description": "first step whose evaluation may enter the baseline; default 0"},
            "max_batch": {"type": "integer", "minimum": 1,
                          "description": "sequences reduced per forward; default 8"},
        },
    }

    def __init__(self, module: Optional[str] = None, warmup: int = 3, max_batch: int = 8,
                 start: int = 0) -> None:
        super().__init__(module=module, warmup=warmup, max_batch=max_batch, start=start)
        if int(warmup) < 1 or int(start) < 0 or int(max_batch) < 1:
            raise ValueError(f"logit_divergence: need warmup >= 1, start >= 0 and max_batch >= 1, got "
                             f"warmup={warmup}, start={start}, max_batch={max_batch}")
        self.pattern = module
        self.warmup = int(warmup)
        self.start = int(start)
        self.max_batch = int(max_batch)
        self._handle = None
        self._error: Optional[str] = None
        self._sum: Optional[torch.Tensor] = None     # sum of log Z since the last evaluation
        self._max: Optional[torch.Tensor] = None
        self._n = 0                                  # positions captured (host int: from shapes)
        self.evals = 0                               # evaluations at steps >= start
        self._base_sum: Optional[torch.Tensor] = None
        self._armed = True                           # capture the next training forwards (due step)

    def setup(self, model, optimizer, every: int = 1) -> None:
        self.every = int(every)
        if model is None:
            raise ValueError("logit_divergence needs the model: Guard(optimizer, policy, model=model)")
        if self.pattern is None:
            self.module_name = find_output_head(model, who="logit_divergence")
            self._handle = model.get_submodule(self.module_name).register_forward_hook(self._hook)
            return
        names = [n for n, _ in model.named_modules() if fnmatch.fnmatchcase(n, self.pattern)]
        if len(names) != 1:
            raise ValueError(f"logit_divergence: params.module {self.pattern!r} must match exactly one module, "
                             f"matched {len(names)}: {names[:5]}")
        self.module_name = names[0]
        self._handle = model.get_submodule(names[0]).register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        if not self._armed or not module.training or not torch.is_grad_enabled():
            return
        with torch.no_grad():
            self._capture(output)

    def _capture(self, output) -> None:
        z = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(z, torch.Tensor) or z.dim() < 2:
            self._error = (f"logit_divergence: module {self.module_name!r} returned {type(z).__name__}"
                           f"{tuple(z.shape) if isinstance(z, torch.Tensor) else ''}, expected logits (B, ..., V)")
            return
        z = z.detach()[: self.max_batch]
        lz = torch.logsumexp(z.float(), dim=-1).reshape(-1)        # (positions,)
        dtype = stat_dtype(lz.device)
        s, m = lz.to(dtype).sum(), lz.max().to(dtype)
        if self._sum is None or self._n == 0:
            self._sum, self._max = s, m
        else:
            self._sum, self._max = _on(self._sum, s) + s, torch.maximum(_on(self._max, m), m)
        self._n += lz.numel()

    def compute(self, telemetry) -> dict:
        if self._error is not None:
            err, self._error = self._error, None
            raise ValueError(err)
        if self._n == 0:
            return {}
        if not isinstance(self._sum, torch.Tensor):   # restored mid-step, nothing captured since
            like = torch.empty((), dtype=stat_dtype(telemetry.device), device=telemetry.device)
            self._sum, self._max = _on(self._sum, like), _on(self._max, like)
        logz = self._sum / self._n
        out = {"logz": logz, "max_logz": self._max}
        if telemetry.step < self.start or self.evals < self.warmup:
            out["drift"] = torch.zeros_like(logz)
            if telemetry.step >= self.start:            # an evaluation of the baseline's window
                self._base_sum = logz if self._base_sum is None else _on(self._base_sum, logz) + logz
                self.evals += 1
        else:
            out["drift"] = logz - _on(self._base_sum, logz) / self.warmup
            self.evals += 1
        self._n = 0
        self._sum = self._max = None
        return out

    def after_step(self, telemetry, stepped: bool) -> None:
        # Arm the hook for the next step's forwards only if that step is due.
        self._armed = (telemetry.step + 1) % self.every == 0

    def state_dict(self) -> dict:
        return {"evals": self.evals, "base_sum": None if self._base_sum is None else float(self._base_sum),
                "n": self._n, "sum": None if self._sum is None else float(self._sum),
                "max": None if self._max is None else float(self._max)}

    def load_state_dict(self, state) -> None:
        # Kept as Python floats until the next capture or evaluation writes them on its device
        # (_on: a fill, no host-device copy).
        self.evals = int(state.get("evals", 0))
        t = lambda v: None if v is None else float(v)  # noqa: E731
        self._base_sum = t(state.get("base_sum"))
        self._n = int(state.get("n", 0))
        self._sum, self._max = t(state.get("sum")), t(state.get("max"))
        self._armed = True   # the guard's step may have moved: capture until the next after_step

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
