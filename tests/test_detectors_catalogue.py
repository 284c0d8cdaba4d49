"""Every built-in detector is registered through the plugin hook, documented in its module and in
docs/detectors.md, and (on a GPU) computes without a blocking host-device sync."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

from lbw_policy.plugins import get_registry
from lbw_policy.telemetry import Telemetry

ROOT = Path(__file__).resolve().parents[1]
NEW = ("grad_norm_trend", "update_ratio", "adam_update_stats", "spectral_entropy", "attention_logits",
       "logit_divergence", "moe_router")


def test_every_builtin_detector_is_registered_and_documented():
    reg = get_registry().detectors
    builtin = {name: r for name, r in reg.items() if r.plugin == "lbw_policy.detectors"}
    assert set(NEW) | {"loss_spike", "grad_norm", "nonfinite"} <= set(builtin)
    catalogue = (ROOT / "docs" / "detectors.md").read_text(encoding="utf-8")
    for name, r in builtin.items():
        doc = importlib.import_module(r.cls.__module__).__doc__
        assert doc and doc.startswith(f"``{name}``"), name
        assert re.search(r"Source|arXiv|\d{4}\.\d{5}", doc), f"{name}: no source in the docstring"
        assert f"\n## {name}\n" in catalogue, f"{name}: no section in docs/detectors.md"
        assert f"[`{name}`](#{name})" in catalogue, f"{name}: not in the catalogue table"


@pytest.mark.gpu
def test_detectors_compute_without_host_sync_on_cuda():
    """The detectors that promise it run compute() and after_step() under
    torch.cuda.set_sync_debug_mode("error") (spectral_entropy's cuSOLVER calls do sync: excluded)."""
    from lbw_policy.demo.gpt import GPT, GPTConfig

    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=4, n_embd=32)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    reg = get_registry().detectors
    dets = [reg["loss_spike"].cls(), reg["loss_spike"].cls(method="mad", window=8, warmup=2),
            reg["loss_spike"].cls(method="cusum", warmup=2), reg["grad_norm"].cls(), reg["nonfinite"].cls(),
            reg["grad_norm_trend"].cls(window=8, min_points=3), reg["update_ratio"].cls(),
            reg["adam_update_stats"].cls(), reg["attention_logits"].cls(), reg["logit_divergence"].cls()]
    for d in dets:
        d.setup(model, opt)
    x = torch.randint(0, 11, (4, 16), device=dev)
    for step in range(4):
        _, loss = model(x, x)
        loss.backward()
        tel = Telemetry(step, loss, opt, model)
        if step == 0:          # first calls: lazy initialisation outside the check
            outs = [d.compute(tel) for d in dets]
        else:
            torch.cuda.set_sync_debug_mode("error")
            try:
                outs = [d.compute(tel) for d in dets]
            finally:
                torch.cuda.set_sync_debug_mode(0)
        opt.step()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for d in dets:
                d.after_step(tel, True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        opt.zero_grad(set_to_none=True)
        for out in outs:
            for v in out.values():
                assert isinstance(v, torch.Tensor) and v.device.type == "cuda" and v.dim() == 0
    for d in dets:
        d.close()
