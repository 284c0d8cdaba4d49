"""Containment and clear errors (part of the issue "Nothing escapes, nothing half-applies, every
error helps"): plugin values that are not numbers, a failed ``Guard()``, losses that are not real
numbers, and command-line inputs that used to end in "internal error" (exit 4)."""

from __future__ import annotations

import json

import pytest
import torch

from lbw_policy import Actuator, Detector, Guard
from lbw_policy.cli import main
from lbw_policy.decision_log import read_log
from lbw_policy.plugins import Registration, Registry, get_registry
from lbw_policy.policy import loads_policy

HEAD = """\
apiVersion: lbw-policy/v1
kind: Policy
metadata: {name: containment}
mode: enforce
on_error: continue
"""


class Chatty(Actuator):
    """Publishes a signal whose value is whatever the test says (a tensor, a string)."""

    name = "chatty"
    signals = ("level",)
    bounds_schema = {"type": "object", "additionalProperties": False,
                     "properties": {"value": {"type": "string"}}}

    def __init__(self, value="tensor"):
        super().__init__(value=value)
        self.value = value

    def signal_values(self):
        return {"level": torch.tensor(1.0) if self.value == "tensor" else "1e3"}


class Hooker(Detector):
    """Attaches a forward hook in setup; raises in setup when told to."""

    name = "hooker"
    signals = ("x",)
    params_schema = {"type": "object", "additionalProperties": False,
                     "properties": {"fail": {"type": "boolean"}}}

    def __init__(self, fail=False):
        super().__init__(fail=fail)
        self.fail = fail
        self.handle = None

    def setup(self, model, optimizer, every=1):
        super().setup(model, optimizer, every)
        if self.fail:
            raise RuntimeError("setup failed on purpose")
        self.handle = model.register_forward_hook(lambda *a: None)

    def compute(self, telemetry):
        return {"x": telemetry.loss}

    def close(self):
        if self.handle is not None:
            self.handle.remove()


def _registry() -> Registry:
    base = get_registry()
    dets, acts = dict(base.detectors), dict(base.actuators)
    dets["hooker"] = Registration("hooker", "detector", Hooker, "tests", "0")
    acts["chatty"] = Registration("chatty", "actuator", Chatty, "tests", "0")
    return Registry(detectors=dets, actuators=acts)


@pytest.mark.parametrize("value", ["tensor", "string"])
def test_an_actuator_signal_that_is_not_a_number_is_contained(tmp_path, value):
    reg = _registry()
    policy = loads_policy(HEAD + f"""\
actuators:
  chatty: {{value: {value}}}
  skip_step: {{}}
rules:
  - name: r
    when: {{signal: chatty.level, op: ">", value: 0}}
    then: [{{actuator: skip_step}}]
""", registry=reg)
    model = torch.nn.Linear(2, 1)
    guard = Guard(torch.optim.SGD(model.parameters(), lr=0.1), policy, model=model,
                  log_dir=tmp_path / "run", registry=reg)
    model(torch.ones(1, 2)).sum().backward()
    result = guard.step(torch.tensor(1.0))  # nothing escapes; on_error: continue
    assert not result.skipped  # the rule never saw the value
    guard.close()
    errors = [r for r in read_log(tmp_path / "run" / "decisions.jsonl").records
              if r["event"] == "error"]
    assert [(e["fault"]["name"], e["fault"]["phase"]) for e in errors] == [("chatty", "signals")]
    assert "signal 'chatty.level' must be a number, bool or None" in errors[0]["error"]


def test_a_failed_guard_leaves_no_hook_on_the_model(tmp_path):
    reg = _registry()
    policy = loads_policy(HEAD + """\
detectors:
  first: {type: hooker}
  second: {type: hooker, params: {fail: true}}
actuators:
  skip_step: {}
rules: []
""", registry=reg)
    model = torch.nn.Linear(2, 1)
    with pytest.raises(RuntimeError, match="setup failed on purpose"):
        Guard(torch.optim.SGD(model.parameters(), lr=0.1), policy, model=model,
              log_dir=tmp_path / "run", registry=reg)
    assert not model._forward_hooks  # the first detector's hook was removed again
    assert not (tmp_path / "run").exists()  # nothing written either


@pytest.mark.parametrize("loss, error, match", [
    ("1e3", TypeError, r"loss must be a 0-dim tensor or a real number, found str '1e3'"),
    (True, TypeError, r"found bool"),
    (torch.tensor(1 + 2j), TypeError, r"real-valued tensor, found dtype torch.complex64"),
    (torch.empty((), device="meta"), ValueError, r"on the meta device"),
    (torch.ones(2), ValueError, r"scalar tensor, got shape \(2,\)"),
])
def test_a_loss_that_is_not_a_real_number_is_refused_before_anything_changes(
        tmp_path, loss, error, match):
    model = torch.nn.Linear(2, 1)
    guard = Guard(torch.optim.SGD(model.parameters(), lr=0.1), "default", model=model,
                  log_dir=tmp_path / "run")
    before = guard.state_dict()
    with pytest.raises(error, match=match):
        guard.step(loss)
    assert guard.state_dict() == before and guard.step_count == 0
    model(torch.ones(1, 2)).sum().backward()
    assert guard.step(torch.tensor(0.5)).step == 0  # the guard goes on
    guard.close()


@pytest.mark.parametrize("argv, message", [
    (["run", "--steps", "0"], "argument --steps: expected an integer >= 1, found 0"),
    (["run", "--steps", "-1"], "argument --steps: expected an integer >= 1, found -1"),
    (["run", "--device", "bogus"], "argument --device: expected cpu, cuda, cuda:N or mps"),
])
def test_bad_run_arguments_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_run_on_cuda_without_cuda_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--device", "cuda"])
    assert exc.value.code == 2
    assert "this machine has no CUDA device" in capsys.readouterr().err


def test_version(capsys):
    import lbw_policy

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"lbw-policy {lbw_policy.__version__}"


def test_a_policy_that_halts_at_step_0_exits_3_with_a_summary(tmp_path, capsys):
    policy = tmp_path / "halt0.yaml"
    policy.write_text(HEAD.replace("on_error: continue", "on_error: halt") + """\
detectors:
  loss: {type: loss_spike}
actuators:
  halt: {checkpoint: false}
rules:
  - name: stop-now
    when: {signal: loss.ema, op: ">", value: -1}
    then: [{actuator: halt}]
""")
    code = main(["run", "--policy", str(policy), "--steps", "3", "--out", str(tmp_path / "run"),
                 "--no-progress", "--n-layer", "1", "--n-embd", "32", "--n-head", "2"])
    out = capsys.readouterr().out
    assert code == 3
    assert "final train loss  - (no step was taken)" in out
    assert "HALTED            training halted at step 0 by rule 'stop-now'" in out


@pytest.mark.parametrize("summary", ['{"log": null}', "[1, 2]", "not json"])
def test_verify_with_a_garbage_summary_reports_it_and_checks_the_chain(tmp_path, capsys, summary):
    model = torch.nn.Linear(2, 1)
    with Guard(torch.optim.SGD(model.parameters(), lr=0.1), "default", model=model,
               log_dir=tmp_path / "run"):
        pass
    (tmp_path / "run" / "summary.json").write_text(summary)
    # an unsigned log's only record of its length is unusable: a problem (issue 17), not a
    # warning; the chain itself is still checked and found intact
    assert main(["verify", str(tmp_path / "run")]) == 1
    out = capsys.readouterr().out
    assert "problem: summary.json cannot be used" in out
    assert "records cut from the end cannot be detected" in out
    assert "FAILED: 1 problem(s) in 2 records" in out
    assert main(["verify", "--no-summary", str(tmp_path / "run")]) == 0


def _three_steps(run_dir):
    """A plain loop of three governed steps under the default policy; returns the guard."""
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Guard(opt, "default", model=model, log_dir=run_dir) as guard:
        for _ in range(3):
            model(torch.ones(1, 2)).sum().backward()
            guard.step(torch.tensor(1.0))
            opt.zero_grad()
    return guard


def test_plot_writes_the_file_it_names_or_fails_cleanly(tmp_path, capsys):
    _three_steps(tmp_path / "run")
    assert main(["plot", str(tmp_path / "run"), "-o", str(tmp_path / "timeline")]) == 0
    assert (tmp_path / "timeline").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "timeline.png").exists()
    assert main(["plot", str(tmp_path / "run"), "-o", "/dev/full"]) == 2
    assert "No space left on device" in capsys.readouterr().err


def test_a_plugin_that_cannot_take_its_params_fails_validation_named(tmp_path):
    from lbw_policy.errors import PolicyBoundsError

    class Positional(Detector):
        name = "positional"
        signals = ("x",)
        params_schema = {"type": "object", "properties": {"alpha": {"type": "number"}}}

        def __init__(self, params=None):  # wrong: params arrive as keyword arguments
            super().__init__()

    base = get_registry()
    reg = Registry(detectors={**base.detectors, "positional": Registration(
        "positional", "detector", Positional, "my-plugin", "1.0")}, actuators=dict(base.actuators))
    with pytest.raises(PolicyBoundsError, match=r"<string>:7: detectors\.p\.params: plugin "
                                                r"'my-plugin' \(.*Positional\) cannot be built "
                                                r"with these values: TypeError"):
        loads_policy(HEAD + """\
detectors:
  p: {type: positional, params: {alpha: 0.5}}
rules: []
""", registry=reg)


def test_a_plain_loop_gets_a_summary_that_verify_uses(tmp_path, capsys):
    guard = _three_steps(tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["log"]["records"] == guard.log.seq
    log = tmp_path / "run" / "decisions.jsonl"
    log.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:-1]))  # cut the tail
    assert main(["verify", str(tmp_path / "run")]) == 1
    assert "records deleted from the end" in capsys.readouterr().out


def test_a_second_run_into_the_same_log_dir_is_refused_unless_resuming(tmp_path, capsys):
    _three_steps(tmp_path / "run")
    before = (tmp_path / "run" / "decisions.jsonl").read_bytes()
    model = torch.nn.Linear(2, 1)
    with pytest.raises(FileExistsError, match=r"already holds a run: pass resume=True"):
        Guard(torch.optim.SGD(model.parameters(), lr=0.1), "default", model=model,
              log_dir=tmp_path / "run")
    assert (tmp_path / "run" / "decisions.jsonl").read_bytes() == before
    Guard(torch.optim.SGD(model.parameters(), lr=0.1), "default", model=model,
          log_dir=tmp_path / "run", resume=True).close()
    assert main(["verify", str(tmp_path / "run")]) == 0  # one chain, continued
    code = main(["run", "--steps", "1", "--out", str(tmp_path / "run"), "--no-progress",
                 "--n-layer", "1", "--n-embd", "32", "--n-head", "2"])
    assert code == 2 and "already holds a run" in capsys.readouterr().err


def test_replay_warns_about_rules_reading_signals_the_run_never_recorded(tmp_path, capsys):
    _three_steps(tmp_path / "run")
    other = tmp_path / "other.yaml"
    other.write_text(HEAD + """\
detectors:
  qk: {type: spectral_entropy}
actuators:
  skip_step: {}
rules:
  - name: qk-collapse
    when: {signal: qk.drop, op: ">", value: 0.4}
    then: [{actuator: skip_step}]
  - name: escalate
    when: {signal: skip_step.exhausted, op: ">", value: 0}
    then: [{actuator: skip_step}]
""")
    assert main(["replay", str(tmp_path / "run"), "--policy", str(other)]) == 0
    out = capsys.readouterr().out
    assert "warning: rule 'qk-collapse' reads 'qk.drop', which the run never recorded" in out
    assert "rule 'escalate'" not in out  # actuator signals exist in any replay
    assert main(["replay", str(tmp_path / "run"), "--policy", str(other), "--strict"]) == 1


def test_foot_guns_are_warned_once(tmp_path):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = Guard(opt, "default", model=model, log_dir=tmp_path / "run")
    with pytest.warns(UserWarning, match=r"found no gradient on any parameter: call "
                                         r"loss.backward\(\) first"):
        guard.step(torch.tensor(1.0))  # backward() forgotten
    model(torch.ones(1, 2)).sum().backward()
    opt.step()  # and then the optimizer stepped by hand as well
    with pytest.warns(UserWarning, match=r"optimizer.step\(\) was called outside guard.step\(\)"):
        guard.step(torch.tensor(1.0))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once each: no second warning
        opt.step()
        guard.step(torch.tensor(1.0))
    guard.close()
    assert not opt._optimizer_step_post_hooks  # the guard's hook is removed at close


def test_audit_groups_consecutive_identical_decisions(tmp_path, capsys):
    policy = loads_policy(HEAD + """\
actuators:
  lr_scale: {min: 0.1, max: 1.0}
rules:
  - name: always
    when: {signal: lr_scale.scale, op: ">", value: 0}
    then: [{actuator: lr_scale, multiply: 0.5}]
""")
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Guard(opt, policy, model=model, log_dir=tmp_path / "run") as guard:
        for _ in range(30):
            model(torch.ones(1, 2)).sum().backward()
            guard.step(torch.tensor(1.0))
            opt.zero_grad()
    assert main(["audit", str(tmp_path / "run"), "--limit", "0"]) == 0
    out = capsys.readouterr().out
    clamped = [line for line in out.splitlines() if "lr_scale 0.1 -> 0.1" in line]
    assert len(clamped) == 1 and clamped[0].endswith("(x26)")  # steps 4..29, one line
    assert " 4..29 " in clamped[0]
