"""Distributed governance on torch.distributed (gloo, CPU): one decision on every rank.

Two process launches (2 ranks, then 4) run every scenario of tests/dist_workers.py; the tests
compare what the ranks wrote. Rank 1 is the odd one out: a NaN loss at NAN_STEP, random-token
batches on BAD steps, a detector that raises in ``compute`` and in ``after_step``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import dist_plugins
import dist_workers as w

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

STEPS = 50


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist2")
    w.spawn(2, str(out), [("ddp_fault", {"steps": STEPS, "alone": True}),
                          ("halt_and_fault", {}), ("resume", {"steps": 16}),
                          ("construction", {}), ("scaler_nan", {}),
                          ("fsdp_grad_norm", {})])
    return out


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist4")
    w.spawn(4, str(out), [("ddp_fault", {"steps": 24, "alone": False, "transfer": "deferred"})])
    return out


def _json(path):
    return json.loads(path.read_text())


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ddp_every_rank_takes_the_same_decisions_and_stays_bitwise_equal(two):
    out = two / "ddp_fault"
    r0, r1 = (_json(out / f"result-r{r}.json")["reduced"] for r in range(2))
    assert r0["decisions"] == r1["decisions"]
    fired = {(e, rule, s) for step in r0["decisions"] for e, rule, s in step if e == "fired"}
    # rank 1's NaN loss and its random-token batch decided the step on both ranks
    assert ("fired", "nonfinite-skip", w.NAN_STEP) in fired
    assert any(rule == "spike-skip" and s in w.BAD for _, rule, s in fired)
    a, b = (torch.load(out / f"reduced-weights-r{r}.pt") for r in range(2))
    assert torch.equal(a, b)


def test_ddp_without_the_reduction_the_replicas_diverge(two):
    """The same run with each rank governing alone (distributed=False): rank 1 skips steps
    rank 0 takes, so the weights differ. This is what the reduction prevents."""
    out = two / "ddp_fault"
    r0, r1 = (_json(out / f"result-r{r}.json")["alone"] for r in range(2))
    assert r0["decisions"] != r1["decisions"]
    a, b = (torch.load(out / f"alone-weights-r{r}.pt") for r in range(2))
    assert not torch.equal(a, b)


def test_exactly_one_collective_per_governed_step(two, four):
    for out, world in ((two, 2), (four, 4)):
        for r in range(world):
            result = _json(out / "ddp_fault" / f"result-r{r}.json")
            steps = len(result["reduced"]["decisions"])
            assert result["reduced"]["collectives"] == steps
            if "alone" in result:
                assert result["alone"]["collectives"] == 0


def test_rank_0_writes_one_log_with_world_size_and_it_verifies(two):
    run = two / "ddp_fault" / "reduced"
    assert sorted(p.name for p in run.iterdir()) == ["decisions.jsonl", "policy.yaml",
                                                      "summary.json", "telemetry.jsonl"]
    records = _records(run / "decisions.jsonl")
    assert records[0]["event"] == "run_start"
    assert records[0]["run"]["world_size"] == 2 and records[0]["run"]["rank"] == 0
    # telemetry holds the global signals: the mean loss is NaN at rank 1's NaN step
    rows = {r["step"]: r for r in _records(run / "telemetry.jsonl")}
    assert rows[w.NAN_STEP]["skipped"] is True
    assert rows[w.NAN_STEP]["signals"]["nan.loss"] == 1.0
    done = subprocess.run([sys.executable, "-m", "lbw_policy.cli", "verify", str(run)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    # replaying the same policy over the global telemetry reproduces every decision
    done = subprocess.run([sys.executable, "-m", "lbw_policy.cli", "replay", str(run),
                           "--policy", "default"], capture_output=True, text=True)
    assert done.returncode == 0 and f"decisions differ: 0 of {STEPS}" in done.stdout, done.stdout
    done = subprocess.run([sys.executable, "-m", "lbw_policy.cli", "audit", str(run)],
                          capture_output=True, text=True)
    assert "(rank 0 of 2, steps 0..50" in done.stdout, done.stdout


def test_four_ranks_agree_and_stay_bitwise_equal_with_the_deferred_transport_and_gate(four):
    """Four ranks, deferred transport, fused AdamW: the non-finite skip is the device gate
    (found_inf), evaluated on the reduced signals, and learnt by the host one step later."""
    out = four / "ddp_fault"
    results = [_json(out / f"result-r{r}.json")["reduced"] for r in range(4)]
    assert results[0]["gate"] == "found_inf"
    assert all(r["decisions"] == results[0]["decisions"] for r in results)
    # the gate skipped rank 1's NaN step on the device; the host records it at the next step
    assert ["action", "nonfinite-skip", w.NAN_STEP + 1] in [
        d for step in results[0]["decisions"] for d in step]
    weights = [torch.load(out / f"reduced-weights-r{r}.pt") for r in range(4)]
    assert all(torch.equal(weights[0], x) for x in weights[1:])


def test_a_plugin_error_on_one_rank_is_contained_on_every_rank_and_names_the_rank(two):
    out = two / "halt_and_fault"
    h0, h1 = (_json(out / f"halt-r{r}.json") for r in range(2))
    assert h0["decisions"] == h1["decisions"]
    errors = [r for r in _records(out / "run" / "decisions.jsonl") if r["event"] == "error"]
    assert [(e["step"], e["fault"]["phase"], e["fault"]["rank"]) for e in errors] == [
        (dist_plugins.COMPUTE_FAULT_STEP, "compute", 1),
        # an after_step fault is reduced with the next step's signals, contained there
        (dist_plugins.AFTER_FAULT_STEP + 1, "after_step", 1)]
    rows = {r["step"]: r for r in _records(out / "run" / "telemetry.jsonl")}
    # on_error: skip_step skipped the same steps on both ranks: the weights stayed equal
    assert rows[dist_plugins.COMPUTE_FAULT_STEP]["skipped"]
    assert rows[dist_plugins.AFTER_FAULT_STEP + 1]["skipped"]
    assert torch.equal(*(torch.load(out / f"halt-weights-r{r}.pt") for r in range(2)))


def test_a_halt_on_one_ranks_condition_halts_every_rank_with_a_sharded_checkpoint(two):
    out = two / "halt_and_fault"
    for r in range(2):
        assert _json(out / f"halt-r{r}.json")["halted"] == {"step": w.NAN_STEP, "rule": "nan-halt"}
    ckpt = out / "run" / "halt-checkpoint.pt"
    names = {p.name for p in ckpt.iterdir()}
    assert {".metadata", "guard-rank0.pt", "guard-rank1.pt"} <= names
    guard_state = torch.load(ckpt / "guard-rank1.pt", weights_only=False)
    assert guard_state["step"] == w.NAN_STEP and guard_state["actuator"] == "halt"
    halt = [r for r in _records(out / "run" / "decisions.jsonl") if r["event"] == "halt"]
    assert len(halt) == 1 and halt[0]["checkpoint"] == str(ckpt)


def test_resume_under_two_processes_is_bit_identical(two):
    out = two / "resume"
    for r in range(2):
        runs = _json(out / f"resume-r{r}.json")
        assert runs["whole"] == runs["split"]
        assert any(runs["whole"])  # decisions were taken, so the comparison means something
        assert torch.equal(torch.load(out / f"whole-r{r}.pt"), torch.load(out / f"split-r{r}.pt"))
    resumed = [r for r in _records(out / "split" / "decisions.jsonl") if r["event"] == "resume"]
    assert len(resumed) == 1  # rank 0 only


def test_fsdp2_grad_norm_is_the_whole_models(two):
    """torch 2.13's fully_shard runs on CPU/gloo: the grad norm the detector reports equals the
    unsharded model's; a detector that needs whole weights and grad_normalize are refused at
    Guard()."""
    for r in range(2):
        got = _json(two / "fsdp_grad_norm" / f"fsdp-r{r}.json")
        assert got["norms"] == pytest.approx(got["refs"], rel=1e-6)
        assert "'upd' (update_ratio)" in got["refused"] and "sharded" in got["refused"]
        assert "actuator 'grad_normalize': it needs each tensor's whole gradient" in got["refused"]
        assert "these plugins cannot run on shards: actuator 'grad_normalize'" in got["agn_refused"]
        assert "| grad_normalize: the parameters are sharded (DTensor" in got["agn_refused"]


def test_a_guard_that_fails_to_build_on_one_rank_fails_on_every_rank(two):
    (p0, d0), (p1, d1) = (_json(two / "construction" / f"construction-r{r}.json")["errors"]
                          for r in range(2))
    # rank 1's policy file is missing
    assert p1.startswith("FileNotFoundError")
    assert p0 == ("RuntimeError: Guard() failed on rank(s) [1] (see their errors); every rank "
                  "must build its guard for the run to be governed")
    assert not (two / "construction" / "run").exists()  # rank 0 wrote nothing
    # rank 0 cannot create its run directory (only rank 0 writes one)
    assert d0.startswith(("FileExistsError", "NotADirectoryError")), d0
    assert d1.startswith("RuntimeError: Guard() failed on rank(s) [0]"), d1


def test_a_scaler_step_takes_the_same_path_on_every_rank(two):
    """found_inf on every rank, a NaN loss on rank 1 only: both ranks govern the step (the NaN
    rules fire on both, the step is not taken), none takes the scaler's silent skip alone."""
    s0, s1 = (_json(two / "scaler_nan" / f"scaler-r{r}.json") for r in range(2))
    assert s0 == s1
    skipped, records = s0[4]
    assert skipped and ["fired", "nonfinite-skip"] in records
    assert torch.equal(*(torch.load(two / "scaler_nan" / f"scaler-weights-r{r}.pt")
                         for r in range(2)))


def test_cli_run_nproc_trains_the_demo_with_ddp(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "lbw_policy.cli", "run", "--nproc", "2", "--steps", "6",
         "--n-layer", "1", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
         "--no-progress", "--out", str(out)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "on each of 2 ranks (DDP)" in done.stdout
    assert _json(out / "summary.json")["world_size"] == 2
    assert _records(out / "decisions.jsonl")[0]["run"]["world_size"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["decisions.jsonl", "policy.yaml",
                                                      "summary.json", "telemetry.jsonl"]
