"""Crash safety of the decision log as a governed run writes it.

* ``lbw-policy run`` killed with SIGKILL mid-training leaves a log that ``verify`` accepts, with
  at most a torn last line; a guard opened on the same run directory continues the same chain
  (and cuts the torn line off the telemetry too).
* Any single-byte edit, and any inserted, deleted or reordered record, is detected (with the
  record count and head hash a finished run keeps in its summary, for the tail).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.nn.functional as F
from runhelpers import batch, make_model

from lbw_policy.adapters.guard import Guard
from lbw_policy.cli import main
from lbw_policy.decision_log import GENESIS, read_log, record_hash, verify_log

ROOT = Path(__file__).resolve().parents[1]

# Enforced, and acts at every step, so records are written continuously.
BUSY = """\
apiVersion: lbw-policy/v1
kind: Policy
metadata: {name: busy, owner: crash tests}
detectors:
  loss: {type: loss_spike}
actuators:
  lr_scale: {min: 0.5, max: 1.0}
rules:
  - name: every-step
    when: {signal: loss.ema, op: ">", value: 0}
    then: [{actuator: lr_scale, set: 1.0}]
"""


def governed_steps(run_dir: Path, policy: Path, steps: int) -> None:
    model, opt = make_model()
    with Guard(opt, policy, model=model, log_dir=run_dir, resume=True) as guard:
        for s in range(steps):
            x, y = batch(s)
            loss = F.mse_loss(model(x), y)
            loss.backward()
            guard.step(loss)
            opt.zero_grad(set_to_none=True)


def check_one_chain(log: Path) -> list:
    report = verify_log(log)
    assert report.ok and report.problems == [] and report.warnings == [], report.format()
    records = read_log(log).records
    assert [r["seq"] for r in records] == list(range(len(records)))
    assert records[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hash"] for a, b in zip(records, records[1:]))
    return records


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_sigkill_mid_training_then_resume_appends_to_the_same_chain(tmp_path):
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(600))
    (tmp_path / "data.txt").write_text(text, encoding="utf-8")
    policy = tmp_path / "busy.yaml"
    policy.write_text(BUSY, encoding="utf-8")
    run_dir = tmp_path / "run"
    log = run_dir / "decisions.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lbw_policy.cli", "run", "--data", str(tmp_path / "data.txt"),
         "--policy", str(policy), "--out", str(run_dir), "--steps", "100000", "--no-progress",
         "--n-layer", "1", "--n-embd", "32", "--block-size", "32", "--batch-size", "8"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if log.exists() and log.read_bytes().count(b"\n") >= 20:
                break
            if proc.poll() is not None:
                pytest.fail(f"the run ended early: {proc.stderr.read().decode()}")
            time.sleep(0.05)
        else:
            pytest.fail("the run wrote fewer than 20 records in 90 s")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    report = verify_log(log)
    assert report.ok, report.format()
    assert report.records >= 20
    assert set(report.warnings) - {w for w in report.warnings if w.startswith("torn last line")} \
        == {"no run_end record: the log may be truncated or the run still going"}
    assert main(["verify", str(run_dir)]) == 0  # the CLI agrees (no summary.json: killed)
    torn = read_log(log).torn_bytes
    before = read_log(log).records

    # Resume: a guard on the same run directory continues the chain.
    governed_steps(run_dir, policy, steps=5)
    records = check_one_chain(log)
    assert records[:len(before)] == before
    start = records[len(before)]
    assert start["event"] == "run_start" and start["prev"] == before[-1]["hash"]
    assert start["recovered_torn_bytes"] == torn
    assert [r["event"] for r in records[len(before) + 1:]] == ["fired"] + ["action"] * 4 + ["run_end"]
    # the telemetry's torn line (if any) was cut off too: every line parses
    for line in (run_dir / "telemetry.jsonl").read_text(encoding="utf-8").splitlines():
        json.loads(line)


@pytest.fixture
def finished(tmp_path):
    """A finished run's log, its expected record count and head hash (as in summary.json)."""
    policy = tmp_path / "busy.yaml"
    policy.write_text(BUSY, encoding="utf-8")
    run_dir = tmp_path / "run"
    governed_steps(run_dir, policy, steps=2)
    log = run_dir / "decisions.jsonl"
    records = check_one_chain(log)
    return log, policy, len(records), records[-1]["hash"]


def test_a_torn_write_is_cut_off_and_the_chain_continues(finished):
    log, policy, count, head = finished
    whole = log.read_bytes()
    fragment = whole.splitlines(keepends=True)[1][:57]  # half a record, no newline
    log.write_bytes(whole + fragment)
    report = verify_log(log, expected_count=count, expected_head=head)
    assert report.ok and report.warnings == [
        f"torn last line ({len(fragment)} bytes) at line {count + 1}: the run was interrupted "
        "while writing; the complete records before it verify"]
    governed_steps(log.parent, policy, steps=2)
    records = check_one_chain(log)
    assert records[count]["recovered_torn_bytes"] == len(fragment)
    assert log.read_bytes().startswith(whole)


def test_every_single_byte_edit_is_detected(finished, tmp_path):
    log, _, count, head = finished
    whole = log.read_bytes()
    last_start = whole.rstrip(b"\n").rfind(b"\n") + 1
    # Every byte of the last record (the tail is where a torn line could hide an edit) and
    # every newline, each changed to two other values; every 7th byte elsewhere, to one.
    edges = set(range(last_start, len(whole))) | {i for i, b in enumerate(whole) if b == 0x0A}
    edits = [(i, f) for i in sorted(edges) for f in (0x01, 0x20)]
    edits += [(i, 0x01) for i in range(0, last_start, 7) if i not in edges]
    copy = tmp_path / "edited.jsonl"
    missed = []
    for i, flip in edits:
        data = bytearray(whole)
        data[i] ^= flip
        copy.write_bytes(bytes(data))
        if verify_log(copy, expected_count=count, expected_head=head).ok:
            missed.append((i, flip))
    assert missed == []


def test_inserted_deleted_reordered_and_forged_records_are_detected(finished, tmp_path):
    log, _, count, head = finished
    lines = log.read_bytes().splitlines(keepends=True)
    copy = tmp_path / "edited.jsonl"

    def detected(new_lines, **expect) -> bool:
        copy.write_bytes(b"".join(new_lines))
        return not verify_log(copy, **expect).ok

    for i in range(len(lines)):
        assert detected(lines[:i] + lines[i + 1:], expected_count=count, expected_head=head), i
        assert detected(lines[:i] + [lines[i]] + lines[i:]), i  # a duplicated record
    for i in range(1, len(lines) - 1):
        assert detected(lines[:i] + [lines[i + 1], lines[i]] + lines[i + 2:]), i
    assert detected(lines[1:])  # the first record deleted
    assert detected(lines[:-1], expected_count=count, expected_head=head)  # the last deleted
    # A forged record with a correct hash of its own but spliced into the chain: its prev
    # cannot be both the real previous hash and leave the next record's prev intact.
    forged = json.loads(lines[2])
    forged["actions"][0]["applied"] = 0.5
    forged["hash"] = record_hash(forged)
    data = json.dumps(forged, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"
    assert detected(lines[:2] + [data.encode()] + lines[3:])
