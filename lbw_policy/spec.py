"""Plain-data specifications shared by the policy loader and the rule engine.

Pure Python: nothing here imports torch, so the engine can be unit-tested and replayed from a
recorded telemetry file without a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

__all__ = ["Command", "RuleSpec", "DetectorSpec", "ActuatorSpec", "Decision", "OPS"]

#: Comparison operators a condition leaf may use: ``{signal, op, value}``.
OPS = (">", ">=", "<", "<=", "==", "!=")


@dataclass(frozen=True)
class Command:
    """One entry of a rule's ``then:`` list.

    ``{actuator: lr_scale, multiply: 0.5}`` is ``Command("lr_scale", "multiply", 0.5)``;
    a bare ``{actuator: skip_step}`` is ``Command("skip_step", "apply", None)``.
    """

    actuator: str
    verb: str = "apply"
    value: Any = None

    def to_dict(self) -> dict:
        return {"actuator": self.actuator, "verb": self.verb, "value": self.value}


@dataclass(frozen=True)
class RuleSpec:
    """A validated rule.

    :param name: unique rule name.
    :param when: condition tree of plain dicts: ``{"all": [...]}``, ``{"any": [...]}``,
        ``{"not": {...}}`` or a leaf ``{"signal": "loss.zscore", "op": ">", "value": 4.0}``.
    :param then: commands carried out while the rule acts.
    :param priority: higher wins when two rules command the same actuator in one step (default 0).
    :param for_: consecutive evaluations the condition must hold before the rule fires (default 1,
        i.e. it fires on the first true evaluation). Written ``for`` in YAML.
    :param keep_firing_for: evaluations the rule stays firing after its condition clears
        (hysteresis, default 0).
    :param cooldown: steps after the rule resolves during which its condition is ignored
        (default 0).
    :param index: position in the policy file (ties in priority go to the earlier rule).
    :param path: YAML path of the rule, e.g. ``rules[2]``, for error messages and audit.
    :param gate: ``"device"`` for a same-step safety gate (see the policy reference), else
        ``None``.
    """

    name: str
    when: Mapping[str, Any]
    then: tuple[Command, ...]
    priority: int = 0
    for_: int = 1
    keep_firing_for: int = 0
    cooldown: int = 0
    index: int = 0
    path: str = ""
    gate: Optional[str] = None

    def signals(self) -> list[str]:
        """Names of every signal the condition reads, in first-seen order."""
        out: list[str] = []

        def walk(node: Mapping[str, Any]) -> None:
            if "signal" in node:
                if node["signal"] not in out:
                    out.append(node["signal"])
            for key in ("all", "any"):
                for child in node.get(key, ()):
                    walk(child)
            if "not" in node:
                walk(node["not"])

        walk(self.when)
        return out


@dataclass(frozen=True)
class DetectorSpec:
    """A configured detector: ``detectors.<id>: {type, params, every}``.

    :param id: the policy's name for it; its signals are ``<id>.<signal>``.
    :param type: the registered detector plugin name.
    :param params: plugin parameters, validated by the plugin's ``params_schema``.
    :param every: run every N steps (default 1).
    """

    id: str
    type: str
    params: Mapping[str, Any] = field(default_factory=dict)
    every: int = 1


@dataclass(frozen=True)
class ActuatorSpec:
    """A configured actuator: ``actuators.<name>: {bounds...}`` (the safety envelope)."""

    name: str
    bounds: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Decision:
    """What the engine decided for one rule at one step.

    :param step: the training step (0-based count of ``Guard.step`` calls).
    :param rule: the rule's name.
    :param priority: the rule's priority.
    :param event: ``"fired"`` (became firing this step; carries commands), ``"action"`` (still
        firing and its condition true: commands again), or ``"resolved"`` (stopped firing; no
        commands).
    :param signals: every signal the rule's condition reads, with its value at this step
        (``None`` when the signal has no value yet).
    :param commands: commands to carry out this step (after conflict resolution).
    :param overridden: ``[(command, winning_rule_name)]``: commands dropped because a rule of
        higher priority (or equal priority, earlier in the file) commanded the same actuator.
    """

    step: int
    rule: str
    priority: int
    event: str
    signals: dict[str, Optional[float]]
    commands: list[Command] = field(default_factory=list)
    overridden: list[tuple[Command, str]] = field(default_factory=list)
