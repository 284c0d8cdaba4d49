"""The recent scheduled learning rates of each param group: the reference shared by the
``lr_jump`` detector and the ``lr_cap`` actuator (same ``window``, same ``trust``), kept in one
place so the two cannot drift apart. Plain Python: the rates are host floats.

The reference of group ``g`` at a step is::

    reference_g = max(median of the last `window` positive scheduled rates,
                      trusted_g)

where ``trusted_g`` is the last scheduled rate that was itself within ``trust`` x the reference
of its own step (a smooth move of the schedule). A schedule that rises by a bounded ratio per
step (linear or cosine warm-up, OneCycleLR's curved ramp, warm-up-stable-decay) so always
compares with its previous value (ratio close to 1), however fast the median lags behind; a
fault (one step jumping more than ``trust`` x) does not become trusted, so it stays compared with
the last good rate until the median itself catches up (``window / 2`` steps: a deliberate change
of the rate). Decaying schedules (cosine, ReduceLROnPlateau) compare with the median, as before.

Source: the median-of-window reference is the robust baseline of Hampel's filter; the trusted
previous value is this project's (issue 14: OneCycleLR's warm-up tripped the median alone).
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Any, Mapping

__all__ = ["LRHistory", "scheduled_lrs"]


class LRHistory:
    """Per-param-group ring of the last ``window`` positive scheduled learning rates, and the
    last trusted rate (module docstring).

    :param window: steps kept per group (>= 1).
    :param trust: a rate within ``trust`` x its step's reference becomes the trusted rate
        (dimensionless, > 1; default 3.0, the default policy's ``lr-jump-cap`` threshold: set it
        to your rule's threshold).
    """

    def __init__(self, window: int, trust: float = 3.0) -> None:
        self.window = int(window)
        self.trust = float(trust)
        self.rings: list[deque] = []
        self.trusted: list = []  # per group: the last trusted rate, or None

    def references(self, lrs: list) -> list:
        """Each group's reference, ``max(median, trusted)`` (``None`` for a group without
        history). Groups beyond the first call's count start with an empty history."""
        while len(self.rings) < len(lrs):
            self.rings.append(deque(maxlen=self.window))
            self.trusted.append(None)
        refs = []
        for ring, trusted in zip(self.rings[:len(lrs)], self.trusted):
            if not ring:
                refs.append(None)
            else:
                median = statistics.median(ring)
                refs.append(median if trusted is None else max(median, trusted))
        return refs

    def push(self, lrs: list, references: list) -> None:
        """Record one step's scheduled rates (non-positive ones are not a reference) given the
        references :meth:`references` returned for them."""
        for i, (ring, lr) in enumerate(zip(self.rings, lrs)):
            if lr > 0:
                ring.append(float(lr))
                ref = references[i] if i < len(references) else None
                if ref is None or lr <= self.trust * ref:
                    self.trusted[i] = float(lr)

    def state_dict(self) -> dict:
        return {"rings": [list(r) for r in self.rings], "trusted": list(self.trusted)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        rings = [deque(map(float, r), maxlen=self.window) for r in state["rings"]]
        # a state saved before "trusted" existed: the last rate of each ring
        trusted = state.get("trusted", [r[-1] if r else None for r in rings])
        if len(trusted) != len(rings):
            raise ValueError(f"lr history has {len(rings)} rings but {len(trusted)} trusted rates")
        self.rings = rings
        self.trusted = [None if t is None else float(t) for t in trusted]


def scheduled_lrs(optimizer: Any) -> list:
    """``[float(group["lr"])]`` of every param group."""
    return [float(group["lr"]) for group in optimizer.param_groups]
