"""The checkpoint an actuator saves when it stops training (``halt``; ``rollback`` escalating).

``<log_dir>/halt-checkpoint.pt`` holds, for ``torch.load(path, weights_only=True)``::

    {"format": "lbw-policy/halt-checkpoint/v1", "step": int, "actuator": str,
     "model": model.state_dict() or None, "optimizer": optimizer.state_dict(),
     "guard": guard.state_dict()}

The weights and optimizer state are those *before* the halted step (the halted step never
runs); the guard's state is the one of the halted step (its detectors have seen that step).
It is written to a temporary file and renamed, so a crash leaves either no file or a whole one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

FILENAME = "halt-checkpoint.pt"
FORMAT = "lbw-policy/halt-checkpoint/v1"


def checkpoint_path(actuator: Any) -> Optional[str]:
    """Where the checkpoint goes (``None`` without a run directory: replay, unit tests)."""
    context = getattr(actuator, "context", None)
    log_dir = getattr(context, "log_dir", None)
    if log_dir is None or getattr(context, "save_checkpoint", None) is None:
        return None
    return str(Path(log_dir) / FILENAME)


def save_checkpoint(actuator: Any, path: str, step: int) -> None:
    """Save model, optimizer and guard state to ``path`` through the run's
    :class:`~lbw_policy.base.ActuatorContext` (the guard writes it, atomically)."""
    actuator.context.save_checkpoint(path, step=int(step), actuator=actuator.name)


def write_checkpoint(path: str, *, step: int, actuator: str, model: Any, optimizer: Any,
                     guard_state: dict) -> None:
    """Write the checkpoint file (the format above) to a temporary file, then rename it."""
    import torch

    payload = {"format": FORMAT, "step": int(step), "actuator": actuator,
               "model": None if model is None else model.state_dict(),
               "optimizer": optimizer.state_dict(), "guard": guard_state}
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)
