"""``nonfinite``: the loss or the gradients contain NaN or Inf.

Signals (1.0 for true, 0.0 for false; 0-dim tensors on an accelerator, Python floats when the
loss and the gradient norm are on the CPU, see ``detectors/_ema.py``):

- ``loss``: the loss is NaN or +/-Inf.
- ``grads``: the global gradient norm is non-finite, i.e. some gradient entry is NaN or Inf
  (or the sum of squares overflowed float32). Reuses the step's shared grad-norm reduction:
  no extra pass over the gradients.
- ``any``: ``loss`` or ``grads``.

No params, no warm-up, no state. Source: the non-finite check of
``torch.nn.utils.clip_grad_norm_(error_if_nonfinite=True)``, kept as a tensor here so skipping
the step needs no host sync (OLMo-core ``SkipStepOptimizer``).
"""

from __future__ import annotations

import math

import torch

from lbw_policy.base import Detector


class NonFinite(Detector):
    name = "nonfinite"
    signals = ("loss", "grads", "any")
    reductions = {"loss": "any", "grads": "any", "any": "any"}

    def compute(self, telemetry):
        loss, norm = telemetry.loss_scalar, telemetry.grad_norm_scalar
        if isinstance(loss, float) and isinstance(norm, float):      # on the CPU: plain floats
            bad_loss, bad_grads = float(not math.isfinite(loss)), float(not math.isfinite(norm))
            return {"loss": bad_loss, "grads": bad_grads, "any": max(bad_loss, bad_grads)}
        bad_loss = ~torch.isfinite(torch.as_tensor(loss))
        bad_grads = ~torch.isfinite(torch.as_tensor(norm))
        if bad_grads.device != bad_loss.device:
            bad_grads = bad_grads.to(bad_loss.device)
        return {"loss": bad_loss.float(), "grads": bad_grads.float(),
                "any": (bad_loss | bad_grads).float()}
