"""Deferred transport and the device gate, on the CPU (no events; same semantics as CUDA).

- ``transfer: deferred``: step ``t``'s signals are evaluated at step ``t + 1`` and host-side
  actions apply from there; records carry both steps; a resumed run continues mid-deferral with
  the same decisions; replay of a deferred run reproduces it.
- ``gate: device``: a non-finite step is undone in the same step, bitwise (AdamW, Adam, SGD and
  fused AdamW through ``found_inf``), and recorded one step later, marked ``device: true``.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys

import pytest
import torch

from lbw_policy import Guard
from lbw_policy.decision_log import read_log
from lbw_policy.errors import PolicyError, TrainingHalted
from lbw_policy.policy import loads_policy
from lbw_policy.replay import replay

HEAD = """\
apiVersion: lbw-policy/v1
kind: Policy
metadata: {name: deferred-fixture}
mode: enforce
on_error: halt
"""

SPIKE = HEAD + """\
detectors:
  loss: {type: loss_spike, params: {alpha: 0.9, warmup: 3}}
  nan:  {type: nonfinite}
actuators:
  lr_scale:  {min: 0.01, max: 1.0, max_change_per_step: 0.5, recover: {factor: 2.0, every: 3}}
  skip_step: {max_consecutive: 3}
rules:
  - name: nan-skip
    priority: 100
    gate: device
    when: {signal: nan.any, op: ">", value: 0}
    then: [{actuator: skip_step}]
  - name: spike-brake
    when: {signal: loss.delta, op: ">", value: 1.0}
    then: [{actuator: lr_scale, multiply: 0.5}]
"""


def _train(log_dir, policy_text, steps, *, transfer, spike_at=(), nan_at=(), state_at=None,
           resume=None, opt_kind="adamw", seed=0):
    """Train a small model; return (results, guard state at ``state_at``, model, optimizer)."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(6, 3)
    opt = _optimizer(opt_kind, model)
    guard = Guard(opt, loads_policy(policy_text), model=model, log_dir=log_dir, transfer=transfer)
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["opt"])
        guard.load_state_dict(resume["guard"])
        start = resume["guard"]["step"]
    gen = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen))
               for _ in range(steps)]
    results, saved = [], None
    for s in range(start, steps):
        x, y = batches[s]
        loss = torch.nn.functional.mse_loss(model(x), y)
        if s in spike_at:
            loss = loss * 50.0
        if s in nan_at:
            loss = loss * float("nan")
        loss.backward()
        results.append(guard.step(loss))
        opt.zero_grad(set_to_none=True)
        if state_at is not None and s + 1 == state_at:
            saved = {"guard": copy.deepcopy(guard.state_dict()),
                     "model": copy.deepcopy(model.state_dict()),
                     "opt": copy.deepcopy(opt.state_dict())}
    guard.close()
    return results, saved, model, opt


def _optimizer(kind, model):
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=0.05)
    if kind == "fused":
        return torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=0.05)
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _decisions(run_dir):
    return [(r["step"], r.get("signals_step"), r["event"], r.get("rule"),
             [(a["actuator"], a.get("applied")) for a in r.get("actions") or ()])
            for r in read_log(run_dir / "decisions.jsonl").records
            if r["event"] in ("fired", "action", "resolved", "recover", "error", "halt")]


def test_deferred_evaluates_step_t_at_t_plus_1(tmp_path):
    imm, _, _, _ = _train(tmp_path / "imm", SPIKE, 12, transfer="immediate", spike_at=(6,))
    dfr, _, _, _ = _train(tmp_path / "dfr", SPIKE, 12, transfer="deferred", spike_at=(6,))
    assert [r.signals_step for r in imm] == list(range(12))
    assert [r.signals_step for r in dfr] == [None] + list(range(11))
    assert [r.step for r in dfr if r.decisions] == [7, 8, 10]
    fired_imm = [d for d in _decisions(tmp_path / "imm") if d[2] == "fired"]
    fired_dfr = [d for d in _decisions(tmp_path / "dfr") if d[2] == "fired"]
    # the spike of step 6: braked at step 6 immediately, at step 7 deferred (signals of step 6)
    assert fired_imm == [(6, 6, "fired", "spike-brake", [("lr_scale", 0.5)])]
    assert fired_dfr == [(7, 6, "fired", "spike-brake", [("lr_scale", 0.5)])]
    # the brake is in force from the step it applies: step 7's learning rate is halved
    assert dfr[7].lr == pytest.approx(0.025) and dfr[6].lr == pytest.approx(0.05)
    assert imm[6].lr == pytest.approx(0.025)
    start = read_log(tmp_path / "dfr" / "decisions.jsonl").records[0]
    assert (start["transfer"], start["delay"]) == ("deferred", 1)
    assert start["gate"] == {"mode": "select", "rules": ["nan-skip"]}


def test_the_last_deferred_vector_lands_at_close(tmp_path):
    _train(tmp_path / "run", SPIKE, 5, transfer="deferred")
    rows = (tmp_path / "run" / "telemetry.jsonl").read_text().splitlines()
    assert len(rows) == 5 and '"step":4' in rows[-1] and '"scheduled_lr":0.05' in rows[-1]


def test_resume_mid_deferral_makes_the_same_decisions(tmp_path):
    spikes = (6, 11)
    whole, _, m_whole, _ = _train(tmp_path / "whole", SPIKE, 16, transfer="deferred",
                                  spike_at=spikes)
    _, saved, _, _ = _train(tmp_path / "first", SPIKE, 16, transfer="deferred", spike_at=spikes,
                            state_at=6)  # saved after step 5: step 5's vector is in flight
    assert saved["guard"]["transport"]["pending"]["step"] == 5
    rest, _, m_rest, _ = _train(tmp_path / "rest", SPIKE, 16, transfer="deferred",
                                spike_at=spikes, resume=saved)
    assert [(r.step, r.signals_step, r.skipped, r.lr) for r in rest] == \
        [(r.step, r.signals_step, r.skipped, r.lr) for r in whole[6:]]
    assert [[(d["event"], d["rule"]) for d in r.decisions] for r in rest] == \
        [[(d["event"], d["rule"]) for d in r.decisions] for r in whole[6:]]
    for a, b in zip(m_rest.parameters(), m_whole.parameters()):
        assert torch.equal(a, b)


def test_a_state_saved_with_another_transfer_is_refused(tmp_path):
    _, saved, _, _ = _train(tmp_path / "a", SPIKE, 4, transfer="deferred", state_at=2)
    model = torch.nn.Linear(6, 3)
    guard = Guard(torch.optim.AdamW(model.parameters()), loads_policy(SPIKE), model=model,
                  log_dir=tmp_path / "b", transfer="immediate")
    before = guard.state_dict()
    with pytest.raises(ValueError, match="saved with transfer 'deferred'.*uses 'immediate'"):
        guard.load_state_dict(saved["guard"])
    assert guard.state_dict() == before  # nothing changed
    guard.close()


def test_replay_of_a_deferred_run_reproduces_it(tmp_path):
    run = tmp_path / "run"
    _train(run, SPIKE, 20, transfer="deferred", spike_at=(6, 12), nan_at=(9,))
    result = replay(run, run / "policy.yaml")
    assert result.summary["differing_steps"] == 0, [s for s in result.steps if s.differs]
    shadow = [(r["step"], r["event"], r.get("rule"), bool(r.get("device")))
              for st in result.steps for r in st.shadow]
    assert (10, "action", "nan-skip", True) in shadow  # the gate of step 9, learnt at 10


@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd", "fused"])
def test_the_device_gate_undoes_a_nan_step_bitwise_in_the_same_step(tmp_path, kind):
    results, _, model, opt = _train(tmp_path / "run", SPIKE, 6, transfer="deferred",
                                    nan_at=(4,), opt_kind=kind)
    # a reference trained to step 4 and stopped: the gated step 4 must not have changed it
    _, saved, _, _ = _train(tmp_path / "ref", SPIKE, 6, transfer="deferred", nan_at=(4,),
                            opt_kind=kind, state_at=4)
    after4 = _params_after(tmp_path / "gated", kind, 5)
    for name, value in saved["model"].items():
        assert torch.equal(after4["model"][name], value), name
    for key, st in saved["opt"]["state"].items():
        for k, v in st.items():
            assert torch.equal(after4["opt"]["state"][key][k], v), (key, k)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    records = read_log(tmp_path / "run" / "decisions.jsonl").records
    gate = [r for r in records if r.get("device")]
    mode = "found_inf" if kind == "fused" else "select"
    assert [(r["step"], r["signals_step"], r["rule"]) for r in gate] == [(5, 4, "nan-skip")]
    assert gate[0]["actions"][0]["applied_step"] == 4
    assert records[0]["gate"]["mode"] == mode
    assert not results[4].skipped  # the host called optimizer.step(); the device undid it
    end = records[-1]["summary"]
    assert (end["skipped_steps"], end["gated_steps"]) == (0, 1)


def _params_after(log_dir, kind, steps):
    """Model and optimizer state after ``steps`` steps with a NaN at step 4."""
    _, saved, _, _ = _train(log_dir, SPIKE, 6, transfer="deferred", nan_at=(4,), opt_kind=kind,
                            state_at=steps)
    return saved


def test_immediate_transfer_runs_a_gate_rule_on_the_host(tmp_path):
    results, _, model, _ = _train(tmp_path / "run", SPIKE, 6, transfer="immediate", nan_at=(4,))
    assert results[4].skipped and all(torch.isfinite(p).all() for p in model.parameters())
    recs = [r for r in read_log(tmp_path / "run" / "decisions.jsonl").records
            if r.get("rule") == "nan-skip"]
    assert [(r["step"], r["event"], r.get("device")) for r in recs] == [(4, "fired", None),
                                                                       (5, "resolved", None)]


@pytest.mark.parametrize("rule, message", [
    ("    gate: device\n    for: 2\n    when: {signal: nan.any, op: '>', value: 0}\n"
     "    then: [{actuator: skip_step}]\n", r"cannot have `for`"),
    ("    gate: device\n    when: {signal: nan.any, op: '>', value: 0}\n"
     "    then: [{actuator: skip_step}, {actuator: lr_scale, multiply: 0.5}]\n",
     r"only command must be a bare skip_step"),
    ("    gate: device\n    when: {signal: loss.zscore, op: '>', value: 4}\n"
     "    then: [{actuator: skip_step}]\n", r"detector 'loss' runs every 2 steps"),
    ("    gate: device\n    when: {signal: skip_step.exhausted, op: '>', value: 0}\n"
     "    then: [{actuator: skip_step}]\n", r"can read only detector signals"),
])
def test_gate_rules_are_checked_when_the_policy_loads(rule, message):
    text = HEAD + """\
detectors:
  loss: {type: loss_spike, every: 2}
  nan:  {type: nonfinite}
actuators:
  lr_scale: {}
  skip_step: {}
rules:
  - name: g
""" + rule
    with pytest.raises(PolicyError, match=message) as err:
        loads_policy(text)
    # named by file, line (the rule's lines 14-17) and YAML path
    assert re.match(r"<string>:1[4-7]: rules\[0\]\.", str(err.value))


def test_the_governor_imports_no_torch():
    code = ("import sys; import lbw_policy.governor, lbw_policy.engine; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_load_state_dict_is_all_or_nothing(tmp_path):
    """A state whose actuator part is damaged (loaded after the detectors) leaves the
    detectors, the rule timers and the step exactly as they were."""
    _, saved, _, _ = _train(tmp_path / "a", SPIKE, 8, transfer="immediate", spike_at=(5,),
                            state_at=8)
    model = torch.nn.Linear(6, 3)
    guard = Guard(torch.optim.AdamW(model.parameters()), loads_policy(SPIKE), model=model,
                  log_dir=tmp_path / "b", transfer="immediate")
    before = guard.state_dict()
    bad = copy.deepcopy(saved["guard"])
    bad["actuators"]["lr_scale"] = {"not": "an lr_scale state"}
    with pytest.raises(ValueError, match="guard state could not be loaded, nothing was changed"):
        guard.load_state_dict(bad)
    assert guard.state_dict() == before
    guard.load_state_dict(saved["guard"])  # the good one still loads
    assert guard.step_count == 8
    guard.close()


def test_a_deferred_policy_test_makes_the_guards_decisions(tmp_path):
    """``lbw-policy test`` with ``transfer: deferred`` models the guard: host rules act one
    step after the signals, the gate rule skips the step itself and is recorded one step later."""
    from lbw_policy.policytest import run_test_file
    from lbw_policy.records import action_rows

    run = tmp_path / "run"
    results, _, _, _ = _train(run, SPIKE, 14, transfer="deferred", spike_at=(6,), nan_at=(9, 10))
    taken = [r for r in action_rows(read_log(run / "decisions.jsonl").records)
             if r["event"] != "recover"]
    (tmp_path / "p.yaml").write_text(SPIKE)
    rows = [__import__("json").loads(line) for line in
            (run / "telemetry.jsonl").read_text().splitlines()]

    def series(name):
        return " ".join("nan" if r["signals"].get(name) != r["signals"].get(name)
                        or r["signals"].get(name) in ("NaN",) else
                        ("_" if name not in r["signals"] else repr(float(r["signals"][name])))
                        for r in rows)

    text = "policy: p.yaml\ntransfer: deferred\ntests:\n  - name: the run\n    signals:\n"
    for name in ("loss.delta", "nan.any"):
        text += f"      {name}: \"{series(name)}\"\n"
    text += "    expect:\n"
    for r in taken:
        text += "      - " + __import__("json").dumps(
            {k: v for k, v in r.items() if k != "clamped"}) + "\n"
    text += "    ignore: [recover]\n"
    text += f"    skipped: {[r.step for r in results if r.skipped] + [9, 10]}\n"
    (tmp_path / "p.test.yaml").write_text(text)
    result = run_test_file(tmp_path / "p.test.yaml")
    assert result.error is None, result.error
    case = result.cases[0]
    assert case.passed, "\n".join(case.diff)
    assert [(r["step"], r["rule"]) for r in case.rows if r["rule"] == "nan-skip"
            and r["event"] != "resolved"] == [(10, "nan-skip"), (11, "nan-skip")]


MIXED = HEAD + """\
detectors:
  nan:  {type: nonfinite}
  loss: {type: loss_spike, params: {warmup: 2}}
actuators:
  skip_step: {max_consecutive: 3}
  halt: {checkpoint: true}
rules:
  - name: nan-halt
    priority: 200
    when: {signal: nan.any, op: ">", value: 0}
    for: 12
    then: [{actuator: halt}]
  - name: gate-nan
    priority: 100
    gate: device
    when: {signal: nan.any, op: ">", value: 0}
    then: [{actuator: skip_step}]
  - name: host-nan
    priority: 90
    when: {signal: nan.any, op: ">", value: 0}
    then: [{actuator: skip_step}]
"""


def _nan_run(run, policy_text, steps, nan_from, nan_to):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = Guard(opt, loads_policy(policy_text), model=model, log_dir=run, transfer="deferred")
    x = torch.randn(8, 4)
    unchanged, halted = [], None
    try:
        for t in range(steps):
            w = model.weight.detach().clone()
            loss = model(x).pow(2).mean()
            if nan_from <= t <= nan_to:
                loss = loss * float("nan")
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
            unchanged.append(torch.equal(w, model.weight))
    except TrainingHalted as exc:
        halted = exc.step
    guard.close()
    return unchanged, halted


def test_max_consecutive_bounds_gate_and_host_skips_together(tmp_path):
    """Steps skipped on the device and on the host count as one run: never more than
    max_consecutive steps in a row leave the weights unchanged, and replay agrees."""
    unchanged, _ = _nan_run(tmp_path / "run", MIXED, 14, 5, 9)
    run = best = 0
    for u in unchanged:
        run = run + 1 if u else 0
        best = max(best, run)
    assert best == 3
    result = replay(tmp_path / "run", tmp_path / "run" / "policy.yaml")
    assert result.summary["differing_steps"] == 0, [s for s in result.steps if s.differs]
    records = read_log(tmp_path / "run" / "decisions.jsonl").records
    # a step the host skipped is never also recorded as a device skip
    device_steps = {r["actions"][0]["applied_step"] for r in records if r.get("device")}
    host_skips = {r["step"] for r in records if r.get("rule") == "host-nan"
                  and r["actions"] and r["actions"][0]["applied"]}
    assert device_steps and not device_steps & host_skips


def test_a_deferred_halt_writes_each_telemetry_row_once_and_replays(tmp_path):
    run = tmp_path / "run"
    _, halted = _nan_run(run, MIXED.replace("for: 12", "for: 4"), 30, 3, 30)
    assert halted is not None
    steps = [json.loads(line)["step"] for line in (run / "telemetry.jsonl").read_text().splitlines()]
    assert steps == list(range(halted + 1))  # the halt checkpoint landed the last one early
    result = replay(run, run / "policy.yaml")
    assert result.warnings == [] and result.summary["differing_steps"] == 0
    assert result.summary["shadow_halted_at"] == halted


def test_replay_with_another_revision_evaluates_its_own_gate(tmp_path):
    """A shadow policy that differs only elsewhere makes the same gate decisions."""
    run = tmp_path / "run"
    _nan_run(run, MIXED, 14, 5, 6)
    other = tmp_path / "other.yaml"
    other.write_text(MIXED.replace("for: 12", "for: 13"))
    result = replay(run, other)
    assert result.summary["differing_steps"] == 0, [s for s in result.steps if s.differs]


def test_an_optimizer_step_that_raises_unwinds_the_actuators_and_halts_the_guard(tmp_path):
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    text = HEAD + "actuators:\n  lr_scale: {min: 0.1, max: 1.0}\nrules:\n" \
        "  - {name: r, when: {signal: lr_scale.scale, op: '>', value: 0.6}, " \
        "then: [{actuator: lr_scale, set: 0.5}]}\n"
    guard = Guard(opt, loads_policy(text), model=model, log_dir=tmp_path / "run")
    model(torch.randn(2, 4)).sum().backward()

    def boom():
        raise RuntimeError("CUDA out of memory (simulated)")

    opt.step = boom
    with pytest.raises(RuntimeError, match="out of memory"):
        guard.step(torch.tensor(1.0))
    assert opt.param_groups[0]["lr"] == 0.01  # lr_scale's change was unwound
    with pytest.raises(RuntimeError, match="halted"):
        guard.step(torch.tensor(1.0))


def test_an_optimizer_the_gate_cannot_undo_warns(tmp_path, monkeypatch):
    """(On CUDA: Adam/AdamW neither fused nor capturable; under transfer: auto the guard then
    falls back to immediate.) Asked for deferred, it warns that gate rules act one step late."""
    from lbw_policy.actuators import SkipStep

    monkeypatch.setattr(SkipStep, "device_gate_mode", lambda self, optimizer: None)
    model = torch.nn.Linear(6, 3)
    with pytest.warns(UserWarning, match=r"cannot skip a step on the device; with transfer: "
                                         r"deferred they act one step late"):
        guard = Guard(torch.optim.AdamW(model.parameters()), loads_policy(SPIKE), model=model,
                      log_dir=tmp_path / "b", transfer="deferred")
    assert guard.transport.mode == "deferred" and not guard.gate and guard.gate_mode is None
    guard.close()


def test_a_gate_on_the_last_step_is_recorded_at_close(tmp_path):
    results, _, model, _ = _train(tmp_path / "run", SPIKE, 6, transfer="deferred", nan_at=(5,))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    records = read_log(tmp_path / "run" / "decisions.jsonl").records
    gate = [(r["step"], r["signals_step"], r["rule"]) for r in records if r.get("device")]
    assert gate == [(6, 5, "nan-skip")] and records[-1]["event"] == "run_end"
    assert records[-1]["summary"]["gated_steps"] == 1
