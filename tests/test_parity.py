"""Parity between the live guard and shadow evaluation.

DESIGN.md: ``Guard`` (live training), ``replay`` (a recorded telemetry file) and ``lbw-policy
test`` (scripted signal series) drive the same step order, so what a replay or a policy test
shows is what the live guard does. These tests state that contract from the outside: a tiny
governed run with scripted plugin faults (tests/parity_plugins.py) in every phase, under every
``on_error``, is replayed with its own policy, and both sides must agree on

* the decision records (``fired`` / ``action`` / ``resolved`` / ``recover`` / ``error`` /
  ``halt``): step, event, rule, actuators with their verb, applied value and clamping, and for an
  error where it happened and what ``on_error`` said;
* the steps whose optimizer step ran, and whether and at which step training halted;
* the hook calls a plugin received (the same actuator sees the same calls, with the same step
  and the same ``stepped``);

and the run's own files must say what happened (``telemetry.jsonl``: one row per step, skipped
exactly when ``optimizer.step()`` did not run, with the effective and the scheduled learning
rate). The ``test_divergence_*`` tests each pin one known way the two sides drift apart, so a
failure names it.

Only public surfaces are used: ``Guard``, ``guard.step``, ``guard.close``, ``guard.step_count``,
``guard.state_dict``, the run directory's files, ``lbw_policy.replay.replay`` with its
``ReplayResult``, ``lbw_policy.policytest.run_test_file``. Ground truth about the optimizer
comes from torch's own optimizer step hooks, not from the guard.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
import torch.nn.functional as F

import parity_plugins
from parity_plugins import ACTUATOR_PHASES, DETECTOR_PHASES, FaultyActuator

from lbw_policy import Guard
from lbw_policy.decision_log import DecisionLog, read_log
from lbw_policy.errors import DecisionLogError, TrainingHalted
from lbw_policy.policy import loads_policy
from lbw_policy.policytest import run_test_file
from lbw_policy.replay import replay
from lbw_policy.records import action_rows, from_json_number

REG = parity_plugins.registry()

#: The events both sides record for a step (run_start / run_end / resume are the log's own).
EVENTS = ("fired", "action", "resolved", "recover", "error", "halt")
ON_ERROR = ("continue", "skip_step", "halt")
STEPS = 12
FAULT_AT = 5


# ------------------------------------------------------------------------------ the run

def schedule(step: int) -> float:
    """The scheduled learning rate (a linear decay, set by hand each step like a scheduler)."""
    return 0.1 * (1.0 - 0.04 * step)


def script(n: int, at) -> list:
    return [1.0 if s in at else 0.0 for s in range(n)]


#: d.x drives the brake (lr_scale, skip_step) and, above 1.5, a momentum reset; d.r a rollback.
X = [0, 0, 1, 1, 0, 0, 2, 0, 1, 0, 0, 0]
REWIND_AT = (10,)


def poke_at(act_phase: str) -> tuple:
    """Steps at which a rule commands ``faulty_act``: at the fault step when the fault is in
    plan or commit; away from it when the fault is in recover (which only runs unheld)."""
    return (3, 7) if act_phase == "recover" else (3, FAULT_AT)


def policy_text(on_error: str = "continue", det_phase: str = "never", act_phase: str = "never",
                fault_at: int = FAULT_AT) -> str:
    values = {"x": X, "poke": script(STEPS, poke_at(act_phase)), "r": script(STEPS, REWIND_AT)}
    params = {"values": values, "fail_at": [fault_at], "fail_in": det_phase}
    return f"""\
apiVersion: lbw-policy/v1
kind: Policy
metadata: {{name: parity, owner: tests, description: scripted faults for guard/shadow parity}}
mode: enforce
on_error: {on_error}
detectors:
  d: {{type: faulty, params: {json.dumps(params)}}}
actuators:
  lr_scale: {{min: 0.1, max: 1.0, recover: {{factor: 2.0, every: 2}}}}
  skip_step: {{max_consecutive: 2}}
  momentum_reset: {{warmup: 2}}
  rollback: {{every: 2, keep: 2, checkpoint: false}}
  faulty_act: {{fail_at: {fault_at}, fail_in: {act_phase}}}
rules:
  - name: brake
    when: {{signal: d.x, op: ">", value: 0.5}}
    then: [{{actuator: lr_scale, multiply: 0.5}}, {{actuator: skip_step}}]
  - name: reset
    priority: 10
    when: {{signal: d.x, op: ">", value: 1.5}}
    then: [{{actuator: momentum_reset}}]
  - name: poke
    when: {{signal: d.poke, op: ">", value: 0.5}}
    then: [{{actuator: faulty_act}}]
  - name: rewind
    priority: 20
    when: {{signal: d.r, op: ">", value: 0.5}}
    then: [{{actuator: rollback}}]
"""


TEACHER = torch.tensor([[0.5, -0.3], [0.2, 0.1], [-0.4, 0.3], [0.1, 0.2]])


def batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 4, generator=g)
    return x, x @ TEACHER


@dataclass
class GuardRun:
    """A finished guarded run and what really happened to its optimizer."""

    run_dir: Path
    text: str
    ran: list = field(default_factory=list)          # steps guard.step was called for
    halted_at: Optional[int] = None                   # step at which TrainingHalted was raised
    stepped: dict = field(default_factory=dict)       # step -> optimizer.step() ran
    effective_lr: dict = field(default_factory=dict)  # step -> param group 0 lr inside step()
    scheduled_lr: dict = field(default_factory=dict)  # step -> lr set by the "scheduler"
    lr_after_halt: Optional[float] = None
    step_count: Optional[int] = None                  # guard.step_count once the loop ended
    actuator: Optional[FaultyActuator] = None         # the guard's faulty_act


def run_guard(run_dir: Path, text: str, steps: int = STEPS,
              sched: Callable[[int], float] = schedule) -> GuardRun:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=sched(0), weight_decay=0.01)
    out = GuardRun(run_dir=run_dir, text=text)
    now = {"step": None}

    def pre(optimizer, args, kwargs):
        out.effective_lr[now["step"]] = float(optimizer.param_groups[0]["lr"])

    def post(optimizer, args, kwargs):
        out.stepped[now["step"]] = True

    opt.register_step_pre_hook(pre)
    opt.register_step_post_hook(post)
    first = len(FaultyActuator.instances)
    guard = Guard(opt, loads_policy(text, registry=REG), model=model, log_dir=run_dir,
                  registry=REG)
    mine = FaultyActuator.instances[first:]
    out.actuator = mine[-1] if mine else None  # the guard's (loading the policy builds one to try its bounds)
    try:
        for s in range(steps):
            now["step"] = s
            for group in opt.param_groups:
                group["lr"] = sched(s)
            out.scheduled_lr[s] = sched(s)
            out.stepped.setdefault(s, False)
            x, y = batch(s)
            loss = F.mse_loss(model(x), y)
            loss.backward()
            out.ran.append(s)
            try:
                guard.step(loss)
            except TrainingHalted:
                out.halted_at = s
                out.lr_after_halt = float(opt.param_groups[0]["lr"])
                break
            finally:
                opt.zero_grad(set_to_none=True)
    finally:
        out.step_count = guard.step_count
        guard.close()
    return out


def telemetry_rows(run_dir: Path) -> list:
    path = Path(run_dir) / "telemetry.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def guard_records(run: GuardRun) -> list:
    return [r for r in read_log(run.run_dir / "decisions.jsonl").records if r.get("event") in EVENTS]


# ------------------------------------------------------------------------------ the matrix

def test_the_scripted_run_exercises_every_actuator_and_event(runs):
    """Self-check of the scripted run (no fault): brakes, skips, a momentum reset with warm-up, a
    rollback, recoveries and faulty_act commits all happen, so the counters can drift."""
    run = runs("none", "never", "continue")
    records = guard_records(run)
    assert {r["event"] for r in records} == {"fired", "action", "resolved", "recover"}
    applied = {(a["actuator"], json.dumps(a["applied"])) for r in records for a in r.get("actions") or ()
               if a.get("applied") not in (None, False)}
    assert {name for name, _ in applied} == {"lr_scale", "skip_step", "momentum_reset", "rollback",
                                             "faulty_act"}
    assert run.halted_at is None and run.ran == list(range(STEPS))
    assert [s for s in run.ran if not run.stepped[s]] == [2, 3, 6, 8, 10]
    assert any(run.effective_lr[s] != run.scheduled_lr[s] for s in run.effective_lr)


CASES = ([pytest.param("none", "never", "continue", id="no-fault")]
         + [pytest.param("detector", p, o, id=f"detector.{p}-{o}")
            for p in DETECTOR_PHASES for o in ON_ERROR]
         + [pytest.param("actuator", p, o, id=f"actuator.{p}-{o}")
            for p in ACTUATOR_PHASES for o in ON_ERROR])
ACTUATOR_CASES = [c for c in CASES if c.values[0] in ("none", "actuator")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Guarded runs by (plugin, phase, on_error), each run once and shared by the tests."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("parity")

    def get(plugin: str, phase: str, on_error: str) -> GuardRun:
        key = (plugin, phase, on_error)
        if key not in cache:
            text = policy_text(on_error, det_phase=phase if plugin == "detector" else "never",
                               act_phase=phase if plugin == "actuator" else "never")
            cache[key] = run_guard(root / "-".join(key), text)
        return cache[key]

    return get


def _value(v: Any) -> Any:
    v = from_json_number(v)
    if isinstance(v, float) and math.isfinite(v):
        return float(f"{v:.9g}")
    if isinstance(v, dict):
        return {k: _value(x) for k, x in sorted(v.items())}
    if isinstance(v, (list, tuple)):
        return [_value(x) for x in v]
    return v


def record_key(r: dict) -> tuple:
    """What must agree between the two sides for one decision record."""
    actions = tuple((a.get("actuator"), a.get("verb"), json.dumps(_value(a.get("applied"))),
                     bool(a.get("clamped"))) for a in r.get("actions") or ())
    error = (r.get("where"), r.get("on_error")) if r.get("event") == "error" else None
    return (r.get("step"), r.get("event"), r.get("rule"), actions, error)


@dataclass
class ShadowSide:
    records: list
    stepped: dict
    halted_at: Optional[int]
    actuator: Optional[FaultyActuator]
    result: Any


def replay_run(run: GuardRun) -> ShadowSide:
    """Replay the run with its own policy (the copy in the run directory), with the registry
    the run used; read the shadow's side from the ReplayResult."""
    first = len(FaultyActuator.instances)
    res = replay(run.run_dir, run.run_dir / "policy.yaml", registry=REG)
    mine = FaultyActuator.instances[first:]
    listed = {st.step: st for st in res.steps}
    halted_at = res.summary.get("shadow_halted_at")
    stepped = {}
    for row in telemetry_rows(run.run_dir):
        s = row["step"]
        if halted_at is not None and s > halted_at:
            break
        st = listed.get(s)
        # A step ReplayResult does not list is one where the shadow decided nothing and agreed
        # with the run (whose telemetry row says whether it was skipped).
        skipped = st.shadow_skipped if st is not None else bool(row.get("skipped"))
        stepped[s] = not skipped
    records = [r for st in res.steps for r in st.shadow]
    return ShadowSide(records=records, stepped=stepped, halted_at=halted_at,
                      actuator=mine[-1] if mine else None, result=res)


def _diff(title: str, guard: list, shadow: list) -> list:
    if guard == shadow:
        return []
    import difflib

    lines = difflib.unified_diff([repr(x) for x in guard], [repr(x) for x in shadow],
                                 "guard", "shadow", lineterm="", n=1)
    return [f"{title} differ:"] + ["    " + line for line in lines]


@pytest.mark.parametrize("plugin,phase,on_error", CASES)
def test_replay_of_a_run_with_its_own_policy_reproduces_it(runs, plugin, phase, on_error):
    """Guard vs replay of the same run with its own policy: the same decision records, the same
    optimizer steps taken, the same halt, the same hook calls on the scripted actuator."""
    run = runs(plugin, phase, on_error)
    errors = [r for r in guard_records(run) if r["event"] == "error"]
    if plugin != "none":  # the scripted fault happened, where it was scripted, and only there
        assert [r["step"] for r in errors] == [FAULT_AT], errors
        assert ("faulty_act" if plugin == "actuator" else "detector d") in errors[0]["where"], errors
    assert run.halted_at == (FAULT_AT if plugin != "none" and on_error == "halt" else None)
    shadow = replay_run(run)
    problems = []
    problems += _diff("decision records", [record_key(r) for r in guard_records(run)],
                      [record_key(r) for r in shadow.records])
    problems += _diff("optimizer steps taken (step, ran)", sorted(run.stepped.items()),
                      sorted(shadow.stepped.items()))
    if run.halted_at != shadow.halted_at:
        problems.append(f"halted at: guard {run.halted_at}, shadow {shadow.halted_at}")
    if run.actuator is not None and shadow.actuator is not None:
        problems += _diff("faulty_act hook calls (phase, step, stepped)", run.actuator.calls,
                          shadow.actuator.calls)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("plugin,phase,on_error", CASES)
def test_telemetry_says_what_happened(runs, plugin, phase, on_error):
    """Every step the guard ran has one telemetry row; ``skipped`` is true exactly when
    ``optimizer.step()`` did not run, ``lr`` is the rate the optimizer stepped with, and the
    step training halted at is marked ``halted``."""
    run = runs(plugin, phase, on_error)
    rows = telemetry_rows(run.run_dir)
    problems = []
    steps = [r["step"] for r in rows]
    if steps != run.ran:
        problems.append(f"telemetry rows for steps {steps}, the guard ran steps {run.ran}")
    for row in rows:
        s = row["step"]
        if s not in run.stepped:
            continue
        if bool(row.get("skipped")) == run.stepped[s]:
            problems.append(f"step {s}: row says skipped={row.get('skipped')}, the optimizer step "
                            f"{'ran' if run.stepped[s] else 'did not run'}")
        if run.stepped[s] and not math.isclose(row.get("lr", math.nan), run.effective_lr[s],
                                               rel_tol=1e-9):
            problems.append(f"step {s}: row says lr={row.get('lr')}, the optimizer stepped with "
                            f"{run.effective_lr[s]}")
        if (s == run.halted_at) != bool(row.get("halted")):
            problems.append(f"step {s}: row says halted={row.get('halted')}, guard halted at "
                            f"{run.halted_at}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("plugin,phase,on_error", ACTUATOR_CASES)
def test_policy_test_of_the_same_series_reproduces_the_run(runs, tmp_path, plugin, phase, on_error):
    """``lbw-policy test`` with the detector's scripted series, expecting exactly the guard's
    decisions, skipped steps and halt, passes. (A detector fault cannot be scripted in a policy
    test, which feeds signal values only, so detector cases are not part of this matrix.)"""
    run = runs(plugin, phase, on_error)
    n = len(run.ran)
    (tmp_path / "policy.yaml").write_text(run.text, encoding="utf-8")
    values = {"x": X, "poke": script(STEPS, poke_at(phase if plugin == "actuator" else "never")),
              "r": script(STEPS, REWIND_AT)}
    skipped = [s for s in run.ran if not run.stepped[s] and s != run.halted_at]
    test_file = {"policy": "policy.yaml", "tests": [{
        "name": "parity", "steps": n,
        "signals": {f"d.{k}": [float(v) for v in vs[:n]] for k, vs in values.items()},
        "expect": action_rows(guard_records(run)),
        "skipped": skipped,
        "halted_at": run.halted_at}]}
    path = tmp_path / "parity.test.yaml"
    path.write_text(json.dumps(test_file, indent=1), encoding="utf-8")
    result = run_test_file(path, registry=REG)
    assert result.error is None, result.error
    for case in result.cases:
        assert case.passed, "\n".join(case.diff)


# ------------------------------------------------------------------------------ known divergences

def _at(records: list, step: int) -> list:
    return [record_key(r) for r in records if r.get("step") == step]


def test_divergence_1_detector_compute_error_is_an_error_record_and_on_error_in_replay(runs):
    """A detector raising in ``compute`` under ``on_error: skip_step``: the guard writes an
    ``error`` record and skips the step; the replay must show the same record and the same skip
    (not merely drop the detector's values)."""
    run = runs("detector", "compute", "skip_step")
    taken = _at(guard_records(run), FAULT_AT)
    assert any(k[1] == "error" and k[4][0].startswith("detector d") for k in taken), taken
    assert run.stepped[FAULT_AT] is False
    shadow = replay_run(run)
    assert _at(shadow.records, FAULT_AT) == taken, "the shadow has no error record for the detector"
    assert shadow.stepped.get(FAULT_AT) is False, "the shadow takes the step the guard skipped"


def test_divergence_2_detector_after_step_error_has_a_counterpart_in_replay(runs):
    """A detector raising in ``after_step`` (``on_error: continue``): the guard's ``error``
    record must appear in the replay too."""
    run = runs("detector", "after_step", "continue")
    taken = _at(guard_records(run), FAULT_AT)
    assert any(k[1] == "error" and k[4][0].startswith("detector d") for k in taken), taken
    shadow = replay_run(run)
    assert _at(shadow.records, FAULT_AT) == taken


def test_divergence_3_detector_error_that_halts_is_in_telemetry_and_replay_reaches_the_halt(runs):
    """``on_error: halt`` after a detector error: the halted step has its telemetry row
    (``halted: true``), and the replay halts at the same step with the same records."""
    run = runs("detector", "compute", "halt")
    assert run.halted_at == FAULT_AT
    rows = {r["step"]: r for r in telemetry_rows(run.run_dir)}
    assert FAULT_AT in rows and rows[FAULT_AT].get("halted") is True, \
        f"no telemetry row for the halted step {FAULT_AT} (rows for {sorted(rows)})"
    shadow = replay_run(run)
    assert shadow.halted_at == FAULT_AT
    assert _at(shadow.records, FAULT_AT) == _at(guard_records(run), FAULT_AT)


def test_divergence_4_before_step_halt_unwinds_with_stepped_false(runs):
    """A ``before_step`` that raises under ``on_error: halt``: the optimizer step never runs, so
    the unwinding ``after_step`` of every entered actuator must say ``stepped=False``; and the
    param groups are left as the scheduler set them."""
    run = runs("actuator", "before_step", "halt")
    assert run.halted_at == FAULT_AT
    assert run.stepped[FAULT_AT] is False
    after = [(step, stepped) for phase, step, stepped in run.actuator.calls if phase == "after_step"]
    wrong = [(step, stepped) for step, stepped in after if stepped != run.stepped[step]]
    assert [st for step, st in after if step == FAULT_AT] == [False], \
        f"after_step at the halted step {FAULT_AT}: {after[-1:]}; optimizer step ran: False"
    assert not wrong, f"after_step(stepped=...) disagrees with the optimizer at {wrong}"
    assert run.lr_after_halt == pytest.approx(schedule(FAULT_AT), rel=1e-12)


def test_divergence_5_after_step_halt_telemetry_says_the_step_ran_with_the_effective_lr(runs):
    """An actuator's ``after_step`` raising under ``on_error: halt``: the optimizer step ran
    (with ``lr_scale`` 0.5 in force), so the halted step's telemetry row says ``skipped: false``
    and the effective learning rate."""
    run = runs("actuator", "after_step", "halt")
    assert run.halted_at == FAULT_AT
    assert run.stepped[FAULT_AT] is True
    assert run.effective_lr[FAULT_AT] == pytest.approx(0.5 * schedule(FAULT_AT), rel=1e-12)
    row = {r["step"]: r for r in telemetry_rows(run.run_dir)}[FAULT_AT]
    assert row.get("halted") is True
    assert (row.get("skipped"), row.get("lr")) == (False, pytest.approx(run.effective_lr[FAULT_AT])), \
        f"telemetry row of step {FAULT_AT}: {row}"


STAND_IN_POLICY = """\
apiVersion: lbw-policy/v1
kind: Policy
metadata: {name: stand-in, owner: tests}
mode: enforce
on_error: continue
detectors:
  d: {type: faulty, params: {values: {poke: [0, 0, 0, 0, 0, 1, 0, 0, 0, 0], cap: [0, 0, 0, 0, 0, 0, 0, 1, 0, 0]}}}
actuators:
  grad_clip: {min: 1.0, max: 10.0, default: 2.0, warmup: 3}
  lr_cap: {window: 4, min_ratio: 0.1}
rules:
  - name: tighten-clip
    when:
      all:
        - {signal: grad_clip.active, op: ">", value: 0}
        - {signal: d.poke, op: ">", value: 0.5}
    then: [{actuator: grad_clip, set: 1.5}]
  - name: cap-jump
    when: {signal: d.cap, op: ">", value: 0.5}
    then: [{actuator: lr_cap, ratio: 2.0}]
"""

RECORD_FIELDS = ("step", "event", "rule", "priority", "signals", "enforced", "actions",
                 "overridden", "where", "error", "on_error")


def test_divergence_6_replay_of_grad_clip_and_lr_cap_reproduces_the_records(tmp_path):
    """A run whose rules read ``grad_clip.active`` and command ``lr_cap`` (after a 10x jump of
    the scheduled rate): replaying it with its own policy reproduces every record field for
    field (the rule firing once clipping is active; lr_cap's scheduled rate before, capped rate
    after, reference and factor)."""
    run = run_guard(tmp_path / "run", STAND_IN_POLICY, steps=10,
                    sched=lambda s: 0.01 if s < 7 else 0.1)
    taken = guard_records(run)
    assert [(r["step"], r["rule"], r["event"]) for r in taken] == [
        (5, "tighten-clip", "fired"), (6, "tighten-clip", "resolved"),
        (7, "cap-jump", "fired"), (8, "cap-jump", "resolved")]
    shadow = replay_run(run)

    def full(r):
        return {k: _value(r.get(k)) for k in RECORD_FIELDS}

    problems = _diff("records", [full(r) for r in taken], [full(r) for r in shadow.records])
    assert not problems, "\n".join(problems)


def test_divergence_6_telemetry_keeps_the_scheduled_and_the_effective_lr(runs):
    """Each telemetry row has ``scheduled_lr`` (what the scheduler set) and ``lr`` (what the
    optimizer stepped with: after lr_scale, momentum_reset's warm-up, ...)."""
    run = runs("none", "never", "continue")
    problems = []
    for row in telemetry_rows(run.run_dir):
        s = row["step"]
        if not math.isclose(row.get("scheduled_lr", math.nan), run.scheduled_lr[s], rel_tol=1e-12):
            problems.append(f"step {s}: scheduled_lr={row.get('scheduled_lr')}, scheduler set "
                            f"{run.scheduled_lr[s]}")
        if run.stepped[s] and not math.isclose(row.get("lr", math.nan), run.effective_lr[s],
                                               rel_tol=1e-12):
            problems.append(f"step {s}: lr={row.get('lr')}, optimizer stepped with "
                            f"{run.effective_lr[s]}")
    assert any(run.effective_lr[s] != run.scheduled_lr[s] for s in run.effective_lr)  # scaled
    assert not problems, "\n".join(problems)


def test_divergence_7_decision_log_failure_mid_step_halts_without_committing(runs, tmp_path,
                                                                              monkeypatch):
    """The decision log fails (``DecisionLogError``) when the record of a decision at step 2 is
    written, and stays broken. Write-ahead: nothing that decision commands is committed after
    the failed write; the step raises, its optimizer step does not run, the step counter reads
    as after any other halt at that step, and the guard is halted: a further ``guard.step``
    raises RuntimeError saying so."""
    # The counter's convention at a halt, from a policy halt (on_error: halt at FAULT_AT).
    halted = runs("actuator", "plan", "halt")
    assert halted.halted_at == FAULT_AT
    counter_offset = halted.step_count - FAULT_AT
    text = policy_text("continue").replace(
        "  - name: brake\n", "  - name: combo\n    priority: 30\n"
        "    when: {signal: d.x, op: \">\", value: 0.5}\n"
        "    then: [{actuator: faulty_act}, {actuator: lr_scale, multiply: 0.5}]\n"
        "  - name: brake\n")
    fail_step = 2
    journal = parity_plugins.JOURNAL
    journal.clear()
    original = DecisionLog.append
    broken = {"yes": False}

    def append(self, record):
        if broken["yes"] or (record.get("step") == fail_step and record.get("event") in EVENTS):
            broken["yes"] = True
            journal.append(("log", "write failed", record.get("step"), record.get("event")))
            raise DecisionLogError("decision log: simulated write failure (disk gone)")
        full = original(self, record)
        journal.append(("log", "write", record.get("step"), record.get("event")))
        return full

    monkeypatch.setattr(DecisionLog, "append", append)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=schedule(0), weight_decay=0.01)
    ran = []
    opt.register_step_post_hook(lambda o, a, k: ran.append(now))
    guard = Guard(opt, loads_policy(text, registry=REG), model=model, log_dir=tmp_path / "run",
                  registry=REG)
    problems = []
    raised = None
    for now in range(fail_step + 1):
        x, y = batch(now)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        try:
            guard.step(loss)
        except Exception as exc:  # noqa: BLE001 - what it raises is checked below
            raised = (now, exc)
            break
        finally:
            opt.zero_grad(set_to_none=True)
    assert raised is not None and raised[0] == fail_step, f"step {fail_step} did not raise: {raised}"
    if not isinstance(raised[1], (DecisionLogError, TrainingHalted)):
        problems.append(f"step {fail_step} raised {raised[1]!r}")
    if fail_step in ran:
        problems.append(f"the optimizer stepped at step {fail_step}, whose decision was never logged")
    if guard.step_count != fail_step + counter_offset:
        problems.append(f"step_count is {guard.step_count} after the log failure at step "
                        f"{fail_step}; after a policy halt at step {FAULT_AT} it is "
                        f"{halted.step_count}")
    try:
        scale = guard.state_dict()["actuators"]["lr_scale"]["scale"]
    except Exception:  # noqa: BLE001 - state unavailable after the failure: not checked here
        scale = 1.0
    if scale != 1.0:
        problems.append(f"lr_scale was committed ({scale}) although its record was not written")

    # A further step must refuse: the guard is halted.
    now = fail_step + 1
    x, y = batch(now)
    loss = F.mse_loss(model(x), y)
    loss.backward()
    try:
        guard.step(loss)
        problems.append("a further guard.step ran after the decision log failed")
    except RuntimeError as exc:
        if "halted" not in str(exc):
            problems.append(f"a further guard.step raised {exc!r}, not 'halted'")
    if now in ran:
        problems.append(f"the optimizer stepped at step {now}, after the decision log failed")

    failed_at = next(i for i, e in enumerate(journal) if e[:2] == ("log", "write failed"))
    late = [e for e in journal[failed_at:] if e[1] == "commit"]
    if late:
        problems.append(f"commits after the failed write: {late}")
    try:
        guard.close()
    except Exception:  # noqa: BLE001 - the log is gone; closing may report it
        pass
    assert not problems, "\n".join(problems)
