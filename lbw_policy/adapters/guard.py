"""The torch adapter: a :class:`Guard` governs a ``torch.optim.Optimizer`` with a policy.

One call per training step, after ``loss.backward()``::

    guard.step(loss)   # sense -> transfer -> govern -> optimizer.step() or skip

The six stages of DESIGN.md's data flow, each in one place:

1. **telemetry**: a :class:`~lbw_policy.telemetry.Telemetry` shared by the detectors
   (the global grad norm is reduced once).
2. **detect**: every detector due this step (``every:``) returns 0-dim tensors, stacked with the
   loss into one signal vector; ``gate: device`` rules are evaluated on it, on the device
   (:mod:`lbw_policy.adapters.gate`). A detector that raises becomes a
   :class:`~lbw_policy.governor.Fault`.
3. **reduce**: in a ``torch.distributed`` run, one collective makes the vector global, so every
   rank takes the same decisions (:mod:`lbw_policy.adapters.distributed`); rank 0 writes the
   decision log.
4. **transfer**: the vector reaches the host at once (``immediate``: one ``.tolist()``) or one
   step later without a blocking sync (``deferred``, the default on CUDA;
   :mod:`lbw_policy.adapters.transport`).
5. **govern**: the :class:`~lbw_policy.governor.Governor` (faults, hold, observe, evaluate, plan,
   write-ahead log, commit, halt check, recover) -- the one step order, shared with replay and
   ``lbw-policy test``.
6. **step**: ``optimizer.step()`` inside the Governor's before/after, or the skip; then every
   detector's ``after_step``.

Errors raised by a detector or actuator plugin are contained by the Governor (an ``error`` record
and the policy's ``on_error``); a failing decision log halts the guard and the step is not taken.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
import platform
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from lbw_policy.adapters.distributed import (NullFile, NullLog, SignalReducer,
                                             resolve_distributed, write_distributed_checkpoint)
from lbw_policy.adapters.gate import DeviceGate, gate_rules
from lbw_policy.adapters.transport import Packet, make_transport
from lbw_policy.base import ActuatorContext
from lbw_policy.decision_log import DecisionLog
from lbw_policy.errors import TrainingHalted
from lbw_policy.governor import Fault, Governor
from lbw_policy.policy import Policy, load_policy
from lbw_policy.records import gate_action
from lbw_policy.telemetry import Telemetry
from lbw_policy.telemetry_log import open_telemetry, telemetry_line

__all__ = ["Guard", "StepResult"]


@dataclass
class StepResult:
    """What :meth:`Guard.step` did.

    :param step: the step index (0-based).
    :param loss: the loss of ``signals_step`` as a float (NaN when no signals landed yet: the
        first step of a deferred run).
    :param skipped: ``True`` when ``optimizer.step()`` was not called (a device-gated step is
        called and undone on the device: it shows in the next step's ``decisions``).
    :param lr: effective learning rate of the first param group this step (after ``lr_scale``).
    :param decisions: the records written this step (full decision-log records).
    :param signals: every signal's latest value, ``{"<detector_id>.<signal>": float}``.
    :param signals_step: the step whose signals were evaluated (``step`` with the immediate
        transport, ``step - 1`` with the deferred one, ``None`` when none landed yet).
    :param lr_scale: the ``lr_scale`` actuator's scale in force during the step (1.0 without
        that actuator, and in ``audit`` mode).
    """

    step: int
    loss: float
    skipped: bool
    lr: float
    decisions: list = field(default_factory=list)
    signals: dict = field(default_factory=dict)
    signals_step: Optional[int] = None
    lr_scale: float = 1.0


class Guard:
    """Apply a policy to an optimizer, step by step.

    :param optimizer: any ``torch.optim.Optimizer`` (AdamW, Adam, SGD, ...).
    :param policy: a :class:`~lbw_policy.policy.Policy`, a path to a YAML file, or the name of a
        built-in policy (``"default"``, ``"audit-only"``).
    :param model: the model (detectors that inspect weights or attach hooks need it).
    :param log_dir: run directory for ``decisions.jsonl``, ``telemetry.jsonl`` and
        ``policy.yaml``; created if missing; an existing decision log is continued only with
        ``resume=True``.
        Default ``runs/<run_id>``.
    :param run_id: label written into every record (default: ``log_dir``'s name, else random).
    :param rank: rank label (default: the process group's rank in a distributed run, else 0).
    :param distributed: ``"auto"`` (default): when ``torch.distributed`` is initialized with
        more than one rank, the step's signals are reduced across ranks in one collective and
        every rank takes the same decisions; only rank 0 writes ``log_dir``
        (docs/distributed.md). A ``ProcessGroup``: reduce over that group. ``True``: require
        an initialized default group. ``False``: this rank governs alone (its decisions may
        differ from the other ranks': the replicas can diverge; for single-rank jobs and tests).
    :param registry: plugin registry (default: :func:`lbw_policy.plugins.get_registry`).
    :param fsync: ``os.fsync`` the decision log after every record (default ``False``: flushed
        to the OS, which survives a killed process but not a power loss).
    :param transfer: ``"auto"``, ``"immediate"`` or ``"deferred"``; overrides the policy's
        ``transfer:`` (default: the policy's, itself ``auto``: deferred on CUDA).
    :param resume: continue the decision log already in ``log_dir`` (a resumed run; load the
        saved state with :meth:`load_state_dict`). Default ``False``: a ``log_dir`` that
        already holds a run is refused, so two runs never share one log by accident.
    :param host_scalars: on the CPU, let the scalar statistics read the loss and grad norm as
        Python floats (default ``True``; ``False`` runs them on tensors, as on an accelerator).
    :param clip_grad_norm: clip the global L2 gradient norm to this value (``max_norm`` of
        ``torch.nn.utils.clip_grad_norm_``) right before ``optimizer.step()``, *after* the
        detectors read the unclipped gradients (default ``None``: no fixed clip). Use it instead
        of calling ``clip_grad_norm_`` yourself before :meth:`step`, which would hide a spike
        from ``grad_norm``. It runs after the policy's actuators and clips the gradients as they
        left them, from the norm they kept (the telemetry's ``current_grad_norm``: no second
        reduction): after ``grad_clip``, from the clipped norm; under the default policy, after
        ``grad_normalize``, from the normalized gradients' norm (about ``sqrt(number of
        tensors)``), so it rescales every step's gradient by nearly the same factor.
    :param sign_key: sign the decision log (:mod:`lbw_policy.signing`): a private key file
        (``lbw-policy keygen``), an ``Ed25519PrivateKey`` or a
        :class:`~lbw_policy.signing.Signer`. Default ``None``: the file named by the
        environment variable ``LBW_POLICY_SIGN_KEY`` if it is set and not empty, else unsigned.
        In a distributed run the rank that writes the log signs it.
    :param witness: with a key, where each signed checkpoint is also reported, outside the run
        directory: a file path, a ``logging.Logger``, a callable taking the entry (a dict), or
        a list of these (:class:`~lbw_policy.signing.Witness`). Default ``None``.
    :param checkpoint_every: with a key, a signed checkpoint every this many records (default
        100), and a final one at :meth:`close`.
    :raises PolicyError: the policy is invalid (nothing was applied).
    :raises ActuatorError: an actuator cannot act on this optimizer (nothing was applied: hooks
        a detector had attached are removed again).
    :raises ValueError: an unknown ``transfer``; ``clip_grad_norm`` not a positive number;
        ``checkpoint_every`` not an integer >= 1; the parameters are sharded (DTensor, FSDP2)
        and a detector or actuator of the policy cannot run on shards (its ``sharding`` text;
        checked before any actuator attaches, nothing was applied).
    :raises lbw_policy.signing.SigningKeyError: the signing key cannot be used (nothing was
        applied).
    :raises FileExistsError: ``log_dir`` already holds a decision log and ``resume`` is false
        (nothing was applied).
    :raises RuntimeError: distributed: another rank failed to build its guard or loaded another
        policy revision (every rank raises; nothing was applied).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, policy: Union[Policy, str, os.PathLike] = "default",
                 model: Optional[torch.nn.Module] = None, log_dir: Union[str, os.PathLike, None] = None,
                 run_id: Optional[str] = None, rank: Optional[int] = None, registry=None,
                 fsync: bool = False, labels: Optional[Mapping[str, Any]] = None,
                 transfer: Optional[str] = None, host_scalars: bool = True, resume: bool = False,
                 clip_grad_norm: Optional[float] = None, distributed: Any = "auto",
                 sign_key: Any = None, witness: Any = None, checkpoint_every: int = 100) -> None:
        device = next((p.device for g in optimizer.param_groups for p in g["params"]),
                      torch.device("cpu"))
        self.dist = resolve_distributed(distributed)
        try:  # in a distributed run a rank that fails here tells the others (no one waits)
            if clip_grad_norm is not None and not (isinstance(clip_grad_norm, (int, float))
                                                   and not isinstance(clip_grad_norm, bool)
                                                   and 0 < clip_grad_norm < float("inf")):
                raise ValueError(f"clip_grad_norm must be a positive finite number or None, "
                                 f"found {clip_grad_norm!r}")
            # a bad key fails before anything is built; only the rank that writes the log signs
            signer = _signer(sign_key) if self.dist is None or self.dist.rank == 0 else None
            if signer is not None:
                from lbw_policy.signing import make_witness

                witness = make_witness(witness)  # TypeError for a witness of the wrong kind
                if type(checkpoint_every) is not int or checkpoint_every < 1:
                    raise ValueError(f"checkpoint_every: expected an integer >= 1, found "
                                     f"{checkpoint_every!r}")
            if registry is None:
                from lbw_policy.plugins import get_registry

                registry = get_registry()
            if not isinstance(policy, Policy):
                from lbw_policy.policy import resolve_policy_path

                policy = load_policy(resolve_policy_path(policy), registry=registry)
        except BaseException:
            if self.dist is not None:
                self.dist.agree(False, "", device)
            raise
        self.clip_grad_norm = None if clip_grad_norm is None else float(clip_grad_norm)
        self.policy = policy
        self.optimizer = optimizer
        self.model = model
        self.enforce = policy.mode == "enforce"
        self.registry = registry
        self.host_scalars = bool(host_scalars)
        self.device = device  # where the signal vector is built: the parameters' device
        if self.dist is not None:
            if rank is not None and rank != self.dist.rank:
                self.dist.agree(False, policy.revision, device)
                raise ValueError(f"rank={rank} but this process is rank {self.dist.rank} of its "
                                 f"process group; leave rank unset in a distributed run")
            rank = self.dist.rank
        self.rank = 0 if rank is None else int(rank)
        self.world_size = 1 if self.dist is None else self.dist.world_size
        # rank 0 writes the run directory (the one decision log); the other ranks decide alike
        self.writer = self.dist is None or self.rank == 0
        self.reducer: Optional[SignalReducer] = None
        self._pending_after: list = []  # distributed: after_step faults, reduced next step

        # Build every plugin before touching files: a bad policy never half-applies, and a
        # failed construction leaves the model as it was (hooks removed).
        self.detectors, self.actuators, self._plugin_versions = {}, {}, {}
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.run_id = run_id or (self.log_dir.name if self.log_dir else uuid.uuid4().hex[:12])
        if self.log_dir is None:
            self.log_dir = Path("runs") / self.run_id
        context = ActuatorContext(model=model, log_dir=self.log_dir, rank=self.rank,
                                  world_size=self.world_size,
                                  save_checkpoint=self._save_checkpoint)
        # Two stages, each agreed on by every rank in a distributed run: build the plugins
        # (no file written), then open the run directory (rank 0).
        self._stage(lambda: self._build(policy, registry, model, optimizer, context, transfer,
                                        resume))
        self._stage(lambda: self._open_run(policy, optimizer, rank=self.rank, fsync=fsync,
                                           labels=labels, signer=signer, witness=witness,
                                           checkpoint_every=checkpoint_every))

    def _stage(self, build: Any) -> None:
        """Run one construction stage; unwind it if it, or another rank's, failed (detector
        hooks removed, run files closed). In a distributed run every rank reports how the stage
        went (:meth:`DistContext.agree`), so a failed rank fails them all, none waits for it.

        :raises: the stage's own error, or ``RuntimeError`` when another rank failed."""
        try:
            build()
            ok = True
        except BaseException:
            ok = False
            raise
        finally:
            try:
                if self.dist is not None:
                    self.dist.agree(ok, self.policy.revision, self.device)
            except BaseException:
                ok = False
                raise
            finally:
                if not ok:
                    self._unwind()

    def _unwind(self) -> None:
        """A failed construction: remove detector hooks, close the run files opened so far."""
        self._close_detectors()
        for name in ("_telemetry_file", "log"):
            f = getattr(self, name, None)
            try:
                if f is not None:
                    f.close()
            except Exception:  # noqa: BLE001 - the construction's error is the one to report
                pass

    def _build(self, policy: Policy, registry: Any, model: Any, optimizer: Any,
               context: ActuatorContext, transfer: Optional[str], resume: bool) -> None:
        """Build the transport, build and attach every plugin and the gate; check the run
        directory. Writes no file. The caller removes detector hooks again when this raises."""
        self.transport = make_transport(transfer or policy.transfer, self.device)
        for det_id, spec in policy.detectors.items():
            reg = registry.detectors[spec.type]
            self.detectors[det_id] = reg.cls(**dict(spec.params))
            self._plugin_versions[f"detector:{spec.type}"] = {"plugin": reg.plugin, "version": reg.version}
        for name, spec in policy.actuators.items():
            reg = registry.actuators[name]
            self.actuators[name] = reg.cls(**dict(spec.bounds))
            self._plugin_versions[f"actuator:{name}"] = {"plugin": reg.plugin, "version": reg.version}
        # before anything attaches: nothing to undo when refused (distributed or not: sharded
        # parameters are the test)
        _check_sharding(self.detectors, self.actuators, policy, optimizer)
        for name, actuator in self.actuators.items():
            actuator.bind(context)  # rollback needs the model, halt the log_dir
            actuator.attach(optimizer)  # ActuatorError if it cannot act on this optimizer
        for det_id, det in self.detectors.items():
            det.setup(model, optimizer, every=policy.detectors[det_id].every)
        if self.dist is not None:
            self.reducer = SignalReducer(self.dist, self.detectors, policy.detectors)
        device = self.device
        # The same-step gate runs on the device only when the host learns too late (deferred)
        # and the policy enforces; otherwise its rules are ordinary host rules.
        gated = gate_rules(policy) if self.transport.delay and self.enforce else []
        self.gate_mode = None
        if gated:
            self.gate_mode = self.actuators["skip_step"].device_gate_mode(optimizer)
            if self.gate_mode is None:  # this optimizer cannot be gated without the host
                chosen = transfer or policy.transfer
                message = (f"{type(optimizer).__name__} keeps its step counts on the CPU (neither "
                           f"fused=True nor capturable=True), so the device gate of rules "
                           f"{[r.name for r in gated]} cannot skip a step on the device")
                if chosen == "auto":  # safety first: same-step skips, one sync per step
                    self.transport = make_transport("immediate", device)
                    warnings.warn(message + "; falling back to transfer: immediate (one host "
                                  "sync per step). Build the optimizer with fused=True to keep "
                                  "the step free of syncs.", stacklevel=3)
                else:
                    warnings.warn(message + "; with transfer: deferred they act one step late, "
                                  "so a non-finite step reaches the weights.", stacklevel=3)
                gated = []
        self.gate = DeviceGate(gated)

        log_path = self.log_dir / "decisions.jsonl"
        if (self.writer and not resume and log_path.exists()
                and log_path.stat().st_size > 0):
            raise FileExistsError(
                f"{log_path} already holds a run: pass resume=True to continue it (then load "
                f"the saved guard state with load_state_dict; GuardedTrainer does both when "
                f"train(resume_from_checkpoint=...) is called), or choose another log_dir")

    def _open_run(self, policy: Policy, optimizer: Any, *, rank: int, fsync: bool,
                  labels: Optional[Mapping[str, Any]], signer: Any = None, witness: Any = None,
                  checkpoint_every: int = 100) -> None:
        """Open the run's files (rank 0 only in a distributed run) and write ``run_start``
        (with the signing key's fingerprint when ``signer`` is given)."""
        from lbw_policy import __version__

        gated = self.gate.rules
        run_labels = {"run_id": self.run_id, "rank": rank, "world_size": self.world_size,
                      "lbw_policy": __version__, "torch": torch.__version__,
                      "python": platform.python_version(), "plugins": self._plugin_versions}
        run_labels.update(labels or {})
        if self.writer:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.log = DecisionLog(self.log_dir / "decisions.jsonl", run=run_labels, fsync=fsync,
                                   signer=signer, checkpoint_every=checkpoint_every,
                                   witness=witness)
            (self.log_dir / "policy.yaml").write_text(policy.text, encoding="utf-8")
            self._telemetry_file = open_telemetry(self.log_dir / "telemetry.jsonl")
        else:
            self.log, self._telemetry_file = NullLog(), NullFile()
        self.governor = Governor(policy, self.actuators, self._write,
                                 rules=[r for r in policy.rules if r not in gated])
        self._step = 0
        # foot-guns, each warned once: optimizer.step() called outside guard.step (a second
        # step per batch), guard.step(loss) without loss.backward() (no gradient at all)
        self._in_step = False
        self._outside_steps = 0
        self._warned: set = set()
        self._step_hook = optimizer.register_step_post_hook(self._count_outside_step)
        self._after_faults: list = []
        self._due_in_step: Any = "in flight"
        self._halted = False
        self._closed = False
        signing = {"signing": {"algorithm": signer.algorithm, "key": signer.fingerprint,
                               "checkpoint_every": checkpoint_every}} if signer else {}
        self._write({"step": 0, "event": "run_start", "mode": policy.mode, **signing,
                     # the description goes here only, not into every record
                     "policy": dict(self._policy_label(), description=policy.description),
                     "transfer": self.transport.mode, "delay": self.transport.delay,
                     "gate": {"mode": self.gate_mode, "rules": [r.name for r in gated]},
                     "detectors": {k: {"type": v.type, "params": dict(v.params), "every": v.every}
                                   for k, v in policy.detectors.items()},
                     "actuators": {k: dict(v.bounds) for k, v in policy.actuators.items()},
                     "optimizer": type(optimizer).__name__,
                     # hyperparameters of param group 0 (betas, weight_decay, ...): replay builds
                     # its stand-in optimizer with them (beta2 recovers toward the run's own)
                     "optimizer_hyperparameters": {k: v for k, v in optimizer.param_groups[0].items()
                                                   if k != "params"},
                     "recovered_torn_bytes": self.log.recovered_torn_bytes})

    # ------------------------------------------------------------------ helpers
    @property
    def step_count(self) -> int:
        """Number of completed ``step`` calls (the next step's index)."""
        return self._step

    @property
    def counts(self):
        """Decisions by ``"event:<e>"``, ``"rule:<name>"``, ``"actuator:<name>"``."""
        return self.governor.counts

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps the host skipped (device-gated steps are counted by their records)."""
        return self.governor.skipped_steps

    @property
    def engine(self):
        return self.governor.engine

    def _policy_label(self) -> dict:
        """The policy fields of every record (``run_start`` adds the description)."""
        return {"name": self.policy.name, "revision": self.policy.revision,
                "owner": self.policy.owner}

    def _write(self, record: dict) -> dict:
        record = {"policy": self._policy_label(), "mode": self.policy.mode, **record}
        return self.log.append(record)

    def _count_outside_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._in_step:
            self._outside_steps += 1

    def _warn_foot_guns(self, tel: Telemetry) -> None:
        """Warn once each: optimizer.step() outside the guard; no gradient at all."""
        if self._outside_steps and "outside" not in self._warned:
            self._warned.add("outside")
            warnings.warn("optimizer.step() was called outside guard.step(): guard.step() "
                          "replaces it (calling both steps twice per batch, and the policy "
                          "cannot skip or scale the other one)", stacklevel=3)
        if self._step < 3 and "no-grad" not in self._warned and not tel.grads():
            self._warned.add("no-grad")
            warnings.warn("guard.step(loss) found no gradient on any parameter: call "
                          "loss.backward() first (the gradient-norm signals read 0 and the "
                          "optimizer step changes nothing)", stacklevel=3)

    def _save_checkpoint(self, path: str, *, step: int, actuator: str) -> None:
        """:class:`~lbw_policy.base.ActuatorContext`'s ``save_checkpoint`` (halt, rollback)."""
        from lbw_policy.actuators._checkpoint import write_checkpoint

        if self.dist is not None:  # sharded state: every rank saves its part, at the same step
            write_distributed_checkpoint(path, step=step, actuator=actuator, model=self.model,
                                         optimizer=self.optimizer, guard_state=self.state_dict(),
                                         rank=self.rank)
            return
        write_checkpoint(path, step=step, actuator=actuator, model=self.model,
                         optimizer=self.optimizer, guard_state=self.state_dict())

    # ------------------------------------------------------------------ the step
    def step(self, loss: torch.Tensor, *, found_inf: Optional[torch.Tensor] = None) -> StepResult:
        """Govern one optimizer step. Call after ``loss.backward()``, instead of
        ``optimizer.step()``.

        :param loss: the step's loss, a scalar tensor (any device) or a float.
        :param found_inf: ``torch.amp.GradScaler``'s flag for this step's gradients (a 0-dim
            float tensor, ``> 0`` when they hold inf/NaN; the gradients must already be
            unscaled). ``None`` (default): no scaler. With a flag set and a finite loss the step
            is the scaler's overflow, its normal business: see :meth:`scaler_skipped` (no
            detector runs, no rule is evaluated). With a flag set and a non-finite loss it is a
            real fault: the step is governed as usual (the policy's rules see it) and the
            optimizer step is never taken. Reading the flag and the loss's finiteness is one
            host read (on CUDA one sync; GradScaler's own step takes the same sync for an
            optimizer that is not fused). In a distributed run both are first reduced across
            ranks (one all-reduce of 2 values, on GradScaler steps only), so every rank takes
            the same path.
        :return: :class:`StepResult`.
        :raises TrainingHalted: a ``halt`` command fired (enforce mode); its record is on disk.
        :raises DecisionLogError: the decision log could not be written; the guard is halted
            and this step's optimizer step was not taken.
        :raises RuntimeError: the guard was closed or has halted.
        """
        if self._closed or self._halted:
            raise RuntimeError("Guard has halted training; build a new one to continue" if self._halted
                               else "Guard is closed")
        take = self.optimizer.step
        if found_inf is not None:  # a GradScaler step (integrations.GuardedOptimizer)
            overflow, take = self._scaler_flag(loss, found_inf)
            if overflow:
                return self.scaler_skipped()
        self._after_faults = []
        tel = Telemetry(self._step, loss, self.optimizer, self.model,         # 1. telemetry
                        host_scalars=self.host_scalars)
        self._warn_foot_guns(tel)
        packet = self._sense(tel)                            # 2. detect, 3. reduce (+ gate)
        due = self.transport.send(packet)                                    # 4. transfer
        emitted, faults, device_actions = self._landed(due)
        self._due_in_step = due  # what a mid-step state_dict (halt checkpoint) saves as in flight
        self._in_step = True
        try:
            outcome = self.governor.step(                                    # 5. govern, 6. step
                self._step, emitted, faults, observation=tel, optimizer=self.optimizer,
                step_fn=functools.partial(self._clip_and_step, tel, take),
                after_step=functools.partial(self._after_step, tel),
                signals_step=None if due is None else due.step, device_actions=device_actions)
        except BaseException:  # optimizer.step() raised (out of memory, ...): the actuators are
            self._stop()       # unwound; rule timers have moved, so this guard cannot go on
            raise
        self._end_step(outcome, due, packet)
        return StepResult(step=outcome.step, loss=due.values[0] if due else float("nan"),
                          skipped=outcome.skipped, lr=outcome.lr, decisions=outcome.records,
                          signals=dict(self.governor.latest),
                          signals_step=None if due is None else due.step,
                          lr_scale=outcome.lr_scale)

    # ------------------------------------------------------------------ mixed precision, clipping
    def _scaler_flag(self, loss: Any, found_inf: torch.Tensor) -> tuple:
        """``(overflow, take)`` for a GradScaler step: ``overflow`` when the scaler found
        inf/NaN but the loss is finite (one host read of both); ``take`` is the step function:
        ``optimizer.step`` or, when the gradients hold inf/NaN, a step that is never taken."""
        flag = found_inf.detach().reshape(()) > 0
        finite = torch.isfinite(torch.as_tensor(loss).detach().reshape(())).to(flag.device)
        if self.dist is not None:
            # every rank must take the same path (the scaler's skip issues no collective, the
            # governed step does): inf/NaN on any rank's gradients, a non-finite loss on any rank
            flags = torch.stack([flag, ~finite]).to(device=self.device, dtype=torch.float64)
            self.dist.all_reduce_max(flags)
            flag, finite = flags[0] > 0, flags[1] == 0
        found, loss_finite = torch.stack([flag, finite]).tolist()  # the one host read
        if not found:
            return False, self.optimizer.step
        return bool(loss_finite), _not_taken

    def scaler_skipped(self) -> StepResult:
        """Record a step that ``torch.amp.GradScaler`` skips because the scaled gradients
        overflowed (its normal business: it lowers the scale and retries next step). One
        ``scaler_skipped`` record (no rule, no action); no detector runs, so no statistic is
        updated with the overflowed gradients; no rule is evaluated and no actuator moves; the
        step counter advances (records keep the framework's step numbering). A signal vector in
        flight (deferred transport) lands at the next governed step.

        :return: :class:`StepResult` with ``skipped=True`` and NaN ``loss``.
        :raises DecisionLogError: the record could not be written (the guard is halted).
        :raises RuntimeError: the guard was closed or has halted.
        """
        if self._closed or self._halted:
            raise RuntimeError("Guard has halted training; build a new one to continue" if self._halted
                               else "Guard is closed")
        outcome = self.governor.record_scaler_skip(self._step)
        self._step += 1
        if outcome.fatal is not None:
            self._stop()
            raise outcome.fatal
        lr = self.optimizer.param_groups[0].get("lr") if self.optimizer.param_groups else None
        scale = (float(self.actuators["lr_scale"].state_dict().get("scale", 1.0))
                 if "lr_scale" in self.actuators and self.enforce else 1.0)
        return StepResult(step=outcome.step, loss=float("nan"), skipped=True,
                          lr=float("nan") if lr is None else float(lr) * scale,
                          decisions=outcome.records, signals=dict(self.governor.latest),
                          lr_scale=scale)

    def _clip_and_step(self, tel: Telemetry, take: Any) -> Any:
        """Stage 6: the fixed clip (``clip_grad_norm``), then the optimizer step; returns what
        ``take`` returns (``False``: no step was taken). Records the learning rates the step
        uses in ``tel.step_lrs`` (the actuators have set them for this step)."""
        if self.clip_grad_norm is not None:
            params = [p for p in tel.parameters() if p.grad is not None]
            # the step's shared norm, or the norm the policy's actuators left after rescaling
            # the gradients this step (grad_clip, grad_normalize keep it): no second reduction
            torch.nn.utils.clip_grads_with_norm_(params, self.clip_grad_norm, tel.current_grad_norm)
        tel.step_lrs = [group.get("lr") for group in self.optimizer.param_groups]
        return take()

    def _end_step(self, outcome: Any, due: Optional[Packet], packet: Packet) -> None:
        """Count the step, write the telemetry rows of the steps done, raise a halt."""
        packet.meta.update(lr=outcome.lr, scheduled_lr=outcome.scheduled_lr,
                           skipped=outcome.skipped, halted=outcome.halted,
                           after_faults=[f.to_dict() for f in self._after_faults])
        self._due_in_step = "in flight"
        self._in_step = False
        self._step += 1  # first: a failing telemetry write must not leave the step half-counted
        for p in (due, packet) if due is not packet else (packet,):
            if p is not None and p.values is not None and "skipped" in p.meta:
                self._write_row(p)
        if not outcome.halted:
            return
        if outcome.fatal is not None:  # the decision log failed: close what can be closed
            self._stop()
            raise outcome.fatal
        self._halted = True
        self._finish()
        self._write_summary()
        h = outcome.halt
        raise TrainingHalted(h["message"], rule=h["rule"] or "", step=outcome.step,
                             signals=h["signals"])

    def _stop(self) -> None:
        """Halt after an error that is not the policy's: close what can be closed."""
        self._halted = True
        try:
            self._finish()
        except Exception:  # noqa: BLE001 - the step's own error is the one to report
            pass

    def _sense(self, tel: Telemetry) -> Packet:
        """Stages 2-3: due detectors -> one vector on the parameters' device (single process:
        ``[loss, *tensor signals, *gate flags]``, host values and faults beside it; distributed:
        the reduced layout of :mod:`lbw_policy.adapters.distributed`, then the gate flags)."""
        step = tel.step
        device = self.device
        dtype = torch.float64 if device.type != "mps" else torch.float32
        outputs: dict = {}
        faults: list = []
        for det_id, det in self.detectors.items():
            spec = self.policy.detectors[det_id]
            if step % spec.every:
                continue
            try:
                # Each value becomes a 0-dim tensor here, inside the try: a detector returning
                # something that is not a scalar is contained like one that raises, and a
                # failed detector contributes no signal at all (no partial output).
                outputs[det_id] = {sig: _scalar(val, device, dtype) if isinstance(val, torch.Tensor)
                                   else _host_number(val) for sig, val in det.compute(tel).items()}
            except Exception as exc:  # a plugin that raises is contained, never silent
                faults.append(Fault.of("detector", det_id, "compute", exc, spec.type))
        loss = tel.loss.reshape(()).to(device=device, dtype=dtype)
        if self.reducer is not None:
            for fault in faults:  # only this rank knows the text: say it here
                warnings.warn(f"rank {self.rank}: {fault.where} raised {fault.error}",
                              stacklevel=3)
            faults, self._pending_after = faults + self._pending_after, []
            names, values, present, counts, first, layout = self.reducer.gather(
                step, loss, outputs, faults, device, dtype)
            nan = torch.full_like(values[1:], float("nan"))
            gates = self._gate(dict(zip(names, torch.where(present > 0, values[1:], nan))), dtype)
            vector = torch.cat([values, present, counts, first] + ([torch.stack(gates)] if gates else []))
            return Packet(step, names, vector, {},
                          meta={"faults": [], "gates": len(gates), "dist": layout})
        flat: list = [loss]
        names = []
        on_host: dict = {}
        for det_id, out in outputs.items():
            for sig, value in out.items():
                if isinstance(value, float):
                    on_host[f"{det_id}.{sig}"] = value
                else:
                    names.append(f"{det_id}.{sig}")
                    flat.append(value)
        gates = self._gate({**dict(zip(names, flat[1:])), **on_host}, dtype)
        vector = torch.stack(flat + gates)
        return Packet(step, names, vector, on_host,
                      meta={"faults": [f.to_dict() for f in faults], "gates": len(gates)})

    def _gate(self, signals: Mapping[str, Any], dtype: torch.dtype) -> list:
        """The device gate's flags (one 0-dim tensor per gated rule that fired, 0/1), with the
        skip armed on the device; ``[]`` without a gate."""
        if not self.gate:
            return []
        fired = self.gate.evaluate(signals, self.device)
        keep = self.actuators["skip_step"].arm(~torch.stack(fired).any())
        return [torch.logical_and(f, ~keep).to(dtype) for f in fired]

    def _decode(self, p: Packet) -> tuple:
        """A landed packet's ``(loss, signals, faults, gate_flags)`` on the host."""
        values, n_gates = p.values, p.meta["gates"]
        body, flags = values[:len(values) - n_gates], values[len(values) - n_gates:]
        if "dist" in p.meta:
            loss, signals, faults = self.reducer.decode(body, p.meta["dist"])
            return loss, signals, faults, flags
        signals = dict(zip(p.names, body[1:]))
        signals.update(p.host)
        return body[0], signals, [Fault.from_dict(f) for f in p.meta["faults"]], flags

    def _landed(self, due: Optional[Packet]) -> tuple:
        """The Governor's inputs from a landed packet: (emitted, faults, device_actions)."""
        if due is None:
            return {}, [], []
        _, emitted, faults, flags = self._decode(due)
        # the gate acted only on a step the host took (a host skip or a halt came first)
        taken = not (due.meta.get("skipped") or due.meta.get("halted"))
        gated = [rule for rule, flag in zip(self.gate.rules, flags) if flag and taken]
        due.meta["gated"] = [rule.name for rule in gated]
        return emitted, faults, [gate_action(r, emitted, due.step, self.gate_mode) for r in gated]

    def _after_step(self, tel: Telemetry, stepped: bool) -> list:
        """Detectors that measure what the step changed; their faults, as data."""
        faults = []
        for det_id, det in self.detectors.items():
            try:
                det.after_step(tel, stepped)
            except Exception as exc:
                faults.append(Fault.of("detector", det_id, "after_step", exc,
                                       self.policy.detectors[det_id].type))
        self._after_faults = faults
        if self.reducer is not None:  # contained on every rank alike, at the next step
            for fault in faults:
                warnings.warn(f"rank {self.rank}: {fault.where} raised {fault.error}",
                              stacklevel=2)
            self._pending_after = faults
            return []
        return faults

    def _write_row(self, p: Packet) -> None:
        """One ``telemetry.jsonl`` line for a landed packet whose step is done."""
        if p.meta.get("written"):  # a mid-step state_dict (halt checkpoint) landed it early
            return
        p.meta["written"] = True
        loss, signals, faults, _ = self._decode(p)
        row = {"step": p.step, "loss": loss, "lr": p.meta["lr"],
               "scheduled_lr": p.meta["scheduled_lr"],
               "skipped": bool(p.meta["skipped"] or p.meta.get("gated")), "signals": signals}
        if faults:
            row["faults"] = [f.to_dict() for f in faults]
        for key in ("after_faults", "gated"):
            if p.meta.get(key):
                row[key] = p.meta[key]
        if p.meta.get("halted"):
            row["halted"] = True
        self._telemetry_file.write(telemetry_line(row) + "\n")

    # ------------------------------------------------------------------ state and teardown
    def state_dict(self) -> dict:
        """Everything needed for a resumed run to make the same decisions, as plain data:
        detector statistics, rule timers, actuator states, latest signals, the signal vector
        still in flight (deferred transport) and the log position. Save it next to the
        optimizer's ``state_dict``. Exception: a ``rollback`` actuator (``save_snapshots: true``,
        its default) keeps its snapshot tensors here, so save it with ``torch.save`` rather
        than JSON. With the deferred transport it waits for the vector in flight (call it at
        checkpoint time, not every step)."""
        gov = self.governor.state_dict()
        return {
            "version": 1,
            "policy_revision": self.policy.revision,
            "step": self._step,
            "latest": gov["latest"],
            "detectors": {k: d.state_dict() for k, d in self.detectors.items()},
            "engine": gov["engine"],
            "actuators": gov["actuators"],
            "transport": {"mode": self.transport.mode,
                          **self.transport.state_dict(self._due_in_step)},
            "log": {"seq": self.log.seq, "head": self.log.last_hash},
            "counts": gov["counts"],
            "skipped_steps": gov["skipped_steps"],
            "gated_steps": gov["gated_steps"],
            "pending_after_faults": [f.to_dict() for f in self._pending_after],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output, all or nothing.

        :raises ValueError: the state was saved under a different policy revision or transfer
            mode, its detectors / actuators / rules differ from this policy's, or a part of it
            cannot be loaded (nothing is changed: the parts loaded so far are put back).
        """
        if state.get("policy_revision") != self.policy.revision:
            raise ValueError(
                f"guard state was saved under policy revision {str(state.get('policy_revision'))[:12]}, "
                f"this guard runs revision {self.policy.revision[:12]} ({self.policy.source}); "
                "resume with the same policy file")
        if set(state["detectors"]) != set(self.detectors):
            raise ValueError(f"guard state has detectors {sorted(state['detectors'])}, "
                             f"policy has {sorted(self.detectors)}")
        saved_mode = (state.get("transport") or {}).get("mode", "immediate")
        if saved_mode != self.transport.mode:
            raise ValueError(f"guard state was saved with transfer {saved_mode!r}, this guard "
                             f"uses {self.transport.mode!r}; resume with the same transfer")
        self.governor.check_state(state)
        before = self.state_dict()
        try:
            self._load_parts(state)
        except Exception as exc:  # all or nothing: put every part back as it was
            self._load_parts(before)
            raise ValueError(f"guard state could not be loaded, nothing was changed: "
                             f"{type(exc).__name__}: {exc}") from exc
        self._write({"step": self._step, "event": "resume", "rule": None,
                     "resumed_from": {"step": self._step, "log_seq": state["log"]["seq"],
                                      "log_head": state["log"]["head"]}})

    def _load_parts(self, state: Mapping[str, Any]) -> None:
        for det_id, det in self.detectors.items():
            det.load_state_dict(state["detectors"][det_id])
        self.governor.load_state_dict(state)
        self.transport.load_state_dict(state.get("transport") or {})
        self._pending_after = [Fault.from_dict(f) for f in state.get("pending_after_faults", [])]
        self._step = int(state["step"])

    def summary(self) -> dict:
        """Counts of decisions by event, rule and actuator; skipped steps (``skipped_steps``: the
        host did not take them; ``gated_steps``: the device gate undid them, as learnt so
        far)."""
        by = {"event": {}, "rule": {}, "actuator": {}}
        for key, n in self.counts.items():
            kind, _, name = key.partition(":")
            by[kind][name] = n
        return {"steps": self._step, "skipped_steps": self.skipped_steps,
                "gated_steps": self.governor.gated_steps,
                "decisions_by_event": by["event"], "decisions_by_rule": by["rule"],
                "decisions_by_actuator": by["actuator"],
                "log": {"records": self.log.seq, "head": self.log.last_hash}}

    def _close_detectors(self) -> None:
        hook = getattr(self, "_step_hook", None)
        if hook is not None:
            hook.remove()
        for det in self.detectors.values():
            try:
                det.close()
            except Exception:  # closing must not mask the run's outcome
                pass

    def _finish(self, run_end: bool = False) -> None:
        last = self.transport.drain()  # the vector still in flight: its telemetry row
        if last is not None and "skipped" in last.meta:
            _, _, device_actions = self._landed(last)
            self._write_row(last)
            if device_actions and not self._halted:  # the last step's gate, learnt at close
                self.governor.record_device(self._step, last.step, device_actions)
        if run_end:  # after the drain: its gate counts in the summary
            self._write({"step": self._step, "event": "run_end", "rule": None,
                         "summary": {k: v for k, v in self.summary().items() if k != "log"}})
        self._close_detectors()
        self._telemetry_file.close()
        self.log.close()
        self._closed = True

    def close(self) -> dict:
        """Write the ``run_end`` record, remove detector hooks, close files, and write
        ``summary.json`` (:meth:`summary`: the log's record count and head hash let
        ``lbw-policy verify`` detect records cut from the end). Idempotent.

        :return: :meth:`summary`.
        """
        if not self._closed:
            self._finish(run_end=True)
            self._write_summary()
        return self.summary()

    def _write_summary(self) -> None:
        if not self.writer:
            return
        path = self.log_dir / "summary.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.summary(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)  # whole or absent, never torn

    def __enter__(self) -> "Guard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _signer(sign_key: Any) -> Any:
    """The :class:`~lbw_policy.signing.Signer` for ``sign_key`` (``None``: the file named by
    ``LBW_POLICY_SIGN_KEY``, if set), or ``None`` for an unsigned log."""
    from lbw_policy.signing import SIGN_KEY_ENV, load_signer

    if sign_key is None:
        sign_key = os.environ.get(SIGN_KEY_ENV) or None
    return None if sign_key is None else load_signer(sign_key)


def _check_sharding(detectors: Mapping[str, Any], actuators: Mapping[str, Any], policy: Policy,
                    optimizer: Any) -> None:
    """Refuse detectors and actuators that cannot run on sharded (DTensor) parameters (FSDP2).

    :raises ValueError: naming each such plugin and why (its class's ``sharding`` text)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor: nothing can be sharded
        return
    if not any(isinstance(p, DTensor) for g in optimizer.param_groups for p in g["params"]):
        return
    refused = [f"{d!r} ({policy.detectors[d].type}): {why}" for d, det in detectors.items()
               if (why := getattr(type(det), "sharding", None))]
    refused += [f"actuator {name!r}: {why}" for name, act in actuators.items()
                if (why := getattr(type(act), "sharding", None))]
    if refused:
        raise ValueError(
            "the parameters are sharded (DTensor, e.g. FSDP2) and these plugins cannot run on "
            "shards: " + "; ".join(refused)
            + ". Remove them from the policy for this run (docs/distributed.md)")


def _not_taken() -> bool:
    """The step function of a step whose gradients hold inf/NaN (GradScaler's ``found_inf``):
    the optimizer step is not taken, and ``False`` tells the Governor so (every actuator's and
    detector's ``after_step`` then sees ``stepped=False``)."""
    return False


def _scalar(val: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``val`` as a 0-dim tensor of ``dtype`` on ``device``, for the step's one transfer; no
    copy when it already is one. :raises RuntimeError: ``val`` has more than one element."""
    if val.requires_grad:
        val = val.detach()
    if val.dim():
        val = val.reshape(())
    if val.dtype != dtype or val.device != device:
        val = val.to(device=device, dtype=dtype)
    return val


def _host_number(val: Any) -> float:
    """A detector's host value as a float. :raises TypeError: not a real number (a string
    such as ``"1e3"``, a complex number, ``None``)."""
    if not isinstance(val, (int, float)):
        if type(val).__module__ == "numpy" and hasattr(val, "dtype") and val.dtype.kind in "biuf":
            return float(val)
        raise TypeError(f"a signal value must be a 0-dim tensor or a real number, found "
                        f"{type(val).__name__} {val!r:.60}")
    return float(val)
