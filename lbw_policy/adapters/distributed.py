"""Stage 3 of a governed step: one collective makes the step's signals global.

In a ``torch.distributed`` run (DDP, FSDP2, ...) every rank's :class:`~lbw_policy.Guard` must
take the same decision at the same step, or the replicas silently diverge. This module makes
that so with **one collective per step**:

1. Every rank lays its step's sensing out in the same fixed order (the *layout*, a function of
   the step and the policy alone): the loss; for every detector due this step, every signal it
   declares (:meth:`~lbw_policy.base.Detector.signals_for`), with a presence flag (a detector may
   leave a signal out, or fail); one error flag per due detector's ``compute`` and per
   detector's ``after_step`` of the previous step. A float64 tensor of ``k`` entries on the
   parameters' device.
2. ``torch.distributed.all_gather_single`` (``all_gather_into_tensor`` on older torch) gathers
   the ``[world_size, k]`` matrix on every rank: the only collective of the step, issued on the
   device before the (possibly non-blocking) copy to the host.
3. Every rank reduces the matrix locally, column by column, with each signal's declared
   reduction (:data:`lbw_policy.base.REDUCTIONS`: ``mean``, ``max``, ``min``, ``sum``, ``any``
   over the ranks where the signal is present; ``same``: the lowest present rank's value). The
   loss reduces by ``mean`` (what DDP's averaged gradients descend). Non-finite values
   propagate (a NaN on one rank is a NaN for everyone). An error flag set on any rank is a fault
   on every rank, with the lowest faulting rank and the count of faulting ranks.

(On a ``torch.amp.GradScaler`` step the guard adds one all-reduce of 2 values before sensing,
:meth:`DistContext.all_reduce_max`, so every rank takes the same path: the scaler's skip, or a
governed step.)

Identical inputs give identical decisions: the Governor is deterministic, so every rank's
Governor takes the same decisions from the reduced vector, and only rank 0 writes the decision
log (one hash chain for the run) and ``telemetry.jsonl``.

Cost: one all-gather of ``world_size * k`` float64 values per governed step (``k`` is about
twice the number of signals of the due detectors; 40-60 for the default policy). Quantities that
are global by nature are computed globally before this stage: the gradient norm over sharded
(DTensor) gradients is the whole model's (:attr:`lbw_policy.telemetry.Telemetry.grad_norm`;
under FSDP that is the one extra scalar all-reduce ``clip_grad_norm_`` also does).

Construction (:meth:`DistContext.agree`) adds two small all-gathers when the guard is built, not
per step (after the plugins are built, and after rank 0 opened the run directory): every rank
learns whether every other rank built its guard, under the same policy revision, so a rank that
failed to build fails the others with a clear error instead of leaving them waiting in the
first step's collective.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

__all__ = ["DistContext", "SignalReducer", "resolve_distributed", "NullLog", "NullFile",
           "write_distributed_checkpoint"]

_CODES = {"mean": 0, "max": 1, "min": 2, "sum": 3, "any": 4, "same": 5}


def _all_gather(output: torch.Tensor, local: torch.Tensor, group: Any) -> None:
    """The one collective: ``output`` (``[world_size * k]``) <- every rank's ``local`` (``[k]``)."""
    import torch.distributed as dist

    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, local, group=group)


@dataclass
class DistContext:
    """The process group a guard reduces over.

    :param group: a ``torch.distributed`` process group (``None``: the default group).
    :param rank: this process's rank in ``group``.
    :param world_size: the number of ranks in ``group``.
    """

    group: Any
    rank: int
    world_size: int

    def agree(self, ok: bool, revision: str, device: torch.device) -> None:
        """One all-gather at construction (two per guard): has every rank built its guard so
        far, under the same policy revision?

        :raises RuntimeError: another rank failed to build its guard, or runs another policy
            revision (when ``ok``; a rank that failed raises its own error instead).
        """
        tag = int(revision[:12], 16) if revision else 0  # 48 bits: exact in float64
        local = torch.tensor([1.0 if ok else 0.0, float(tag)], dtype=torch.float64, device=device)
        out = torch.empty(self.world_size * 2, dtype=torch.float64, device=device)
        _all_gather(out, local, self.group)
        rows = out.view(self.world_size, 2).tolist()  # once per run, not per step
        if not ok:
            return
        failed = [r for r, (flag, _) in enumerate(rows) if flag != 1.0]
        if failed:
            raise RuntimeError(f"Guard() failed on rank(s) {failed} (see their errors); every "
                               f"rank must build its guard for the run to be governed")
        other = [r for r, (_, t) in enumerate(rows) if t != float(tag)]
        if other:
            raise RuntimeError(f"rank(s) {other} run another policy revision than rank "
                               f"{self.rank} ({revision[:12]}): every rank must load the same "
                               f"policy file")


    def all_reduce_max(self, values: torch.Tensor) -> None:
        """``values`` (any shape) <- its element-wise maximum over the ranks, in place. Used
        only on GradScaler steps (the guard's choice between the scaler's skip and a governed
        step must be the same on every rank)."""
        import torch.distributed as dist

        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group)


def resolve_distributed(distributed: Any) -> Optional[DistContext]:
    """The :class:`DistContext` of ``Guard(distributed=...)``.

    :param distributed: ``"auto"`` (default): the default process group when
        ``torch.distributed`` is initialized with more than one rank, else none; ``True``: the
        default group (:raises RuntimeError: not initialized); ``False``: none (every rank
        governs alone -- its decisions may differ from the other ranks'; for tests and
        single-rank jobs); a ``ProcessGroup``: that group.
    :returns: ``None`` when the guard governs alone.
    :raises ValueError: any other value.
    """
    import torch.distributed as dist

    if distributed is False:
        return None
    if distributed is True or distributed == "auto":
        if not (dist.is_available() and dist.is_initialized()):
            if distributed is True:
                raise RuntimeError("Guard(distributed=True) needs torch.distributed to be "
                                   "initialized (init_process_group, or torchrun)")
            return None
        group = None
    elif isinstance(distributed, str):
        raise ValueError(f"distributed must be 'auto', True, False or a process group, found "
                         f"{distributed!r}")
    else:
        group = distributed
    world = dist.get_world_size(group)
    if world == 1 and distributed == "auto":
        return None
    return DistContext(group, dist.get_rank(group), world)


class SignalReducer:
    """Lays out, gathers and reduces one step's sensing (the module docstring).

    :param context: the process group.
    :param detectors: ``{detector_id: Detector}`` in policy order.
    :param specs: ``{detector_id: DetectorSpec}`` (``type``, ``params``, ``every``).
        """

    def __init__(self, context: DistContext, detectors: Mapping[str, Any],
                 specs: Mapping[str, Any]) -> None:
        self.context = context
        self.signals = {d: [s for s in type(det).signals_for(specs[d].params)]
                        for d, det in detectors.items()}
        self.reductions = {f"{d}.{s}": type(det).reduction_for(s)
                           for d, det in detectors.items() for s in self.signals[d]}
        self.types = {d: specs[d].type for d in detectors}
        self.every = {d: int(specs[d].every) for d in detectors}
        self._codes: dict = {}

    # ------------------------------------------------------------------ encode
    def layout(self, step: int) -> tuple:
        """``(names, fault_slots)`` of ``step``: the due detectors' signal names in policy order,
        and the ``(detector_id, phase)`` of every error flag. The same on every rank."""
        due = [d for d in self.signals if step % self.every[d] == 0]
        names = [f"{d}.{s}" for d in due for s in self.signals[d]]
        slots = [(d, "compute") for d in due] + [(d, "after_step") for d in self.signals]
        return names, slots

    def gather(self, step: int, loss: torch.Tensor, outputs: Mapping[str, Mapping[str, Any]],
               faults: Sequence[Any], device: torch.device, dtype: torch.dtype) -> tuple:
        """Encode this rank's sensing, run the collective, reduce.

        :param loss: the step's loss, 0-dim tensor on ``device``.
        :param outputs: ``{detector_id: {signal: 0-dim tensor or float}}`` of the detectors that
            computed (a signal a detector does not declare is dropped, with a warning once).
        :param faults: this rank's :class:`~lbw_policy.governor.Fault` values: ``compute``
            faults of this step, ``after_step`` faults of the previous step.
        :returns: ``(names, values, present, counts, first_rank, meta)``: the reduced loss and
            signals ``values`` (``[1 + n]``, NaN where absent), presence ``[n]`` (0/1),
            faulting-rank ``counts`` and lowest faulting rank per slot, all on ``device``;
            ``meta``: plain data for :meth:`decode`.
        """
        names, slots = self.layout(step)
        index = {n: i for i, n in enumerate(names)}
        n, m = len(names), len(slots)
        vals: list = [loss.reshape(()).to(device=device, dtype=dtype)]
        value_pos: list = [0]
        host_vals: list = []
        host_pos: list = []
        for det_id, out in outputs.items():
            for sig, val in out.items():
                i = index.get(f"{det_id}.{sig}")
                if i is None:
                    warnings.warn(f"detector {det_id!r} emitted {sig!r}, which its class does "
                                  f"not declare in signals: it is not reduced across ranks and "
                                  f"is dropped", stacklevel=4)
                    continue
                if isinstance(val, torch.Tensor):
                    vals.append(val.to(device=device, dtype=dtype))
                    value_pos.append(1 + i)
                else:
                    host_vals.append(float(val))
                    host_pos.append(1 + i)
        flags = [0.0] * m
        failed = {(f.name, f.phase) for f in faults if f.plugin == "detector"}
        for j, slot in enumerate(slots):
            if slot in failed:
                flags[j] = 1.0
        k = 1 + 2 * n + m
        # host-side part (presence and flags are known on the host): one small copy
        host_row = [math.nan] * k
        for i in range(1, 1 + n):
            host_row[i] = 0.0
        for pos in value_pos[1:] + host_pos:
            host_row[n + pos] = 1.0  # presence of value 1 + i sits at 1 + n + i
        for pos, v in zip(host_pos, host_vals):
            host_row[pos] = v
        for j, f in enumerate(flags):
            host_row[1 + 2 * n + j] = f
        local = torch.tensor(host_row, dtype=dtype).to(device, non_blocking=True)
        local = local.index_put((torch.tensor(value_pos, device=device),), torch.stack(vals))
        world = self.context.world_size
        out = torch.empty(world * k, dtype=dtype, device=device)
        _all_gather(out, local, self.context.group)  # the step's one collective
        matrix = out.view(world, k)
        ranks = torch.arange(world, dtype=dtype, device=device)
        v = matrix[:, :1 + n]
        p = torch.cat([torch.ones_like(matrix[:, :1]), matrix[:, 1 + n:1 + 2 * n]], 1) > 0
        codes = self._codes.get((tuple(names), device))
        if codes is None:  # once per layout (the due detectors vary with their cadence)
            codes = torch.tensor([0] + [_CODES[self.reductions[x]] for x in names], device=device)
            self._codes[(tuple(names), device)] = codes
        values = _reduce(v, p, codes)
        present = p[:, 1:].any(0).to(dtype)
        f = matrix[:, 1 + 2 * n:] > 0
        counts = f.to(dtype).sum(0)
        first = torch.where(f, ranks[:, None], torch.full_like(matrix[:, 1 + 2 * n:], math.inf)).min(0).values \
            if m else counts
        local_errors = {f"{f_.name}/{f_.phase}": f_.to_dict() for f_ in faults}
        meta = {"names": names, "slots": [list(s) for s in slots], "local_errors": local_errors,
                "rank": self.context.rank, "world_size": world}
        return names, values, present, counts, first, meta

    # ------------------------------------------------------------------ decode
    def decode(self, values: Sequence[float], meta: Mapping[str, Any]) -> tuple:
        """The host side of a landed vector ``[loss, *signals, *presence, *counts, *first]``.

        :returns: ``(loss, emitted, faults)``: ``emitted`` holds the signals present on some
            rank; ``faults`` one :class:`~lbw_policy.governor.Fault` per flagged slot (this
            rank's own error text when it raised; else the lowest faulting rank's, by name).
        """
        from lbw_policy.governor import Fault

        names, slots = meta["names"], meta["slots"]
        n, m = len(names), len(slots)
        emitted = {name: values[1 + i] for i, name in enumerate(names) if values[1 + n + i] > 0}
        faults = []
        for j, (det_id, phase) in enumerate(slots):
            count = int(values[1 + 2 * n + j])
            if not count:
                continue
            rank = int(values[1 + 2 * n + m + j])
            own = meta["local_errors"].get(f"{det_id}/{phase}")
            if own is not None and rank == meta["rank"]:
                error = own["error"]
            else:
                error = f"raised on rank {rank} (its error text is in that rank's warnings)"
            if count > 1:
                error += f" [{count} of {meta['world_size']} ranks raised]"
            faults.append(Fault("detector", det_id, phase, error, self.types.get(det_id), rank))
        return values[0], emitted, faults


def _reduce(v: torch.Tensor, p: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Column-wise reduction of ``v`` (``[world, c]``) over the ranks where ``p`` is true, by
    ``codes`` (``_CODES``); NaN where no rank is present. Non-finite values propagate."""
    zero = torch.zeros_like(v)
    n = p.sum(0).to(v.dtype)
    s = torch.where(p, v, zero).sum(0)
    mean = s / n
    mx = torch.where(p, v, torch.full_like(v, -math.inf)).amax(0)  # amax/amin propagate NaN
    mn = torch.where(p, v, torch.full_like(v, math.inf)).amin(0)
    anyv = (torch.where(p, v, zero) != 0).any(0).to(v.dtype)
    first = torch.gather(v, 0, p.to(torch.int8).argmax(0, keepdim=True)).squeeze(0)
    table = torch.stack([mean, mx, mn, s, anyv, first])  # [6, c]
    out = torch.gather(table, 0, codes[None, :]).squeeze(0)
    return torch.where(n > 0, out, torch.full_like(out, math.nan))


class NullLog:
    """The decision log of a rank other than 0: records pass through unwritten (rank 0 writes
    the run's one hash chain; every rank's decisions are identical by construction)."""

    recovered_torn_bytes = 0
    last_hash = None

    def __init__(self) -> None:
        self.seq = 0

    def append(self, record: dict) -> dict:
        self.seq += 1
        return dict(record, seq=self.seq - 1)

    def close(self) -> None:
        pass


class NullFile:
    """``telemetry.jsonl`` of a rank other than 0: nothing is written."""

    def write(self, text: str) -> int:
        return len(text)

    def close(self) -> None:
        pass


def write_distributed_checkpoint(path: str, *, step: int, actuator: str, model: Any,
                                 optimizer: Any, guard_state: dict, rank: int) -> None:
    """The halt / rollback checkpoint of a distributed run: a ``torch.distributed.checkpoint``
    directory at ``path`` holding ``{"model", "optimizer"}`` (sharded state saved by every rank,
    load it with ``torch.distributed.checkpoint.load``), and ``guard-rank<r>.pt`` per rank
    (``{"format", "step", "actuator", "guard"}``: that rank's guard state). Every rank calls it
    at the same step (the decisions are identical); it issues the checkpoint's own collectives.

    :raises ValueError: no model was given to the guard (a sharded optimizer state cannot be
        saved without it).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from lbw_policy.actuators._checkpoint import FORMAT

    if model is None:
        raise ValueError("a distributed halt checkpoint needs the model: pass Guard(model=...)")
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=path)
    tmp = os.path.join(path, f"guard-rank{rank}.pt.tmp")
    torch.save({"format": FORMAT, "step": int(step), "actuator": actuator, "guard": guard_state},
               tmp)
    os.replace(tmp, os.path.join(path, f"guard-rank{rank}.pt"))
