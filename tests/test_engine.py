"""Tests for lbw_policy.engine: hand-written signal series with hand-computed decision trajectories."""

from __future__ import annotations

import ast
import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbw_policy.engine import Engine, compile_condition, evaluate_condition, explain_condition
from lbw_policy.spec import OPS, Command, Decision, RuleSpec

ENGINE_PY = Path(__file__).resolve().parents[1] / "lbw_policy" / "engine.py"

LR_HALF = Command("lr_scale", "multiply", 0.5)
LR_09 = Command("lr_scale", "multiply", 0.9)
SKIP = Command("skip_step")


def leaf(signal: str, op: str, value) -> dict:
    return {"signal": signal, "op": op, "value": value}


X_GT_4 = leaf("x", ">", 4.0)


def rule(name: str, when: dict = X_GT_4, then=(LR_HALF,), **kw) -> RuleSpec:
    return RuleSpec(name=name, when=when, then=tuple(then), **kw)


def events(engine: Engine, series, steps=None) -> list[tuple[int, str, str]]:
    """Feed ``x`` values (one per step) and return ``[(step, rule, event)]``."""
    steps = range(len(series)) if steps is None else steps
    out = []
    for step, x in zip(steps, series):
        out += [(d.step, d.rule, d.event) for d in engine.evaluate(step, {"x": x})]
    return out


T, F = 5.0, 0.0  # x values making X_GT_4 true / false


# --------------------------------------------------------------------------- for


def test_for_1_fires_on_first_true_and_acts_while_true():
    eng = Engine([rule("a", for_=1)])
    assert events(eng, [T, T, F, T, T, T, T, F]) == [
        (0, "a", "fired"), (1, "a", "action"), (2, "a", "resolved"),
        (3, "a", "fired"), (4, "a", "action"), (5, "a", "action"), (6, "a", "action"),
        (7, "a", "resolved"),
    ]


def test_for_3_needs_three_consecutive_trues_and_a_broken_streak_resets():
    eng = Engine([rule("b", for_=3)])
    # steps 0,1 true (pending 1,2), 2 false (reset), 3,4,5 true -> fires at 5
    assert events(eng, [T, T, F, T, T, T, T, F]) == [
        (5, "b", "fired"), (6, "b", "action"), (7, "b", "resolved"),
    ]


def test_fired_decision_carries_commands_and_signals():
    eng = Engine([rule("a", when={"all": [X_GT_4, leaf("y", "<", 1)]}, then=(LR_HALF, SKIP))])
    (d,) = eng.evaluate(7, {"x": 5.0, "y": 0, "z": 3.0})
    assert d == Decision(step=7, rule="a", priority=0, event="fired",
                         signals={"x": 5.0, "y": 0}, commands=[LR_HALF, SKIP], overridden=[])
    eng2 = Engine([rule("a", when={"any": [X_GT_4, leaf("y", "<", 1)]})])
    (d2,) = eng2.evaluate(0, {"x": 5.0})  # y missing -> None in the decision
    assert d2.signals == {"x": 5.0, "y": None}


def test_resolved_decision_has_no_commands():
    eng = Engine([rule("a")])
    eng.evaluate(0, {"x": T})
    (d,) = eng.evaluate(1, {"x": F})
    assert (d.event, d.commands, d.overridden, d.signals) == ("resolved", [], [], {"x": F})


# ------------------------------------------------------------ keep_firing_for


FLAP = [T, F, T, F, F, T, F, F, F, T]


def test_keep_firing_for_hysteresis_stops_flapping():
    eng = Engine([rule("a", keep_firing_for=2)])
    # 0 fired; 1 F clear=1; 2 T action; 3,4 F clear 1,2; 5 T action; 6,7,8 F clear 1,2,3>2 resolved;
    # 9 T fired again (no cooldown)
    assert events(eng, FLAP) == [
        (0, "a", "fired"), (2, "a", "action"), (5, "a", "action"), (8, "a", "resolved"),
        (9, "a", "fired"),
    ]


def test_without_hysteresis_the_same_signal_flaps():
    eng = Engine([rule("a", keep_firing_for=0)])
    assert events(eng, FLAP) == [
        (0, "a", "fired"), (1, "a", "resolved"), (2, "a", "fired"), (3, "a", "resolved"),
        (5, "a", "fired"), (6, "a", "resolved"), (9, "a", "fired"),
    ]


def test_silent_firing_rule_still_holds_its_actuators():
    eng = Engine([rule("a", then=(LR_HALF, SKIP), keep_firing_for=1)])
    assert eng.held_actuators() == set() and eng.firing() == []
    eng.evaluate(0, {"x": T})
    assert eng.evaluate(1, {"x": F}) == []  # clear=1 <= 1: silent, still firing
    assert eng.firing() == ["a"]
    assert eng.held_actuators() == {"lr_scale", "skip_step"}
    assert [d.event for d in eng.evaluate(2, {"x": F})] == ["resolved"]
    assert eng.firing() == [] and eng.held_actuators() == set()


def test_held_actuators_is_the_union_over_firing_rules():
    eng = Engine([
        rule("a", then=(LR_HALF,)),
        rule("b", when=leaf("y", ">", 0), then=(SKIP,), index=1),
        rule("c", when=leaf("z", ">", 0), then=(Command("momentum_reset"),), index=2),
    ])
    eng.evaluate(0, {"x": T, "y": 1.0, "z": 0.0})
    assert eng.firing() == ["a", "b"]
    assert eng.held_actuators() == {"lr_scale", "skip_step"}


# ------------------------------------------------------------------- cooldown


def test_cooldown_ignores_true_conditions_then_fires_again():
    eng = Engine([rule("a", cooldown=5)])
    # 0 fired, 1 resolved (resolved_step=1); 2..6 true but 2..6 <= 1+5: ignored; 7 fires
    series = [T, F, T, T, T, T, T, T, T]
    assert events(eng, series) == [
        (0, "a", "fired"), (1, "a", "resolved"), (7, "a", "fired"), (8, "a", "action"),
    ]


def test_cooldown_resets_pending_so_for_counts_from_its_end():
    eng = Engine([rule("a", for_=2, cooldown=3)])
    # 0,1 T fired at 1; 2 F resolved (rs=2); 3..5 ignored; 6 T pending=1; 7 T fired
    series = [T, T, F, T, T, T, T, T]
    assert events(eng, series) == [
        (1, "a", "fired"), (2, "a", "resolved"), (7, "a", "fired"),
    ]
    assert eng.state_dict()["rules"]["a"]["resolved_step"] == 2


def test_cooldown_counts_steps_not_evaluations():
    eng = Engine([rule("a", cooldown=15)])
    steps = [0, 10, 20, 25, 26, 40]
    # fired 0; resolved 10 (rs=10); 20, 25 <= 25 ignored; 26 > 25 fires; 40 action
    assert events(eng, [T, F, T, T, T, T], steps) == [
        (0, "a", "fired"), (10, "a", "resolved"), (26, "a", "fired"), (40, "a", "action"),
    ]


def test_for_and_keep_firing_for_count_evaluations_not_steps():
    eng = Engine([rule("a", for_=2, keep_firing_for=1)])
    steps = [0, 100, 200, 300, 400]
    assert events(eng, [T, T, F, F, T], steps) == [
        (100, "a", "fired"), (300, "a", "resolved"),
    ]


def test_module_docstring_example():
    eng = Engine([rule("a", for_=2, keep_firing_for=1, cooldown=3)])
    series = [T, T, T, F, T, F, F, T, T, T, T, T]
    assert events(eng, series) == [
        (1, "a", "fired"), (2, "a", "action"), (4, "a", "action"), (6, "a", "resolved"),
        (11, "a", "fired"),
    ]


# ----------------------------------------------------------------- conflicts


def test_higher_priority_wins_and_loser_records_the_winner():
    eng = Engine([
        rule("gentle", then=(LR_09, SKIP), priority=10, index=0),
        rule("brake", then=(LR_HALF,), priority=50, index=1),
    ])
    brake, gentle = eng.evaluate(3, {"x": T})
    assert (brake.rule, brake.commands, brake.overridden) == ("brake", [LR_HALF], [])
    assert (gentle.rule, gentle.commands, gentle.overridden) == (
        "gentle", [SKIP], [(LR_09, "brake")])


def test_priority_tie_goes_to_the_earlier_rule_and_all_overridden_is_still_returned():
    eng = Engine([  # given out of file order on purpose
        rule("second", then=(LR_09,), index=1),
        rule("first", then=(LR_HALF,), index=0),
    ])
    first, second = eng.evaluate(0, {"x": T})
    assert (first.rule, first.commands, first.overridden) == ("first", [LR_HALF], [])
    assert (second.rule, second.event, second.commands, second.overridden) == (
        "second", "fired", [], [(LR_09, "first")])


def test_decisions_ordered_by_priority_then_index():
    eng = Engine([
        rule("a", then=(Command("a"),), priority=1, index=0),
        rule("b", then=(Command("b"),), priority=5, index=1),
        rule("c", then=(Command("c"),), priority=5, index=2),
        rule("d", then=(Command("d"),), priority=-3, index=3),
    ])
    assert [d.rule for d in eng.evaluate(0, {"x": T})] == ["b", "c", "a", "d"]


def test_same_rule_two_commands_for_one_actuator_are_both_kept():
    eng = Engine([rule("a", then=(LR_HALF, LR_09))])
    (d,) = eng.evaluate(0, {"x": T})
    assert d.commands == [LR_HALF, LR_09] and d.overridden == []


def test_silent_or_resolving_higher_rule_does_not_override():
    eng = Engine([
        rule("high", when=leaf("y", ">", 0), then=(LR_HALF,), priority=9, keep_firing_for=1),
        rule("low", then=(LR_09,), priority=1, index=1),
    ])
    assert [(d.rule, d.event) for d in eng.evaluate(0, {"x": F, "y": 1})] == [("high", "fired")]
    (low,) = eng.evaluate(1, {"x": T, "y": 0})  # high is firing silently: no command, no claim
    assert (low.rule, low.commands, low.overridden) == ("low", [LR_09], [])
    high, low = eng.evaluate(2, {"x": T, "y": 0})
    assert (high.event, low.event, low.commands) == ("resolved", "action", [LR_09])


# ----------------------------------------------------------------- conditions


@pytest.mark.parametrize("node, signals, expected", [
    ({"all": [leaf("a", ">", 1), leaf("b", "<", 0)]}, {"a": 2, "b": -1}, True),
    ({"all": [leaf("a", ">", 1), leaf("b", "<", 0)]}, {"a": 2, "b": 1}, False),
    ({"any": [leaf("a", ">", 1), leaf("b", "<", 0)]}, {"a": 0, "b": 1}, False),
    ({"any": [leaf("a", ">", 1), leaf("b", "<", 0)]}, {"a": 0, "b": -1}, True),
    ({"not": leaf("a", ">", 1)}, {"a": 2}, False),
    ({"not": {"not": leaf("a", ">", 1)}}, {"a": 2}, True),
    ({"any": [{"all": [leaf("a", ">=", 1), {"not": leaf("b", "==", 3)}]}, leaf("c", "!=", 0)]},
     {"a": 1, "b": 4, "c": 0}, True),
    ({"any": [{"all": [leaf("a", ">=", 1), {"not": leaf("b", "==", 3)}]}, leaf("c", "!=", 0)]},
     {"a": 1, "b": 3, "c": 0}, False),
    ({"any": [{"all": [leaf("a", ">=", 1), {"not": leaf("b", "==", 3)}]}, leaf("c", "!=", 0)]},
     {"a": 1, "b": 3, "c": 2}, True),
    ({"all": []}, {}, True),
    ({"any": []}, {}, False),
])
def test_all_any_not_nesting(node, signals, expected):
    assert evaluate_condition(node, signals) is expected


@pytest.mark.parametrize("op, value, expected", [
    (">", 1, True), (">=", 2, True), ("<", 2, False), ("<=", 2, True), ("==", 2, True),
    ("!=", 2, False), ("==", 2.0, True),
])
def test_each_operator(op, value, expected):
    assert evaluate_condition(leaf("a", op, value), {"a": 2}) is expected


@pytest.mark.parametrize("signals", [{}, {"a": None}, {"a": math.nan}, {"a": float("nan")}],
                         ids=["missing", "None", "nan", "nan2"])
@pytest.mark.parametrize("op", [">", ">=", "<", "<=", "==", "!="])
def test_missing_none_nan_leaf_is_false_and_its_not_is_true(signals, op):
    assert evaluate_condition(leaf("a", op, 0.0), signals) is False
    # documented: `not` of a leaf with no value is True
    assert evaluate_condition({"not": leaf("a", op, 0.0)}, signals) is True


@pytest.mark.parametrize("x, op, value, expected", [
    (math.inf, ">", 4, True), (math.inf, "<", 4, False), (-math.inf, ">", 4, False),
    (-math.inf, "<", -1e300, True), (math.inf, "==", math.inf, True), (math.inf, ">", 1e308, True),
])
def test_infinities_compare_normally(x, op, value, expected):
    assert evaluate_condition(leaf("a", op, value), {"a": x}) is expected


@pytest.mark.parametrize("x, op, value, expected", [
    (True, "==", 1, True), (True, ">", 0.5, True), (False, "==", 0, True),
    (1.0, "==", True, True), (0, "==", False, True), (True, "==", True, True),
    (False, "!=", True, True),
])
def test_bools_compare_as_one_and_zero(x, op, value, expected):
    assert evaluate_condition(leaf("a", op, value), {"a": x}) is expected


def test_nan_signal_does_not_fire_a_rule_but_not_rule_does():
    eng = Engine([rule("a"), rule("quiet", when={"not": X_GT_4}, then=(SKIP,), index=1)])
    assert [(d.rule, d.event) for d in eng.evaluate(0, {"x": math.nan})] == [("quiet", "fired")]


def test_explain_condition_annotates_every_node():
    node = {"any": [leaf("loss.zscore", ">", 4.0),
                    {"all": [leaf("g", ">", 0.02), {"not": leaf("q", ">", 0.1)}]}]}
    assert explain_condition(node, {"loss.zscore": 5.1, "g": 0.01}) == {
        "any": [
            {"signal": "loss.zscore", "op": ">", "value": 4.0, "actual": 5.1, "result": True},
            {"all": [
                {"signal": "g", "op": ">", "value": 0.02, "actual": 0.01, "result": False},
                {"not": {"signal": "q", "op": ">", "value": 0.1, "actual": None, "result": False},
                 "result": True},
            ], "result": False},
        ],
        "result": True,
    }


def test_malformed_conditions_raise():
    with pytest.raises(ValueError, match=r"when\.any\[0\]\.op: expected one of >, >=, <, <=, "
                                         r"==, !=, found '=>'"):
        evaluate_condition({"any": [leaf("a", "=>", 1)]}, {"a": 2})
    with pytest.raises(ValueError, match=r"when\.not: expected exactly one of 'all', 'any', "
                                         r"'not', 'signal', found \['foo'\]"):
        evaluate_condition({"not": {"foo": 1}}, {})
    with pytest.raises(ValueError, match=r"when: expected exactly one of .*found \['all', 'any'\]"):
        evaluate_condition({"all": [], "any": []}, {})
    with pytest.raises(TypeError, match=r"signal 'a': expected a number, bool or None, found str"):
        evaluate_condition(leaf("a", ">", 1), {"a": "high"})


def test_engine_checks_rules_up_front():
    with pytest.raises(ValueError, match=r"rule 'a' \(rules\[1\]\): duplicate rule name"):
        Engine([rule("a"), rule("a", path="rules[1]")])
    with pytest.raises(ValueError, match=r"rule 'a': expected for >= 1, found 0"):
        Engine([rule("a", for_=0)])
    with pytest.raises(ValueError, match=r"rule 'a': expected cooldown >= 0, found -1"):
        Engine([rule("a", cooldown=-1)])
    # a malformed leaf behind a short-circuit is still found at construction
    bad = {"all": [leaf("x", ">", 1), leaf("y", "~", 1)]}
    with pytest.raises(ValueError, match=r"rule 'a': when\.all\[1\]\.op: expected one of"):
        Engine([rule("a", when=bad)])


# ------------------------------------------------------------------- state


def _policy() -> list[RuleSpec]:
    return [
        rule("brake", when={"any": [leaf("z", ">", 2.0), leaf("nf", "==", True)]},
             then=(LR_HALF, SKIP), priority=50, for_=2, keep_firing_for=3, cooldown=7, index=0),
        rule("trend", when={"all": [leaf("g", ">", 0.5), {"not": leaf("z", "<", -1.0)}]},
             then=(LR_09,), priority=10, for_=3, keep_firing_for=1, cooldown=4, index=1),
        rule("idle", when={"not": leaf("g", ">", 0.2)}, then=(Command("momentum_reset"),),
             priority=10, for_=1, index=2),
    ]


def _series(n: int = 101) -> list[dict]:
    rng = random.Random(20240607)
    out = []
    for _ in range(n):
        s = {"z": rng.choice([rng.gauss(0, 1.5), None]), "g": rng.random(),
             "nf": rng.random() < 0.05}
        if rng.random() < 0.1:
            del s["g"]
        out.append(s)
    return out


def test_state_dict_round_trip_resumes_identically():
    series = _series()
    reference = Engine(_policy())
    ref = [reference.evaluate(step, s) for step, s in enumerate(series)]

    first = Engine(_policy())
    for step in range(50):
        first.evaluate(step, series[step])
    state = json.loads(json.dumps(first.state_dict()))
    assert state != Engine(_policy()).state_dict()  # something non-trivial to carry over

    resumed = Engine(_policy())
    resumed.load_state_dict(state)
    got = [resumed.evaluate(step, series[step]) for step in range(50, 101)]
    assert got == ref[50:]
    assert sum(len(ds) for ds in got) > 10  # the tail actually exercises the rules
    events_seen = {d.event for ds in got for d in ds}
    assert events_seen == {"fired", "action", "resolved"}


def test_state_dict_layout():
    eng = Engine([rule("a", cooldown=2)])
    eng.evaluate(0, {"x": T})
    eng.evaluate(1, {"x": F})
    assert eng.state_dict() == {"version": 1, "rules": {
        "a": {"pending": 0, "firing": False, "clear": 0, "resolved_step": 1}}}


def test_load_state_dict_with_other_rules_raises():
    saved = Engine([rule("a"), rule("b", index=1)]).state_dict()
    eng = Engine([rule("a"), rule("c", index=1)])
    before = eng.state_dict()
    with pytest.raises(ValueError, match=r"^engine state: rule names do not match this engine's "
                                         r"rules: missing \['c'\], unexpected \['b'\]"):
        eng.load_state_dict(saved)
    assert eng.state_dict() == before


def test_load_state_dict_rejects_other_versions():
    with pytest.raises(ValueError, match=r"engine state: expected version 1, found 99"):
        Engine([rule("a")]).load_state_dict({"version": 99, "rules": {}})


# ------------------------------------------------------------- no torch


def test_engine_source_imports_only_stdlib_and_spec():
    tree = ast.parse(ENGINE_PY.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "use absolute imports"
            mods = [node.module]
        else:
            continue
        for mod in mods:
            top = mod.split(".")[0]
            assert mod == "lbw_policy.spec" or (
                top != "lbw_policy" and top in sys.stdlib_module_names), mod


def test_importing_engine_loads_no_torch_or_numpy():
    # A stub parent package keeps lbw_policy/__init__.py (which may grow) out of the picture.
    code = f"""
import sys, types
pkg = types.ModuleType("lbw_policy"); pkg.__path__ = [{str(ENGINE_PY.parent)!r}]
sys.modules["lbw_policy"] = pkg
import lbw_policy.engine
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "scipy"))
assert not bad, bad
"""
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- property


@settings(max_examples=300, deadline=None)
@given(conds=st.lists(st.booleans(), max_size=60), for_=st.integers(1, 5),
       keep=st.integers(0, 3), cooldown=st.integers(0, 4))
def test_fires_only_after_for_consecutive_trues_and_never_twice(conds, for_, keep, cooldown):
    eng = Engine([rule("a", for_=for_, keep_firing_for=keep, cooldown=cooldown)])
    evs = events(eng, [T if c else F for c in conds])
    firing = False
    last_resolved = None
    for step, _, event in evs:
        if event == "fired":
            assert not firing, "fired twice without a resolved in between"
            start = step - for_ + 1
            assert start >= 0 and all(conds[start:step + 1])
            if last_resolved is not None:
                assert start > last_resolved + cooldown
            firing = True
        elif event == "action":
            assert firing and conds[step]
        else:
            assert event == "resolved" and firing
            assert not any(conds[step - keep:step + 1])
            firing, last_resolved = False, step
    assert eng.firing() == (["a"] if firing else [])


# ------------------------------------------------------------- compiled conditions

_NAMES = ("a", "b", "c")  # floats without subnormals: other tests set torch.set_flush_denormal(True)
_VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False), st.booleans(),
                    st.integers(-5, 5), st.none())
_LEAF = st.builds(lambda name, op, value: {"signal": name, "op": op, "value": value},
                  st.sampled_from(_NAMES), st.sampled_from(sorted(OPS)), _VALUES)
_TREE = st.recursive(_LEAF, lambda kids: st.one_of(
    st.builds(lambda c: {"all": c}, st.lists(kids, max_size=3)),
    st.builds(lambda c: {"any": c}, st.lists(kids, max_size=3)),
    st.builds(lambda c: {"not": c}, kids)), max_leaves=8)
_SIGNALS = st.dictionaries(st.sampled_from(_NAMES),
                           st.one_of(_VALUES, st.just("text"), st.just([1.0])), max_size=3)


@settings(max_examples=400, deadline=None)
@given(tree=_TREE, signals=st.lists(_SIGNALS, min_size=1, max_size=4))
def test_compiled_condition_decides_as_the_tree_walk(tree, signals):
    """The engine evaluates each rule through compile_condition; it must agree with
    evaluate_condition on every tree and signal set, errors included (a string or a list as a
    signal's value raises TypeError naming it, when the walk reaches it)."""
    f = compile_condition(tree)
    for values in signals:
        try:
            expected = evaluate_condition(tree, values)
        except TypeError as err:
            with pytest.raises(TypeError, match=re.escape(str(err))):
                f(values)
        else:
            assert f(values) is expected
