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

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Mapping, Optional

__all__ = ["Detector", "Actuator", "Action"]


class Detector:
    """A source of signals, computed once per due step from the step's telemetry.

    Subclasses set the class attributes and implement :meth:`compute`.

    :cvar name: the type name a policy uses (``detectors.<id>.type``), e.g. ``"loss_spike"``.
    :cvar signals: names of the signals it emits; the policy sees them as ``<id>.<signal>``.
    :cvar params_schema: JSON Schema of ``params`` (an object schema); checked at policy load.
    :cvar version: plugin version written to the decision log (defaults to the package's).

    Lifecycle: ``__init__(**params)`` (raise ``ValueError`` for params the schema cannot express,
    such as ``min > max``) -> :meth:`setup` once the model and optimizer are known -> :meth:`compute`
    on every due step -> :meth:`close`.
    """

    name: ClassVar[str] = ""
    signals: ClassVar[tuple[str, ...]] = ()
    params_schema: ClassVar[dict] = {"type": "object", "properties": {}, "additionalProperties": False}
    version: ClassVar[Optional[str]] = None

    def __init__(self, **params: Any) -> None:
        self.params = dict(params)

    @classmethod
    def signals_for(cls, params: Mapping[str, Any]) -> tuple[str, ...]:
        """Signals emitted with these params (default: :attr:`signals`)."""
        return tuple(cls.signals)

    @classmethod
    def validate_params(cls, params: Mapping[str, Any]) -> None:
        """Cross-field checks beyond the JSON Schema. Raise ``ValueError`` naming the field."""

    def setup(self, model: Any, optimizer: Any) -> None:
        """Called once when the guard is built; may attach model hooks (keep the handles)."""

    def compute(self, telemetry: Any) -> Mapping[str, Any]:
        """Return ``{signal_name: value}`` for this step.

        Values are 0-dim tensors (preferred: they stay on the device and cross to the host with
        every other signal of the step in one transfer) or Python numbers. A signal left out of
        the mapping keeps its previous value.
        """
        raise NotImplementedError

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

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        if d["note"] is None:
            d.pop("note")
        d.update(extra)
        return d


class Actuator:
    """A bounded control on the optimizer.

    :cvar name: the name a policy configures (``actuators.<name>``) and rules command.
    :cvar bounds_schema: JSON Schema of the policy's ``actuators.<name>`` mapping.
    :cvar commands: ``{verb: JSON Schema of the value}``; a bare ``{actuator: NAME}`` is the verb
        ``"apply"`` with value ``None`` (declare ``"apply": {"type": "null"}`` to accept it).
    :cvar version: plugin version written to the decision log.

    Every change goes through :meth:`plan` (pure: computes the clamped change) and then
    :meth:`commit` (applies exactly what was planned), so the guard can write the decision record
    *before* anything changes. :meth:`before_step` / :meth:`after_step` run around
    ``optimizer.step()``; :meth:`before_step` returning ``False`` vetoes the step.
    """

    name: ClassVar[str] = ""
    bounds_schema: ClassVar[dict] = {"type": "object", "properties": {}, "additionalProperties": False}
    commands: ClassVar[dict] = {}
    version: ClassVar[Optional[str]] = None

    def __init__(self, **bounds: Any) -> None:
        self.bounds = dict(bounds)

    @classmethod
    def validate_bounds(cls, bounds: Mapping[str, Any]) -> None:
        """Cross-field checks beyond the JSON Schema (e.g. ``min <= max``); raise ``ValueError``."""

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

    def before_step(self, optimizer: Any) -> bool:
        """Called right before ``optimizer.step()``; return ``False`` to skip the step."""
        return True

    def after_step(self, optimizer: Any, stepped: bool) -> None:
        """Called right after ``optimizer.step()`` (or the skip)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass
