"""Tests for ``lbw-policy replay`` (lbw_policy.replay): shadow evaluation over a real run's
telemetry. Replaying a run with its own policy reproduces every decision it took (the detector
``gn`` runs every 3 steps, so this also checks sample-and-hold); another policy's differences
are checked against what that policy must do on the same signals."""

from __future__ import annotations

import json

import pytest
from runhelpers import AUDIT_POLICY, AUDIT_SCALE_AT, make_run

from lbw_policy.cli import main
from lbw_policy.decision_log import read_log
from lbw_policy.replay import replay
from lbw_policy.telemetry_log import read_telemetry
from lbw_policy.records import action_rows

HALTING = AUDIT_POLICY.replace("name: audit-fixture", "name: halting").replace(
    "  skip_step: {max_consecutive: 3}\n",
    "  skip_step: {max_consecutive: 3}\n  halt: {checkpoint: false}\n").replace(
    "rules:\n", """rules:
  - name: stop-on-nan
    priority: 200
    when: {signal: nan.any, op: ">", value: 0}
    for: 2
    then: [{actuator: halt}]
""")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("replay") / "run"
    make_run(run_dir, AUDIT_POLICY, steps=50, scale_at=AUDIT_SCALE_AT)
    return run_dir


def taken_rows(run_dir):
    return action_rows(read_log(run_dir / "decisions.jsonl").records)


def shadow_rows(result):
    return action_rows([r for st in result.steps for r in st.shadow])


def test_replaying_the_runs_own_policy_reproduces_every_decision(run):
    result = replay(run, run / "policy.yaml")
    assert result.n_steps == 50 and result.warnings == []
    assert result.summary["differing_steps"] == 0
    assert result.summary["scale_differs_steps"] == 0
    assert shadow_rows(result) == taken_rows(run)
    assert [st.step for st in result.steps] == [20, 22, 25, 30, 31, 32, 36, 41, 46]
    assert result.summary["taken_skipped"] == result.summary["shadow_skipped"] == 2


def test_sample_and_hold_of_a_detector_running_every_third_step(run):
    rows, _ = read_telemetry(run / "telemetry.jsonl")
    assert ["gn.ratio" in r["signals"] for r in rows[:4]] == [True, False, False, True]
    # the shadow's decision at a step the detector skipped reads the held value
    result = replay(run, run / "policy.yaml")
    brake = next(r for st in result.steps for r in st.shadow if r["rule"] == "spike-brake")
    assert brake["step"] == 20 and 20 % 3 != 0
    assert brake["signals"]["gn.ratio"] == rows[18]["signals"]["gn.ratio"]


def test_audit_mode_shadow_differs_where_actions_were_enforced(run, tmp_path):
    other = tmp_path / "audit.yaml"
    other.write_text(AUDIT_POLICY.replace("on_error: continue", "mode: audit\non_error: continue"))
    result = replay(run, other)
    s = result.summary
    # the same decisions are taken (logged) but nothing is applied: no skip, scale stays 1
    assert s["shadow_skipped"] == 0 and s["taken_skipped"] == 2
    assert s["shadow_min_scale"] == 1.0 and s["taken_min_scale"] == 0.2
    differing = [st.step for st in result.steps if st.differs]
    # 20: both plan lr_scale 1 -> 0.2 (clamped): the same decision, applied only in the run;
    # 30, 31: the skip differs, and the planned lr_scale (the shadow's scale never moved);
    # 25, 36, 41, 46: the taken run recovered, the shadow has nothing to recover
    assert differing == [25, 30, 31, 36, 41, 46]
    assert s["scale_differs_steps"] == 26  # steps 20..45; from 46 the run is back at 1.0
    st30 = next(st for st in result.steps if st.step == 30)
    assert (st30.taken_skipped, st30.shadow_skipped) == (True, False)
    assert st30.shadow_lr == pytest.approx(st30.lr / st30.taken_scale)


def test_a_stricter_policy_halts_and_the_rest_of_the_run_is_counted(run, tmp_path, capsys):
    other = tmp_path / "halting.yaml"
    other.write_text(HALTING)
    result = replay(run, other)
    s = result.summary
    assert s["shadow_halted_at"] == 31 and s["taken_halted_at"] is None
    assert s["after_shadow_halt"] == 18  # steps 32..49 would not have run
    assert main(["replay", str(run), "--policy", str(other)]) == 0
    out = capsys.readouterr().out
    assert "shadow  halting  revision " in out
    assert "  shadow  stop-on-nan fired: halt false -> true\n" in out
    assert "  shadow  stop-on-nan halt: training halted at step 31 by rule 'stop-on-nan'; " \
            "signals: nan.any=1  [halted]\n" in out  # the guard's message: one Governor
    assert "steps where the lr_scale differs: 0 of 50" in out
    assert "the shadow halted at step 31: the run's 18 later steps would not have run" in out
    assert "halted at step                   -          31" in out


def test_replaying_a_halted_run_sees_the_halting_step(tmp_path):
    run_dir = tmp_path / "halted"
    results = make_run(run_dir, HALTING, steps=50, scale_at=AUDIT_SCALE_AT)
    assert len(results) == 31  # steps 0..30; step 31 halted
    rows, warnings = read_telemetry(run_dir / "telemetry.jsonl")
    assert rows[-1]["step"] == 31 and rows[-1]["halted"] is True and rows[-1]["skipped"] is True
    result = replay(run_dir, run_dir / "policy.yaml")
    assert result.summary["differing_steps"] == 0
    assert result.summary["shadow_halted_at"] == result.summary["taken_halted_at"] == 31
    assert shadow_rows(result) == taken_rows(run_dir)


def test_json_format(run, capsys):
    assert main(["replay", str(run), "--policy", str(run / "policy.yaml"), "--format", "json",
                 "--all"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["steps_replayed"] == 50 and doc["summary"]["differing_steps"] == 0
    assert [s["step"] for s in doc["steps"]] == [20, 22, 25, 30, 31, 32, 36, 41, 46]
    assert doc["taken"]["owner"] == doc["shadow"]["owner"] == "Ada Lovelace <ada@example.org>"


def test_torn_and_damaged_telemetry_lines_are_skipped_with_a_warning(run, tmp_path):
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("decisions.jsonl", "policy.yaml"):
        (copy / name).write_bytes((run / name).read_bytes())
    lines = (run / "telemetry.jsonl").read_bytes().splitlines(keepends=True)
    lines[5] = b"{not json\n"
    (copy / "telemetry.jsonl").write_bytes(b"".join(lines) + b'{"step":50,"lo')
    rows, warnings = read_telemetry(copy / "telemetry.jsonl")
    assert len(rows) == 49
    assert warnings == ["telemetry line 6: damaged line; skipped",
                        "telemetry line 51: torn last line (the run was interrupted); skipped"]
    result = replay(copy, run / "policy.yaml")
    assert result.warnings[:2] == warnings


def test_errors_are_one_line(run, tmp_path, capsys):
    assert main(["replay", str(tmp_path / "nope"), "--policy", "default"]) == 2
    assert capsys.readouterr().err.startswith("error: no run directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["replay", str(empty), "--policy", "default"]) == 2
    assert "error: no telemetry at" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [\n")
    assert main(["replay", str(run), "--policy", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: invalid policy\n") and "bad.yaml:" in err and "Traceback" not in err
