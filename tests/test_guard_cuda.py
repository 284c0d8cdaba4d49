"""The guard's CUDA performance contract (DESIGN.md): a governed step makes no blocking host-device
sync, checked with ``torch.cuda.set_sync_debug_mode("error")``, and a non-finite step is undone on
the device in the same step. Strict: no xfail. Skipped without CUDA.

The checks are ``sync_check`` and ``nan_gate_check`` of ``benchmarks/gpu_check.py`` (the GPU
check runs the same ones on a GPT-2-small-shaped model); here on a small demo GPT, bf16 autocast
and fused AdamW, random tokens.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def setup():
    from lbw_policy.demo.gpt import GPTConfig

    gc = _gpu_check()
    config = GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=4, n_embd=128)
    tokens = torch.randint(0, 65, (20_000,), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    return gc, config, gc.DeviceBatches(tokens, batch_size=8, block_size=64, seed=0)


@pytest.mark.parametrize("policy", ["default", "early-warning"])
def test_a_step_where_every_detector_is_due_makes_no_blocking_sync(setup, tmp_path, policy):
    """Past every detector's warm-up, on a multiple of every ``every:`` (default: all run every
    step; early-warning: lcm(4, 5, 10, 50) = 100): step 100, and step 101 (where the deferred
    transport reads step 100's signals), under sync-debug "error"."""
    due_step = 100
    gc, config, batches = setup
    res = gc.sync_check(policy, config, torch.device("cuda"), batches, tmp_path / "run", amp=True)
    assert res["transfer"] == "deferred"  # the guard's default on CUDA
    assert res["due_step"] == due_step
    assert [c["step"] for c in res["checks"]] == [due_step, due_step + 1], res
    assert res["checks"][0]["every_detector_due"]
    for c in res["checks"]:
        assert c["error"] is None, f"step {c['step']}: {c['error']}\n{c['where']}"
    # early-warning has on_error: continue: a detector that syncs is logged, not raised
    assert res["error_records"] == [], res["error_records"]
    assert res["ok"]


def test_a_nan_gradient_is_skipped_on_the_device_without_a_sync(setup, tmp_path):
    """The default policy gates its ``nonfinite-skip`` rule on the device (``gate: device``): a
    NaN loss, hence NaN gradients, after 30 warm-up steps leaves the weights and every optimizer
    state tensor (moments, step count) bitwise as they were, with no blocking sync, and the
    decision is logged once the host learns of it."""
    gc, config, batches = setup
    res = gc.nan_gate_check(config, torch.device("cuda"), batches, tmp_path / "run", policy="default", amp=True)
    assert res["transfer"] == "deferred"
    assert res["gate"]["mode"] == "found_inf"  # fused AdamW
    assert "nonfinite-skip" in res["gate"]["rules"]
    assert res["sync_error"] is None, f"{res['sync_error']}\n{res['where']}"
    assert res["weights_unchanged"]
    assert res["optimizer_state_unchanged"]
    # recorded when the host learns of it, one step later, as the device's own action
    assert {"step": 31, "event": "action", "device": True, "applied_step": [30]} in res["nonfinite_skip_records"]
    assert res["ok"]
