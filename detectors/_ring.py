"""Fixed-size ring buffers and masked order statistics kept on the device (shared by detectors).

A :class:`Ring` holds the last ``size`` observations of a scalar series as two device tensors,
``values`` (float64 on CPU/CUDA, float32 elsewhere) and ``valid`` (bool), plus the step of each
observation. Pushing never reads a value back to the host: a non-finite observation is not
stored and does not advance the write position (it never poisons the statistics and never
evicts a finite one); slots not yet written are invalid.

:func:`masked_median` computes the median over the valid entries only, with fixed-size tensor
ops (sort with invalid entries pushed to +inf, then a gather at a count-dependent index), so
nothing synchronises with the host.

:func:`to_device` moves a tensor to a device without a blocking copy: a CPU tensor bound for CUDA
(a resumed state) goes through pinned memory with ``non_blocking=True``. A plain ``.to("cuda")``
of pageable memory is ``cudaMemcpy`` followed by a stream synchronisation (``memcpy_and_sync`` in
``aten/src/ATen/native/cuda/Copy.cu``; ``torch.cuda.set_sync_debug_mode`` reports it), and even a
``non_blocking`` copy from pageable memory makes the driver synchronise the stream before staging
it (CUDA runtime API, "API synchronization behavior"), silently.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["Ring", "masked_median", "stat_dtype", "to_device"]


def stat_dtype(device: torch.device) -> torch.dtype:
    """float64 where the backend has it (CPU, CUDA), float32 otherwise (MPS)."""
    return torch.float64 if torch.device(device).type in ("cpu", "cuda") else torch.float32


def to_device(t: torch.Tensor, device: torch.device | str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``t`` on ``device`` (and ``dtype``), without a blocking host-device copy where one can be
    avoided: no copy when it is there already; a CPU tensor bound for CUDA is staged in pinned
    memory and copied ``non_blocking`` (the caching host allocator keeps the pinned block until
    the copy has run: ``CachingHostAllocator_recordEvent`` in ``Copy.cu``). Device to device is
    a plain ``.to`` (no host involved). Moving to the CPU cannot avoid waiting for the device; no
    detector does it on a training step."""
    device = torch.device(device)
    if t.device.type == "cpu" and device.type == "cuda":
        if dtype is not None:
            t = t.to(dtype)                            # on the CPU: converts host memory only
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device=device, dtype=dtype)


def masked_median(x: torch.Tensor, valid: torch.Tensor, count: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Median of ``x[valid]`` along the last dim, as numpy's (mean of the two middle values for
    an even count). ``x`` and ``valid`` have the same shape ``(..., n)``; the result has shape
    ``(...)`` and is NaN where no entry is valid. No host synchronisation.

    :param count: ``valid.sum(dim=-1, keepdim=True)`` when the caller has it (saves the sum).
    """
    s, _ = torch.sort(torch.where(valid, x, float("inf")), dim=-1)
    m = valid.sum(dim=-1, keepdim=True) if count is None else count   # (..., 1) valid count
    lo = torch.clamp((m - 1) // 2, min=0)
    hi = torch.clamp(m // 2, min=0, max=x.shape[-1] - 1)
    med = 0.5 * (s.gather(-1, lo) + s.gather(-1, hi))
    return torch.where(m > 0, med, float("nan")).squeeze(-1)


class Ring:
    """The last ``size`` observations of a scalar series, on one device.

    :param size: capacity (number of observations kept), >= 1.

    Attributes (tensors created on the first :meth:`push`, on that observation's device):
    ``values`` ``(size,)``, ``valid`` ``(size,)`` bool, ``steps`` ``(size,)`` (the step index
    given with each observation), ``pos`` (0-dim long: slot of the next push) and ``count``
    (0-dim long: valid observations held). Slots never written are invalid.
    """

    def __init__(self, size: int) -> None:
        if int(size) < 1:
            raise ValueError(f"ring size must be >= 1, got {size}")
        self.size = int(size)
        self.values: Optional[torch.Tensor] = None
        self.valid: Optional[torch.Tensor] = None
        self.steps: Optional[torch.Tensor] = None
        self.pos: Optional[torch.Tensor] = None
        self._slots: Optional[torch.Tensor] = None   # arange(size) on the buffers' device

    def _init(self, device: torch.device) -> None:
        dtype = stat_dtype(device)
        self.values = torch.zeros(self.size, dtype=dtype, device=device)
        self.valid = torch.zeros(self.size, dtype=torch.bool, device=device)
        self.steps = torch.zeros(self.size, dtype=dtype, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)

    @property
    def count(self) -> torch.Tensor:
        """Valid observations held, a 0-dim long tensor (0 before the first push)."""
        if self.valid is None:
            return torch.zeros((), dtype=torch.long)
        return self.valid.sum()

    def ensure(self, device: torch.device) -> None:
        """Create the buffers on ``device``, or move them there (a state restored on the CPU
        meeting a CUDA observation: staged through pinned memory, no blocking copy; the values
        take ``device``'s statistics dtype)."""
        if self.values is None:
            self._init(device)
        elif self.values.device != torch.device(device):
            dtype = stat_dtype(device)
            self.values, self.valid = to_device(self.values, device, dtype), to_device(self.valid, device)
            self.steps, self.pos = to_device(self.steps, device, dtype), to_device(self.pos, device)

    def push(self, x: torch.Tensor, step: int) -> None:
        """Store the 0-dim tensor ``x`` observed at ``step`` if it is finite (else nothing
        changes). Overwrites the oldest slot once full. No host synchronisation."""
        self.ensure(x.device)
        x = x.detach().reshape(()).to(self.values.dtype)
        finite = torch.isfinite(x)
        if self._slots is None or self._slots.device != self.pos.device:
            self._slots = torch.arange(self.size, device=self.pos.device)
        slot = (self._slots == self.pos) & finite                    # (size,), no sync
        self.values = torch.where(slot, x, self.values)
        self.valid = self.valid | slot
        self.steps = torch.where(slot, float(step), self.steps)
        self.pos = (self.pos + finite.long()) % self.size

    def state_dict(self) -> dict:
        if self.values is None:
            return {}
        return {"values": self.values.tolist(), "valid": self.valid.tolist(),
                "steps": self.steps.tolist(), "pos": int(self.pos)}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        if not state:
            self.values = self.valid = self.steps = self.pos = None
            return
        if len(state["values"]) != self.size:
            raise ValueError(f"ring state holds {len(state['values'])} slots, this ring has {self.size}")
        # Built in host memory, then moved by ensure(): torch.tensor(..., device="cuda") would be a
        # blocking copy. Without a device the ring stays on the CPU until its first push.
        dtype = stat_dtype(torch.device(device))
        self.values = torch.tensor(state["values"], dtype=dtype)
        self.valid = torch.tensor(state["valid"], dtype=torch.bool)
        self.steps = torch.tensor(state["steps"], dtype=dtype)
        self.pos = torch.tensor(int(state["pos"]), dtype=torch.long)
        self.ensure(device)
