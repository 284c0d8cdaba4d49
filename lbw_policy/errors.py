"""Exceptions raised by lbw-policy.

Every user-facing error carries enough to act on it: the file, the line, the YAML path, what was
expected and what was found. ``PolicyError`` may carry several :class:`Problem` items so one
``validate`` run reports every mistake in a file, not only the first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = [
    "Problem",
    "PolicyError",
    "PolicySyntaxError",
    "PolicySchemaError",
    "PolicyReferenceError",
    "PolicyBoundsError",
    "PluginError",
    "ActuatorError",
    "TrainingHalted",
    "DecisionLogError",
]


@dataclass
class Problem:
    """One mistake in a policy file.

    :param message: what rule was broken, in words (``"unknown signal 'loss.zscor'"``).
    :param file: the policy file's path, or ``"<string>"`` for in-memory text.
    :param line: 1-based line of the offending node, or ``None`` when it is unknown.
    :param path: YAML path of the offending node, e.g. ``rules[0].when.any[1].signal``; ``""`` is
        the document root.
    :param expected: what would have been accepted, or ``None``.
    :param found: what the file holds, or ``None``.
    :param hint: how to fix it, or ``None``.
    """

    message: str
    file: str = "<string>"
    line: Optional[int] = None
    path: str = ""
    expected: Optional[str] = None
    found: Optional[str] = None
    hint: Optional[str] = None

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        text = f"{where}: {self.path or '<root>'}: {self.message}"
        if self.expected is not None:
            text += f"; expected {self.expected}"
        if self.found is not None:
            text += f", found {self.found}"
        if self.hint:
            text += f" (fix: {self.hint})"
        return text


class PolicyError(ValueError):
    """A policy could not be loaded. Nothing of it was applied.

    ``problems`` lists every mistake found (at least one); ``str(err)`` prints one per line,
    each as ``FILE:LINE: YAML.PATH: message; expected ..., found ... (fix: ...)``.
    """

    def __init__(self, problems: "Problem | list[Problem] | str", **kw: Any) -> None:
        if isinstance(problems, str):
            problems = [Problem(problems, **kw)]
        elif isinstance(problems, Problem):
            problems = [problems]
        if not problems:
            raise ValueError("PolicyError needs at least one Problem")
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    @property
    def file(self) -> str:
        return self.problems[0].file

    @property
    def line(self) -> Optional[int]:
        return self.problems[0].line

    @property
    def path(self) -> str:
        return self.problems[0].path


class PolicySyntaxError(PolicyError):
    """The file is not a single YAML document of plain data (bad YAML, tags, aliases bomb, ...)."""


class PolicySchemaError(PolicyError):
    """The document does not match ``lbw_policy/schema/policy.schema.json``."""


class PolicyReferenceError(PolicyError):
    """A rule names a signal, detector type or actuator that no configured plugin provides."""


class PolicyBoundsError(PolicyError):
    """An actuator's bounds, a detector's params or a command value are invalid."""


class PluginError(RuntimeError):
    """A plugin broke a registration rule (duplicate name, missing attribute, bad class).

    :ivar plugin: the name of the offending plugin, as pluggy knows it.
    """

    def __init__(self, message: str, plugin: Optional[str] = None) -> None:
        super().__init__(message)
        self.plugin = plugin


class ActuatorError(RuntimeError):
    """An actuator cannot act on the optimizer it was attached to (raised at attach time)."""


class DecisionLogError(RuntimeError):
    """The decision log cannot be opened or appended to safely."""


class TrainingHalted(RuntimeError):
    """Raised by ``Guard.step`` after a policy's ``halt`` actuator fired and its record is on disk.

    :ivar rule: name of the rule that halted training.
    :ivar step: the step at which it fired.
    :ivar signals: the signal values the rule read, ``{name: float}``.
    """

    def __init__(self, message: str, rule: str = "", step: int = -1,
                 signals: Optional[dict] = None) -> None:
        super().__init__(message)
        self.rule = rule
        self.step = step
        self.signals = dict(signals or {})
