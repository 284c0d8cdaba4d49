"""Tests for ``lbw-policy test`` (lbw_policy.policytest) and the shadow it drives
(lbw_policy.shadow): the series notation, matching and diffs, test-file errors with file, line
and path, the shipped policy tests, and the --show round trip."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from lbw_policy.cli import main
from lbw_policy.errors import PolicyError
from lbw_policy.policy import loads_policy
from lbw_policy.policytest import (format_actual, load_test_file, parse_series, run_test_file)
from lbw_policy.records import action_rows
from lbw_policy.shadow import Shadow

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ROOT / "policies"
TESTS = POLICIES / "tests"
FIXTURE_TESTS = ROOT / "tests" / "policies"  # scenario tests of test-only policies
SCENARIOS = ("quiet", "spike", "nan", "drift", "flapping")

POLICY = """\
apiVersion: lbw-policy/v1
kind: Policy
metadata: {name: pt, owner: tests}
detectors:
  loss: {type: loss_spike}
  nan: {type: nonfinite}
actuators:
  lr_scale: {min: 0.1, max: 1.0, recover: {factor: 2.0, every: 3}}
  skip_step: {max_consecutive: 2}
  halt: {checkpoint: false}
rules:
  - name: stop
    priority: 10
    when: {signal: nan.any, op: ">", value: 0}
    for: 3
    then: [{actuator: halt}]
  - name: brake
    when: {signal: loss.zscore, op: ">", value: 4}
    then:
      - {actuator: lr_scale, multiply: 0.5}
      - {actuator: skip_step}
"""


@pytest.fixture
def policy_file(tmp_path) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(POLICY, encoding="utf-8")
    return path


def write_test(tmp_path, body: str) -> Path:
    path = tmp_path / "p.test.yaml"
    path.write_text("policy: p.yaml\ntests:\n" + body, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- series notation


@pytest.mark.parametrize("spec, expected", [
    ("0x3", [0.0, 0.0, 0.0]),
    ("1 2.5 -1e-3", [1.0, 2.5, -0.001]),
    ("1+0.5x4", [1.0, 1.5, 2.0, 2.5]),
    ("3-1x3", [3.0, 2.0, 1.0]),
    ("-1e-3+1e-3x3", [-0.001, 0.0, 0.001]),
    ("_ _x2 7", [None, None, None, 7.0]),
    ("(3.9 4.1)x2 0", [3.9, 4.1, 3.9, 4.1, 0.0]),
    ("((1)x2 2)x2", [1.0, 1.0, 2.0, 1.0, 1.0, 2.0]),
    ([1, None, "_", 2.5, True], [1, None, None, 2.5, True]),
    (4, [4]),
])
def test_series_notation(spec, expected):
    assert parse_series(spec) == expected


def test_series_ramp_is_rounded_to_12_digits():
    # 1 + 70 * 0.1 is 8.000000000000002 in floats; the ramp gives 8.0, so "> 8" is false there
    assert parse_series("1+0.1x72")[70:] == [8.0, 8.1]


def test_series_non_finite_tokens():
    nan, inf, ninf = parse_series("nan inf -inf")
    assert math.isnan(nan) and inf == math.inf and ninf == -math.inf


@pytest.mark.parametrize("spec, match", [
    ("abc", "token 'abc': not a number"),
    ("1x", "count after 'x' must be a whole number"),
    ("1ex3", "expected VxN or A\\+BxN"),
    ("(1 2", "a group is written \\(A B ...\\)xN"),
    ("(1 2) 3", "a group is written"),
    ("0x2000000", "more than 1000000 steps"),
    ("(0x1000)x2000", "more than 1000000 steps"),
    ({"a": 1}, "expected a list or a string"),
])
def test_series_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_series(spec)


# ------------------------------------------------------------------- running and matching


def test_passing_case_with_ranges_wildcards_and_final_state(tmp_path, policy_file):
    path = write_test(tmp_path, """\
  - name: two spikes
    signals:
      loss.zscore: "0 9 0 9 9 9 0x4"
    expect:
      - {step: 1, rule: brake, event: fired, actuator: lr_scale, value: 0.5}
      - {step: 1, rule: brake, event: fired, actuator: skip_step, value: true}
      - {step: 2, rule: brake, event: resolved}
      - {step: 3, rule: brake, event: fired, actuator: lr_scale, value: 0.25}
      - {steps: "3:4", actuator: skip_step, value: true}
      - {step: 4, rule: brake, event: action, actuator: lr_scale, value: 0.125}
      # the third skip in a row is refused: max_consecutive 2
      - {step: 5, rule: brake, actuator: skip_step, value: false, clamped: true}
      - {step: 5, rule: brake, actuator: lr_scale, value: 0.1, clamped: true}
      - {step: 6, event: resolved}
      - {step: 8, event: recover, actuator: lr_scale, value: 0.2}
    skipped: [1, "3:4"]
    halted_at: null
""")
    result = run_test_file(path)
    assert result.error is None and result.passed, result.cases[0].diff
    assert result.cases[0].skipped == [1, 3, 4]


def test_failing_case_shows_a_diff_and_the_cli_exits_1(tmp_path, policy_file, capsys):
    path = write_test(tmp_path, """\
  - name: wrong expectations
    signals:
      loss.zscore: "0 9 0"
    expect:
      - {step: 1, rule: brake, event: fired, actuator: lr_scale, value: 0.25}
      - {step: 1, rule: brake, event: fired, actuator: skip_step, value: true}
    skipped: [2]
  - name: right
    signals: {loss.zscore: "0x3"}
    expect: []
""")
    assert main(["test", str(path)]) == 1
    out = capsys.readouterr().out
    assert "  FAIL  wrong expectations" in out and "  ok    right" in out
    lines = [line.strip() for line in out.splitlines()]
    assert "- 1     brake     fired     lr_scale    0.25" in lines
    assert "+ 1     brake     fired     lr_scale    0.5" in lines
    assert "+ 2     brake     resolved  -           -" in lines
    assert "- skipped steps 2" in lines and "+ skipped steps 1" in lines
    assert out.rstrip().endswith("1 passed, 1 failed (1 file)")


def test_nan_storm_halts_and_ignore_leaves_events_out(tmp_path, policy_file):
    path = write_test(tmp_path, """\
  - name: storm
    signals:
      nan.any: "0 1x5"
    ignore: [action, recover]
    expect:
      - {step: 3, rule: stop, event: fired, actuator: halt, value: true}
      - {step: 3, rule: stop, event: halt}
    halted_at: 3
""")
    result = run_test_file(path)
    assert result.passed, result.cases[0].diff
    assert result.cases[0].halted_at == 3


def test_sample_and_hold_between_emissions(tmp_path, policy_file):
    # "_" emits nothing: the signal keeps its last value, like a detector that is not due
    path = write_test(tmp_path, """\
  - name: held
    signals:
      loss.zscore: "9 _x2 0"
    ignore: [recover]
    expect:
      - {step: 0, rule: brake, event: fired, actuator: lr_scale, value: 0.5}
      - {step: 0, actuator: skip_step, value: true}
      - {steps: "1:2", rule: brake, event: action, actuator: lr_scale}
      - {step: 1, actuator: skip_step, value: true}
      - {step: 2, actuator: skip_step, value: false}
      - {step: 3, rule: brake, event: resolved}
""")
    result = run_test_file(path)
    assert result.passed, result.cases[0].diff


def test_show_output_pasted_back_passes(tmp_path, policy_file, capsys):
    case = """\
  - name: anything
    signals:
      loss.zscore: "0 9x8 0x5 9 0x3"
      nan.any: "0x6 1x2 0x6"
    expect: []
"""
    path = write_test(tmp_path, case)
    assert main(["test", "--show", str(path)]) == 1  # the case fails: expect is empty
    shown = capsys.readouterr().out
    body = "\n".join(line for line in shown.splitlines() if not line.startswith("#"))
    path.write_text("policy: p.yaml\ntests:\n" + case.replace("    expect: []\n", "") + body + "\n",
                    encoding="utf-8")
    result = run_test_file(path)
    assert result.passed, result.cases[0].diff
    assert 'steps: "' in shown  # consecutive identical rows are folded into a range


# ------------------------------------------------------------------------ test-file errors


@pytest.mark.parametrize("body, match", [
    ("  - name: x\n    signals: {loss.zscor: \"1\"}\n    expect: []\n",
     r"p\.test\.yaml:4: tests\[0\]\.signals\[\"loss\.zscor\"\]: unknown signal 'loss\.zscor'.*did you mean 'loss\.zscore'"),
    ("  - name: x\n    signals: {skip_step.exhausted: \"1\"}\n    expect: []\n",
     r":4: tests\[0\]\.signals\[\"skip_step\.exhausted\"\]: signal 'skip_step\.exhausted' is published by the actuator"),
    ("  - name: x\n    signals: {loss.zscore: \"1 two\"}\n    expect: []\n",
     r":4: .*bad series: token 'two': not a number"),
    ("  - name: x\n    signals: {loss.zscore: \"1\"}\n    expect:\n      - {step: 0, rule: brak}\n",
     r":6: tests\[0\]\.expect\[0\]\.rule: unknown rule 'brak'.*did you mean 'brake'"),
    ("  - name: x\n    signals: {loss.zscore: \"1\"}\n    expect:\n      - {rule: brake}\n",
     r":6: tests\[0\]\.expect\[0\]: give exactly one of 'step' and 'steps'"),
    ("  - name: x\n    signals: {loss.zscore: \"1\"}\n    expect:\n      - {steps: \"5:2\"}\n",
     r"tests\[0\]\.expect\[0\]\.steps: expected a step >= 0 or an inclusive range"),
    ("  - name: x\n    signals: {loss.zscore: \"1\"}\n    expect:\n      - {step: 0, event: fire}\n",
     r"tests\[0\]\.expect\[0\]\.event: unknown event 'fire'"),
    ("  - name: x\n    signals: {loss.zscore: \"1\"}\n",
     r":3: tests\[0\]\.expect: missing 'expect'"),
    ("  - name: x\n    signals: {loss.zscore: \"1\"}\n    expect: []\n    halted: 3\n",
     r":6: tests\[0\]\.halted: unknown key 'halted'.*did you mean 'halted_at'"),
    ("  - name: x\n    signals: {loss.zscore: \"1\"}\n    expect: []\n  - name: x\n    signals: {loss.zscore: \"1\"}\n    expect: []\n",
     r"tests\[1\]\.name: duplicate case name 'x'"),
])
def test_test_file_errors_name_file_line_and_path(tmp_path, policy_file, body, match):
    path = write_test(tmp_path, body)
    with pytest.raises(PolicyError, match=match) as info:
        load_test_file(path)
    for problem in info.value.problems:
        assert problem.file == str(path) and isinstance(problem.line, int)


def test_missing_policy_and_bad_yaml(tmp_path, capsys):
    path = tmp_path / "t.yaml"
    path.write_text("policy: nope.yaml\ntests: [{name: a, signals: {x.y: 1}, expect: []}]\n")
    with pytest.raises(PolicyError, match=r"t\.yaml:1: policy: policy file not found"):
        load_test_file(path)
    path.write_text("policy: [\n")
    with pytest.raises(PolicyError, match=r"t\.yaml:\d+: <root>: invalid YAML"):
        load_test_file(path)
    path.write_text("tests: !!python/object/apply:os.system ['echo pwned']\n")
    assert main(["test", str(path)]) == 1
    out = capsys.readouterr().out
    assert "ERROR" in out and "YAML tag '!!python/object/apply:os.system' is not allowed" in out


def test_invalid_policy_is_reported_not_raised(tmp_path, capsys):
    (tmp_path / "p.yaml").write_text(POLICY.replace("loss_spike", "loss_spik"))
    path = write_test(tmp_path, "  - {name: a, signals: {loss.zscore: 1}, expect: []}\n")
    assert main(["test", str(path)]) == 1
    assert "unknown detector type 'loss_spik'" in capsys.readouterr().out


# --------------------------------------------------------------- the shipped policy tests


def test_every_shipped_policy_has_worst_case_scenario_tests():
    policies = sorted(p.stem for p in POLICIES.glob("*.yaml"))
    assert policies, "no policies found"
    missing = [name for name in policies if not (TESTS / f"{name}.test.yaml").exists()]
    assert not missing, f"policies without a test file in policies/tests/: {missing}"
    for name in policies:
        tf = load_test_file(TESTS / f"{name}.test.yaml")
        names = " ".join(c.name.lower() for c in tf.cases)
        for word in SCENARIOS:
            assert word in names, f"{name}: no {word!r} scenario among {names!r}"


@pytest.mark.parametrize("path", sorted(TESTS.glob("*.test.yaml")) + sorted(FIXTURE_TESTS.glob("*.test.yaml")),
                         ids=lambda p: p.name)
def test_shipped_policy_tests_pass(path):
    result = run_test_file(path)
    assert result.error is None, result.error
    failed = {c.name: c.diff for c in result.cases if not c.passed}
    assert not failed, failed


def test_cli_runs_a_directory(capsys):
    assert main(["test", str(TESTS)]) == 0
    assert re.search(r"\d+ passed, 0 failed \(\d+ files\)", capsys.readouterr().out)


# ---------------------------------------------------------------------------- the shadow


def test_actuators_plan_commit_recover_without_an_optimizer(registry):
    """lr_scale, skip_step and halt plan, commit and recover without being attached: the
    shadow's stand-in optimizer is only for before_step / after_step."""
    lr = registry.actuators["lr_scale"].cls(min=0.1, max=1.0, recover={"factor": 2.0, "every": 1})
    a = lr.plan("multiply", 0.05, step=0)
    assert (a.requested, a.applied, a.clamped) == (0.05, 0.1, True)
    lr.commit(a)
    assert lr.recover(1).applied == 0.2
    skip = registry.actuators["skip_step"].cls(max_consecutive=1)
    skip.commit(skip.plan("apply", None, 0))
    assert skip.pending
    halt = registry.actuators["halt"].cls(checkpoint=False)
    halt.commit(halt.plan("apply", None, 0))
    assert halt.halted


def test_shadow_reads_actuator_signals_for_escalation():
    text = POLICY.replace("""  - name: brake
""", """  - name: escalate
    priority: 20
    when:
      all:
        - {signal: loss.zscore, op: ">", value: 4}
        - {signal: skip_step.exhausted, op: ">", value: 0}
    then: [{actuator: halt}]
  - name: brake
""")
    shadow = Shadow(loads_policy(text))
    events = []
    for t in range(5):
        out = shadow.step(t, {"loss.zscore": 9.0})
        events += [(r["step"], r["rule"], r["event"]) for r in out.records]
        if out.halted:
            break
    # two skips in a row exhaust skip_step (max_consecutive 2); the third step escalates
    assert [e for e in events if e[0] == 2] == [(2, "escalate", "fired"), (2, "brake", "action"),
                                                 (2, "escalate", "halt")]
    assert shadow.halted and shadow.skipped_steps == 2


def test_action_rows_flatten_records():
    rows = action_rows([
        {"step": 1, "rule": "r", "event": "fired",
         "actions": [{"actuator": "lr_scale", "applied": 0.5, "clamped": False},
                     {"actuator": "skip_step", "applied": True, "clamped": False}]},
        {"step": 2, "rule": "r", "event": "resolved", "actions": []},
        {"step": 0, "event": "run_start"},
        {"step": 3, "rule": None, "event": "recover",
         "actions": [{"actuator": "lr_scale", "applied": "NaN", "clamped": True}]},
    ])
    assert [(r["step"], r["event"], r.get("actuator")) for r in rows] == [
        (1, "fired", "lr_scale"), (1, "fired", "skip_step"), (2, "resolved", None),
        (3, "recover", "lr_scale")]
    assert math.isnan(rows[-1]["value"]) and rows[-1]["clamped"] is True


def test_format_actual_of_a_broken_file(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("")
    assert format_actual([run_test_file(path)]).startswith(f"# ERROR {path}")


def test_the_stand_in_optimizer_takes_the_runs_hyperparameters(tmp_path):
    """beta2 recovers toward the optimizer's own beta2: 0.95 as in the run, not torch's 0.999."""
    (tmp_path / "p.yaml").write_text(POLICY.replace(
        "  halt: {checkpoint: false}\n",
        "  halt: {checkpoint: false}\n  beta2: {min: 0.8, max: 0.999, recover: {step: 0.05, every: 1}}\n"
    ).replace("      - {actuator: skip_step}\n", "      - {actuator: skip_step}\n      - {actuator: beta2, set: 0.85}\n"))
    path = write_test(tmp_path, """\
  - name: recover to the run's beta2
    signals: {loss.zscore: "9 0x4"}
    ignore: [fired, resolved, action]
    expect:
      - {step: 3, event: recover, actuator: lr_scale, value: 1.0}  # every 3, factor 2
      - {step: 1, event: recover, actuator: beta2, value: 0.9}
      - {step: 2, event: recover, actuator: beta2, value: 0.95}
""").read_text()
    (tmp_path / "p.test.yaml").write_text(path.replace("tests:\n", "optimizer: {type: AdamW, betas: [0.9, 0.95]}\ntests:\n", 1))
    result = run_test_file(tmp_path / "p.test.yaml")
    assert result.passed, result.error or result.cases[0].diff
    (tmp_path / "p.test.yaml").write_text(path.replace("tests:\n", "optimizer: {betaz: 1}\ntests:\n", 1))
    with pytest.raises(PolicyError, match=r":2: optimizer\.betaz: unknown key 'betaz'"):
        load_test_file(tmp_path / "p.test.yaml")
