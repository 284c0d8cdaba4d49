"""Stage 4 of a governed step: the step's signal vector reaches the host.

Two strategies (policy ``transfer:``, or ``Guard(..., transfer=...)``):

``immediate``
    The vector is read at once (one ``.tolist()`` per step). On a CPU that waits for nothing; on
    CUDA it is a blocking host-device sync every step.

``deferred``
    The vector is copied ``non_blocking`` into a pinned, double-buffered host tensor and a CUDA
    event is recorded; the host reads it at the *next* step (step ``t``'s signals are evaluated
    at step ``t + 1``; host-side actions apply from ``t + 1``), by which time the copy has long
    finished: no blocking sync. Values that already live on the host (Python floats such as
    ``lr_jump``'s) are delayed with the vector, so the Governor always sees one step's signals
    together. On the CPU there is no event: the vector is kept and read one step later, with the
    same semantics (CI tests them there).

``auto`` (default) is ``deferred`` on CUDA and ``immediate`` elsewhere.

A :class:`Packet` is one step's worth of sensing: the vector (on the device until it lands),
the names of its entries, the host values and whatever the guard attaches to it (faults, the
step's learning rates); :meth:`Transport.send` returns the packet that is due for evaluation
now (this step's with ``immediate``, the previous step's with ``deferred``, ``None`` at the
first deferred step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

__all__ = ["Packet", "Transport", "ImmediateTransport", "DeferredTransport", "make_transport",
           "TRANSFER_MODES"]

#: Values of the policy's ``transfer:`` and of ``Guard(transfer=...)``.
TRANSFER_MODES = ("auto", "immediate", "deferred")


@dataclass
class Packet:
    """One step's sensing on its way to the host.

    :param step: the step whose signals these are.
    :param names: names of the vector's entries after the first ``n_fixed`` (the loss etc.).
    :param vector: 1-D float64 tensor (float32 on MPS) on the loss's device, or ``None`` once
        landed.
    :param host: ``{name: float}`` values that were on the host already.
    :param meta: what the guard attaches (faults, learning rates, skipped, ...), plain data.
    :param values: the vector's entries as floats, once landed.
    """

    step: int
    names: list
    vector: Optional[torch.Tensor]
    host: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    values: Optional[list] = None
    _event: Any = None
    _buffer: Optional[torch.Tensor] = None


class Transport:
    """Base class: see the module docstring. ``delay`` is 0 or 1 step."""

    mode = ""
    delay = 0

    def send(self, packet: Packet) -> Optional[Packet]:
        raise NotImplementedError

    def drain(self) -> Optional[Packet]:
        """The packet still in flight (landed now), or ``None``."""
        return None

    def state_dict(self, pending: Any = "in flight") -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ImmediateTransport(Transport):
    """Read the vector at once (one host transfer per step)."""

    mode = "immediate"

    def send(self, packet: Packet) -> Packet:
        packet.values = packet.vector.tolist()  # host-device sync point on an accelerator
        packet.vector = None
        return packet


class DeferredTransport(Transport):
    """Land each step's vector one step later, without a blocking sync (module docstring).

    :param device: the device the vectors live on.
    :param capacity: initial length of the two pinned host buffers (grown when a longer vector
        arrives; growing allocates pinned memory once).
    """

    mode = "deferred"
    delay = 1

    def __init__(self, device: torch.device, capacity: int = 64) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._buffers: list = []
        self._capacity = 0
        self._next = 0
        self._pending: Optional[Packet] = None
        if self.cuda:
            self._grow(capacity)

    def _grow(self, n: int) -> None:
        self._capacity = max(n, 2 * self._capacity)
        self._buffers = [torch.empty(self._capacity, dtype=torch.float64, pin_memory=True)
                         for _ in range(2)]

    def send(self, packet: Packet) -> Optional[Packet]:
        vec = packet.vector
        if self.cuda:
            n = vec.numel()
            if n > self._capacity:
                self._land(self._pending)  # it may use a buffer about to be replaced
                self._grow(n)
            buf = self._buffers[self._next][:n]
            self._next ^= 1
            buf.copy_(vec.to(torch.float64), non_blocking=True)  # no sync: into pinned memory
            packet._event = torch.cuda.Event()
            packet._event.record()
            packet._buffer = buf
        else:
            packet._buffer = vec.detach().clone()  # read one step later, as on CUDA
        packet.vector = None
        due, self._pending = self._pending, packet
        return self._land(due)

    def _land(self, packet: Optional[Packet]) -> Optional[Packet]:
        if packet is None or packet.values is not None:
            return packet
        if packet._event is not None and not packet._event.query():
            packet._event.synchronize()  # only if a whole step did not finish the copy
        packet.values = packet._buffer.tolist()  # host memory: no device involved
        packet._event = packet._buffer = None
        return packet

    def drain(self) -> Optional[Packet]:
        due, self._pending = self._pending, None
        return self._land(due)

    def pending(self) -> Optional[Packet]:
        """The packet in flight, landed (reads wait for its copy: call at checkpoint time)."""
        return self._land(self._pending)

    def state_dict(self, pending: Any = "in flight") -> dict:
        """The packet in flight (landed; or ``pending`` when given: a halt checkpoint taken in
        the middle of a step saves the packet that step evaluated, so that a resumed run
        evaluates it again at the re-run step), as plain data."""
        p = self.pending() if pending == "in flight" else pending
        if p is None:
            return {"pending": None}
        meta = {k: v for k, v in p.meta.items() if k != "written"}
        return {"pending": {"step": p.step, "names": list(p.names), "values": list(p.values),
                            "host": dict(p.host), "meta": meta}}

    def load_state_dict(self, state: dict) -> None:
        p = state.get("pending")
        self._pending = None if p is None else Packet(
            int(p["step"]), list(p["names"]), None, dict(p["host"]), dict(p["meta"]),
            values=[float(v) for v in p["values"]])


def make_transport(mode: str, device: torch.device) -> Transport:
    """The transport for ``mode`` (``auto``: deferred on CUDA, immediate elsewhere).

    :raises ValueError: an unknown mode.
    """
    if mode not in TRANSFER_MODES:
        raise ValueError(f"transfer must be one of {', '.join(TRANSFER_MODES)}, found {mode!r}")
    device = torch.device(device)
    if mode == "auto":
        mode = "deferred" if device.type == "cuda" else "immediate"
    return DeferredTransport(device) if mode == "deferred" else ImmediateTransport()
