"""Tests for lbw_policy.progress: the progress bar and printed summary of a plain loop (issue
18: "own loops get no printed summary"), and StepResult.lr_scale, which the bar shows."""

from __future__ import annotations

import io
import json

import torch.nn.functional as F
from runhelpers import LR, batch, make_model

from lbw_policy import TrainingHalted
from lbw_policy.adapters.guard import Guard
from lbw_policy.policy import loads_policy
from lbw_policy.progress import Progress, format_summary

# a non-finite step is skipped and the learning rate halved; with HALT, training halts instead
POLICY = """\
apiVersion: lbw-policy/v1
kind: Policy
metadata: {name: progress}
detectors:
  nan: {type: nonfinite}
actuators:
  lr_scale:  {min: 0.1, max: 1.0}
  skip_step: {max_consecutive: 5}
  halt: {}
rules:
  - name: nan-skip
    when: {signal: nan.any, op: ">", value: 0}
    then: [{actuator: skip_step}, {actuator: lr_scale, multiply: 0.5}]
"""
HALT = POLICY.replace("then: [{actuator: skip_step}, {actuator: lr_scale, multiply: 0.5}]",
                      "then: [{actuator: halt}]")


def loop(tmp_path, policy, nan_at, steps, **kw):
    """A plain loop under Progress; returns (progress, StepResults, the halt or None, what was
    printed)."""
    model, opt = make_model()
    guard = Guard(opt, loads_policy(policy), model=model, log_dir=tmp_path / "run")
    results, halted, out = [], None, io.StringIO()
    try:
        with Progress(guard, total=steps, file=out, **kw) as progress:
            for s in range(steps):
                x, y = batch(s)
                loss = F.mse_loss(model(x), y) * (float("nan") if s in nan_at else 1.0)
                loss.backward()
                results.append(guard.step(loss))
                opt.zero_grad(set_to_none=True)
                progress.update(results[-1])
    except TrainingHalted as exc:
        halted = exc
    return progress, results, halted, out.getvalue()


def test_the_bar_shows_the_lr_scale_and_the_summary_is_printed_at_the_end(tmp_path):
    progress, results, halted, printed = loop(tmp_path, POLICY, {2, 4}, 6, close_guard=True,
                                              mininterval=0)
    assert halted is None
    # StepResult.lr_scale: the scale in force during the step (halved at 2 and at 4)
    assert [r.lr_scale for r in results] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert [r.lr for r in results] == [LR, LR, LR * 0.5, LR * 0.5, LR * 0.25, LR * 0.25]
    postfix = progress.bar.postfix
    assert "lr_scale=0.25" in postfix and "skipped=2" in postfix and "decisions=4" in postfix
    assert f"loss={results[-1].loss:.3f}" in postfix and progress.bar.n == 6
    assert printed == format_summary(progress.summary) + "\n"
    assert printed.splitlines()[:4] == [
        "steps             6 run, 2 skipped",
        "decisions by rule:",
        "  nan-skip                     4",  # fired, resolved, fired, resolved
        "decisions by actuator:"]
    # close_guard: the guard is closed (run_end written, summary.json on disk)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["steps"] == 6 and on_disk["decisions_by_rule"] == {"nan-skip": 4}


def test_a_halt_is_in_the_printed_summary_and_still_raised(tmp_path):
    progress, results, halted, printed = loop(tmp_path, HALT, {3}, 6)
    assert isinstance(halted, TrainingHalted) and halted.step == 3 and len(results) == 3
    lines = printed.splitlines()
    assert lines[0] == "steps             4 run, 0 skipped"
    assert lines[1] == f"HALTED            {halted}" and "halted at step 3" in lines[1]
    assert progress.bar.n == 3  # the halted step raised before update


def test_format_summary_counts_device_gated_steps_as_skipped():
    text = format_summary({"steps": 10, "skipped_steps": 1, "gated_steps": 2,
                           "decisions_by_rule": {"a": 1, "b": 3}, "decisions_by_event": {},
                           "decisions_by_actuator": {"skip_step": 3}})
    assert text.splitlines() == [
        "steps             10 run, 3 skipped (2 on the device)",
        "decisions by rule:", "  b                            3", "  a                            1",
        "decisions by actuator:", "  skip_step                    3",
        "decisions by event: none"]
