"""Guard (lbw_policy.adapters.guard) on a real AdamW: what a governed step changes and what it
leaves bit-identical, write-ahead logging, conflicts, halts, contained plugin errors, resume.

Expected values are computed by hand (learning-rate trajectories, skip patterns) or by running
plain AdamW on the same seed and data (weights and optimizer state, compared bitwise)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from lbw_policy import TrainingHalted
from lbw_policy.adapters.guard import Guard
from lbw_policy.base import Action, Actuator, Detector
from lbw_policy.decision_log import read_log, verify_log
from lbw_policy.errors import ActuatorError, PolicyError
from lbw_policy.plugins import Registration, Registry, get_registry
from lbw_policy.policy import load_policy, loads_policy

from actuator_helpers import assert_same as assert_same_tensors, batch, forward_backward, opt_state, params

ROOT = Path(__file__).resolve().parents[1]
# The pre-issue-6 default (a spike brake), frozen as a fixture: these tests pin its timers.
SPIKE_BRAKE = ROOT / "tests" / "policies" / "spike-brake.yaml"
LR = 0.1

HEAD = """\
apiVersion: lbw-policy/v1
kind: Policy
metadata: {name: guard-test}
"""

# A rule that fires at every step: loss.ema is the EMA of a (positive) MSE loss, always > -1.
ALWAYS = """\
detectors:
  loss: {type: loss_spike}
actuators:
  lr_scale: {min: 0.05, max: 1.0, max_change_per_step: 0.5}
  skip_step: {max_consecutive: 3}
rules:
  - name: always
    when: {signal: loss.ema, op: ">", value: -1}
    then:
      - {actuator: lr_scale, multiply: 0.5}
      - {actuator: skip_step}
"""


# ------------------------------------------------------------------------- test plugins


class Script(Detector):
    """Emits ``value = values[step]`` (a scripted signal, to drive rules by hand)."""

    name = "script"
    signals = ("value",)
    params_schema = {"type": "object", "additionalProperties": False, "required": ["values"],
                     "properties": {"values": {"type": "array", "items": {"type": "number"}}}}

    def __init__(self, values):
        super().__init__(values=values)
        self.values = list(values)

    def compute(self, telemetry):
        return {"value": torch.tensor(float(self.values[telemetry.step]))}


class Boom(Detector):
    """Emits ``x = 1`` and ``y = 2`` except at the steps in ``fail_at``, where it raises."""

    name = "boom"
    signals = ("x", "y")
    params_schema = {"type": "object", "additionalProperties": False,
                     "properties": {"fail_at": {"type": "array", "items": {"type": "integer"}}}}

    def __init__(self, fail_at=()):
        super().__init__(fail_at=list(fail_at))
        self.fail_at = set(fail_at)

    def compute(self, telemetry):
        if telemetry.step in self.fail_at:
            raise RuntimeError(f"boom at step {telemetry.step}")
        return {"x": torch.tensor(1.0), "y": torch.tensor(2.0)}


class Probe(Actuator):
    """Does nothing but, at commit, read the decision log named in its bounds and keep its last
    record: proves the decision was on disk before the actuator changed anything."""

    name = "probe"
    bounds_schema = {"type": "object", "additionalProperties": False, "required": ["log"],
                     "properties": {"log": {"type": "string"}}}
    commands = {"apply": {"type": "null"}}
    seen: list = []

    def __init__(self, log):
        super().__init__(log=log)
        self.log = Path(log)

    def plan(self, verb, value, step):
        return Action(self.name, verb, requested=True, applied=True, before=False, after=True,
                      extra={"step": step})

    def commit(self, action):
        lines = self.log.read_bytes().splitlines()
        Probe.seen.append((action.step, json.loads(lines[-1])))


class Refuser(Actuator):
    name = "refuser"
    commands = {"apply": {"type": "null"}}

    def attach(self, optimizer):
        raise ActuatorError(f"refuser: cannot act on {type(optimizer).__name__}")


class BadPlan(Actuator):
    name = "badplan"
    commands = {"apply": {"type": "null"}}

    def plan(self, verb, value, step):
        raise RuntimeError("cannot plan")


@pytest.fixture(scope="module")
def reg() -> Registry:
    """The built-in plugins plus this module's test plugins, in a registry of its own."""
    base = get_registry()
    dets = dict(base.detectors)
    acts = dict(base.actuators)
    for cls in (Script, Boom):
        dets[cls.name] = Registration(cls.name, "detector", cls, "tests", "0.0.1")
    for cls in (Probe, Refuser, BadPlan):
        acts[cls.name] = Registration(cls.name, "actuator", cls, "tests", "0.0.1")
    return Registry(detectors=dets, actuators=acts)


# ------------------------------------------------------------------------------ helpers


def make(seed: int = 0, wd: float = 0.1, lr: float = LR):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    return model, opt




def plain_run(steps, lr_at=None, take=None, seed=0):
    """Plain AdamW over the same data. ``lr_at(step)`` sets the group lr for that step;
    ``take(step)`` False zeroes the gradient and does not step (a hand-made skip)."""
    model, opt = make(seed)
    for s in range(steps):
        forward_backward(model, s)
        if take is None or take(s):
            if lr_at is not None:
                opt.param_groups[0]["lr"] = lr_at(s)
            opt.step()
            opt.param_groups[0]["lr"] = LR
        opt.zero_grad(set_to_none=True)
    return model, opt




def records(log_dir) -> list[dict]:
    read = read_log(Path(log_dir) / "decisions.jsonl")
    assert not read.torn_tail and not read.bad_lines
    return read.records


def decisions_of(recs, events=("fired", "action", "resolved", "recover", "halt", "error")):
    return [r for r in recs if r["event"] in events]


# ------------------------------------------------------------------------ the contract


def test_quiet_policy_is_bit_identical_to_plain_adamw(tmp_path):
    # spike-brake.yaml over 20 steps: z-scores and gnorm ratios are still warming up (25 steps),
    # no NaN: no rule can fire, and the governed run must be exactly plain AdamW.
    model, opt = make()
    with Guard(opt, SPIKE_BRAKE, model=model, log_dir=tmp_path / "run") as guard:
        for s in range(20):
            loss = forward_backward(model, s)
            result = guard.step(loss)
            opt.zero_grad(set_to_none=True)
            assert not result.skipped and result.lr == LR and result.decisions == []
            assert result.loss == loss.item()
    ref_model, ref_opt = plain_run(20)
    assert_same_tensors(params(model), params(ref_model))
    assert_same_tensors(opt_state(opt), opt_state(ref_opt))
    assert int(opt.state[next(model.parameters())]["step"]) == 20
    assert [r["event"] for r in records(tmp_path / "run")] == ["run_start", "run_end"]


def test_audit_mode_logs_every_decision_and_changes_nothing(tmp_path, reg):
    pol = loads_policy(HEAD + "mode: audit\n" + ALWAYS, registry=reg)
    model, opt = make()
    results = []
    with Guard(opt, pol, model=model, log_dir=tmp_path / "run", registry=reg) as guard:
        for s in range(20):
            results.append(guard.step(forward_backward(model, s)))
            opt.zero_grad(set_to_none=True)
    ref_model, ref_opt = plain_run(20)
    assert_same_tensors(params(model), params(ref_model))
    assert_same_tensors(opt_state(opt), opt_state(ref_opt))
    assert [r.skipped for r in results] == [False] * 20
    assert [r.lr for r in results] == [LR] * 20

    decs = decisions_of(records(tmp_path / "run"))
    assert [(d["step"], d["event"]) for d in decs] == [(0, "fired")] + [(s, "action") for s in range(1, 20)]
    for d in decs:
        assert d["enforced"] is False and d["mode"] == "audit" and d["rule"] == "always"
        lr, skip = d["actions"]
        # Nothing is committed in audit mode: every step plans from the untouched state.
        assert (lr["actuator"], lr["before"], lr["applied"]) == ("lr_scale", 1.0, 0.5)
        assert (skip["actuator"], skip["applied"], skip["before"]) == ("skip_step", True, 0)


def test_enforced_skip_step_skips_and_respects_max_consecutive(tmp_path, reg):
    text = HEAD + """\
detectors:
  loss: {type: loss_spike}
actuators:
  skip_step: {max_consecutive: 2}
rules:
  - name: always-skip
    when: {signal: loss.ema, op: ">", value: -1}
    then: [{actuator: skip_step}]
"""
    model, opt = make()
    pattern = []
    with Guard(opt, loads_policy(text, registry=reg), model=model, log_dir=tmp_path / "run",
               registry=reg) as guard:
        for s in range(9):
            before_p, before_o = params(model), opt_state(opt)
            result = guard.step(forward_backward(model, s))
            opt.zero_grad(set_to_none=True)
            pattern.append(result.skipped)
            if result.skipped:  # weights, exp_avg, exp_avg_sq and step all untouched
                assert_same_tensors(params(model), before_p)
                assert_same_tensors(opt_state(opt), before_o)
            else:
                assert not torch.equal(params(model)[0], before_p[0])
        assert guard.summary()["skipped_steps"] == 6
    # Two skips, then max_consecutive=2 forces a step; repeat.
    assert pattern == [True, True, False] * 3
    assert [int(st["step"]) for st in opt_state(opt)] == [3] * 4
    # The governed run is exactly plain AdamW stepping only on the batches of steps 2, 5, 8.
    ref_model, ref_opt = plain_run(9, take=lambda s: s % 3 == 2)
    assert_same_tensors(params(model), params(ref_model))
    assert_same_tensors(opt_state(opt), opt_state(ref_opt))

    decs = decisions_of(records(tmp_path / "run"))
    refused = [d for d in decs if d["step"] == 2][0]["actions"][0]
    assert refused["applied"] is False and refused["clamped"] is True
    assert refused["note"] == "max_consecutive=2 reached; step taken"
    assert [d["actions"][0]["applied"] for d in decs] == [True, True, False] * 3
    assert all(d["enforced"] is True for d in decs)


def test_enforced_lr_scale_follows_clamped_trajectory_and_recovers(tmp_path, reg):
    values = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    text = HEAD + f"""\
detectors:
  s: {{type: script, params: {{values: {values}}}}}
actuators:
  lr_scale: {{min: 0.2, max: 1.0, max_change_per_step: 0.3, recover: {{factor: 2.0, every: 2}}}}
rules:
  - name: brake
    when: {{signal: s.value, op: ">", value: 0.5}}
    keep_firing_for: 1
    then: [{{actuator: lr_scale, multiply: 0.5}}]
"""
    # By hand: 1.0 -> 0.5 asked, max change 0.3 -> 0.7; 0.35 asked -> 0.4; 0.2; 0.1 asked ->
    # min 0.2. Step 4: condition false, kept firing (keep_firing_for 1), held: no recovery.
    # Step 5: resolved; 5 - 3 >= every -> recover 0.2*2 = 0.4. Step 7: 0.8 asked, max change
    # -> 0.7. Step 9: 1.4 asked, capped at 1.0. Then nothing.
    scales = [0.7, 0.4, 0.2, 0.2, 0.2, 0.4, 0.4, 0.7, 0.7, 1.0, 1.0, 1.0]
    expected_events = {0: ["fired"], 1: ["action"], 2: ["action"], 3: ["action"],
                       5: ["resolved", "recover"], 7: ["recover"], 9: ["recover"]}
    model, opt = make()
    lrs, events = [], {}
    with Guard(opt, loads_policy(text, registry=reg), model=model, log_dir=tmp_path / "run",
               registry=reg) as guard:
        for s in range(len(values)):
            result = guard.step(forward_backward(model, s))
            opt.zero_grad(set_to_none=True)
            lrs.append(result.lr)
            if result.decisions:
                events[s] = [d["event"] for d in result.decisions]
            assert opt.param_groups[0]["lr"] == LR  # the scale never leaks into the group's lr
    assert lrs == [LR * k for k in scales]
    assert events == expected_events

    decs = decisions_of(records(tmp_path / "run"))
    acts = [(d["step"], d["actions"][0]["requested"], d["actions"][0]["applied"],
             d["actions"][0]["clamped"]) for d in decs if d.get("actions")]
    assert acts == [(0, 0.5, 0.7, True), (1, 0.35, 0.4, True), (2, 0.2, 0.2, False),
                    (3, 0.1, 0.2, True), (5, 0.4, 0.4, False), (7, 0.8, 0.7, True),
                    (9, 1.0, 1.0, False)]
    assert [d["actions"][0]["verb"] for d in decs if d["event"] == "recover"] == ["recover"] * 3
    # The weights are plain AdamW with lr = LR * scale at each step.
    ref_model, ref_opt = plain_run(len(values), lr_at=lambda s: LR * scales[s])
    assert_same_tensors(params(model), params(ref_model))
    assert_same_tensors(opt_state(opt), opt_state(ref_opt))


def test_decision_is_on_disk_before_the_actuator_commits(tmp_path, reg):
    log = tmp_path / "run" / "decisions.jsonl"
    text = HEAD + f"""\
detectors:
  s: {{type: script, params: {{values: [0, 1, 1, 0]}}}}
actuators:
  probe: {{log: {json.dumps(str(log))}}}
rules:
  - name: poke
    when: {{signal: s.value, op: ">", value: 0.5}}
    then: [{{actuator: probe}}]
"""
    Probe.seen = []
    model, opt = make()
    written = {}
    with Guard(opt, loads_policy(text, registry=reg), model=model, log_dir=tmp_path / "run",
               registry=reg) as guard:
        for s in range(4):
            result = guard.step(forward_backward(model, s))
            opt.zero_grad(set_to_none=True)
            for d in result.decisions:
                if d.get("actions"):
                    written[s] = d
    assert [step for step, _ in Probe.seen] == [1, 2]
    for step, last_on_disk in Probe.seen:
        # The last line on disk at commit time is exactly this step's decision record.
        assert last_on_disk == written[step]
        assert last_on_disk["rule"] == "poke" and last_on_disk["step"] == step
        assert last_on_disk["actions"][0]["actuator"] == "probe"
    assert [written[s]["event"] for s in (1, 2)] == ["fired", "action"]


def test_priority_conflict_applies_the_higher_priority_value(tmp_path, reg):
    text = HEAD + """\
detectors:
  s: {type: script, params: {values: [1, 1]}}
actuators:
  lr_scale: {min: 0.05, max: 1.0}
rules:
  - name: gentle          # listed first, but lower priority
    priority: 1
    when: {signal: s.value, op: ">", value: 0.5}
    then: [{actuator: lr_scale, set: 0.25}]
  - name: strong
    priority: 9
    when: {signal: s.value, op: ">", value: 0.5}
    then: [{actuator: lr_scale, set: 0.5}]
"""
    model, opt = make()
    with Guard(opt, loads_policy(text, registry=reg), model=model, log_dir=tmp_path / "run",
               registry=reg) as guard:
        result = guard.step(forward_backward(model, 0))
    assert result.lr == LR * 0.5
    strong, gentle = result.decisions  # higher priority first
    assert (strong["rule"], strong["priority"], gentle["rule"]) == ("strong", 9, "gentle")
    assert strong["actions"][0]["applied"] == 0.5 and strong["overridden"] == []
    assert gentle["actions"] == []
    assert gentle["overridden"] == [{"actuator": "lr_scale", "verb": "set", "value": 0.25,
                                     "overridden_by": "strong"}]
    assert decisions_of(records(tmp_path / "run")) == [strong, gentle]


def test_halt_raises_after_its_record_is_on_disk(tmp_path, reg, capsys):
    text = HEAD + """\
detectors:
  s: {type: script, params: {values: [0, 0, 7.5, 0]}}
actuators:
  halt: {}
rules:
  - name: stop-now
    when: {signal: s.value, op: ">", value: 5}
    then: [{actuator: halt}]
"""
    model, opt = make()
    guard = Guard(opt, loads_policy(text, registry=reg), model=model, log_dir=tmp_path / "run",
                  registry=reg)
    for s in range(2):
        guard.step(forward_backward(model, s))
        opt.zero_grad(set_to_none=True)
    weights = params(model)
    with pytest.raises(TrainingHalted,
                       match=r"^training halted at step 2 by rule 'stop-now'; signals: s\.value=7\.5$") as info:
        guard.step(forward_backward(model, 2))
    assert (info.value.rule, info.value.step, info.value.signals) == ("stop-now", 2, {"s.value": 7.5})
    assert_same_tensors(params(model), weights)  # the halted step did not step
    recs = records(tmp_path / "run")
    assert [r["event"] for r in recs[-2:]] == ["fired", "halt"]
    assert recs[-1]["rule"] == "stop-now" and recs[-1]["step"] == 2
    assert recs[-1]["message"] == str(info.value)
    report = verify_log(tmp_path / "run" / "decisions.jsonl")
    assert report.ok and report.warnings == [] and report.records == len(recs)
    from lbw_policy.cli import main

    assert main(["verify", str(tmp_path / "run")]) == 0
    assert f"OK: {len(recs)} records, chain intact" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="Guard has halted training; build a new one to continue"):
        guard.step(forward_backward(model, 3))


def test_nonfinite_loss_skips_then_six_in_a_row_halt(tmp_path):
    model, opt = make(lr=0.01)
    guard = Guard(opt, SPIKE_BRAKE, model=model, log_dir=tmp_path / "run")
    for s in range(5):
        guard.step(forward_backward(model, s))
        opt.zero_grad(set_to_none=True)
    weights, state = params(model), opt_state(opt)
    lrs = []
    for s in range(5, 10):  # five non-finite steps: each skipped, lr halved within [0.05, 1]
        result = guard.step(forward_backward(model, s, scale=float("nan")))
        opt.zero_grad(set_to_none=True)
        assert result.skipped
        assert result.signals["nan.any"] == 1.0 and result.signals["nan.loss"] == 1.0
        lrs.append(result.lr)
        assert_same_tensors(params(model), weights)
        assert_same_tensors(opt_state(opt), state)
    assert lrs == [0.01 * k for k in (0.5, 0.25, 0.125, 0.0625, 0.05)]
    with pytest.raises(TrainingHalted, match=r"^training halted at step 10 by rule 'nonfinite-halt'; "
                                             r"signals: nan\.any=1") as info:
        guard.step(forward_backward(model, 10, scale=float("nan")))
    assert info.value.rule == "nonfinite-halt" and info.value.step == 10
    assert_same_tensors(params(model), weights)
    recs = records(tmp_path / "run")
    assert recs[-1]["event"] == "halt"
    assert [r["rule"] for r in recs if r["event"] == "fired"] == ["nonfinite-skip", "nonfinite-halt"]
    assert verify_log(tmp_path / "run" / "decisions.jsonl").ok


# ---------------------------------------------------------------------------------- resume

# Loss (and gradients) x50 at these steps: grad-norm spikes after the 25-step warm-up. By the
# spike-brake policy's timers: 27 fires (lr 0.5, skip), keeps firing 5 steps, resolves at 33; lr
# recovers x1.05 at 37 and 47 (every 10 after the last change); 41 falls in the cooldown
# (33 + 10) and is ignored; 53 fires again and resolves at 59.
SPIKES = {27, 41, 53}


def _train(guard, model, opt, start, stop):
    for s in range(start, stop):
        guard.step(forward_backward(model, s, scale=50.0 if s in SPIKES else 1.0))
        opt.zero_grad(set_to_none=True)


def _key(rec):
    return (rec["step"], rec["rule"], rec["event"], rec.get("signals"),
            [(a["actuator"], a["requested"], a["applied"], a["clamped"], a["before"], a["after"])
             for a in rec.get("actions", [])])


def test_resume_makes_the_same_decisions_and_weights(tmp_path):
    # Uninterrupted: 60 steps.
    full_model, full_opt = make(lr=0.01)
    with Guard(full_opt, SPIKE_BRAKE, model=full_model, log_dir=tmp_path / "full") as guard:
        _train(guard, full_model, full_opt, 0, 60)
    full = records(tmp_path / "full")

    # Interrupted at 30: save, rebuild everything, load, continue in the same log.
    model, opt = make(lr=0.01)
    guard = Guard(opt, SPIKE_BRAKE, model=model, log_dir=tmp_path / "resumed")
    _train(guard, model, opt, 0, 30)
    saved = {"model": model.state_dict(), "opt": opt.state_dict(),
             "guard": json.loads(json.dumps(guard.state_dict()))}  # plain data
    guard.close()
    # The boundary falls inside live state: a rule firing, the lr scale below 1.
    assert saved["guard"]["engine"]["rules"]["loss-spike-brake"]["firing"] is True
    assert saved["guard"]["actuators"]["lr_scale"]["scale"] == 0.5

    model2, opt2 = make(seed=123, lr=0.01)  # fresh objects with different initial weights
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    guard2 = Guard(opt2, SPIKE_BRAKE, model=model2, log_dir=tmp_path / "resumed", resume=True)
    guard2.load_state_dict(saved["guard"])
    assert guard2.step_count == 30
    _train(guard2, model2, opt2, 30, 60)
    guard2.close()

    resumed = records(tmp_path / "resumed")
    late_full = [_key(r) for r in decisions_of(full) if r["step"] >= 30]
    late_resumed = [_key(r) for r in decisions_of(resumed) if r["step"] >= 30]
    assert late_resumed == late_full
    # Real firing on both sides of the boundary: resolution and recovery after the resume,
    # a second spike braked, and the lr recovering again.
    assert [(k[0], k[1], k[2]) for k in late_full] == [
        (33, "loss-spike-brake", "resolved"), (37, None, "recover"), (47, None, "recover"),
        (53, "loss-spike-brake", "fired"), (59, "loss-spike-brake", "resolved")]
    assert [k[4] for k in late_full if k[2] == "recover"] == [
        [("lr_scale", 0.525, 0.525, False, 0.5, 0.525)],
        [("lr_scale", 0.55125, 0.55125, False, 0.525, 0.55125)]]
    assert [_key(r) for r in decisions_of(resumed) if r["step"] < 30] == \
        [_key(r) for r in decisions_of(full) if r["step"] < 30]

    assert_same_tensors(params(full_model), params(model2))
    assert_same_tensors(opt_state(full_opt), opt_state(opt2))
    report = verify_log(tmp_path / "resumed" / "decisions.jsonl")
    assert report.ok, report.problems
    assert report.records == len(resumed)
    assert [r["event"] for r in resumed if r["event"] in ("run_start", "run_end", "resume")] == \
        ["run_start", "run_end", "run_start", "resume", "run_end"]
    resume = next(r for r in resumed if r["event"] == "resume")
    assert resume["resumed_from"]["log_seq"] == saved["guard"]["log"]["seq"]


def test_load_state_dict_refuses_another_policy_revision(tmp_path, reg):
    a = loads_policy(HEAD + ALWAYS, registry=reg)
    b = loads_policy(HEAD + ALWAYS.replace("max_consecutive: 3", "max_consecutive: 4"), registry=reg)
    model, opt = make()
    with Guard(opt, a, model=model, log_dir=tmp_path / "a", registry=reg) as ga:
        state = ga.state_dict()
    with Guard(opt, b, model=model, log_dir=tmp_path / "b", registry=reg) as gb:
        with pytest.raises(ValueError, match=rf"guard state was saved under policy revision "
                                             rf"{a.revision[:12]}, this guard runs revision "
                                             rf"{b.revision[:12]} \(<string>\); resume with the same policy file"):
            gb.load_state_dict(state)
        assert gb.step_count == 0


# --------------------------------------------------------------------- contained plugin errors


def _boom_policy(reg, on_error, fail_at):
    line = f"on_error: {on_error}\n" if on_error else ""
    return loads_policy(HEAD + line + f"""\
detectors:
  loss: {{type: loss_spike}}
  b: {{type: boom, params: {{fail_at: {fail_at}}}}}
actuators:
  lr_scale: {{min: 0.05, max: 1.0}}
rules:
  - name: on-x
    when: {{signal: b.x, op: ">", value: 0.5}}
    then: [{{actuator: lr_scale, set: 0.5}}]
""", registry=reg)


def test_detector_error_with_on_error_continue(tmp_path, reg):
    model, opt = make()
    results = []
    with Guard(opt, _boom_policy(reg, "continue", [2]), model=model, log_dir=tmp_path / "run",
               registry=reg) as guard:
        for s in range(4):
            before = params(model)
            results.append(guard.step(forward_backward(model, s)))
            opt.zero_grad(set_to_none=True)
            assert not torch.equal(params(model)[0], before[0])  # every step taken
    assert [r.skipped for r in results] == [False] * 4
    # Step 2: the broken detector's signals are absent (not last step's values); the others
    # are there.
    assert "b.x" not in results[2].signals and "b.y" not in results[2].signals
    assert {k for k in results[2].signals if k.startswith("loss.")} == {"loss.zscore", "loss.ema", "loss.delta"}
    assert results[3].signals["b.x"] == 1.0 and results[3].signals["b.y"] == 2.0
    error = [d for d in results[2].decisions if d["event"] == "error"]
    assert len(error) == 1
    assert error[0]["where"] == "detector b (boom)"
    assert error[0]["error"] == "RuntimeError: boom at step 2"
    assert error[0]["on_error"] == "continue"
    # The rule reading b.x does not act on a stale value: it resolves at step 2, fires again
    # at step 3.
    events = [(d["step"], d["event"]) for d in decisions_of(records(tmp_path / "run"))]
    assert events == [(0, "fired"), (1, "action"), (2, "error"), (2, "resolved"), (3, "fired")]


def test_detector_error_with_on_error_skip_step(tmp_path, reg):
    model, opt = make()
    with Guard(opt, _boom_policy(reg, "skip_step", [1]), model=model, log_dir=tmp_path / "run",
               registry=reg) as guard:
        guard.step(forward_backward(model, 0))
        opt.zero_grad(set_to_none=True)
        weights, state = params(model), opt_state(opt)
        result = guard.step(forward_backward(model, 1))
        opt.zero_grad(set_to_none=True)
        assert result.skipped
        assert_same_tensors(params(model), weights)
        assert_same_tensors(opt_state(opt), state)
        assert [d["on_error"] for d in result.decisions if d["event"] == "error"] == ["skip_step"]
        assert not guard.step(forward_backward(model, 2)).skipped


def test_detector_error_halts_by_default(tmp_path, reg):
    pol = _boom_policy(reg, None, [1])
    assert pol.on_error == "halt"
    model, opt = make()
    guard = Guard(opt, pol, model=model, log_dir=tmp_path / "run", registry=reg)
    guard.step(forward_backward(model, 0))
    opt.zero_grad(set_to_none=True)
    with pytest.raises(TrainingHalted, match=r"^training halted at step 1 by on_error=halt after "
                                             r"detector 'b' raised RuntimeError: boom at step 1$"):
        guard.step(forward_backward(model, 1))
    recs = records(tmp_path / "run")
    assert [r["event"] for r in recs[-2:]] == ["error", "halt"]
    assert verify_log(tmp_path / "run" / "decisions.jsonl").ok


def test_actuator_plan_error_keeps_each_action_with_its_own_command(tmp_path, reg):
    text = HEAD + """\
on_error: continue
detectors:
  s: {type: script, params: {values: [1]}}
actuators:
  badplan: {}
  lr_scale: {min: 0.05, max: 1.0}
rules:
  - name: both
    when: {signal: s.value, op: ">", value: 0.5}
    then:
      - {actuator: badplan}
      - {actuator: lr_scale, multiply: 0.5}
"""
    model, opt = make()
    with Guard(opt, loads_policy(text, registry=reg), model=model, log_dir=tmp_path / "run",
               registry=reg) as guard:
        result = guard.step(forward_backward(model, 0))
    error, fired = result.decisions
    assert error["event"] == "error" and error["where"] == "actuator badplan plan"
    assert error["error"] == "RuntimeError: cannot plan"
    assert fired["event"] == "fired"
    assert [(a["actuator"], a["applied"], a["command"]) for a in fired["actions"]] == \
        [("lr_scale", 0.5, {"verb": "multiply", "value": 0.5})]
    assert result.lr == LR * 0.5 and not result.skipped


# ------------------------------------------------------------- nothing half-applied at build


def test_actuator_attach_error_fails_before_any_file(tmp_path, reg):
    text = HEAD + """\
actuators:
  lr_scale: {}
  refuser: {}
rules: []
"""
    model, opt = make()
    run = tmp_path / "run"
    with pytest.raises(ActuatorError, match="refuser: cannot act on AdamW"):
        Guard(opt, loads_policy(text, registry=reg), model=model, log_dir=run, registry=reg)
    assert not run.exists()
    assert opt.param_groups[0]["lr"] == LR


def test_invalid_policy_creates_no_log_dir(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(HEAD + ALWAYS.replace("loss.ema", "loss.emma"), encoding="utf-8")
    model, opt = make()
    run = tmp_path / "run"
    with pytest.raises(PolicyError, match=r"bad\.yaml:\d+: rules\[0\]\.when\.signal: unknown signal 'loss\.emma'"):
        Guard(opt, bad, model=model, log_dir=run)
    assert not run.exists()


# ---------------------------------------------------------------- one host transfer per step


HOST = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy")


class CountHost(TorchFunctionMode):
    """Counts tensor -> Python conversions (each a host-device sync on an accelerator)."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("host_scalars", [False, True])
def test_signals_cross_to_the_host_once_per_step(tmp_path, host_scalars):
    """The accelerator path (statistics as tensors) makes one transfer per step; on the CPU the
    statistics read the loss and the grad norm as floats (once each per step, shared by the
    detectors; no device to wait for) and the step's one transfer carries the loss alone."""
    text = HEAD + """\
detectors:
  loss:  {type: loss_spike, params: {warmup: 2}}
  gnorm: {type: grad_norm, params: {warmup: 2}}
  nan:   {type: nonfinite}
actuators:
  lr_scale: {min: 0.05, max: 1.0}
rules:
  - name: always            # fires: the decision path must not sync either
    when: {all: [{signal: gnorm.norm, op: ">", value: 0}, {signal: nan.any, op: "<", value: 1}]}
    then: [{actuator: lr_scale, multiply: 0.9}]
"""
    model, opt = make()
    twin, twin_opt = make()  # plain AdamW: its own .item() calls (step counts) are the baseline
    with Guard(opt, loads_policy(text), model=model, log_dir=tmp_path / "run",
               host_scalars=host_scalars) as guard:
        for s in range(5):
            loss = forward_backward(model, s)
            forward_backward(twin, s)
            with CountHost() as plain:
                twin_opt.step()
            with CountHost() as governed:
                result = guard.step(loss)
            opt.zero_grad(set_to_none=True)
            twin_opt.zero_grad(set_to_none=True)
            host_reads = Counter({"__float__": 2}) if host_scalars else Counter()  # loss, grad norm: once each
            assert governed.calls - plain.calls == Counter({"tolist": 1}) + host_reads, \
                (s, governed.calls, plain.calls)
            assert plain.calls - governed.calls == Counter()
            assert result.decisions and type(result.loss) is float
            detected = {k: v for k, v in result.signals.items() if k.split(".")[0] in ("loss", "gnorm", "nan")}
            assert len(detected) == 8
            assert all(type(v) is float for v in detected.values())
            # Actuators publish host state: plain numbers, never tensors.
            assert all(type(v) in (int, float, bool) for v in result.signals.values())


def test_telemetry_line_fast_path_writes_what_sanitize_writes():
    import math as _math

    from lbw_policy.telemetry_log import telemetry_line as _telemetry_line
    from lbw_policy.decision_log import sanitize

    finite = {"step": 3, "loss": 2.5, "lr": 1e-3, "skipped": False,
              "signals": {"loss.zscore": -0.1, "upd.ratio": 1.25e-3, "nan.any": 0.0}}
    assert _telemetry_line(finite) == json.dumps(sanitize(finite), separators=(",", ":"))
    for key, bad in (("loss", _math.nan), ("lr", _math.inf), ("signals", {"loss.zscore": -_math.inf})):
        record = dict(finite, **{key: bad})
        line = _telemetry_line(record)    # strict JSON: no bare NaN / Infinity literals
        assert json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in {line}")) == sanitize(record)
    halted = dict(finite, halted=True)
    assert json.loads(_telemetry_line(halted))["halted"] is True
