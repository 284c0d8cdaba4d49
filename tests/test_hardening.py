"""Hardening against bad input: the malformed-policy corpus (tests/policies_bad/), a fuzz test
of the loader, no traceback from the command line, and plugins that raise or misbehave inside
Guard.step contained by the policy's on_error without half-changed training state.

Each corpus file's first line is ``# expect: <regex>``: the loader must raise PolicyError whose
problems all name the file and a line, and whose text (``FILE:LINE: PATH: message ...``)
matches the regex (the message and the YAML path)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runhelpers import batch, make_model

from lbw_policy import TrainingHalted
from lbw_policy.adapters.guard import Guard
from lbw_policy.base import Action, Actuator, Detector
from lbw_policy.cli import main
from lbw_policy.decision_log import read_log, verify_log
from lbw_policy.errors import PolicyError
from lbw_policy.plugins import Registration, Registry, get_registry
from lbw_policy.policy import load_policy, loads_policy
from lbw_policy.replay import replay
from lbw_policy.records import action_rows

ROOT = Path(__file__).resolve().parents[1]
CORPUS = sorted((ROOT / "tests" / "policies_bad").glob("*.yaml"))
DEFAULT_TEXT = (ROOT / "policies" / "default.yaml").read_text(encoding="utf-8")


def expectation(path: Path) -> str:
    first = path.read_bytes().split(b"\n", 1)[0].decode("utf-8")
    assert first.startswith("# expect: "), f"{path.name}: first line must be '# expect: <regex>'"
    return first[len("# expect: "):]


# ---------------------------------------------------------------------- malformed policies


def test_corpus_has_at_least_50_uniquely_numbered_files():
    assert len(CORPUS) >= 50
    numbers = [p.name.split("-", 1)[0] for p in CORPUS]
    assert len(set(numbers)) == len(numbers) and all(n.isdigit() for n in numbers)


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_malformed_policy_is_rejected_with_file_line_and_path(path):
    regex = expectation(path)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    text = str(info.value)
    assert re.search(regex, text), f"{regex!r} not found in:\n{text}"
    for problem in info.value.problems:
        assert problem.file == str(path)
        assert isinstance(problem.line, int) and problem.line >= 1, str(problem)
        assert str(problem).startswith(f"{path}:{problem.line}: {problem.path or '<root>'}: ")


def test_validate_cli_over_the_whole_corpus_prints_file_line_path_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "lbw_policy.cli", "validate",
                           *[str(p.relative_to(ROOT)) for p in CORPUS]],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    for path in CORPUS:
        rel = re.escape(str(path.relative_to(ROOT)))
        assert re.search(rf"^INVALID {rel}: \d+ problems?$", proc.stderr, re.M), path.name
        assert re.search(rf"^  {rel}:\d+: \S+: ", proc.stderr, re.M), path.name


# ----------------------------------------------------------------------------------- fuzz

def _load_or_reject(text) -> None:
    """The loader's whole contract: a Policy or a PolicyError whose problems have lines."""
    try:
        loads_policy(text, source="fuzz.yaml")
    except PolicyError as exc:
        assert exc.problems and all(p.file == "fuzz.yaml" for p in exc.problems)
        assert all(isinstance(p.line, int) for p in exc.problems), str(exc)


FRAGMENTS = ["apiVersion: lbw-policy/v1\n", "kind: Policy\n", "metadata: {name: f}\n", "rules:\n",
             "  - name: r\n", "    when: {signal: loss.zscore, op: '>', value: 4}\n",
             "    then: [{actuator: lr_scale, multiply: 0.5}]\n", "detectors:\n",
             "  loss: {type: loss_spike}\n", "actuators:\n", "  lr_scale: {min: 0.1}\n", "&a ",
             "*a", "<<: *a\n", "!!python/object:os.system ", "!!binary ", "? ", ": ", "- ", "[",
             "]", "{", "}", ",", "'", '"', "\n", "  ", "\t", "#", "---\n", "...\n", ".nan", "1e999",
             "-.inf", "99999999999999999999", "~", "yes", "2024-01-01", "%YAML 1.1\n", "\x00",
             "\ufeff", "|\n", ">\n", "!!set {a, b}\n", "!!omap [a: 1]\n", "&x [*x]\n"]

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(),
                      st.floats(allow_nan=True, allow_subnormal=False),  # FTZ may be on (demo)
                      st.text(max_size=8))
json_tree = st.recursive(json_leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=4),
    st.dictionaries(st.sampled_from(["apiVersion", "kind", "metadata", "rules", "detectors",
                                     "actuators", "name", "when", "then", "signal", "op", "value",
                                     "type", "params", "all", "any", "not", "for", "actuator",
                                     "multiply", "min", "max", "every", "mode", "on_error", "x"]),
                    kids, max_size=5)), max_leaves=25)

FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.text(max_size=300))
def test_fuzz_arbitrary_text_never_crashes_the_loader(text):
    _load_or_reject(text)


@FUZZ
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=30))
def test_fuzz_yaml_fragments_never_crash_the_loader(parts):
    _load_or_reject("".join(parts))


@FUZZ
@given(json_tree)
def test_fuzz_structured_documents_never_crash_the_loader(doc):
    _load_or_reject(yaml.safe_dump(doc, allow_unicode=True))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(DEFAULT_TEXT)), st.integers(0, 255),
                          st.sampled_from(["replace", "insert", "delete"])), min_size=1, max_size=4))
def test_fuzz_byte_edits_of_a_real_policy_never_crash_the_loader(edits):
    data = bytearray(DEFAULT_TEXT.encode("utf-8"))
    for pos, byte, how in edits:
        pos = min(pos, len(data))
        if how == "insert":
            data[pos:pos] = bytes([byte])
        elif pos < len(data):
            if how == "replace":
                data[pos] = byte
            else:
                del data[pos]
    _load_or_reject(bytes(data))


# ------------------------------------------------------------------ no traceback from the CLI


@pytest.mark.parametrize("argv, code, message", [
    (["validate", "{tmp}/missing.yaml"], 1, "policy file not found"),
    (["validate", "{tmp}"], 1, "cannot read policy file"),
    (["audit", "{tmp}/nope"], 2, "error: no decision log at"),
    (["audit", "{tmp}/junk.jsonl"], 0, "chain FAILED"),
    (["audit", "{tmp}/junk.jsonl", "--explain", "x.1"], 2, "error: no record with id 'x.1'"),
    (["verify", "{tmp}/junk.jsonl"], 1, "FAILED"),
    (["replay", "{tmp}", "--policy", "default"], 2, "error: no telemetry at"),
    (["replay", "{tmp}", "--policy", "{tmp}/missing.yaml"], 2, "no policy file"),
    (["plot", "{tmp}/nope", "-o", "{tmp}/x.png"], 2, "error: no telemetry at"),
    (["test", "{tmp}/junk.jsonl"], 1, "ERROR"),
    (["test", "{tmp}/missing.yaml"], 1, "cannot read test file"),
    (["run", "--policy", "{tmp}/junk.jsonl", "--steps", "1"], 1, "error: invalid policy"),
    (["run", "--data", "{tmp}/missing.txt", "--steps", "1"], 2, "error:"),
])
def test_bad_input_gives_a_one_line_error_never_a_traceback(tmp_path, capsys, argv, code, message):
    (tmp_path / "junk.jsonl").write_bytes(b"\x89PNG\x00\xff garbage\n{not json}\n")
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(argv) == code
    captured = capsys.readouterr()
    assert message in captured.out + captured.err
    assert "Traceback" not in captured.out + captured.err


def test_an_unexpected_error_is_one_line_with_exit_4(monkeypatch, capsys):
    import lbw_policy.audit

    def boom(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(lbw_policy.audit, "load_audit", boom)
    monkeypatch.delenv("LBW_POLICY_DEBUG", raising=False)
    assert main(["audit", "x"]) == 4
    assert capsys.readouterr().err.strip() == (
        "error: internal error: ZeroDivisionError: a bug (set LBW_POLICY_DEBUG=1 for the "
        "traceback, and please report it)")
    monkeypatch.setenv("LBW_POLICY_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["audit", "x"])


# -------------------------------------------------- plugins that raise inside Guard.step


class Misbehave(Detector):
    """Emits ``x = 1`` except at ``bad_at`` steps, where it returns ``what``: a value that is
    not a scalar, a string, or a mapping that breaks while being read."""

    name = "misbehave"
    signals = ("x", "y")
    params_schema = {"type": "object", "additionalProperties": False,
                     "properties": {"bad_at": {"type": "array"}, "what": {"type": "string"}}}

    def __init__(self, bad_at=(), what="vector"):
        super().__init__(bad_at=list(bad_at), what=what)
        self.bad_at, self.what = set(bad_at), what

    def compute(self, telemetry):
        if telemetry.step not in self.bad_at:
            return {"x": torch.tensor(1.0), "y": torch.tensor(2.0)}
        if self.what == "vector":
            return {"x": torch.tensor(1.0), "y": torch.ones(3)}
        if self.what == "string":
            return {"x": torch.tensor(1.0), "y": "two"}

        class Broken(dict):
            def items(self):
                yield "x", torch.tensor(5.0)
                raise RuntimeError("broken mapping")
        return Broken()


class Flaky(Actuator):
    """Raises in ``observe`` / ``before_step`` / ``after_step`` / the commit of a recovery at
    the steps given in ``fail``: ``{"observe": [..], "before": [..], "after": [..], "recover": [..]}``."""

    name = "flaky"
    bounds_schema = {"type": "object"}
    commands = {"apply": {"type": "null"}}

    def __init__(self, **fail):
        super().__init__(**fail)
        self.fail = {k: set(v) for k, v in fail.items()}
        self.step = 0

    def observe(self, telemetry):
        self.step = telemetry.step
        if self.step in self.fail.get("observe", ()):
            raise RuntimeError(f"flaky observe at step {self.step}")

    def recover(self, step):
        if step in self.fail.get("recover", ()):
            return Action(self.name, "recover", requested=1, applied=1, before=0, after=1)
        return None

    def plan(self, verb, value, step):
        return Action(self.name, verb, requested=1, applied=1, before=0, after=1, step=step)

    def commit(self, action):
        raise RuntimeError(f"flaky commit at step {self.step}")

    def before_step(self, optimizer, step):
        if self.step in self.fail.get("before", ()):
            raise RuntimeError(f"flaky before_step at step {self.step}")
        return True

    def after_step(self, optimizer, stepped, step):
        if self.step in self.fail.get("after", ()):
            raise RuntimeError(f"flaky after_step at step {self.step}")


@pytest.fixture(scope="module")
def reg() -> Registry:
    base = get_registry()
    dets, acts = dict(base.detectors), dict(base.actuators)
    dets["misbehave"] = Registration("misbehave", "detector", Misbehave, "tests", "0")
    acts["flaky"] = Registration("flaky", "actuator", Flaky, "tests", "0")
    return Registry(detectors=dets, actuators=acts)


def policy(reg, on_error, what="vector", flaky="{}", bad_at="[1]"):
    return loads_policy(f"""\
apiVersion: lbw-policy/v1
kind: Policy
metadata: {{name: hardening}}
on_error: {on_error}
detectors:
  m: {{type: misbehave, params: {{bad_at: {bad_at}, what: {what}}}}}
actuators:
  lr_scale: {{min: 0.1, max: 1.0}}
  flaky: {flaky}
rules:
  - name: always
    when: {{signal: m.x, op: ">", value: 0}}
    then: [{{actuator: lr_scale, set: 0.5}}]
""", registry=reg)


def train(tmp_path, pol, reg, steps=3):
    """Run steps; return (results, weights before each step, lr after each step, error)."""
    model, opt = make_model()
    guard = Guard(opt, pol, model=model, log_dir=tmp_path / "run", registry=reg)
    results, weights, lrs, error = [], [], [], None
    try:
        for s in range(steps):
            weights.append([p.detach().clone() for p in model.parameters()])
            x, y = batch(s)
            torch.nn.functional.mse_loss(model(x), y).backward()
            try:
                results.append(guard.step(torch.nn.functional.mse_loss(model(x), y)))
            finally:
                lrs.append(opt.param_groups[0]["lr"])
                opt.zero_grad(set_to_none=True)
    except TrainingHalted as exc:
        error = exc
    guard.close()
    weights.append([p.detach().clone() for p in model.parameters()])
    return results, weights, lrs, error


def unchanged(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def events(tmp_path):
    read = read_log(tmp_path / "run" / "decisions.jsonl")
    assert verify_log(tmp_path / "run" / "decisions.jsonl").ok
    return [(r["step"], r["event"], r.get("where")) for r in read.records
            if r["event"] not in ("run_start", "run_end")]


@pytest.mark.parametrize("what, message", [
    ("vector", "RuntimeError: shape '[]' is invalid for input of size 3"),
    ("string", "TypeError: a signal value must be a 0-dim tensor or a real number, found str 'two'"),
    ("broken", "RuntimeError: broken mapping"),
])
def test_a_detector_returning_garbage_is_contained_and_contributes_nothing(tmp_path, reg, what, message):
    results, weights, lrs, error = train(tmp_path, policy(reg, "continue", what), reg)
    assert error is None and len(results) == 3
    err = [d for d in results[1].decisions if d["event"] == "error"]
    assert len(err) == 1 and err[0]["where"] == "detector m (misbehave)"
    assert err[0]["error"] == message
    # no partial output: neither x nor y of the broken step reached the rules or the telemetry
    assert "m.x" not in results[1].signals and "m.y" not in results[1].signals
    tel = [json.loads(line) for line in (tmp_path / "run" / "telemetry.jsonl").read_text().splitlines()]
    assert tel[1]["signals"] == {} and tel[2]["signals"] == {"m.x": 1.0, "m.y": 2.0}
    assert [e[:2] for e in events(tmp_path)] == [(0, "fired"), (1, "error"), (1, "resolved"),
                                                 (2, "fired")]


def test_a_detector_error_with_skip_step_skips_and_with_halt_halts(tmp_path, reg):
    results, weights, _, error = train(tmp_path / "a", policy(reg, "skip_step"), reg)
    assert [r.skipped for r in results] == [False, True, False]
    assert unchanged(weights[1], weights[2])
    results, weights, _, error = train(tmp_path / "b", policy(reg, "halt"), reg)
    assert isinstance(error, TrainingHalted) and len(results) == 1
    assert str(error).startswith("training halted at step 1 by on_error=halt after detector 'm' raised")
    assert unchanged(weights[1], weights[-1])


@pytest.mark.parametrize("on_error, skipped, halted", [("continue", False, False),
                                                        ("skip_step", True, False),
                                                        ("halt", True, True)])
def test_a_raising_before_step_never_leaves_the_learning_rate_half_changed(
        tmp_path, reg, on_error, skipped, halted):
    # lr_scale (0.5) is entered first and changes the param group's lr; flaky then raises
    results, weights, lrs, error = train(tmp_path, policy(reg, on_error, flaky="{before: [1]}", bad_at="[]"), reg)
    assert lrs[:2] == [0.05, 0.05]  # the scheduled lr is back after every step, halted or not
    assert (error is not None) == halted
    if halted:
        assert "on_error=halt after actuator 'flaky' before_step raised RuntimeError" in str(error)
        assert unchanged(weights[1], weights[-1])
        tel = (tmp_path / "run" / "telemetry.jsonl").read_text().splitlines()
        assert json.loads(tel[-1])["halted"] is True  # the halted step's signals, for replay
    else:
        assert results[1].skipped is skipped
        assert unchanged(weights[1], weights[2]) is skipped
        assert results[1].lr == pytest.approx(0.025)  # the step ran (or not) with the scale
    assert (1, "error", "actuator flaky before_step") in events(tmp_path)


def test_a_raising_after_step_still_unwinds_the_other_actuators(tmp_path, reg):
    # after_step runs in reverse: flaky (raises) first, then lr_scale must still restore the lr
    results, weights, lrs, error = train(tmp_path, policy(reg, "continue", flaky="{after: [1]}", bad_at="[]"), reg)
    assert error is None and lrs == [0.05, 0.05, 0.05]
    assert not results[1].skipped and not unchanged(weights[1], weights[2])
    err = [d for d in results[1].decisions if d["event"] == "error"]
    assert [(d["where"], d["error"]) for d in err] == [
        ("actuator flaky after_step", "RuntimeError: flaky after_step at step 1")]


def test_a_raising_recovery_commit_is_contained(tmp_path, reg):
    results, _, _, error = train(tmp_path, policy(reg, "skip_step", flaky="{recover: [2]}", bad_at="[]"), reg)
    assert error is None and [r.skipped for r in results] == [False, False, True]
    assert (2, "recover", None) in events(tmp_path)
    assert (2, "error", "actuator flaky recover commit") in events(tmp_path)


def test_a_raising_observe_and_recovery_commit_are_contained_alike_by_the_guard_and_its_replay(tmp_path, reg):
    pol = policy(reg, "skip_step", flaky="{observe: [1], recover: [2]}", bad_at="[]")
    results, weights, _, error = train(tmp_path, pol, reg)
    assert error is None and [r.skipped for r in results] == [False, True, True]
    errors = [(s, where) for s, event, where in events(tmp_path) if event == "error"]
    assert errors == [(1, "actuator flaky signals"), (2, "actuator flaky recover commit")]
    # the shadow (lbw-policy replay / test) contains the same errors at the same places
    result = replay(tmp_path / "run", pol, registry=reg)
    shadow = [r for st in result.steps for r in st.shadow]
    assert [(r["step"], r["where"]) for r in shadow if r["event"] == "error"] == errors
    assert action_rows(shadow) == action_rows(read_log(tmp_path / "run" / "decisions.jsonl").records)
    assert result.summary["differing_steps"] == 0 and result.summary["shadow_skipped"] == 2


def test_a_failed_commit_is_recorded_as_not_applied_after_its_write_ahead_record(tmp_path, reg, capsys):
    # issue 18: the write-ahead record said `applied: 1` and nothing said otherwise
    pol = loads_policy("""\
apiVersion: lbw-policy/v1
kind: Policy
metadata: {name: failed-commit}
on_error: continue
detectors:
  m: {type: misbehave}
actuators:
  lr_scale: {min: 0.1, max: 1.0}
  flaky: {}
rules:
  - name: both
    when: {signal: m.x, op: ">", value: 0}
    then: [{actuator: lr_scale, set: 0.5}, {actuator: flaky, apply: null}]
""", registry=reg)
    results, _, lrs, error = train(tmp_path, pol, reg, steps=2)
    assert error is None and lrs == [0.05, 0.05]  # lr_scale's commit went through
    log = tmp_path / "run" / "decisions.jsonl"
    records = read_log(log).records
    fired = next(r for r in records if r["event"] == "fired")
    failed = records[fired["seq"] + 1]  # chained right after the write-ahead record
    assert failed["event"] == "error" and failed["where"] == "actuator flaky commit"
    assert failed["not_applied"] == {
        "id": fired["id"], "seq": fired["seq"], "step": 0, "event": "fired", "rule": "both",
        "action": {k: v for k, v in fired["actions"][1].items() if k != "command"}}
    assert fired["actions"][1]["applied"] == 1  # the log is append-only: never rewritten
    # verify: chain intact; the not-applied action is listed; a forged reference is a problem
    report = verify_log(log)
    assert report.ok
    assert f"line {failed['seq'] + 1}: flaky action of record seq {fired['seq']} (fired, rule " \
        "both) was not applied: its commit raised RuntimeError: flaky commit at step 0" \
        in report.warnings
    # reading the records together: that action was not applied, lr_scale's was
    rows = action_rows(records)
    assert [(r["step"], r["event"], r.get("actuator"), r.get("value")) for r in rows][:3] == [
        (0, "fired", "lr_scale", 0.5), (0, "fired", "flaky", None), (0, "error", None, None)]
    # audit: by actuator, the text line, --explain
    assert main(["audit", str(tmp_path / "run"), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"]["by_actuator"]["flaky"] == {
        "actions": 2, "applied": 0, "clamped": 0, "refused": 0, "failed": 2, "enforced": 2}
    assert doc["summary"]["by_actuator"]["lr_scale"]["applied"] == 2
    assert main(["audit", str(tmp_path / "run")]) == 0
    text = capsys.readouterr().out
    assert f"flaky NOT APPLIED (its commit raised; record {failed['id']})" in text
    assert f"not applied: flaky 0 -> 1, decided in record {fired['id']}" in text
    assert main(["audit", str(tmp_path / "run"), "--explain", fired["id"]]) == 0
    assert "except flaky, whose commit raised (not applied" in capsys.readouterr().out
    # replay: the shadow's flaky commit raises too; what was applied is the same
    result = replay(tmp_path / "run", pol, registry=reg)
    assert result.summary["differing_steps"] == 0


def test_verify_refuses_a_not_applied_that_names_no_earlier_action(tmp_path):
    from lbw_policy.decision_log import DecisionLog

    path = tmp_path / "decisions.jsonl"
    with DecisionLog(path) as log:
        log.append({"step": 0, "event": "fired", "rule": "r",
                    "actions": [{"actuator": "lr_scale", "applied": 0.5}]})
        log.append({"step": 0, "event": "error", "error": "E: x", "not_applied": {
            "seq": 0, "action": {"actuator": "skip_step"}}})
        log.append({"step": 0, "event": "error", "error": "E: x", "not_applied": {
            "seq": 5, "action": {"actuator": "lr_scale"}}})
        log.append({"step": 1, "event": "run_end"})
    report = verify_log(path)
    assert not report.ok and [p.split(":")[0] for p in report.problems] == ["line 2", "line 3"]
    assert "names record seq 0 and actuator 'skip_step'" in report.problems[0]


def test_verify_lists_five_not_applied_actions_then_counts_the_rest(tmp_path):
    from lbw_policy.decision_log import DecisionLog

    path = tmp_path / "decisions.jsonl"
    with DecisionLog(path) as log:
        for step in range(7):
            rec = log.append({"step": step, "event": "action", "rule": "r",
                              "actions": [{"actuator": "lr_scale", "applied": 0.5}]})
            log.append({"step": step, "event": "error", "error": "E: x", "not_applied": {
                "seq": rec["seq"], "event": "action", "rule": "r",
                "action": {"actuator": "lr_scale"}}})
        log.append({"step": 7, "event": "run_end"})
    report = verify_log(path)
    assert report.ok and len(report.warnings) == 6
    assert report.warnings[0] == ("line 2: lr_scale action of record seq 0 (action, rule r) was "
                                  "not applied: its commit raised E: x")
    assert report.warnings[5].startswith("2 more actions were not applied")
