"""A detector that raises on rank 1 only, for tests/dist_workers.py (registered through a
:class:`~lbw_policy.plugins.Registry` handed to the guard, not globally)."""

from __future__ import annotations

import torch.distributed as dist

from lbw_policy.base import Detector
from lbw_policy.plugins import Registration, Registry, get_registry

COMPUTE_FAULT_STEP = 3  # rank 1's compute raises
AFTER_FAULT_STEP = 5    # rank 1's after_step raises


class RankFault(Detector):
    name = "rank_fault"
    signals = ("x",)

    def compute(self, telemetry):
        if dist.get_rank() == 1 and telemetry.step == COMPUTE_FAULT_STEP:
            raise RuntimeError("rank-local failure")
        return {"x": telemetry.loss}

    def after_step(self, telemetry, stepped):
        if dist.get_rank() == 1 and telemetry.step == AFTER_FAULT_STEP:
            raise RuntimeError("rank-local after_step failure")


def registry() -> Registry:
    base = get_registry()
    dets = dict(base.detectors)
    dets["rank_fault"] = Registration("rank_fault", "detector", RankFault, "tests", "0")
    return Registry(detectors=dets, actuators=dict(base.actuators))
