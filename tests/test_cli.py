"""The ``lbw-policy`` command line: validate, verify, schema and run (in process through
``lbw_policy.cli.main``, plus one subprocess smoke test of the installed script)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
import yaml

from lbw_policy.adapters.guard import Guard
from lbw_policy.cli import main
from lbw_policy.decision_log import read_log, verify_log
from lbw_policy.policy import load_policy

ROOT = Path(__file__).resolve().parents[1]
POLICIES = sorted((ROOT / "policies").glob("*.yaml"))

# Line 10 holds the misspelt signal; line 13 commands an actuator that is not configured.
BROKEN = """\
apiVersion: lbw-policy/v1
kind: Policy
metadata: {name: broken}
detectors:
  loss: {type: loss_spike}
actuators:
  lr_scale: {min: 0.1}
rules:
  - name: typo
    when: {signal: loss.zscor, op: ">", value: 4}
    then:
      - {actuator: lr_scale, multiply: 0.5}
      - {actuator: skip_step}
"""


@pytest.fixture
def broken(tmp_path) -> Path:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ validate


def test_validate_ok_files(capsys):
    assert POLICIES, "no shipped policies found"
    assert main(["validate", *map(str, POLICIES)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert len(lines) == len(POLICIES)
    for path, line in zip(POLICIES, lines):
        pol = load_policy(path)
        assert line == (f"ok {path}: {pol.name} (revision {pol.revision[:12]}, "
                        f"{len(pol.rules)} rules)")


def test_validate_broken_file_reports_file_line_and_path(broken, capsys):
    assert main(["validate", str(broken)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines[0] == f"INVALID {broken}: 2 problems"
    assert lines[1].startswith(f"  {broken}:10: rules[0].when.signal: unknown signal 'loss.zscor'")
    assert "did you mean 'loss.zscore'?" in lines[1]
    assert lines[2].startswith(f"  {broken}:13: rules[0].then[1].actuator: actuator 'skip_step' "
                               "is not configured")


def test_validate_several_files_one_bad(broken, capsys):
    good = POLICIES[0]
    assert main(["validate", str(good), str(broken), str(good)]) == 1
    out, err = capsys.readouterr()
    assert out.count(f"ok {good}:") == 2
    assert err.count("INVALID") == 1 and f"INVALID {broken}" in err


def test_validate_missing_file_is_reported(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["validate", str(missing)]) == 1
    assert f"INVALID {missing}: 1 problem\n  {missing}: <root>: policy file not found" in capsys.readouterr().err


# -------------------------------------------------------------------------------- verify


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A short governed run with its summary.json, as `lbw-policy run` leaves it."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    # Adam moves each weight by about lr a step: 1e-3 stays under the default's update-RMS brake
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = tmp_path / "run"
    guard = Guard(opt, "default", model=model, log_dir=out)
    for s in range(5):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        if s == 3:
            loss = loss * float("nan")  # one non-finite step: the skip (gate) and the brake
            # rule each fire and resolve
        loss.backward()
        guard.step(loss)
        opt.zero_grad(set_to_none=True)
    summary = guard.close()
    (out / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return out


def test_verify_good_run(run_dir, capsys):
    recs = read_log(run_dir / "decisions.jsonl").records
    assert [r["event"] for r in recs] == ["run_start", "fired", "fired", "resolved", "resolved",
                                          "run_end"]
    assert main(["verify", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{run_dir / 'decisions.jsonl'}: OK: 6 records, chain intact, head {recs[-1]['hash']}")
    assert main(["verify", str(run_dir / "decisions.jsonl")]) == 0


def test_verify_detects_a_one_byte_edit(run_dir, capsys):
    log = run_dir / "decisions.jsonl"
    data = bytearray(log.read_bytes())
    at = data.index(b'"event":"fired"') + len(b'"event":"f')
    data[at:at + 1] = b"F"  # "fired" -> "fFred": one byte
    log.write_bytes(bytes(data))
    assert main(["verify", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "line 2: hash mismatch (record edited)" in out


def test_verify_detects_a_deleted_last_record_through_summary(run_dir, capsys):
    log = run_dir / "decisions.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:-1]))
    # The shorter chain is still a valid chain on its own ...
    assert verify_log(log).ok
    assert main(["verify", "--no-summary", str(run_dir)]) == 0
    capsys.readouterr()
    # ... but summary.json recorded 6 records and the head of the deleted one.
    assert main(["verify", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "log has 5 records, summary.json says 6: records deleted from the end" in out
    assert "does not match summary.json head" in out


def test_verify_missing_log_is_a_usage_error(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert f"error: no decision log at {tmp_path / 'decisions.jsonl'}" in capsys.readouterr().err


# -------------------------------------------------------------------------------- schema


def test_schema_is_a_valid_draft_2020_12_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    validator = jsonschema.Draft202012Validator(schema)
    for path in POLICIES:  # the shipped policies match it ...
        validator.validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    bad = yaml.safe_load(BROKEN)
    bad["mode"] = "dry-run"  # ... and a wrong mode does not
    errors = list(validator.iter_errors(bad))
    assert [list(e.absolute_path) for e in errors] == [["mode"]]


# ----------------------------------------------------------------------------------- run


@pytest.fixture
def one_thread():
    """A tiny model gains nothing from intra-op threads, and on a shared CPU they spin-wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(data: Path, out: Path) -> int:
    return main(["run", "--data", str(data), "--steps", "40", "--lr", "3e-1", "--n-layer", "1",
                 "--n-embd", "32", "--block-size", "32", "--batch-size", "8", "--out", str(out),
                 "--no-progress", "--seed", "1"])


def _telemetry(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "telemetry.jsonl").read_text(encoding="utf-8").splitlines()]


def test_run_writes_a_verifiable_reproducible_run(shakespeare, tmp_path, capsys, one_thread):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(shakespeare, a) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in a.iterdir()) == ["decisions.jsonl", "policy.yaml", "summary.json",
                                                 "telemetry.jsonl"]
    default = load_policy(ROOT / "policies" / "default.yaml")
    assert (a / "policy.yaml").read_text(encoding="utf-8") == default.text
    summary = json.loads((a / "summary.json").read_text(encoding="utf-8"))
    assert summary["steps_run"] == 40 and summary["halted"] is None
    assert summary["policy"]["revision"] == default.revision
    telemetry = _telemetry(a)
    assert [t["step"] for t in telemetry] == list(range(40))
    assert summary["final_train_loss"] == telemetry[-1]["loss"]
    # The summary is printed.
    assert f"run directory     {a}\n" in out
    assert f"policy            stability-default (enforce, revision {default.revision[:12]})" in out
    assert f"steps             40 run, {summary['skipped_steps']} skipped" in out
    assert f"final train loss  {summary['final_train_loss']:.4f} nats" in out
    # The log verifies, against summary.json too.
    report = verify_log(a / "decisions.jsonl", expected_count=summary["log"]["records"],
                        expected_head=summary["log"]["head"])
    assert report.ok and report.warnings == []
    assert main(["verify", str(a)]) == 0
    capsys.readouterr()

    # Same seed, same data: the same losses, decisions and skips.
    assert _run(shakespeare, b) == 0
    capsys.readouterr()
    assert [t["loss"] for t in _telemetry(b)] == [t["loss"] for t in telemetry]
    assert [t["skipped"] for t in _telemetry(b)] == [t["skipped"] for t in telemetry]

    def decisions(run):
        return [(r["step"], r.get("rule"), r["event"]) for r in read_log(run / "decisions.jsonl").records]

    assert decisions(b) == decisions(a)


def test_run_with_an_invalid_policy_exits_1_before_training(broken, tmp_path, capsys):
    out = tmp_path / "never"
    code = main(["run", "--policy", str(broken), "--steps", "2", "--out", str(out), "--no-progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: invalid policy\n")
    assert f"{broken}:10: rules[0].when.signal: unknown signal 'loss.zscor'" in err
    assert not out.exists()


def test_installed_script_smoke(broken):
    script = Path(sys.executable).parent / "lbw-policy"
    if not script.exists():
        pytest.skip(f"{script} not installed")
    env = dict(os.environ, LBW_POLICY_LOAD_PLUGINS="")
    ok = subprocess.run([str(script), "validate", str(ROOT / "policies" / "default.yaml")],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"ok {ROOT / 'policies' / 'default.yaml'}: stability-default")
    bad = subprocess.run([str(script), "validate", str(broken)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 1
    assert f"{broken}:10: rules[0].when.signal" in bad.stderr
