"""The device gate: rules marked ``gate: device`` skip the *same* step without the host.

With the deferred transport the host learns step ``t``'s signals at ``t + 1``, too late to keep a
non-finite or extreme update out of the weights. A rule marked ``gate: device`` (its condition
compares this step's signals with constants; its only command is ``skip_step``; checked when the
policy loads) is compiled here into tensor operations on the signals' device: the result is a
0-dim bool ``keep`` computed without a host sync, and the optimizer step is carried out through
``skip_step``'s device seam (:meth:`~lbw_policy.actuators.SkipStep.arm`): torch's fused
Adam / AdamW take it as ``found_inf`` (the kernel skips the update, weight decay included, and
undoes the step count), other optimizers through a ``torch.where`` restore. The gate's outcome
travels to the host in the step's signal vector; the Governor records it one step later, marked
``device: true``.

Semantics match the host engine's (:func:`lbw_policy.engine.evaluate_condition`): a leaf whose
signal is missing this step or NaN is false (so ``!=`` against NaN is false too).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

__all__ = ["DeviceGate", "gate_rules"]

_OPS: dict = {">": torch.gt, ">=": torch.ge, "<": torch.lt, "<=": torch.le, "==": torch.eq,
              "!=": torch.ne}
_PY: dict = {">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b,
             "<=": lambda a, b: a <= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}


def gate_rules(policy: Any) -> list:
    """The policy's rules marked ``gate: device``, in file order."""
    return [r for r in policy.rules if getattr(r, "gate", None) == "device"]


class DeviceGate:
    """Evaluate the gate rules on device tensors.

    :param rules: the ``gate: device`` rules (:class:`~lbw_policy.spec.RuleSpec`).
    """

    def __init__(self, rules: Sequence[Any]) -> None:
        self.rules = list(rules)
        self._compiled = [_compile(r.when) for r in self.rules]

    def __bool__(self) -> bool:
        return bool(self.rules)

    def evaluate(self, signals: Mapping[str, Any], device: torch.device) -> list:
        """One 0-dim bool tensor per gate rule: whether its condition holds this step.

        :param signals: ``{name: 0-dim tensor or float}`` emitted this step.
        """
        out = []
        for fn in self._compiled:
            v = fn(signals)
            # a host constant becomes a fill on the device (torch.tensor would copy: a sync)
            out.append(v if isinstance(v, torch.Tensor)
                       else torch.full((), bool(v), dtype=torch.bool, device=device))
        return out


def _compile(node: Mapping) -> Callable[[Mapping], Any]:
    if "all" in node:
        parts = [_compile(c) for c in node["all"]]
        return lambda s: _fold(parts, s, torch.logical_and, True)
    if "any" in node:
        parts = [_compile(c) for c in node["any"]]
        return lambda s: _fold(parts, s, torch.logical_or, False)
    if "not" in node:
        inner = _compile(node["not"])
        return lambda s: _not(inner(s))
    name, op, const = node["signal"], node["op"], node["value"]
    const = float(const) if not isinstance(const, bool) else float(const)

    def leaf(signals: Mapping) -> Any:
        v = signals.get(name)
        if v is None:
            return False
        if isinstance(v, torch.Tensor):
            v = v.detach()
            return torch.logical_and(v == v, _OPS[op](v, const))  # NaN -> false, as the engine
        v = float(v)
        return v == v and _PY[op](v, const)

    return leaf


def _fold(parts: list, signals: Mapping, op: Callable, unit: bool) -> Any:
    acc: Any = unit
    for part in parts:
        v = part(signals)
        if isinstance(acc, bool) and isinstance(v, bool):
            acc = (acc and v) if unit else (acc or v)
        elif isinstance(acc, bool):
            acc = v if acc == unit else acc
        elif isinstance(v, bool):
            acc = acc if v == unit else v
        else:
            acc = op(acc, v)
    return acc


def _not(v: Any) -> Any:
    return (not v) if isinstance(v, bool) else torch.logical_not(v)
