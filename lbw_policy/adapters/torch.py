"""The thin adapter: a :class:`Guard` governs a ``torch.optim.Optimizer`` with a policy.

One call per training step, after ``loss.backward()``::

    guard.step(loss)   # detect -> decide -> log -> actuate -> optimizer.step() or skip

1. **telemetry**: a :class:`~lbw_policy.telemetry.Telemetry` shared by the detectors
   (the global grad norm is reduced once).
2. **detect**: every detector due this step (``every:``) returns 0-dim tensors; the step's
   signals and the loss cross to the host in one transfer (one ``.tolist()`` on one stacked
   vector; the only host-device sync of the step).
3. **decide**: :class:`~lbw_policy.engine.Engine` evaluates the rules on plain floats.
4. **log**: each decision is planned by its actuators (clamped to the policy's bounds) and its
   record is flushed to ``decisions.jsonl`` *before* anything changes (write-ahead).
5. **actuate**: in ``enforce`` mode the planned actions are committed; in ``audit`` mode nothing
   changes. Actuators not held by a firing rule may recover (logged the same way).
6. ``optimizer.step()`` runs unless an actuator vetoes it (``skip_step``); then every detector's
   ``after_step(telemetry, stepped)`` runs (due or not).

Errors raised by a detector or actuator plugin are contained: an ``error`` record is written
and the policy's ``on_error`` decides (``continue``: go on without that plugin's output this
step; ``skip_step``: skip this optimizer step; ``halt``: raise :class:`TrainingHalted`).
An actuator's commit that raises leaves earlier commits of the step in place and is reported
the same way. A detector value that is not a scalar counts as the detector raising (none of its
signals is used that step). ``before_step`` / ``after_step`` that raise are contained too, and
every actuator that entered ``before_step`` is unwound by ``after_step`` even when another one
raises, so no param-group change (``lr_scale``) is left half-undone, halted or not.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from lbw_policy.base import Action
from lbw_policy.decision_log import DecisionLog, sanitize
from lbw_policy.engine import Engine
from lbw_policy.errors import ActuatorError, PolicyError, TrainingHalted
from lbw_policy.policy import Policy, load_policy
from lbw_policy.telemetry import Telemetry

__all__ = ["Guard", "StepResult"]


@dataclass
class StepResult:
    """What :meth:`Guard.step` did.

    :param step: the step index (0-based).
    :param loss: the loss as a float (from the step's single host transfer).
    :param skipped: ``True`` when ``optimizer.step()`` was not called.
    :param lr: effective learning rate of the first param group this step (after ``lr_scale``).
    :param decisions: the records written this step (full decision-log records).
    :param signals: every signal's latest value, ``{"<detector_id>.<signal>": float}``.
    """

    step: int
    loss: float
    skipped: bool
    lr: float
    decisions: list = field(default_factory=list)
    signals: dict = field(default_factory=dict)


class Guard:
    """Apply a policy to an optimizer, step by step.

    :param optimizer: any ``torch.optim.Optimizer`` (AdamW, Adam, SGD, ...).
    :param policy: a :class:`~lbw_policy.policy.Policy`, a path to a YAML file, or the name of a
        built-in policy (``"default"``, ``"audit-only"``).
    :param model: the model (detectors that inspect weights or attach hooks need it).
    :param log_dir: run directory for ``decisions.jsonl``, ``telemetry.jsonl`` and
        ``policy.yaml``; created if missing; an existing decision log is continued (resume).
        Default ``runs/<run_id>``.
    :param run_id: label written into every record (default: ``log_dir``'s name, else random).
    :param rank: distributed rank label (default 0).
    :param registry: plugin registry (default: :func:`lbw_policy.plugins.get_registry`).
    :param fsync: ``os.fsync`` the decision log after every record (default ``False``: flushed
        to the OS, which survives a killed process but not a power loss).
    :raises PolicyError: the policy is invalid (nothing was applied).
    :raises ActuatorError: an actuator cannot act on this optimizer.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, policy: Union[Policy, str, os.PathLike] = "default",
                 model: Optional[torch.nn.Module] = None, log_dir: Union[str, os.PathLike, None] = None,
                 run_id: Optional[str] = None, rank: int = 0, registry=None, fsync: bool = False,
                 labels: Optional[Mapping[str, Any]] = None) -> None:
        if registry is None:
            from lbw_policy.plugins import get_registry

            registry = get_registry()
        if not isinstance(policy, Policy):
            from lbw_policy.policy import resolve_policy_path

            policy = load_policy(resolve_policy_path(policy), registry=registry)
        self.policy = policy
        self.optimizer = optimizer
        self.model = model
        self.enforce = policy.mode == "enforce"
        self.registry = registry

        # Build every plugin before touching files or the optimizer: a bad policy never
        # half-applies.
        self.detectors = {}
        self._plugin_versions = {}
        for det_id, spec in policy.detectors.items():
            reg = registry.detectors[spec.type]
            self.detectors[det_id] = reg.cls(**dict(spec.params))
            self.detectors[det_id].every = spec.every
            self._plugin_versions[f"detector:{spec.type}"] = {"plugin": reg.plugin, "version": reg.version}
        self.actuators = {}
        for name, spec in policy.actuators.items():
            reg = registry.actuators[name]
            self.actuators[name] = reg.cls(**dict(spec.bounds))
            self._plugin_versions[f"actuator:{name}"] = {"plugin": reg.plugin, "version": reg.version}
        for name, actuator in self.actuators.items():
            actuator.bind(model=model, guard=self)  # rollback needs the model, halt the log_dir
            actuator.attach(optimizer)  # ActuatorError if it cannot act on this optimizer
        for det in self.detectors.values():
            det.setup(model, optimizer)
        self.engine = Engine(policy.rules)

        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.run_id = run_id or (self.log_dir.name if self.log_dir else uuid.uuid4().hex[:12])
        if self.log_dir is None:
            self.log_dir = Path("runs") / self.run_id
        self.log_dir.mkdir(parents=True, exist_ok=True)
        from lbw_policy import __version__

        run_labels = {"run_id": self.run_id, "rank": rank, "lbw_policy": __version__,
                      "torch": torch.__version__, "python": platform.python_version(),
                      "plugins": self._plugin_versions}
        run_labels.update(labels or {})
        self.log = DecisionLog(self.log_dir / "decisions.jsonl", run=run_labels, fsync=fsync)
        (self.log_dir / "policy.yaml").write_text(policy.text, encoding="utf-8")
        self._telemetry_file = _open_telemetry(self.log_dir / "telemetry.jsonl")
        self._step_telemetry: Optional[dict] = None  # the step in progress's telemetry line

        self._step = 0
        self._latest: dict = {}
        self._written: list = []          # records of the step in progress (StepResult.decisions)
        self._halted = False
        self._closed = False
        self.counts = Counter()           # decisions by "event", "rule:<name>", "actuator:<name>"
        self.skipped_steps = 0
        self._write({"step": 0, "event": "run_start", "mode": policy.mode,
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

    def _policy_label(self) -> dict:
        return {"name": self.policy.name, "revision": self.policy.revision,
                "owner": self.policy.owner, "description": self.policy.description}

    def _write(self, record: dict) -> dict:
        record = {"policy": self._policy_label(), "mode": self.policy.mode, **record}
        return self.log.append(record)

    def _error(self, step: int, where: str, exc: BaseException) -> dict:
        self.counts["event:error"] += 1
        record = self._write({"step": step, "event": "error", "rule": None, "where": where,
                              "error": f"{type(exc).__name__}: {exc}", "on_error": self.policy.on_error})
        self._written.append(record)  # reported in StepResult.decisions with the step's others
        return record

    def _halt(self, step: int, rule: Optional[str], signals: dict, reason: str,
              checkpoint: Optional[str] = None) -> None:
        message = f"training halted at step {step} by {reason}"
        if signals:
            message += "; signals: " + ", ".join(f"{k}={_fmt(v)}" for k, v in signals.items())
        record = {"step": step, "event": "halt", "rule": rule, "signals": signals, "message": message}
        if checkpoint is not None:
            record["checkpoint"] = checkpoint  # written by the halting action (halt, rollback)
        self._write(record)
        self._halted = True
        if self._step_telemetry is not None:  # the halted step's signals, for replay
            self._write_telemetry(halted=True)
        self._finish(None)
        raise TrainingHalted(message, rule=rule or "", step=step, signals=signals)

    def _write_telemetry(self, **extra: Any) -> None:
        self._telemetry_file.write(_telemetry_line(dict(self._step_telemetry, **extra)) + "\n")
        self._step_telemetry = None

    # ------------------------------------------------------------------ the step
    def _detect(self, tel: Telemetry, step: int) -> tuple[float, dict, bool, set]:
        """Run due detectors; return (loss, {signal: float}, skip_requested_by_error,
        {id of each detector that raised})."""
        failed: set = set()
        names: list[str] = []
        on_host: dict = {}
        device = tel.loss.device
        dtype = torch.float64 if device.type != "mps" else torch.float32
        flat: list = [tel.loss.detach().reshape(()).to(device=device, dtype=dtype)]
        skip = False
        for det_id, det in self.detectors.items():
            spec = self.policy.detectors[det_id]
            if step % spec.every:
                continue
            try:
                # Each value becomes a 0-dim tensor here, inside the try: a detector returning
                # something that is not a scalar is contained like one that raises, and a
                # failed detector contributes no signal at all (no partial output).
                # Python numbers (host values such as lr_jump's) stay on the host.
                mine = [(f"{det_id}.{sig}", _scalar(val, device, dtype)
                         if isinstance(val, torch.Tensor) else float(val))
                        for sig, val in det.compute(tel).items()]
            except Exception as exc:  # a plugin that raises is contained, never silent
                failed.add(det_id)
                self._error(step, f"detector {det_id} ({spec.type})", exc)
                skip |= self._on_error(step, f"detector {det_id!r} raised {type(exc).__name__}: {exc}")
                continue
            for name, value in mine:
                if isinstance(value, float):
                    on_host[name] = value
                else:
                    names.append(name)
                    flat.append(value)
        # One host transfer for the loss and every tensor signal of the step.
        host = torch.stack(flat).cpu().tolist()  # host-device sync point (one per step)
        values = dict(zip(names, host[1:]))
        values.update(on_host)
        return host[0], values, skip, failed

    def _on_error(self, step: int, reason: str) -> bool:
        """Apply on_error; return True when the step must be skipped."""
        if self.policy.on_error == "halt" and self.enforce:
            self._halt(step, None, {}, f"on_error=halt after {reason}")
        return self.policy.on_error == "skip_step" and self.enforce

    def step(self, loss: torch.Tensor) -> StepResult:
        """Govern one optimizer step. Call after ``loss.backward()``, instead of
        ``optimizer.step()``.

        :param loss: the step's loss, a scalar tensor (any device) or a float.
        :return: :class:`StepResult`.
        :raises TrainingHalted: a ``halt`` command fired (enforce mode); its record is on disk.
        :raises RuntimeError: the guard was closed or has halted.
        """
        if self._closed or self._halted:
            raise RuntimeError("Guard has halted training; build a new one to continue" if self._halted
                               else "Guard is closed")
        step = self._step
        written: list = []
        self._written = written
        tel = Telemetry(step, loss, self.optimizer, self.model)
        self._step_telemetry = None
        loss_value, values, skip, failed = self._detect(tel, step)
        # Until the optimizer step is taken, the step counts as skipped (a halt skips it).
        self._step_telemetry = {"step": step, "loss": loss_value,
                                "lr": float(self.optimizer.param_groups[0]["lr"]),
                                "skipped": True, "signals": values}
        if failed:  # no stale values from a detector that raised: its signals are absent
            self._latest = {k: v for k, v in self._latest.items() if k.split(".", 1)[0] not in failed}
        self._latest.update(values)
        # Actuators see the step's telemetry (shared grad norm), then publish their own state
        # as signals "<actuator>.<signal>" (host values: no sync) for escalation rules. They are
        # read by the rules (and logged with a decision) but not kept in `_latest`.
        readable = dict(self._latest)
        for name, actuator in self.actuators.items():
            try:
                actuator.observe(tel)
                for sig, val in actuator.signal_values().items():
                    readable[f"{name}.{sig}"] = val
            except Exception as exc:  # contained like a detector's error; its signals are absent
                self._error(step, f"actuator {name} signals", exc)
                skip |= self._on_error(step, f"actuator {name!r} signals raised {type(exc).__name__}: {exc}")

        decisions = self.engine.evaluate(step, readable)
        commanded = set()
        halt_by: Optional[tuple] = None
        for d in decisions:
            actions: list[Action] = []
            planned: list = []  # (action, command) pairs; a command whose plan raised has none
            for cmd in d.commands:
                commanded.add(cmd.actuator)
                try:
                    act = self.actuators[cmd.actuator].plan(cmd.verb, cmd.value, step)
                except Exception as exc:
                    self._error(step, f"actuator {cmd.actuator} plan", exc)
                    skip |= self._on_error(step, f"actuator {cmd.actuator!r} raised {type(exc).__name__}: {exc}")
                    continue
                actions.append(act)
                planned.append((act, cmd))
            record = {"step": step, "event": d.event, "rule": d.rule, "priority": d.priority,
                      "signals": d.signals, "enforced": self.enforce,
                      "actions": [dict(_action_dict(a), command={"verb": c.verb, "value": c.value})
                                  for a, c in planned],
                      "overridden": [{"actuator": c.actuator, "verb": c.verb, "value": c.value,
                                      "overridden_by": winner} for c, winner in d.overridden]}
            written.append(self._write(record))  # write-ahead: on disk before anything changes
            self.counts[f"event:{d.event}"] += 1
            self.counts[f"rule:{d.rule}"] += 1
            for a in actions:
                self.counts[f"actuator:{a.actuator}"] += 1
            if self.enforce:
                for a in actions:
                    committed = False
                    try:
                        self.actuators[a.actuator].commit(a)
                        committed = True
                    except Exception as exc:
                        self._error(step, f"actuator {a.actuator} commit", exc)
                        skip |= self._on_error(step, f"actuator {a.actuator!r} raised {type(exc).__name__}: {exc}")
                    # An action marked extra["halt"] (halt; rollback past its anti-thrash
                    # budget) stops training, even if its commit (the checkpoint) failed.
                    if (a.extra.get("halt") or (a.actuator == "halt" and a.applied)) and halt_by is None:
                        halt_by = (d.rule, d.signals, a.extra.get("checkpoint") if committed else None)
        if halt_by is not None:
            self._halt(step, halt_by[0], halt_by[1], f"rule {halt_by[0]!r}", checkpoint=halt_by[2])

        # Recovery of actuators no firing rule holds.
        held = self.engine.held_actuators() | commanded
        for name, actuator in self.actuators.items():
            if name in held:
                continue
            try:
                act = actuator.recover(step)
            except Exception as exc:
                self._error(step, f"actuator {name} recover", exc)
                skip |= self._on_error(step, f"actuator {name!r} recover raised {type(exc).__name__}: {exc}")
                continue
            if act is None:
                continue
            written.append(self._write({"step": step, "event": "recover", "rule": None,
                                        "enforced": self.enforce, "actions": [_action_dict(act)]}))
            self.counts["event:recover"] += 1
            if self.enforce:
                try:
                    actuator.commit(act)
                except Exception as exc:
                    self._error(step, f"actuator {name} recover commit", exc)
                    skip |= self._on_error(step, f"actuator {name!r} recover commit raised {type(exc).__name__}: {exc}")

        # The optimizer step, or the skip. Every actuator sees before/after, even on a veto.
        # A before_step that raises is contained (on_error: continue ignores it, skip_step
        # skips, halt halts after the unwinding below); every entered actuator is unwound,
        # even when another's after_step raises, so no param-group change is left half-undone.
        proceed = not skip
        entered = []
        unwind_errors: list = []
        try:
            if self.enforce:
                for name, actuator in self.actuators.items():
                    entered.append((name, actuator))
                    try:
                        ok = actuator.before_step(self.optimizer)
                    except Exception as exc:
                        self._error(step, f"actuator {name} before_step", exc)
                        ok = not self._on_error(step, f"actuator {name!r} before_step raised {type(exc).__name__}: {exc}")
                    proceed = ok and proceed
            lr = float(self.optimizer.param_groups[0]["lr"])
            if proceed:
                self.optimizer.step()
        finally:
            for name, actuator in reversed(entered):  # unwind param-group changes in reverse order
                try:
                    actuator.after_step(self.optimizer, proceed)
                except Exception as exc:
                    unwind_errors.append((name, exc))
        for name, exc in unwind_errors:
            self._error(step, f"actuator {name} after_step", exc)
            self._on_error(step, f"actuator {name!r} after_step raised {type(exc).__name__}: {exc}")
        self._step_telemetry.update(lr=lr, skipped=not proceed)
        if not proceed:
            self.skipped_steps += 1
        for det_id, det in self.detectors.items():  # detectors that measure what the step changed
            try:
                det.after_step(tel, proceed)
            except Exception as exc:
                self._error(step, f"detector {det_id} after_step", exc)
                self._on_error(step, f"detector {det_id!r} after_step raised {type(exc).__name__}: {exc}")

        result = StepResult(step=step, loss=loss_value, skipped=not proceed, lr=lr,
                            decisions=written, signals=dict(self._latest))
        self._write_telemetry()
        self._step += 1
        return result

    # ------------------------------------------------------------------ state and teardown
    def state_dict(self) -> dict:
        """Everything needed for a resumed run to make the same decisions, as plain data:
        detector statistics, rule timers, actuator states, latest signals and the log
        position. Save it next to the optimizer's ``state_dict``. Exception: a ``rollback``
        actuator (``save_snapshots: true``, its default) keeps its snapshot tensors here, so
        save it with ``torch.save`` rather than JSON."""
        return {
            "version": 1,
            "policy_revision": self.policy.revision,
            "step": self._step,
            "latest": dict(self._latest),
            "detectors": {k: d.state_dict() for k, d in self.detectors.items()},
            "engine": self.engine.state_dict(),
            "actuators": {k: a.state_dict() for k, a in self.actuators.items()},
            "log": {"seq": self.log.seq, "head": self.log.last_hash},
            "counts": dict(self.counts),
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output.

        :raises ValueError: the state was saved under a different policy revision, or its
            detectors / actuators differ from this policy's.
        """
        if state.get("policy_revision") != self.policy.revision:
            raise ValueError(
                f"guard state was saved under policy revision {str(state.get('policy_revision'))[:12]}, "
                f"this guard runs revision {self.policy.revision[:12]} ({self.policy.source}); "
                "resume with the same policy file")
        for kind, own in (("detectors", self.detectors), ("actuators", self.actuators)):
            if set(state[kind]) != set(own):
                raise ValueError(f"guard state has {kind} {sorted(state[kind])}, policy has {sorted(own)}")
        for det_id, det in self.detectors.items():
            det.load_state_dict(state["detectors"][det_id])
        self.engine.load_state_dict(state["engine"])
        for name, act in self.actuators.items():
            act.load_state_dict(state["actuators"][name])
        self._latest = {k: (float(v) if v is not None else None) for k, v in state["latest"].items()}
        self._step = int(state["step"])
        self.counts = Counter(state.get("counts", {}))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self._write({"step": self._step, "event": "resume", "rule": None,
                     "resumed_from": {"step": self._step, "log_seq": state["log"]["seq"],
                                      "log_head": state["log"]["head"]}})

    def summary(self) -> dict:
        """Counts of decisions by event, rule and actuator, and skipped steps."""
        by = {"event": {}, "rule": {}, "actuator": {}}
        for key, n in self.counts.items():
            kind, _, name = key.partition(":")
            by[kind][name] = n
        return {"steps": self._step, "skipped_steps": self.skipped_steps,
                "decisions_by_event": by["event"], "decisions_by_rule": by["rule"],
                "decisions_by_actuator": by["actuator"],
                "log": {"records": self.log.seq, "head": self.log.last_hash}}

    def _finish(self, end_record: Optional[dict]) -> None:
        if end_record is not None:
            self._write(end_record)
        for det in self.detectors.values():
            try:
                det.close()
            except Exception:  # closing must not mask the run's outcome
                pass
        self._telemetry_file.close()
        self.log.close()
        self._closed = True

    def close(self) -> dict:
        """Write the ``run_end`` record, remove detector hooks, close files. Idempotent.

        :return: :meth:`summary`.
        """
        if not self._closed:
            self._finish({"step": self._step, "event": "run_end", "rule": None,
                          "summary": {k: v for k, v in self.summary().items() if k != "log"}})
        return self.summary()

    def __enter__(self) -> "Guard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_telemetry(path: Path):
    """Open ``telemetry.jsonl`` for appending, line-buffered (a killed run loses at most the
    line being written); a torn last line left by a crash is cut off first, so the next line
    does not glue onto it."""
    if path.exists():
        with open(path, "r+b") as fh:
            pos = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, pos - 1))
            if pos and fh.read(1) != b"\n":
                while pos > 0:  # find the last newline, reading backwards in chunks
                    start = max(0, pos - 65536)
                    fh.seek(start)
                    cut = fh.read(pos - start).rfind(b"\n")
                    if cut >= 0:
                        fh.truncate(start + cut + 1)
                        break
                    pos = start
                else:
                    fh.truncate(0)
    return open(path, "a", encoding="utf-8", buffering=1)


def _action_dict(action: Action) -> dict:
    d = action.to_dict()
    d.pop("step", None)
    return d


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


def _telemetry_line(record: dict) -> str:
    """One ``telemetry.jsonl`` line: ``record`` through :func:`sanitize`, or straight to JSON
    when every number in it is already a finite float (the usual step, and the same text)."""
    loss, lr = record["loss"], record["lr"]
    if (type(loss) is float and loss - loss == 0.0 and type(lr) is float and lr - lr == 0.0
            and all(type(v) is float and v - v == 0.0 for v in record["signals"].values())):
        return json.dumps(record, separators=(",", ":"))
    return json.dumps(sanitize(record), separators=(",", ":"))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
