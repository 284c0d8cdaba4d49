"""Tests for lbw_policy.policy: loading, the revision hash, and every kind of load error with its
file, line and YAML path pinned. A small registry of test plugins keeps these tests independent of
the built-in detectors and actuators; a few tests at the end use the real registry."""

from __future__ import annotations

import hashlib
import json
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
import yaml

from lbw_policy.base import Actuator, Detector
from lbw_policy.errors import (
    PolicyBoundsError,
    PolicyError,
    PolicyReferenceError,
    PolicySchemaError,
    PolicySyntaxError,
)
from lbw_policy.policy import (
    Policy,
    canonical_json,
    load_policy,
    loads_policy,
    policy_schema,
    resolve_policy_path,
)
from lbw_policy.spec import OPS, ActuatorSpec, Command, DetectorSpec


# ------------------------------------------------------------------------ test plugins


class LossSpike(Detector):
    name = "loss_spike"
    signals = ("zscore", "ema")
    params_schema = {
        "type": "object",
        "properties": {"alpha": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                       "warmup": {"type": "integer", "minimum": 0}},
        "additionalProperties": False,
    }


class GradNorm(Detector):
    name = "grad_norm"
    signals = ("norm", "ratio")
    params_schema = {"type": "object", "properties": {"window": {"type": "integer", "minimum": 1}},
                     "additionalProperties": False}

    @classmethod
    def validate_params(cls, params):
        if params.get("window", 1) > 1000:
            raise ValueError("window must be <= 1000")


class Layers(Detector):
    """Signals depend on params: one per named layer."""

    name = "layer_entropy"
    params_schema = {"type": "object", "properties": {"layers": {"type": "array"}}}

    @classmethod
    def signals_for(cls, params):
        return tuple(f"{layer}_entropy" for layer in params.get("layers", []))


class LrScale(Actuator):
    name = "lr_scale"
    bounds_schema = {
        "type": "object",
        "properties": {"min": {"type": "number", "exclusiveMinimum": 0},
                       "max": {"type": "number", "exclusiveMinimum": 0},
                       "max_change_per_step": {"type": "number"},
                       "recover": {"type": "object"}},
        "additionalProperties": False,
    }
    commands = {"multiply": {"type": "number", "exclusiveMinimum": 0}, "set": {"type": "number"}}

    @classmethod
    def validate_bounds(cls, bounds):
        if bounds.get("min", 0) > bounds.get("max", 1):
            raise ValueError(f"min ({bounds['min']}) must be <= max ({bounds['max']})")


class SkipStep(Actuator):
    name = "skip_step"
    bounds_schema = {"type": "object", "properties": {"max_consecutive": {"type": "integer",
                     "minimum": 1}}, "additionalProperties": False}
    commands = {"apply": {"type": "null"}}


class Halt(Actuator):
    name = "halt"
    commands = {"apply": {"type": "null"}}


@dataclass(frozen=True)
class Reg:
    cls: type
    plugin: str = "tests"
    version: str = "0"


@dataclass
class Registry:
    detectors: dict
    actuators: dict


REG = Registry(
    detectors={c.name: Reg(c) for c in (LossSpike, GradNorm, Layers)},
    actuators={c.name: Reg(c) for c in (LrScale, SkipStep, Halt)},
)

VALID = """\
apiVersion: lbw-policy/v1
kind: Policy
metadata: {name: stability-default, description: "brake on spikes", owner: "ml@example.org"}
mode: audit
detectors:
  loss:   {type: loss_spike, params: {alpha: 0.97, warmup: 25}}
  gnorm:  {type: grad_norm, every: 4}
actuators:
  lr_scale:  {min: 0.05, max: 1.0, max_change_per_step: 0.5, recover: {factor: 1.05, every: 10}}
  skip_step: {max_consecutive: 3}
rules:
  - name: loss-spike-brake
    priority: 50
    when:
      any:
        - {signal: loss.zscore, op: ">", value: 4.0}
        - all: [{signal: gnorm.ratio, op: ">", value: 8}, {not: {signal: loss.ema, op: "<", value: 0.1}}]
    for: 2
    keep_firing_for: 20
    cooldown: 50
    then:
      - {actuator: lr_scale, multiply: 0.5}
      - {actuator: skip_step}
  - name: minimal
    when: {signal: gnorm.norm, op: ">=", value: 100}
    then: [{actuator: skip_step}]
"""


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_bad(tmp_path, text, exc=PolicyError, match=None):
    path = write(tmp_path, text)
    with pytest.raises(exc, match=match) as info:
        load_policy(path, registry=REG)
    assert info.value.file == str(path)
    return info.value


HEADER = """\
apiVersion: lbw-policy/v1
kind: Policy
metadata: {name: t}
"""


# -------------------------------------------------------------------------- loading


def test_valid_policy_loads_with_specs_and_defaults(tmp_path):
    path = write(tmp_path, VALID)
    pol = load_policy(path, registry=REG)
    assert isinstance(pol, Policy)
    assert pol.source == str(path) and pol.text == VALID
    assert (pol.name, pol.description, pol.owner) == ("stability-default", "brake on spikes", "ml@example.org")
    assert pol.mode == "audit" and pol.on_error == "halt"  # on_error default
    assert pol.detectors == {
        "loss": DetectorSpec("loss", "loss_spike", {"alpha": 0.97, "warmup": 25}, 1),
        "gnorm": DetectorSpec("gnorm", "grad_norm", {}, 4),
    }
    assert pol.actuators["skip_step"] == ActuatorSpec("skip_step", {"max_consecutive": 3})
    assert pol.actuators["lr_scale"].bounds["recover"] == {"factor": 1.05, "every": 10}
    r0, r1 = pol.rules
    assert (r0.name, r0.priority, r0.for_, r0.keep_firing_for, r0.cooldown, r0.index, r0.path) == \
        ("loss-spike-brake", 50, 2, 20, 50, 0, "rules[0]")
    assert r0.then == (Command("lr_scale", "multiply", 0.5), Command("skip_step", "apply", None))
    assert r0.signals() == ["loss.zscore", "gnorm.ratio", "loss.ema"]
    assert r0.when["any"][1]["all"][1] == {"not": {"signal": "loss.ema", "op": "<", "value": 0.1}}
    assert (r1.priority, r1.for_, r1.keep_firing_for, r1.cooldown, r1.index) == (0, 1, 0, 0, 1)
    assert pol.signals() == {"loss.zscore": "loss", "loss.ema": "loss",
                             "gnorm.norm": "gnorm", "gnorm.ratio": "gnorm"}
    # lines: a mapping value is at its key's line; list items at their own line
    assert pol.line_of("rules[0].when.any[1].all[0].signal") == 17
    assert pol.line_of(("rules", 1, "then")) == 26
    assert pol.line_of("detectors.gnorm.every") == 7
    assert pol.line_of("nope") is None
    assert load_policy(pol) is pol


def test_minimal_policy_defaults():
    pol = loads_policy(HEADER + "rules: []\n", registry=REG)
    assert (pol.mode, pol.on_error, pol.description, pol.owner) == ("enforce", "halt", "", "")
    assert pol.detectors == {} and pol.actuators == {} and pol.rules == ()
    assert pol.source == "<string>"


def test_revision_is_sha256_of_canonical_json():
    pol = loads_policy(VALID, registry=REG)
    data = yaml.safe_load(VALID)
    expected = hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":"),
                                         ensure_ascii=False).encode("utf-8")).hexdigest()
    assert pol.revision == expected
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode("utf-8")


def test_revision_stable_under_formatting_and_changed_by_values():
    base = loads_policy(VALID, registry=REG)
    # block style, comments, reordered keys: same data, same revision
    reformatted = yaml.safe_dump(yaml.safe_load(VALID), default_flow_style=False, sort_keys=True)
    reformatted = "# a comment\n" + reformatted.replace("rules:", "rules:   # the rules")
    assert reformatted != VALID
    assert loads_policy(reformatted, registry=REG).revision == base.revision
    changed = VALID.replace("multiply: 0.5", "multiply: 0.25")
    assert loads_policy(changed, registry=REG).revision != base.revision


def test_merge_keys_and_aliases_are_plain_data():
    text = HEADER + textwrap.dedent("""\
        detectors:
          loss: {type: loss_spike}
        actuators: {skip_step: {}}
        rules:
          - &base {name: a, when: &c {signal: loss.zscore, op: ">", value: 3}, then: [{actuator: skip_step}]}
          - <<: *base
            name: b
            when: {not: *c}
        """)
    pol = loads_policy(text, registry=REG)
    assert [r.name for r in pol.rules] == ["a", "b"]
    assert pol.rules[1].when == {"not": {"signal": "loss.zscore", "op": ">", "value": 3}}
    assert pol.line_of("rules[1].then") == 8  # merged from the anchor's line


# ---------------------------------------------------------------------- syntax errors


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(PolicyError, match="policy file not found: .*nope.yaml") as info:
        load_policy(tmp_path / "nope.yaml", registry=REG)
    assert info.value.file.endswith("nope.yaml")


def test_empty_file(tmp_path):
    err = load_bad(tmp_path, "", PolicySyntaxError, match="empty policy file")
    assert str(err).startswith(f"{err.file}:1: <root>: empty policy file")
    load_bad(tmp_path, "# only a comment\n\n", PolicySyntaxError, match="empty policy file")


def test_binary_junk(tmp_path):
    path = tmp_path / "junk.yaml"
    path.write_bytes(b"apiVersion: x\n\x89PNG\r\n\x1a\n\x00\x00\xff")
    with pytest.raises(PolicySyntaxError, match="not UTF-8 text at byte 14") as info:
        load_policy(path, registry=REG)
    assert info.value.line == 2
    path.write_bytes(b"a: 1\x00\x00")
    with pytest.raises(PolicySyntaxError, match="NUL character at offset 4"):
        load_policy(path, registry=REG)


def test_invalid_yaml_has_line(tmp_path):
    err = load_bad(tmp_path, HEADER + "rules: [\n  {name: x\n", PolicySyntaxError, match="invalid YAML")
    assert err.line == 6


def test_two_documents(tmp_path):
    err = load_bad(tmp_path, HEADER + "rules: []\n---\na: 1\n", PolicySyntaxError,
                   match="exactly one YAML document")
    assert err.line == 5


def test_python_tag_is_refused_never_constructed(tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(os, "system", lambda *a: pytest.fail("os.system was called"))
    err = load_bad(tmp_path, HEADER + "rules: !!python/object/apply:os.system ['echo pwned']\n",
                   PolicySyntaxError, match=r"rules: YAML tag '!!python/object/apply:os.system' is not allowed")
    assert (err.line, err.path) == (4, "rules")


def test_anchors_bomb_is_refused_without_expanding(tmp_path):
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    err = load_bad(tmp_path, "\n".join(lines) + "\n", PolicySyntaxError,
                   match="document too large once its aliases are expanded; expected at most 10000 nodes")
    assert err.problems[0].found.endswith(" nodes") and int(err.problems[0].found.split()[0]) > 9**10


def test_recursive_alias(tmp_path):
    load_bad(tmp_path, HEADER + "rules: &r [*r]\n", PolicySyntaxError, match="recursive alias")


def test_duplicate_keys(tmp_path):
    err = load_bad(tmp_path, HEADER + "mode: audit\nrules: []\nmode: enforce\n", PolicySyntaxError,
                   match=r":6: mode: duplicate key 'mode'.*already on line 4")
    assert (err.line, err.path) == (6, "mode")


def test_non_string_key(tmp_path):
    err = load_bad(tmp_path, HEADER + "rules: []\ndetectors: {on: {type: loss_spike}}\n",
                   PolicySyntaxError, match="mapping keys must be strings, found 'on'")
    assert (err.line, err.path) == (5, "detectors")


def test_nan_and_huge_int(tmp_path):
    text = HEADER + textwrap.dedent("""\
        detectors:
          loss: {type: loss_spike, params: {alpha: .nan, warmup: 10000000000000000000}}
        rules: []
        """)
    err = load_bad(tmp_path, text, PolicySyntaxError)
    assert [(p.path, p.line, p.message) for p in err.problems] == [
        ("detectors.loss.params.alpha", 5, "non-finite number"),
        ("detectors.loss.params.warmup", 5, "number too large"),
    ]


@pytest.mark.parametrize("style", ["block", "flow"])
def test_a_1000_deep_not_chain_is_refused_at_the_line_and_path_of_the_first_node_too_deep(
        tmp_path, style):
    # issue 18: it was "line 1: nesting too deep" (PyYAML's composer hit the recursion limit)
    leaf = "{signal: loss_spike.zscore, op: '>', value: 1}"
    if style == "block":  # line 7 + k holds the k-th `not:` (k = 0..999)
        when = "".join("  " * (k + 3) + "not:\n" for k in range(1000)) + "  " * 1003 + leaf
    else:
        when = "      " + "{not: " * 1000 + leaf + "}" * 1000
    text = HEADER + "rules:\n  - name: r\n    when:\n" + when + "\n    then: [{actuator: halt}]\n"
    path = tmp_path / "deep.yaml"
    path.write_bytes(text.encode("utf-8"))
    with pytest.raises(PolicySyntaxError) as info:
        load_policy(path, registry=REG)
    (problem,) = info.value.problems
    # rules (1), [0] (2), when (3), 61 nots: the value of the 62nd `not` is at depth 65 > 64
    assert problem.path == "rules[0].when" + ".not" * 62
    assert problem.message == "nesting too deep" and problem.expected == "at most 64 levels"
    # block: that value starts on the line after the 62nd `not:` (line 7 + 61); flow: line 7
    assert problem.line == (7 + 62 if style == "block" else 7)


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85", "\r"])
def test_a_line_separator_inside_a_string_does_not_shift_the_reported_lines(tmp_path, separator):
    # issue 18: YAML breaks lines at U+2028 / U+2029 / NEL / a lone CR; an editor (and this
    # loader's messages) count "\n" only
    text = (f"apiVersion: lbw-policy/v1\nkind: Policy\nmetadata: {{name: t, owner: 'a{separator}b'}}\n"
            "rules:\n  - name: r\n    when: {signal: loss_spike.zscore, op: '>', value: 1}\n"
            "    for: 0\n    then: [{actuator: halt}]\n")
    path = tmp_path / "sep.yaml"
    path.write_bytes(text.encode("utf-8"))
    with pytest.raises(PolicySchemaError) as info:
        load_policy(path, registry=REG)
    assert [(p.path, p.line) for p in info.value.problems] == [("rules[0].for", 7)]
    assert text.split("\n")[6] == "    for: 0"
    # a syntax error after the separator too (PyYAML's own mark), and a CRLF file alike
    bad = text.replace("    for: 0\n", "    for: 1\n   oops: 2\n").replace("\n", "\r\n")
    path.write_bytes(bad.encode("utf-8"))
    with pytest.raises(PolicySyntaxError) as info:
        load_policy(path, registry=REG)
    assert info.value.problems[0].line == 8, str(info.value)


def test_timestamp_is_not_plain_data(tmp_path):
    load_bad(tmp_path, "apiVersion: lbw-policy/v1\nkind: Policy\nmetadata: {name: 2024-01-01}\nrules: []\n",
             PolicySyntaxError, match=r":3: metadata.name: a date or time is not plain data.*quote it")


# ---------------------------------------------------------------------- schema errors


def test_top_level_not_a_mapping(tmp_path):
    load_bad(tmp_path, "- a\n- b\n", PolicySchemaError, match="a policy must be a mapping")


def test_wrong_type(tmp_path):
    err = load_bad(tmp_path, HEADER + "rules:\n  - name: r\n    when: {signal: a.b, op: '>', value: 1}\n"
                   "    for: two\n    then: [{actuator: halt}]\n", PolicySchemaError)
    assert str(err) == (f"{err.file}:7: rules[0].for: wrong type; expected an integer >= 1, "
                        "found 'two'")


def test_unknown_top_level_key(tmp_path):
    err = load_bad(tmp_path, HEADER + "rules: []\nrulez: []\n", PolicySchemaError,
                   match=r":5: rulez: unknown key 'rulez'; expected one of \['actuators', .*'rules', 'transfer'\]")
    assert (err.line, err.path) == (5, "rulez")


def test_unknown_key_in_rule_with_suggestion(tmp_path):
    err = load_bad(tmp_path, HEADER + textwrap.dedent("""\
        rules:
          - name: r
            when: {signal: a.b, op: ">", value: 1}
            cooldwn: 5
            then: [{actuator: halt}]
        """), PolicySchemaError, match=r"unknown key 'cooldwn'.*did you mean 'cooldown'\?")
    assert (err.line, err.path) == (7, "rules[0].cooldwn")


def test_bad_enum(tmp_path):
    err = load_bad(tmp_path, HEADER + "mode: enforced\nrules: []\n", PolicySchemaError,
                   match=r"mode: invalid value; expected one of \['enforce', 'audit'\], found 'enforced'")
    assert err.line == 4


def test_missing_required(tmp_path):
    err = load_bad(tmp_path, "apiVersion: lbw-policy/v1\nkind: Policy\nmetadata: {description: x}\n",
                   PolicySchemaError)
    assert [(p.path, p.message) for p in err.problems] == [
        ("", "missing required key 'rules'"),
        ("metadata", "missing required key 'name'"),
    ]
    assert err.problems[1].line == 3


def test_bad_api_version_and_detector_id(tmp_path):
    err = load_bad(tmp_path, "apiVersion: v2\nkind: Policy\nmetadata: {name: t}\nrules: []\n"
                   "detectors: {'my det': {type: loss_spike}}\n", PolicySchemaError)
    assert [(p.path, p.line, p.message, p.expected) for p in err.problems] == [
        ("apiVersion", 1, "invalid value", "'lbw-policy/v1'"),
        ('detectors["my det"]', 5, "invalid name 'my det'", "a string matching ^[A-Za-z_][A-Za-z0-9_]*$"),
    ]


@pytest.mark.parametrize("when, path, message", [
    ("{signal: a.b, op: '>', value: 1, any: []}", "rules[0].when",
     "a condition must be exactly one of all/any/not or a {signal, op, value} leaf"),
    ("{}", "rules[0].when", "a condition must be exactly one of all/any/not"),
    ("[a, b]", "rules[0].when", "a condition must be exactly one of .*; expected a mapping"),
    ("{any: []}", "rules[0].when.any", "too few items; expected a non-empty list"),
    ("{all: [{signal: a.b, op: '=>', value: 1}]}", "rules[0].when.all[0].op", "invalid value"),
    ("{not: {signal: a.b, op: '>'}}", "rules[0].when.not", "missing required key 'value'"),
    ("{all: [{any: [{signal: a.b, op: '>', value: 1}], all: []}]}", "rules[0].when.all[0]",
     "exactly one of all/any/not"),
    ("{any: [{signal: a.b, op: '>', valu: 1}]}", "rules[0].when.any[0].valu",
     "unknown key 'valu'.*did you mean 'value'"),
    ("{signal: a.b, op: '>', value: true}", "rules[0].when.op",
     r"invalid value; expected one of \['==', '!='\]"),
    ("{signal: zscore, op: '>', value: 1}", "rules[0].when.signal", "invalid string"),
])
def test_bad_condition_shape(tmp_path, when, path, message):
    text = HEADER + f"rules:\n  - name: r\n    when: {when}\n    then: [{{actuator: halt}}]\n"
    err = load_bad(tmp_path, text, PolicySchemaError)
    assert all(p.line == 6 and p.path.startswith("rules[0].when") for p in err.problems), str(err)
    assert any(p.path == path and re.search(message, str(p)) for p in err.problems), str(err)


@pytest.mark.parametrize("written, fixed", [("1e3", "1.0e+3"), ("1.0e9", "1.0e+9"), (".5e3", "0.5e+3"),
                                             ("-2e+4", "-2.0e+4")])
def test_exponent_yaml_reads_as_a_string_gets_a_fix_that_parses(tmp_path, written, fixed):
    # YAML 1.1 (PyYAML) needs a dot in the mantissa and a sign in the exponent
    load_bad(tmp_path, HEADER + f"rules: [{{name: r, when: {{signal: a.b, op: '>', value: {written}}}, "
             "then: [{actuator: halt}]}]\n", PolicySchemaError,
             match=rf"expected a number or a boolean, found '{re.escape(written)}' \(fix: YAML reads "
             rf"{re.escape(written)} as a string; write {re.escape(fixed)}\)")
    assert yaml.safe_load(f"v: {fixed}")["v"] == float(written)


def test_a_quoted_float_gets_no_exponent_hint(tmp_path):
    err = load_bad(tmp_path, HEADER + "rules: [{name: r, when: {signal: a.b, op: '>', value: '2.5e-4'}, "
                   "then: [{actuator: halt}]}]\n", PolicySchemaError, match="found '2.5e-4'")
    assert "as a string; write" not in str(err)


def test_command_with_two_verbs(tmp_path):
    text = HEADER + "rules: [{name: r, when: {signal: a.b, op: '>', value: 1}, " \
        "then: [{actuator: lr_scale, multiply: 0.5, set: 1}]}]\n"
    load_bad(tmp_path, text, PolicySchemaError, match=r"rules\[0\].then\[0\]: a command names one "
             r"actuator and at most one verb")


def test_schema_errors_sorted_by_path(tmp_path):
    err = load_bad(tmp_path, HEADER + "rules: [{name: 'a b', when: {}, then: []}]\nmode: x\n",
                   PolicySchemaError)
    assert [p.path for p in err.problems] == ["mode", "rules[0].name", "rules[0].then", "rules[0].when"]


# ---------------------------------------------------------------- cross-field errors

POLICY_WITH = HEADER + """\
detectors:
  loss: {type: loss_spike}
  gnorm: {type: grad_norm}
actuators:
  lr_scale: {min: 0.1, max: 1.0}
  skip_step: {}
rules:
  - name: brake
    when: {signal: loss.zscore, op: ">", value: 4}
    then:
      - {actuator: lr_scale, multiply: 0.5}
"""


def test_unknown_detector_type_with_suggestion(tmp_path):
    err = load_bad(tmp_path, POLICY_WITH.replace("type: loss_spike", "type: loss_spik"),
                   PolicyReferenceError, match=r"unknown detector type 'loss_spik'; expected one "
                   r"of the registered detector types \['grad_norm', 'layer_entropy', 'loss_spike'\]"
                   r", found 'loss_spik' \(fix: did you mean 'loss_spike'\?\)")
    # the signals of a detector of unknown type are not reported again
    assert len(err.problems) == 1 and (err.line, err.path) == (5, "detectors.loss.type")


def test_bad_detector_params(tmp_path):
    text = POLICY_WITH.replace("{type: grad_norm}", "{type: grad_norm, params: {window: 0, wndow: 2}}")
    text = text.replace("{type: loss_spike}", "{type: loss_spike, params: {alpha: 2}}")
    err = load_bad(tmp_path, text, PolicyBoundsError)
    assert [(p.path, p.line, p.message) for p in err.problems] == [
        ("detectors.loss.params.alpha", 5, "value out of range"),
        ("detectors.gnorm.params.wndow", 6, "unknown key 'wndow'"),
        ("detectors.gnorm.params.window", 6, "value out of range"),
    ]
    err = load_bad(tmp_path, POLICY_WITH.replace("{type: grad_norm}",
                   "{type: grad_norm, params: {window: 5000}}"), PolicyBoundsError,
                   match=r":6: detectors.gnorm.params: window must be <= 1000")


def test_unknown_signal_with_suggestion(tmp_path):
    err = load_bad(tmp_path, POLICY_WITH.replace("loss.zscore", "loss.zscor"), PolicyReferenceError,
                   match=r"unknown signal 'loss.zscor'; expected one of the declared signals "
                   r"\['gnorm.norm', 'gnorm.ratio', 'loss.ema', 'loss.zscore'\] \(fix: did you mean "
                   r"'loss.zscore'\?\)")
    assert (err.line, err.path) == (12, "rules[0].when.signal")
    err = load_bad(tmp_path, POLICY_WITH.replace("loss.zscore", "qk.entropy"), PolicyReferenceError,
                   match=r"configure a detector 'qk' under `detectors:`")


def test_signals_depend_on_params():
    text = HEADER + "detectors: {ent: {type: layer_entropy, params: {layers: [qk, mlp]}}}\n" \
        "actuators: {halt: {}}\n" \
        "rules: [{name: r, when: {signal: ent.qk_entropy, op: '<', value: 1}, then: [{actuator: halt}]}]\n"
    assert loads_policy(text, registry=REG).signals() == {"ent.qk_entropy": "ent", "ent.mlp_entropy": "ent"}
    with pytest.raises(PolicyReferenceError, match="unknown signal 'ent.attn_entropy'"):
        loads_policy(text.replace("ent.qk_entropy", "ent.attn_entropy"), registry=REG)


def test_unknown_actuator(tmp_path):
    err = load_bad(tmp_path, POLICY_WITH.replace("  skip_step: {}", "  skip_stepp: {}"),
                   PolicyReferenceError, match=r":9: actuators.skip_stepp: unknown actuator "
                   r"'skip_stepp'.*did you mean 'skip_step'")
    assert len(err.problems) == 1


def test_unknown_actuator_in_command(tmp_path):
    load_bad(tmp_path, POLICY_WITH.replace("{actuator: lr_scale,", "{actuator: lr_scal,"),
             PolicyReferenceError, match=r":14: rules\[0\].then\[0\].actuator: unknown actuator "
             r"'lr_scal'.*did you mean 'lr_scale'")


def test_actuator_used_but_not_configured(tmp_path):
    err = load_bad(tmp_path, POLICY_WITH + "      - {actuator: halt}\n", PolicyReferenceError,
                   match=r"actuator 'halt' is not configured \(fix: add `actuators: \{halt: \{...\}\}` "
                   r"with its bounds\)")
    assert (err.line, err.path) == (15, "rules[0].then[1].actuator")


def test_bad_bounds(tmp_path):
    err = load_bad(tmp_path, POLICY_WITH.replace("{min: 0.1, max: 1.0}", "{min: 2.0, max: 1.0}"),
                   PolicyBoundsError, match=r":8: actuators.lr_scale: min \(2.0\) must be <= max \(1.0\)")
    assert err.path == "actuators.lr_scale"
    err = load_bad(tmp_path, POLICY_WITH.replace("skip_step: {}", "skip_step: {max_consecutive: 0}"),
                   PolicyBoundsError, match="value out of range; expected an integer >= 1, found 0")
    assert (err.path, err.line) == ("actuators.skip_step.max_consecutive", 9)


def test_bad_verb_and_value(tmp_path):
    err = load_bad(tmp_path, POLICY_WITH.replace("multiply: 0.5", "multiplyy: 0.5"), PolicyReferenceError,
                   match=r"unknown verb 'multiplyy' for actuator 'lr_scale'; expected one of the verbs "
                   r"\['multiply', 'set'\].*did you mean 'multiply'")
    assert (err.path, err.line) == ("rules[0].then[0].multiplyy", 14)
    err = load_bad(tmp_path, POLICY_WITH.replace("multiply: 0.5", "multiply: -1"), PolicyBoundsError,
                   match=r"value out of range; expected a number > 0, found -1")
    assert err.path == "rules[0].then[0].multiply"
    load_bad(tmp_path, POLICY_WITH.replace("{actuator: lr_scale, multiply: 0.5}", "{actuator: lr_scale}"),
             PolicyReferenceError, match=r"rules\[0\].then\[0\]: actuator 'lr_scale' needs a verb")
    load_bad(tmp_path, POLICY_WITH + "      - {actuator: skip_step, apply: 1}\n", PolicyBoundsError,
             match=r"then\[1\].apply: wrong type; expected null, found 1")


def test_duplicate_rule_names_and_commands(tmp_path):
    text = POLICY_WITH + (
        "  - name: brake\n"
        "    when: {signal: loss.zscore, op: '>', value: 5}\n"
        "    then: [{actuator: skip_step}, {actuator: skip_step}]\n")
    err = load_bad(tmp_path, text, PolicyReferenceError)
    assert [(p.path, p.line, p.message) for p in err.problems] == [
        ("rules[1].name", 15, "duplicate rule name 'brake'"),
        ("rules[1].then[1].actuator", 17, "actuator 'skip_step' is commanded twice in one rule"),
    ]
    assert "rules[0] (line 11) already has it" in str(err)


def test_several_errors_reported_at_once(tmp_path):
    text = POLICY_WITH.replace("type: grad_norm", "type: grad_nrm")
    text = text.replace("max: 1.0", "max: 0.01").replace("loss.zscore", "loss.z")
    text += "      - {actuator: halt}\n"
    err = load_bad(tmp_path, text, PolicyError)
    # one exception that is both kinds, so either except clause catches it
    assert isinstance(err, PolicyReferenceError) and isinstance(err, PolicyBoundsError)
    assert [p.path for p in err.problems] == [
        "detectors.gnorm.type", "actuators.lr_scale", "rules[0].when.signal", "rules[0].then[1].actuator"]
    assert len(str(err).splitlines()) == 4
    assert all(line.startswith(f"{err.file}:") for line in str(err).splitlines())


def test_bad_policy_never_half_applies(tmp_path):
    """Whatever the mistake, load_policy raises a PolicyError and returns nothing."""
    for text in ["", "[", HEADER, HEADER + "rules: {}\n", POLICY_WITH.replace("loss.zscore", "x.y")]:
        with pytest.raises(PolicyError):
            loads_policy(text, registry=REG)


# ---------------------------------------------------------------------------- misc


def test_schema_is_valid_and_documented():
    schema = policy_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$id"] == "https://lbw-policy.dev/schema/policy.schema.json"
    assert schema["$defs"]["condition"]["oneOf"][3]["properties"]["op"]["enum"] == list(OPS)

    def walk(node, where):
        if isinstance(node, dict):
            for name, sub in node.get("properties", {}).items():
                assert "description" in sub, f"{where}.properties.{name} has no description"
            for key, sub in node.items():
                walk(sub, f"{where}.{key}")
        elif isinstance(node, list):
            for i, sub in enumerate(node):
                walk(sub, f"{where}[{i}]")

    walk(schema, "")
    policy_schema()["title"] = "mutated"
    assert policy_schema()["title"] != "mutated"


def test_valid_policy_passes_the_published_schema():
    jsonschema.Draft202012Validator(policy_schema()).validate(yaml.safe_load(VALID))


def test_resolve_policy_path(tmp_path):
    path = write(tmp_path, VALID)
    assert resolve_policy_path(path) == path
    with pytest.raises(FileNotFoundError, match="built-in policies"):
        resolve_policy_path("no-such-policy")
    try:
        default = resolve_policy_path("default")
    except FileNotFoundError:
        pytest.skip("lbw_policy.policies has no default.yaml yet")
    assert default.name == "default.yaml" and default.is_file()
    assert resolve_policy_path("default.yaml") == default


# ------------------------------------------------------------- the real registry

def _real_registry():
    plugins = pytest.importorskip("lbw_policy.plugins")
    return plugins.get_registry()


@pytest.mark.parametrize("name", ["default", "audit-only"])
def test_builtin_policies_load_with_the_real_registry(name):
    registry = _real_registry()
    try:
        path = resolve_policy_path(name)
    except FileNotFoundError:
        pytest.skip(f"no built-in policy {name!r}")
    pol = load_policy(path, registry=registry)
    assert pol.name and pol.rules
    assert load_policy(path).revision == pol.revision  # registry=None uses get_registry()


def test_audit_only_is_the_default_policy_in_audit_mode():
    """audit-only.yaml must stay the shipped default's rules, detectors and bounds, in audit mode."""
    default = yaml.safe_load(resolve_policy_path("default").read_text(encoding="utf-8"))
    audit = yaml.safe_load(resolve_policy_path("audit-only").read_text(encoding="utf-8"))
    assert (default["mode"], audit["mode"]) == ("enforce", "audit")
    assert audit["metadata"]["name"] == default["metadata"]["name"] + "-audit"
    for key in ("detectors", "actuators", "rules", "on_error"):
        assert audit[key] == default[key], key
