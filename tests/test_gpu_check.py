"""benchmarks/gpu_check.py: the whole check in ``--tiny`` mode (CPU here; the tests and sync
sections say why they were skipped), its budget, and its spike and first-action definitions."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
LRS = (3e-3, 1e-1)  # the --tiny defaults
STEPS = 20


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _data() -> list:
    return ["--data", str(SHAKESPEARE)] if SHAKESPEARE.exists() else []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("gc_tiny")
    rc = _module().main(["--tiny", "--out", str(out), *_data()])
    return rc, out, json.loads((out / "results.json").read_text(encoding="utf-8"))


def test_tiny_run_records_every_section(tiny):
    import torch

    rc, out, res = tiny
    assert rc == 0
    assert list(res["sections"]) == ["tests", "sync", "overhead", "stress"]
    for name, sec in res["sections"].items():
        assert sec["wall_s"] >= 0 and "traceback" not in sec, (name, sec.get("traceback"))
    if not torch.cuda.is_available():
        for name in ("tests", "sync"):
            assert res["sections"][name]["status"] == "skipped"
            assert "CUDA" in res["sections"][name]["reason"]
    env = res["environment"]
    assert env["torch"] == torch.__version__ and "cuda" in env and env["device"]
    assert "--tiny" in res["command"] and res["wall_s"] > 0
    # flat: a handful of files and the run directories
    assert {p.name for p in out.iterdir()} <= {"results.json", "results.md", "timeline.png", "pytest.txt",
                                               "log.txt", "runs"}


def test_tiny_overhead_has_a_ratio_and_interval_per_policy(tiny):
    _, _, res = tiny
    ov = res["sections"]["overhead"]
    assert ov["status"] == "ok" and ov["rounds"] >= 2
    assert set(ov["steps_per_s"]) == {"plain", "default", "early-warning"}
    for policy in ("default", "early-warning"):
        r = ov["ratios"][policy]
        assert len(r["rounds"]) == ov["rounds"] and math.isfinite(r["median"]) and r["median"] > 0
        lo, hi = r["ci95"]
        assert lo <= r["median"] <= hi
    assert [g["goal"] for g in ov["goals"]] == ["default steps/s >= 0.98x plain",
                                                "early-warning steps/s >= 0.95x plain",
                                                "default peak memory <= 1.02x plain"]


def test_tiny_stress_has_one_row_per_lr_and_method_with_a_verifiable_log(tiny):
    from lbw_policy.cli import main as cli

    _, out, res = tiny
    st = res["sections"]["stress"]
    assert st["status"] == "ok"
    rows = st["runs"]
    assert sorted((r["lr"], r["method"]) for r in rows) == sorted((lr, m) for lr in LRS for m in ("adamw", "lbw"))
    for r in rows:
        assert r["steps_run"] == STEPS and len(r["losses"]) == STEPS
        assert math.isfinite(r["final_val_loss"]) and r["diverged"] is (r["final_val_loss"] > st["ln_vocab"])
        assert r["spikes"] >= 0
        if r["method"] == "adamw":
            assert r["run_dir"] is None and r["first_action_step"] is None and r["skipped_steps"] == 0
            continue
        run = out / r["run_dir"]
        assert (run / "decisions.jsonl").is_file() and (run / "telemetry.jsonl").is_file()
        assert cli(["verify", str(run)]) == 0  # hash chain, and record count / head from summary.json
        records = [json.loads(line) for line in (run / "decisions.jsonl").read_text().splitlines()]
        assert r["first_action_step"] == _module().first_action_step(records)
        assert records[-1]["event"] == "run_end"
    assert st["plot"] == "timeline.png" and (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiny_markdown_has_the_three_tables(tiny):
    _, out, res = tiny
    md = (out / "results.md").read_text(encoding="utf-8")
    for heading in ("## Correctness", "## Overhead and memory", "## Stress"):
        assert heading in md
    assert "| check | result | detail |" in md
    assert "| arm | steps/s (median) | ratio to plain (95 % CI) |" in md
    for arm in ("plain", "default", "early-warning"):
        assert f"\n| {arm} | " in md
    for lr in LRS:
        for method in ("adamw", "lbw"):
            assert f"\n| {lr:g} | {method} | " in md
    assert "Timeline: timeline.png" in md


def test_a_short_budget_skips_runs_and_says_so(tmp_path):
    mod = _module()
    rc = mod.main(["--tiny", "--out", str(tmp_path), "--sections", "overhead,stress", "--budget-s", "1", *_data()])
    res = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert rc == 0 and list(res["sections"]) == ["overhead", "stress"]
    assert res["sections"]["overhead"]["status"] == "skipped" and "budget" in res["sections"]["overhead"]["reason"]
    st = res["sections"]["stress"]
    assert st["status"] == "partial"
    assert "final_val_loss" in st["runs"][0]  # the first run measures the step time ...
    assert all("budget" in r["skipped"] for r in st["runs"][1:])  # ... and the rest do not fit
    assert len(st["runs"]) == 4


def test_run_dirs_elsewhere_are_packed_into_the_out_folder(tmp_path):
    import tarfile

    from lbw_policy.cli import main as cli

    out, runs = tmp_path / "out", tmp_path / "runs"
    assert _module().main(["--tiny", "--out", str(out), "--runs-dir", str(runs), "--sections", "stress",
                           "--lrs", "0.1", *_data()]) == 0
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert res["runs_archive"] == "runs.tar.gz"
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "results.json", "results.md", "runs.tar.gz",
                                                     "timeline.png"]
    governed = next(r for r in res["sections"]["stress"]["runs"] if r["method"] == "lbw")
    with tarfile.open(out / "runs.tar.gz") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert cli(["verify", str(tmp_path / "unpacked" / governed["run_dir"])]) == 0


def test_spikes_and_first_action_follow_their_definitions():
    mod = _module()
    flat = [3.0] * 10
    assert mod.count_spikes(flat + [4.01, 3.0]) == 1          # > 1 nat above the 10-step mean
    assert mod.count_spikes(flat + [4.0]) == 0                 # exactly 1 nat: not a spike
    assert mod.count_spikes([9.0] + flat[:9] + [4.5]) == 0     # mean of the window 3.6
    assert mod.count_spikes(flat + [float("nan"), float("nan")]) == 1  # the first NaN only
    assert mod.count_spikes([9.0] * 5) == 0                    # too short to judge
    rec = lambda step, event, before, after, **kw: {"step": step, "event": event, "enforced": True,  # noqa: E731
                                                    "actions": [{"before": before, "after": after, **kw}]}
    assert mod.first_action_step([{"step": 0, "event": "run_start"}, rec(4, "recover", 0.5, 0.6),
                                  rec(7, "fired", 1.0, 1.0), rec(9, "fired", 1.0, 0.5),
                                  rec(8, "action", 0, 1, applied=False)]) == 9
    assert mod.first_action_step([dict(rec(2, "fired", 1.0, 0.5), enforced=False)]) is None
    # a device-gated skip: recorded at step 6, taken at step 5, no before/after
    gated = {"step": 6, "event": "action", "enforced": True, "device": True, "rule": "nonfinite-skip",
             "actions": [{"actuator": "skip_step", "applied": True, "before": None, "after": None,
                          "applied_step": 5}]}
    assert mod.first_action_step([rec(9, "fired", 1.0, 0.5), gated]) == 5
    assert mod.gated_skips([gated, rec(9, "fired", 0, 1)]) == 1


def test_gpu_profile_tiny_profiles_each_arm(tmp_path):
    """``benchmarks/gpu_profile.py --tiny``: plain and each policy profiled, one table each."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "gpu_profile", Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_profile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--tiny", "--out", str(tmp_path), "--steps", "2"]) == 0
    text = (tmp_path / "profile.txt").read_text()
    heads = [line.split(":")[0] for line in text.splitlines() if line.startswith("=====")]
    assert heads == ["===== plain", "===== default", "===== early-warning"]
    assert "cudaLaunchKernel" not in text and "Self CPU time total" in text
