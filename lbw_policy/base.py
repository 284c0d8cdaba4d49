"""Base classes for detector and actuator plugins: the contract every plugin implements.

A plugin package registers subclasses of :class:`Detector` and :class:`Actuator` through the
``register_detectors(register)`` / ``register_actuators(register)`` hooks
(:mod:`lbw_policy.hookspecs`). The built-ins in ``lbw_policy.detectors`` and
``lbw_policy.actuators`` use exactly the same contract.

This module imports no torch at import time: the policy loader uses the class attributes
(``params_schema``, ``signals_for``, ``bounds_schema``, ``commands``) to validate a policy without
touching a model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Optional

__all__ = ["Detector", "Actuator", "Action", "ActuatorContext", "API_VERSION", "REDUCTIONS"]

#: The plugin contract this package implements. A plugin class declares the version it was
#: written against as ``api_version``; the registry refuses any other (``PluginError``).
#: Version 2: ``Action.step`` / ``halt`` / ``applied_step`` fields; actuators get an
#: :class:`ActuatorContext` in :meth:`Actuator.bind` and the step in ``before_step`` /
#: ``after_step``; signals declare their cross-rank reduction.
API_VERSION = 2

#: How a signal reduces across ranks in a distributed run (the distributed adapter applies it
#: to the step's gathered signal vector): ``max``, ``min``, ``sum``, ``mean``, ``any`` (true when
#: any rank's value is nonzero), ``same`` (every rank holds the same value; rank 0's is used).
REDUCTIONS = ("max", "min", "sum", "mean", "any", "same")


class Detector:
    """A source of signals, computed once per due step from the step's telemetry.

    Subclasses set the class attributes and implement :meth:`compute`.

    :cvar name: the type name a policy uses (``detectors.<id>.type``), e.g. ``"loss_spike"``.
    :cvar signals: names of the signals it emits; the policy sees them as ``<id>.<signal>``.
    :cvar params_schema: JSON Schema of ``params`` (an object schema); checked at policy load.
    :cvar version: plugin version written to the decision log (defaults to the package's).
    :cvar api_version: the plugin contract the class implements (:data:`API_VERSION`).
    :cvar reductions: ``{signal: reduction}``, how each signal reduces across ranks (one of
        :data:`REDUCTIONS`); a signal left out reduces by :attr:`default_reduction`
        (``"mean"`` unless the class says otherwise). See :meth:`reduction_for`.
    :cvar optional_signals: ``{signal: "param: value"}`` for signals emitted only with some
        params (see :meth:`signals_for`); a policy that reads one without them is told which
        param turns it on (default: none).
    :cvar sharding: ``None`` (default) when the detector works on sharded (DTensor, FSDP2)
        parameters, else why it cannot (e.g. it needs whole weight matrices): a guard over
        sharded parameters refuses it at construction with a ``ValueError`` carrying this text.
    :ivar every: the policy's cadence for this detector, given to :meth:`setup` (1 before it).

    Lifecycle: ``__init__(**params)`` (raise ``ValueError`` for params the schema cannot express,
    such as ``min > max``) -> :meth:`setup` once the model and optimizer are known -> :meth:`compute`
    on every due step, :meth:`after_step` after every optimizer step (or skip) -> :meth:`close`.
    """

    name: ClassVar[str] = ""
    signals: ClassVar[tuple[str, ...]] = ()
    params_schema: ClassVar[dict] = {"type": "object", "properties": {}, "additionalProperties": False}
    version: ClassVar[Optional[str]] = None
    api_version: ClassVar[int] = API_VERSION
    reductions: ClassVar[Mapping[str, str]] = {}
    optional_signals: ClassVar[Mapping[str, str]] = {}
    default_reduction: ClassVar[str] = "mean"
    sharding: ClassVar[Optional[str]] = None
    every: int = 1

    def __init__(self, **params: Any) -> None:
        self.params = dict(params)

    @classmethod
    def reduction_for(cls, signal: str) -> str:
        """How ``signal`` reduces across ranks: :attr:`reductions`, else
        :attr:`default_reduction`."""
        return cls.reductions.get(signal, cls.default_reduction)

    @classmethod
    def signals_for(cls, params: Mapping[str, Any]) -> tuple[str, ...]:
        """Signals emitted with these params (default: :attr:`signals`)."""
        return tuple(cls.signals)

    @classmethod
    def validate_params(cls, params: Mapping[str, Any]) -> None:
        """Cross-field checks beyond the JSON Schema. Raise ``ValueError`` naming the field."""

    def setup(self, model: Any, optimizer: Any, every: int = 1) -> None:
        """Called once when the guard is built; may attach model hooks (keep the handles).

        :param every: the policy's cadence (``detectors.<id>.every``): :meth:`compute` runs on
            steps ``0, every, 2 * every, ...``. Kept as ``self.every``; a detector with forward
            hooks uses it, with ``telemetry.step`` in :meth:`after_step`, to capture only the
            forwards of due steps."""
        self.every = int(every)

    def compute(self, telemetry: Any) -> Mapping[str, Any]:
        """Return ``{signal_name: value}`` for this step.

        Values are 0-dim tensors (preferred: they stay on the device and cross to the host with
        every other signal of the step in one transfer) or Python numbers (values already on the
        host, e.g. a param group's learning rate: they stay there, outside the transfer). A
        signal left out of the mapping keeps its previous value.
        """
        raise NotImplementedError

    def after_step(self, telemetry: Any, stepped: bool) -> None:
        """Optional: called on every step, due or not, right after ``optimizer.step()`` (or the
        skip), with the step's telemetry, so a detector can measure what the step changed (e.g.
        ``update_ratio`` compares the weights with a copy taken in :meth:`compute`). It returns
        nothing; values it measures are emitted by a later :meth:`compute`. Keep it cheap on
        steps where the detector has nothing to do.

        :param telemetry: the same :class:`~lbw_policy.telemetry.Telemetry` :meth:`compute` saw.
        :param stepped: ``False`` when the optimizer step was skipped (the weights did not move).
        """

    def state_dict(self) -> dict:
        """Statistics needed to resume, as plain data (no tensors)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def close(self) -> None:
        """Remove model hooks and release resources."""


@dataclass
class Action:
    """A planned (and, once committed, applied) change by one actuator.

    :param actuator: actuator name.
    :param verb: the command verb (``"multiply"``, ``"set"``, ``"apply"``, ``"recover"``, ...).
    :param requested: the value the rule asked for (``None`` for bare commands).
    :param applied: the value actually taken after clamping to the policy's bounds
        (``None`` when nothing was applied).
    :param clamped: ``True`` when the bounds changed or refused the request.
    :param before: the actuator's controlled value before the action.
    :param after: the controlled value after the action.
    :param note: free text, e.g. why a request was refused.
    :param step: the step at which the action was planned (``plan``'s ``step``; the record
        carries it, so it is not repeated in the logged action).
    :param halt: ``True`` asks the Governor to stop training once the action is committed
        (enforce mode): the ``halt`` actuator sets it, and so does ``rollback`` when its
        anti-thrash budget is spent; ``extra["checkpoint"]`` names the checkpoint file such an
        action saved, and the ``halt`` record repeats it. Logged as ``"halt": true``.
    :param applied_step: the step the action took effect at when that is not the record's step
        (a device gate's skip, recorded one step later). Logged when set.
    :param extra: more fields for the decision record (merged into the logged action). For
        plugins written against API version 1, ``extra["step"]`` and ``extra["halt"]`` are
        moved into ``step`` and ``halt``.
    """

    actuator: str
    verb: str
    requested: Any = None
    applied: Any = None
    clamped: bool = False
    before: Any = None
    after: Any = None
    note: Optional[str] = None
    extra: dict = field(default_factory=dict)
    step: Optional[int] = None
    halt: bool = False
    applied_step: Optional[int] = None

    def __post_init__(self) -> None:
        if "step" in self.extra:  # API version 1: the step travelled in extra
            step = self.extra.pop("step")
            if self.step is None:
                self.step = step
        if "halt" in self.extra:
            self.halt = bool(self.extra.pop("halt")) or self.halt

    def to_dict(self) -> dict:
        """The action as logged: every field but ``step`` (the record has it) and ``extra``
        (merged in); ``note`` only when set, ``halt`` only when true, ``applied_step`` only when
        set."""
        d = {"actuator": self.actuator, "verb": self.verb, "requested": self.requested,
             "applied": self.applied, "clamped": self.clamped, "before": self.before,
             "after": self.after}
        if self.note is not None:
            d["note"] = self.note
        d.update(_plain(self.extra))
        if self.halt:
            d["halt"] = True
        if self.applied_step is not None:
            d["applied_step"] = self.applied_step
        return d


def _plain(extra: dict) -> dict:
    return copy.deepcopy(extra)  # the record must not alias the actuator's live state


@dataclass
class ActuatorContext:
    """What an actuator may use of the run, handed to :meth:`Actuator.bind` (instead of the
    guard itself: no cycle between actuators and the guard's state).

    :param model: the model, or ``None`` when the guard was built without one.
    :param log_dir: the run directory, or ``None`` (replay, policy tests, unit tests).
    :param save_checkpoint: ``save_checkpoint(path, step=..., actuator=...)`` saves model,
        optimizer and guard state atomically (the format of ``actuators/_checkpoint.py``), or
        ``None`` where no checkpoint can be written.
    :param rank: this process's rank (0 outside distributed runs).
    :param world_size: number of ranks (1 outside distributed runs).
    """

    model: Any = None
    log_dir: Any = None
    save_checkpoint: Optional[Callable[..., None]] = None
    rank: int = 0
    world_size: int = 1


class Actuator:
    """A bounded control on the optimizer.

    :cvar name: the name a policy configures (``actuators.<name>``) and rules command.
    :cvar bounds_schema: JSON Schema of the policy's ``actuators.<name>`` mapping.
    :cvar commands: ``{verb: JSON Schema of the value}``; a bare ``{actuator: NAME}`` is the verb
        ``"apply"`` with value ``None`` (declare ``"apply": {"type": "null"}`` to accept it).
    :cvar version: plugin version written to the decision log.
    :cvar signals: names of the signals the actuator publishes about its own state (e.g.
        ``"exhausted"``); rules read them as ``<actuator name>.<signal>`` (``skip_step.exhausted``),
        which is how a policy writes escalation declaratively. See :meth:`signals_for`.
    :cvar api_version: the plugin contract the class implements (:data:`API_VERSION`).
    :cvar same_step: ``True`` when the action only makes sense on the step whose signals asked
        for it (``skip_step``: a bad batch's update); under deferred transfer such commands need
        a ``gate: device`` rule to act in time. Default ``False``.
    :cvar sharding: ``None`` (default) when the actuator works on sharded (DTensor, FSDP2)
        parameters, else why it cannot (``grad_normalize``: per-tensor norms): a guard over
        sharded parameters refuses it at construction with a ``ValueError`` carrying this text,
        before any actuator attaches.

    An actuator that rescales the gradients in :meth:`before_step` keeps the global L2 norm it
    leaves in the step's telemetry (``telemetry.grad_norm_after``, a 0-dim tensor on the
    device; take the telemetry in :meth:`observe`), so a later ``grad_clip`` and the guard's
    ``clip_grad_norm`` clip from the right norm without reducing again.

    Every change goes through :meth:`plan` (pure: computes the clamped change) and then
    :meth:`commit` (applies exactly what was planned), so the guard can write the decision record
    *before* anything changes. :meth:`before_step` / :meth:`after_step` run around
    ``optimizer.step()``; :meth:`before_step` returning ``False`` vetoes the step. The guard calls
    :meth:`after_step` in the reverse order of :meth:`before_step`, so actuators that change a
    param-group value around the step (``lr_scale``, ``momentum_reset``'s warm-up) unwind in turn.

    Lifecycle: ``__init__(**bounds)`` -> :meth:`bind` (an :class:`ActuatorContext`) -> :meth:`attach`
    (the optimizer; raise :class:`~lbw_policy.errors.ActuatorError` here) -> per step:
    :meth:`observe`, :meth:`signal_values`, :meth:`plan` / :meth:`commit` or :meth:`recover`,
    :meth:`before_step`, :meth:`after_step`.
    """

    name: ClassVar[str] = ""
    bounds_schema: ClassVar[dict] = {"type": "object", "properties": {}, "additionalProperties": False}
    commands: ClassVar[dict] = {}
    version: ClassVar[Optional[str]] = None
    signals: ClassVar[tuple[str, ...]] = ()
    api_version: ClassVar[int] = API_VERSION
    same_step: ClassVar[bool] = False
    sharding: ClassVar[Optional[str]] = None

    def __init__(self, **bounds: Any) -> None:
        self.bounds = dict(bounds)

    @classmethod
    def validate_bounds(cls, bounds: Mapping[str, Any]) -> None:
        """Cross-field checks beyond the JSON Schema (e.g. ``min <= max``); raise ``ValueError``."""

    @classmethod
    def signals_for(cls, bounds: Mapping[str, Any]) -> tuple[str, ...]:
        """Signals published with these bounds (default: :attr:`signals`). The policy loader
        accepts ``<actuator name>.<signal>`` in rules for every configured actuator."""
        return tuple(cls.signals)

    def signal_values(self) -> Mapping[str, Any]:
        """``{signal: value}`` of :meth:`signals_for`'s signals, read by the guard at the start
        of every step, before the rules are evaluated (so a rule sees the state the previous
        steps left). Values are plain numbers or bools from host state: no device sync."""
        return {}

    def bind(self, context: ActuatorContext) -> None:
        """Called before :meth:`attach` with the run's :class:`ActuatorContext`. The default
        keeps it as ``self.context`` and its model as ``self.model``."""
        self.context = context
        self.model = context.model

    def observe(self, telemetry: Any) -> None:
        """Called every step after the detectors ran, before the rules are evaluated, with the
        step's :class:`~lbw_policy.telemetry.Telemetry` (its cached grad norm is shared, so an
        actuator that needs it adds no reduction). Must not sync with the device."""

    def attach(self, optimizer: Any) -> None:
        """Bind to the optimizer. Raise :class:`~lbw_policy.errors.ActuatorError` if this
        actuator cannot act on it (never ignore silently)."""
        self.optimizer = optimizer

    def plan(self, verb: str, value: Any, step: int) -> Action:
        """Compute the change a command would make, clamped to the bounds. No side effects."""
        raise NotImplementedError

    def commit(self, action: Action) -> None:
        """Apply a planned action."""
        raise NotImplementedError

    def recover(self, step: int) -> Optional[Action]:
        """Plan a recovery step toward the neutral value, or ``None``. Called each step while no
        firing rule commands this actuator."""
        return None

    def device_applied(self, action: Action) -> None:
        """Called when the host learns that the device carried out ``action`` for this
        actuator by itself one step earlier (a ``gate: device`` rule's skip; the action's
        ``applied_step``), before the rules of the current step. Default: nothing."""

    def before_step(self, optimizer: Any, step: int) -> bool:
        """Called right before ``optimizer.step()`` of step ``step``; return ``False`` to skip
        the step."""
        return True

    def after_step(self, optimizer: Any, stepped: bool, step: int) -> None:
        """Called right after ``optimizer.step()`` of step ``step`` (or the skip: ``stepped``
        is ``False`` when the optimizer step did not run)."""

    def state_dict(self) -> dict:
        """What a resumed run needs, as plain data where possible (``rollback`` keeps its
        snapshot tensors here: save the guard's state with ``torch.save``)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (after :meth:`attach`)."""
