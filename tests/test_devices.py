"""The shipped policies on every device this machine has (CPU always; CUDA when present, skipped
otherwise), in float32 and under bf16 autocast, with both transports: a governed run raises
nothing, logs no plugin error, keeps the weights finite, and its replay reproduces it."""

from __future__ import annotations

import pytest
import torch

from lbw_policy import Guard
from lbw_policy.decision_log import read_log
from lbw_policy.demo.gpt import GPT, GPTConfig
from lbw_policy.replay import replay

DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amp", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("policy, transfer", [("default", "immediate"), ("default", "deferred"),
                                              ("early-warning", "deferred")])
def test_a_governed_run_on_each_device_and_precision(tmp_path, device, amp, policy, transfer):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32)).to(device)
    fused = device == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, fused=fused)
    run = tmp_path / "run"
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 32, (12, 4, 17), generator=gen)
    with Guard(opt, policy, model=model, log_dir=run, transfer=transfer) as guard:
        for s in range(12):
            batch = data[s].to(device)
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
                _, loss = model(batch[:, :-1], batch[:, 1:])
            if s == 7 and policy == "default":  # early-warning is audit-only: nothing skipped
                loss = loss * float("nan")  # a non-finite step: gated or skipped
            loss.backward()
            guard.step(loss)
            opt.zero_grad(set_to_none=True)
    records = read_log(run / "decisions.jsonl").records
    assert [r for r in records if r["event"] == "error"] == []
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if policy == "default":  # the NaN step is skipped: on the host (immediate) or the device
        skips = [r for r in records if r.get("rule") == "nonfinite-skip"
                 and r["event"] in ("fired", "action")]
        assert skips and skips[0]["signals_step"] == 7
        assert skips[0].get("device", False) is (transfer == "deferred")
    result = replay(run, run / "policy.yaml")
    assert result.summary["differing_steps"] == 0
