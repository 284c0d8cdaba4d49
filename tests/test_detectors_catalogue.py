"""Every built-in detector is registered through the plugin hook, documented in its module and in
docs/detectors.md, and (on a GPU) the detectors of the shipped policies run without a blocking
host-device sync."""

from __future__ import annotations

import contextlib
import importlib
import math
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


def _sync_free_set(reg):
    """Every detector the shipped policies use (default, early-warning), as there and with the
    other loss_spike methods, at cadence 1."""
    return [reg["loss_spike"].cls(), reg["loss_spike"].cls(method="mad", window=8, warmup=2),
            reg["loss_spike"].cls(method="cusum", warmup=2), reg["grad_norm"].cls(), reg["nonfinite"].cls(),
            reg["grad_norm_trend"].cls(window=8, min_points=3), reg["update_ratio"].cls(),
            reg["adam_update_stats"].cls(), reg["attention_logits"].cls(), reg["logit_divergence"].cls(),
            reg["spectral_entropy"].cls(warmup=2, layers=2), reg["lr_jump"].cls()]


@contextlib.contextmanager
def _no_sync(check: bool = True):
    """``torch.cuda.set_sync_debug_mode("error")`` inside (a blocking host-device sync raises)."""
    if check:
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
def test_detectors_compute_without_host_sync_on_cuda():
    """Every detector of policies/default.yaml and policies/early-warning.yaml runs setup(),
    compute() and after_step() under torch.cuda.set_sync_debug_mode("error"), spectral_entropy
    included (its CUDA route has no cuSOLVER error check), from the first step on; then a second
    set, restored from the first's state_dict() (the checkpoint itself reads values back: outside
    the check), continues without a sync too (restored statistics reach the device through pinned
    memory). Not checked: update_ratio's setup(), which builds its index tensors with
    torch.tensor(list, device=...) (a blocking copy); and a restored update_ratio returns its
    pending values as CPU tensors at its first compute (the guard then copies them, blocking):
    that output is not required on the device (detectors/update_ratio.py)."""
    from lbw_policy.demo.gpt import GPT, GPTConfig

    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=4, n_embd=32)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    reg = get_registry().detectors
    x = torch.randint(0, 11, (4, 16), device=dev)
    torch.cuda.synchronize()

    def run(dets, steps):
        for step in steps:
            _, loss = model(x, x)
            loss.backward()
            torch.cuda.synchronize()
            tel = Telemetry(step, loss, opt, model)
            outs, checked = [], []
            for d in dets:
                with _no_sync():
                    outs.append(d.compute(tel))
                checked.append(step > steps[0] or d.name != "update_ratio")
            opt.step()
            with _no_sync():
                for d in dets:
                    d.after_step(tel, True)
            opt.zero_grad(set_to_none=True)
            for d, out, check in zip(dets, outs, checked):
                for k, v in (out.items() if check else ()):
                    if d.name == "lr_jump" or k == "cost_ms":     # host values by design
                        assert isinstance(v, float), (d.name, k)
                    else:
                        assert isinstance(v, torch.Tensor) and v.device.type == "cuda" and v.dim() == 0, (d.name, k)

    dets = _sync_free_set(reg)
    for d in dets:
        with _no_sync(d.name != "update_ratio"):
            d.setup(model, opt)
    run(dets, range(4))
    states = [d.state_dict() for d in dets]
    resumed = _sync_free_set(reg)
    for d, state in zip(resumed, states):
        with _no_sync(d.name != "update_ratio"):
            d.setup(model, opt)
        with _no_sync():
            d.load_state_dict(state)
    run(resumed, range(4, 7))
    for d in dets + resumed:
        d.close()


@pytest.mark.gpu
def test_early_warning_step_with_every_detector_due_makes_no_sync_on_cuda(tmp_path):
    """A governed step of policies/early-warning.yaml where every detector is due (step 100: a
    multiple of every cadence, past every warm-up), and the next one, under
    set_sync_debug_mode("error"). Everything the step does is checked, the guard's own code too.
    The policy's on_error is continue: a detector's sync error would be contained as an error
    record, so the log is read too."""
    from lbw_policy.adapters.guard import Guard
    from lbw_policy.decision_log import read_log
    from lbw_policy.demo.gpt import GPT, GPTConfig
    from lbw_policy.policy import load_policy

    policy = load_policy(ROOT / "policies" / "early-warning.yaml")
    due = math.lcm(*(spec.every for spec in policy.detectors.values()))
    due *= math.ceil(100 / due)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=4, n_embd=32)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x = torch.randint(0, 11, (4, 16), device="cuda")
    with Guard(opt, str(ROOT / "policies" / "early-warning.yaml"), model=model, log_dir=tmp_path / "run") as guard:
        for step in range(due + 2):
            _, loss = model(x, x)
            loss.backward()
            torch.cuda.synchronize()
            with _no_sync(step >= due):
                guard.step(loss)
            opt.zero_grad(set_to_none=True)
    errors = [r for r in read_log(tmp_path / "run" / "decisions.jsonl").records if r.get("event") == "error"]
    assert errors == []
