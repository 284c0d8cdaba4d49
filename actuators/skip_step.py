"""``skip_step``: skip this step's ``optimizer.step()``, leaving the optimizer exactly as it was.

A skipped step leaves the weights and the whole optimizer state untouched: for AdamW / Adam the
``exp_avg`` and ``exp_avg_sq`` moments, the ``step`` count (so bias correction does not
advance) and the weight decay (applied inside ``step()``) all stay as they were; for SGD the
``momentum_buffer``. The gradients are left for the caller's ``zero_grad``.

Command: ``{actuator: skip_step}`` (bare).

Bounds:

- ``max_consecutive`` (int >= 1, default 3): at most this many consecutive skipped steps; a
  further request is refused (logged ``applied: false, clamped: true``) and the step is taken,
  so a persistent condition cannot freeze training. What happens then is the policy's
  **escalation**, written as a rule on this actuator's signals (below), e.g. ``rollback`` or
  ``halt`` when ``skip_step.exhausted`` and the bad condition both hold.
- ``gate`` (``host`` | ``device``, default ``host``): how a skip is carried out.

  ``host``: the rule decided on host values (the guard's one transfer per step), so the guard
  does not call ``optimizer.step()`` at all. Exact and free.

  ``device``: also accepts a device-side gate, :meth:`SkipStep.arm` ``(keep)`` with ``keep`` a
  0-dim bool tensor on the parameters' device, computed without a host sync (e.g. from
  ``torch.isfinite`` of the loss and grad norm, DESIGN.md "same-step safety gate"). The step then
  runs with a *select*: before ``optimizer.step()`` every parameter that has a gradient and every
  tensor of its optimizer state is copied into preallocated buffers on the same device; after it,
  ``torch.where(keep, new, saved)`` puts the saved values back where ``keep`` is false. No host
  sync, correct for any optimizer whose state is all tensors (Adam, AdamW, SGD). Cost per gated
  step: one extra copy of (parameters + optimizer state) in memory (AdamW: 3x the parameter
  bytes), two copies and one select of it in bandwidth, and the optimizer's own step even when
  the result is thrown away. (OLMo-core's ``SkipStepAdamW`` avoids the copy by folding the gate
  into its own AdamW arithmetic; lbw-policy governs stock ``torch.optim`` optimizers, so it
  selects instead.) ``max_consecutive`` is enforced on the device too: a gate that would make
  more than ``max_consecutive`` skipped steps in a row is overridden (the step is kept).

  Limits of ``device``: the very first step of a parameter, before the optimizer has created its
  state, cannot be undone by a select (the state would exist afterwards), so it reads ``keep`` on
  the host (one sync, once). On CUDA, Adam / AdamW keep ``state["step"]`` on the CPU unless
  built with ``capturable=True`` or ``fused=True``; ``gate: device`` then raises
  :class:`~lbw_policy.errors.ActuatorError` at attach. The guard arms the gate every step from
  the policy's ``gate: device`` rules under deferred transfer (user code may arm it too, between
  ``loss.backward()`` and ``guard.step(loss)``); torch's fused Adam / AdamW take it through
  ``found_inf`` instead of the select (:meth:`device_gate_mode`). The host learns a gated step
  one step later (:meth:`device_applied`) and counts it in ``consecutive``.

Signals (host values, the state before this step's commands):

- ``skip_step.consecutive``: rule-requested steps skipped in a row, ending at the last step.
- ``skip_step.exhausted``: 1 when ``consecutive >= max_consecutive``: a skip requested now
  would be refused. A rule ``{all: [<bad condition>, {signal: skip_step.exhausted, op: ">",
  value: 0}]}`` with a higher priority escalates in the same step.
- ``skip_step.refused``: skip requests refused since the last step with no skip request.

Source: the skip-step of OLMo-core (``src/olmo_core/optim/skip_step_optimizer.py``) and
LBW-Guard (arXiv 2605.19008).
"""

from __future__ import annotations

from typing import Any, Optional

from lbw_policy.base import Action, Actuator
from lbw_policy.errors import ActuatorError

__all__ = ["SkipStep"]


class SkipStep(Actuator):
    """Skip the optimizer step (see the module docstring).

    :param max_consecutive: most consecutive skipped steps (default 3, >= 1).
    :param gate: ``"host"`` (default) or ``"device"``.
    """

    name = "skip_step"
    bounds_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "max_consecutive": {"type": "integer", "minimum": 1,
                                "description": "most consecutive skipped steps; default 3"},
            "gate": {"enum": ["host", "device"],
                     "description": "host: the guard does not call optimizer.step(); device: "
                                    "also accept an on-device gate (arm) carried out with a "
                                    "select, no host sync; default host"},
        },
    }
    commands = {"apply": {"type": "null"}}
    signals = ("consecutive", "exhausted", "refused")
    same_step = True  # a bad batch's update: only its own step can be skipped

    def __init__(self, max_consecutive: int = 3, gate: str = "host") -> None:
        super().__init__(max_consecutive=max_consecutive, gate=gate)
        if gate not in ("host", "device"):
            raise ValueError(f"gate must be 'host' or 'device', found {gate!r}")
        self.max_consecutive = int(max_consecutive)
        self.gate = gate
        self.consecutive = 0
        self.refused = 0
        self.pending = False
        self._requested = False
        # device gate
        self._keep = None            # armed gate for the coming step (0-dim bool tensor)
        self._pairs: Optional[list] = None   # [(live tensor, saved buffer)] of this step
        self._buffers: list = []     # reused across steps
        self._dev_consecutive = None  # 0-dim int64 tensor on the gate's device
        self._saved_dev_consecutive = 0
        self.host_syncs = 0          # device-gated steps that had to read keep on the host
        self._expect = False         # this step's gate outcome will be learnt next step
        self._unresolved = False     # the last step was taken on the host; gated or not: unknown
        self._keep_was_armed = False

    # ---------------------------------------------------------------- binding and signals
    def attach(self, optimizer) -> None:
        if self.gate == "device":
            import torch

            for i, group in enumerate(optimizer.param_groups):
                on_cuda = any(p.is_cuda for p in group["params"])
                if (on_cuda and isinstance(optimizer, torch.optim.Adam)
                        and not (group.get("capturable") or group.get("fused"))):
                    raise ActuatorError(
                        f"skip_step: gate: device needs the step counts on the device, but param "
                        f"group {i} of {type(optimizer).__name__} keeps state['step'] on the CPU; "
                        f"build it with capturable=True or fused=True, or use gate: host")
        self.optimizer = optimizer

    def expect_device_outcome(self) -> None:
        """This step may be skipped by the device gate (the guard calls :meth:`arm`, which
        implies it; a shadow evaluating the gate on plain values calls this): if the host takes
        the step, :attr:`consecutive` is settled when the outcome is learnt, next step
        (:meth:`device_applied`), not reset at once."""
        self._expect = True

    def device_applied(self, action: Action) -> None:
        """The device gate skipped the last step (recorded one step late): it counts toward
        ``consecutive`` like a host skip, so ``max_consecutive`` bounds both kinds together."""
        if action.applied and self._unresolved:
            self.consecutive += 1
            self._unresolved = False

    def observe(self, telemetry) -> None:
        if self._unresolved:  # no gate outcome for the last step: it was taken
            self.consecutive = 0
            self._unresolved = False

    def signal_values(self) -> dict:
        return {"consecutive": self.consecutive,
                "exhausted": int(self.consecutive >= self.max_consecutive),
                "refused": self.refused}

    # ---------------------------------------------------------------- commands
    def plan(self, verb: str, value: Any, step: int) -> Action:
        allowed = self.consecutive < self.max_consecutive
        return Action(self.name, verb, requested=True, applied=allowed, clamped=not allowed,
                      before=self.consecutive, after=self.consecutive + 1 if allowed else 0,
                      note=None if allowed else
                      f"max_consecutive={self.max_consecutive} reached; step taken")

    def commit(self, action: Action) -> None:
        self._requested = True
        if action.applied:
            self.pending = True
        else:
            self.refused += 1

    def arm(self, keep):
        """Gate the coming optimizer step on the device: the update is kept where ``keep`` is
        true and undone where it is false, with no host sync. The guard arms it from the
        policy's ``gate: device`` rules; user code may arm it between ``loss.backward()`` and
        ``guard.step(loss)``.

        :param keep: 0-dim bool tensor on the parameters' device.
        :returns: the gate in force (0-dim bool tensor): ``keep``, or true where it would make
            more than ``max_consecutive`` skipped steps in a row.
        :raises ValueError: ``keep`` is not a 0-dim tensor.
        """
        import torch

        if not isinstance(keep, torch.Tensor) or keep.dim() != 0:
            raise ValueError(f"keep must be a 0-dim bool tensor, got {keep!r}")
        keep = keep.to(torch.bool)
        if self._dev_consecutive is None or self._dev_consecutive.device != keep.device:
            self._dev_consecutive = torch.full((), self._saved_dev_consecutive, dtype=torch.int64,
                                               device=keep.device)
        # max_consecutive on the device: a gate that would exceed it is overridden.
        self._keep = keep | (self._dev_consecutive >= self.max_consecutive)
        return self._keep

    def device_gate_mode(self, optimizer) -> Optional[str]:
        """How :meth:`arm` carries out a gate on ``optimizer``: ``"found_inf"`` (torch's fused
        Adam / AdamW: the kernel skips the update, weight decay included, and undoes the step
        count), ``"select"`` (a ``torch.where`` restore of parameters and optimizer state), or
        ``None`` when a step of this optimizer cannot be undone without the host (CUDA Adam /
        AdamW keeping ``state["step"]`` on the CPU: build it with ``fused=True`` or
        ``capturable=True``)."""
        import torch

        groups = optimizer.param_groups
        if isinstance(optimizer, torch.optim.Adam) and all(g.get("fused") for g in groups):
            return "found_inf"
        for group in groups:
            on_cuda = any(p.is_cuda for p in group["params"])
            if (on_cuda and isinstance(optimizer, torch.optim.Adam)
                    and not (group.get("capturable") or group.get("fused"))):
                return None
        return "select"

    def device_consecutive(self):
        """Skipped steps in a row as seen by the device gate (0-dim int64 tensor, or ``None``
        before the first gated step). Reading its value syncs."""
        return self._dev_consecutive

    # ---------------------------------------------------------------- the step
    def before_step(self, optimizer, step: int) -> bool:
        if self.pending:
            return False
        if self._keep is None:
            return True
        keep = self._keep
        if self.device_gate_mode(optimizer) == "found_inf":
            # torch's fused Adam/AdamW read `found_inf` (the seam GradScaler uses): exactly
            # 1.0 skips the update, weight decay included, and undoes the step count.
            import torch

            optimizer.found_inf = (~keep).to(torch.float32)
            self._pairs = None
            return True
        pairs = self._snapshot(optimizer)
        if pairs is None:  # state not created yet: a select cannot undo its creation
            self.host_syncs += 1
            return bool(keep)  # host-device sync (documented; first step of a parameter only)
        self._pairs = pairs
        return True

    def _snapshot(self, optimizer) -> Optional[list]:
        import torch

        live = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = optimizer.state.get(p)
                if not state:
                    return None
                live.append(p.detach())
                for key, value in state.items():
                    if not isinstance(value, torch.Tensor):
                        raise RuntimeError(f"skip_step gate: device cannot undo non-tensor "
                                           f"optimizer state {key!r} of {type(optimizer).__name__}")
                    live.append(value)
        if len(self._buffers) != len(live) or any(
                b.shape != t.shape or b.dtype != t.dtype or b.device != t.device
                for b, t in zip(self._buffers, live)):
            self._buffers = [torch.empty_like(t) for t in live]
        for b, t in zip(self._buffers, live):
            b.copy_(t)
        return list(zip(live, self._buffers))

    def after_step(self, optimizer, stepped: bool, step: int) -> None:
        self._keep_was_armed = self._keep is not None
        if getattr(optimizer, "found_inf", None) is not None and self._keep is not None:
            del optimizer.found_inf
        if self._keep is not None:
            import torch

            keep = self._keep
            if self._pairs is not None and stepped:
                for t, saved in self._pairs:
                    torch.where(keep, t, saved, out=t)  # elementwise, in place: no sync
            kept = keep if stepped else torch.zeros((), dtype=torch.bool, device=keep.device)
            self._dev_consecutive = torch.where(kept, torch.zeros_like(self._dev_consecutive),
                                                self._dev_consecutive + 1)
            self._keep, self._pairs = None, None
        elif self._dev_consecutive is not None:
            if stepped:
                self._dev_consecutive.zero_()
            else:
                self._dev_consecutive.add_(1)
        awaiting = self._expect or self._keep_was_armed
        self._expect = self._keep_was_armed = False
        if self.pending:
            self.consecutive += 1
        elif stepped and awaiting:
            self._unresolved = True  # settled next step: device_applied() or observe()
        elif stepped:
            self.consecutive = 0
        if not self._requested:
            self.refused = 0
        self.pending = self._requested = False

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        dev = self._saved_dev_consecutive if self._dev_consecutive is None \
            else int(self._dev_consecutive)  # host-device sync (checkpoint time only)
        return {"consecutive": self.consecutive, "refused": self.refused,
                "device_consecutive": dev, "unresolved": self._unresolved}

    def load_state_dict(self, state) -> None:
        self.consecutive = int(state["consecutive"])
        self.refused = int(state.get("refused", 0))
        self._saved_dev_consecutive = int(state.get("device_consecutive", 0))
        self._unresolved = bool(state.get("unresolved", False))
        self._dev_consecutive = None
        self.pending = self._requested = False
        self._keep = self._pairs = None
