"""The recent scheduled learning rates of each param group: the reference shared by the
``lr_jump`` detector and the ``lr_cap`` actuator (same ``window``, same median), kept in one place
so the two cannot drift apart. Plain Python: the rates are host floats.

Source: the median-of-window reference is the robust baseline of Hampel's filter.
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Any, Mapping

__all__ = ["LRHistory", "scheduled_lrs"]


class LRHistory:
    """Per-param-group ring of the last ``window`` positive scheduled learning rates.

    :param window: steps kept per group (>= 1).
    """

    def __init__(self, window: int) -> None:
        self.window = int(window)
        self.rings: list[deque] = []

    def references(self, lrs: list) -> list:
        """The median of each group's history (``None`` for a group without history). Groups
        beyond the first call's count start with an empty history."""
        while len(self.rings) < len(lrs):
            self.rings.append(deque(maxlen=self.window))
        return [statistics.median(ring) if ring else None for ring in self.rings[:len(lrs)]]

    def push(self, lrs: list) -> None:
        """Record one step's scheduled rates (non-positive ones are not a reference)."""
        for ring, lr in zip(self.rings, lrs):
            if lr > 0:
                ring.append(float(lr))

    def state_dict(self) -> dict:
        return {"rings": [list(r) for r in self.rings]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rings = [deque(map(float, r), maxlen=self.window) for r in state["rings"]]


def scheduled_lrs(optimizer: Any) -> list:
    """``[float(group["lr"])]`` of every param group."""
    return [float(group["lr"]) for group in optimizer.param_groups]
