"""Issue 6, GPU part: one governed step with the default policy under
``torch.cuda.set_sync_debug_mode("error")`` (no blocking host-device synchronization).

Skipped without CUDA. Expected to fail today, and marked so: the guard decides on host values
and reads the step's loss and tensor signals back in one blocking transfer per step
(``Guard._detect``), which sync-debug mode reports. Passing it needs decisions on the previous
step's signals, read through a non-blocking copy into pinned memory; that change has not been
made because no GPU was lent to verify it (docs/results.md, "Not done")."""

from __future__ import annotations

import pytest
import torch

from lbw_policy.adapters.torch import Guard
from lbw_policy.demo.gpt import GPT, GPTConfig


@pytest.mark.gpu
@pytest.mark.xfail(reason="the guard's one host transfer per step is a blocking sync", strict=False)
def test_one_governed_step_with_the_default_policy_makes_no_blocking_sync(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=4, n_embd=128)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), fused=True)
    x = torch.randint(0, 65, (8, 64), device="cuda")
    with Guard(opt, "default", model=model, log_dir=tmp_path / "run") as guard:
        for _ in range(2):  # warm up: optimizer state, detector buffers
            _, loss = model(x, x)
            loss.backward()
            guard.step(loss)
            opt.zero_grad(set_to_none=True)
        _, loss = model(x, x)
        loss.backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            guard.step(loss)
        finally:
            torch.cuda.set_sync_debug_mode("default")
