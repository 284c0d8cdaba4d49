"""benchmarks/overhead.py: one small run end to end, and its confidence interval."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def _module():
    spec = importlib.util.spec_from_file_location("overhead", ROOT / "benchmarks" / "overhead.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_median_ci_brackets_the_median_and_collapses_for_equal_rounds():
    mod = _module()
    assert mod._median_ci([0.95] * 7) == [0.95, 0.95]
    rng = np.random.default_rng(0)
    ratios = list(0.95 + 0.05 * rng.standard_normal(40))
    lo, hi = mod._median_ci(ratios)
    assert lo < statistics.median(ratios) < hi
    assert hi - lo < 0.1                               # 40 rounds of sd 0.05: a few hundredths
    assert mod._median_ci(ratios) == [lo, hi]          # fixed seed: reproducible


def test_overhead_run_writes_one_row_per_policy(tmp_path):
    mod = _module()
    out = tmp_path / "overhead.jsonl"
    assert mod.main(["--data", str(SHAKESPEARE), "--policy", "default", "--policy", "early-warning",
                     "--rounds", "3", "--block", "2", "--n-layer", "1", "--n-embd", "32", "--batch-size", "4",
                     "--block-size", "16", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["policy"] for r in rows] == ["default", "early-warning"]
    for r in rows:
        assert len(r["ratios"]) == 3 and r["rounds"] == 3 and r["block"] == 2 and r["params"] > 0
        assert abs(r["median_ratio"] - statistics.median(r["ratios"])) < 1e-4   # ratios are rounded
        lo, hi = r["median_ratio_ci95"]
        assert min(r["ratios"]) - 1e-4 <= lo <= r["median_ratio"] + 1e-4 <= hi + 2e-4
        assert r["plain_steps_per_s"] > 0 and r["governed_steps_per_s"] > 0


def test_overhead_with_sign_measures_the_signed_loop_and_one_checkpoint(tmp_path):
    mod = _module()
    out = tmp_path / "overhead.jsonl"
    assert mod.main(["--data", str(SHAKESPEARE), "--sign", "--checkpoint-every", "1",
                     "--rounds", "2", "--block", "2", "--n-layer", "1", "--n-embd", "16",
                     "--batch-size", "4", "--block-size", "16", "--out", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(row["sign_ratios"]) == 2 and row["signed_steps_per_s"] > 0
    assert abs(row["sign_ratio"] - statistics.median(row["sign_ratios"])) < 1e-4
    assert row["checkpoint_every"] == 1 and row["checkpoints"] >= 2  # one per record, and final
    assert 0 < row["checkpoint_seconds"] < 1
    assert row["checkpoint_fraction_of_step"] == \
        row["checkpoint_seconds"] * row["plain_steps_per_s"]


def test_overhead_nproc_2_measures_ddp_with_the_collective(tmp_path, monkeypatch):
    # spawned ranks import the script by name: put benchmarks/ on the path they inherit
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import overhead as mod
    out = tmp_path / "overhead.jsonl"
    assert mod.main(["--data", str(SHAKESPEARE), "--nproc", "2", "--threads", "1",
                     "--rounds", "2", "--block", "2", "--n-layer", "1", "--n-embd", "32",
                     "--batch-size", "4", "--block-size", "16", "--out", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["nproc"] == 2
    assert row["collective_floats"] > 10 and row["governed_steps_per_s"] > 0
