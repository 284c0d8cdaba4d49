"""A small governed run for the audit, replay, plot and crash tests: a two-layer MLP on a noisy
linear teacher (MSE about 0.1), AdamW, a Guard with a policy, and hand-placed disturbances:
``scale_at={step: factor}`` multiplies that step's loss (``inf`` makes the loss and the
gradients non-finite; ``50`` makes a loss spike)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from lbw_policy import TrainingHalted
from lbw_policy.adapters.guard import Guard
from lbw_policy.policy import load_policy

LR = 0.05
TEACHER = torch.randn(8, 2, generator=torch.Generator().manual_seed(7)) * 0.3

# Brakes on a loss spike (clamped by min 0.2), skips non-finite steps; owner and description
# for accountability checks.
AUDIT_POLICY = """\
apiVersion: lbw-policy/v1
kind: Policy
metadata:
  name: audit-fixture
  owner: "Ada Lovelace <ada@example.org>"
  description: Brake on loss spikes, skip non-finite steps.
on_error: continue
detectors:
  loss: {type: loss_spike, params: {warmup: 5}}
  nan:  {type: nonfinite}
  gn:   {type: grad_norm, every: 3}
actuators:
  lr_scale:  {min: 0.2, max: 1.0, recover: {factor: 2.0, every: 5}}
  skip_step: {max_consecutive: 3}
rules:
  - name: nonfinite-skip
    priority: 100
    when: {signal: nan.any, op: ">", value: 0}
    then:
      - {actuator: skip_step}
      - {actuator: lr_scale, multiply: 0.5}
  - name: spike-brake
    priority: 50
    when:
      any:
        - {signal: loss.delta, op: ">", value: 0.5}
        - {signal: gn.ratio, op: ">", value: 50.0}
    keep_firing_for: 1
    then:
      - {actuator: lr_scale, multiply: 0.1}
"""

#: Disturbances of the audit fixture: a loss spike at 20, non-finite steps 30 and 31.
AUDIT_SCALE_AT = {20: 50.0, 30: float("inf"), 31: float("inf")}


def batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(32, 8, generator=g)
    return x, torch.tanh(x @ TEACHER) + 0.05 * torch.randn(32, 2, generator=g)


def make_model(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)


def make_run(run_dir: Path, policy_text: str, steps: int = 50,
             scale_at: Optional[dict] = None, registry=None, seed: int = 0) -> list:
    """Train ``steps`` steps under the policy (written to ``run_dir.parent/<name>.yaml``);
    return the StepResults (stops early on a halt)."""
    run_dir = Path(run_dir)
    policy_file = run_dir.parent / f"{run_dir.name}-policy.yaml"
    policy_file.write_text(policy_text, encoding="utf-8")
    policy = load_policy(policy_file, registry=registry)
    model, opt = make_model(seed)
    results = []
    guard = Guard(opt, policy, model=model, log_dir=run_dir, registry=registry)
    try:
        for s in range(steps):
            x, y = batch(s)
            loss = F.mse_loss(model(x), y) * (scale_at or {}).get(s, 1.0)
            loss.backward()
            results.append(guard.step(loss))
            opt.zero_grad(set_to_none=True)
    except TrainingHalted:
        pass
    finally:
        guard.close()
    return results
