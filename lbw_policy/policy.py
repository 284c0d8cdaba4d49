"""YAML policy -> validated, immutable :class:`Policy`.

A bad policy never half-applies: :func:`load_policy` returns a :class:`Policy` or raises a
:class:`~lbw_policy.errors.PolicyError` listing every problem of the first layer that failed, each
with file, line, YAML path (``rules[0].when.any[1].signal``, ``detectors["my key"]``), expected,
found and a fix. The layers, and the subclass each raises:

1. syntax (``PolicySyntaxError``): UTF-8 text; one YAML document composed with ``yaml.SafeLoader``
   (nothing is ever constructed from a tag); plain tags only; string keys, none duplicated; at most
   ``MAX_NODES`` nodes with aliases expanded (counted, never expanded: no anchors bomb); finite
   numbers, integers within +-``MAX_INT`` (:mod:`lbw_policy.yamlsource` reads the YAML);
2. shape (``PolicySchemaError``): ``lbw_policy/schema/policy.schema.json``, with one rule
   stricter than JSON Schema's: an ``integer`` is a whole number written as one (``3``), never a
   float (``3.0``, ``1.0e+300``), in the policy's schema and in every plugin's;
3. references (``PolicyReferenceError``) and values (``PolicyBoundsError``), against the plugin
   registry: detector types and params, actuators and bounds, signals, verbs and command values.

Problems of several kinds raise one exception that is an instance of each of their classes.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import jsonschema
import yaml

from lbw_policy.decision_log import canonical_json
from lbw_policy.errors import (PolicyBoundsError, PolicyError, PolicyReferenceError,
                               PolicySchemaError, PolicySyntaxError)
from lbw_policy.spec import ActuatorSpec, Command, DetectorSpec, RuleSpec
from lbw_policy.yamlsource import (MAX_INT, Collector, PathT, check_plain, decode, format_path,
                                   found, parse, path_key, read_source, suggest)

__all__ = ["Policy", "load_policy", "loads_policy", "policy_schema", "canonical_json",
           "resolve_policy_path"]

_CONDITION_TEXT = "a condition must be exactly one of all/any/not or a {signal, op, value} leaf"
_TYPE_NAMES = {"object": "a mapping", "array": "a list", "string": "a string",
               "integer": "an integer", "number": "a number", "boolean": "a boolean",
               "null": "null"}


def _is_integer(checker: Any, instance: Any) -> bool:
    """An integer is a Python ``int`` (not ``bool``): JSON Schema also counts ``2.0`` and
    ``1.0e+300``, which YAML reads as floats and which would pass every ``maximum`` below
    1e308 (issue 18)."""
    return isinstance(instance, int) and not isinstance(instance, bool)


#: Draft 2020-12 with :func:`_is_integer`: the validator of the policy's and plugins' schemas.
_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer))


@dataclass(frozen=True)
class Policy:
    """A validated policy. Build one with :func:`load_policy` / :func:`loads_policy`.

    :param data: the document as written (plain data, defaults not filled in).
    :param source: the file path, or ``"<string>"``.
    :param revision: sha256 hex digest of :func:`canonical_json` of ``data``: unchanged by
        comments, formatting and key order; changed by any value.
    :param name: ``metadata.name``; ``description`` and ``owner`` default to ``""``.
    :param mode: ``"enforce"`` or ``"audit"``.
    :param on_error: ``"continue"``, ``"skip_step"`` or ``"halt"``.
    :param transfer: ``"auto"``, ``"immediate"`` or ``"deferred"`` (how signals reach the host).
    :param detectors: ``{id: DetectorSpec}`` in file order.
    :param actuators: ``{name: ActuatorSpec}`` in file order.
    :param rules: the rules in file order (``RuleSpec.index`` is the position).
    :param lines: ``{yaml_path: 1-based line}`` for every node (a mapping value: its key's line).
    :param text: the original text.
    """

    data: dict = field(repr=False)
    source: str
    revision: str
    name: str
    description: str
    owner: str
    mode: str
    on_error: str
    transfer: str
    detectors: dict
    actuators: dict
    rules: tuple
    lines: dict = field(repr=False, compare=False)
    text: str = field(repr=False, compare=False)
    _signals: dict = field(default_factory=dict, repr=False, compare=False)

    def __hash__(self) -> int:
        return hash((self.source, self.revision))

    def line_of(self, path: Union[str, Sequence]) -> Optional[int]:
        """Line of a YAML path (a string like ``rules[0].when`` or a sequence of keys and
        indices), or ``None`` when the document has no such node."""
        return self.lines.get(path if isinstance(path, str) else format_path(path))

    def signals(self) -> dict:
        """Every declared signal ``"<detector id>.<signal>"`` -> the detector id."""
        return dict(self._signals)


def load_policy(source: Union[str, os.PathLike, Policy], *, registry: Any = None) -> Policy:
    """Read and validate a policy file; a :class:`Policy` passes through unchanged.

    :param source: path of a YAML policy file (see :func:`resolve_policy_path` for built-ins).
    :param registry: object with ``detectors`` and ``actuators`` mappings of name ->
        registration (``.cls``, ``.plugin``, ``.version``); default
        :func:`lbw_policy.plugins.get_registry`.
    :raises PolicyError: the file cannot be read (its path named), is not a regular file (a
        FIFO or device is refused without reading), is larger than 4 MiB, or the policy is
        invalid (a subclass per kind; ``err.problems`` lists every problem).
    """
    if isinstance(source, Policy):
        return source
    path = Path(source)
    try:
        raw = read_source(path, "policy file", PolicySyntaxError)
    except FileNotFoundError:
        hint = "this looks like policy text: use loads_policy(text)" if "\n" in str(source) \
            else f"check the path; built-in policies: {sorted(_builtin_policies())}"
        raise PolicyError(f"policy file not found: {str(path)!r}", file=str(path),
                          hint=hint) from None
    return _load(decode(raw, str(path)), str(path), registry)


def loads_policy(text: Union[str, bytes], *, source: str = "<string>",
                 registry: Any = None) -> Policy:
    """Validate policy text (``source`` names it in error messages). See :func:`load_policy`."""
    text = decode(bytes(text), source) if isinstance(text, (bytes, bytearray)) else text
    return _load(text, source, registry)


def policy_schema() -> dict:
    """The policy JSON Schema (draft 2020-12), as a fresh dict."""
    return copy.deepcopy(_schema())


def resolve_policy_path(name_or_path: Union[str, os.PathLike]) -> Path:
    """An existing path as given, or the built-in policy of that name (``"default"`` or
    ``"default.yaml"``) from the ``lbw_policy.policies`` package.

    :raises FileNotFoundError: neither exists; the message lists the built-in names.
    """
    path = Path(name_or_path)
    if path.exists():
        return path
    name = str(name_or_path)
    builtins = _builtin_policies()
    stem = name[:-5] if name.endswith(".yaml") else name[:-4] if name.endswith(".yml") else name
    if os.sep not in name and "/" not in name and stem in builtins:
        return builtins[stem]
    raise FileNotFoundError(
        f"no policy file {name!r} and no built-in policy of that name; "
        f"built-in policies: {', '.join(sorted(builtins)) or '(none)'}")


def _load(text: str, source: str, registry: Any) -> Policy:
    col = Collector(source, {})
    data = parse(text, col)
    col.raise_if_any()
    if not isinstance(data, dict):
        col.add(PolicySchemaError, (), "a policy must be a mapping", expected="a mapping with "
                "apiVersion, kind, metadata, rules", found=found(data), line=1)
        col.raise_if_any()
    check_plain(data, (), col)
    col.raise_if_any()
    _schema_problems(col, PolicySchemaError, _schema(), data, ())
    if not col.items:  # on a well-formed document only
        _check_line_breaks(data, col)
    col.raise_if_any(sort=True)
    if registry is None:
        from lbw_policy.plugins import get_registry

        registry = get_registry()
    signals = _check_references(data, col, registry)
    col.raise_if_any()
    return _build(data, text, source, col.lines, signals)


# ------------------------------------------------------------------------------ JSON Schema


def _check_line_breaks(data: dict, col: Collector) -> None:
    """Names a schema pattern checks with ``$`` (which also matches before a final newline):
    detector ids, actuator names, rule names and the signals rules read hold no line break."""
    names = [(("detectors", k), k) for k in (data.get("detectors") or {})]
    names += [(("actuators", k), k) for k in (data.get("actuators") or {})]
    for i, rule in enumerate(data.get("rules") or ()):
        if isinstance(rule, dict):
            names.append((("rules", i, "name"), rule.get("name")))
            if isinstance(rule.get("when"), dict):
                names += [(p + ("signal",), leaf.get("signal"))
                          for p, leaf in _leaves(rule["when"], ("rules", i, "when"))
                          if isinstance(leaf, dict)]
    for path, name in names:
        if isinstance(name, str) and ("\n" in name or "\r" in name):
            col.add(PolicySchemaError, path, "a name must not contain a line break",
                    found=repr(name), hint="remove the trailing newline (from a `|` block or a "
                    "quoted \"...\\n\")")


@functools.lru_cache(maxsize=None)
def _schema() -> dict:
    text = resources.files("lbw_policy.schema").joinpath("policy.schema.json").read_text("utf-8")
    return json.loads(text)


def _schema_problems(col: "Collector", kind: type, schema: Mapping, instance: Any,
                     prefix: PathT) -> None:
    """Validate ``instance`` against ``schema``; one problem per error, paths under ``prefix``."""
    errors = _Validator(schema).iter_errors(instance)
    for err in sorted(errors, key=lambda e: path_key(tuple(e.absolute_path))):
        _explain(col, kind, err, prefix)


def _explain(col: "Collector", kind: type, err: jsonschema.ValidationError, prefix: PathT) -> None:
    path = prefix + tuple(err.absolute_path)
    schema, inst, keyword = err.schema, err.instance, err.validator
    if not isinstance(schema, dict):
        col.add(kind, path, err.message)
    elif keyword == "oneOf" and schema == _schema()["$defs"]["condition"]:
        _explain_condition(col, kind, err, prefix, path)
    elif "propertyNames" in err.absolute_schema_path:
        col.add(kind, path + (inst,), f"invalid name {inst!r}", expected=_describe(schema))
    elif keyword == "additionalProperties" and isinstance(inst, dict):
        allowed = sorted(schema.get("properties", {}))
        patterns = list(schema.get("patternProperties", {}))
        for key in inst:
            if key in allowed or any(re.search(p, key) for p in patterns):
                continue
            col.add(kind, path + (key,), f"unknown key {key!r}",
                    expected=f"one of {allowed}" if allowed else "no keys",
                    hint=suggest(key, allowed))
    elif keyword == "required" and isinstance(inst, dict):
        for key in err.validator_value:
            if key not in inst:
                sub = schema.get("properties", {}).get(key, {})
                col.add(kind, path, f"missing required key {key!r}",
                        expected=f"{key}: {_describe(sub)}" if _describe(sub) else None)
    elif keyword == "maxProperties" and isinstance(inst, dict) and "actuator" in inst:
        col.add(kind, path, "a command names one actuator and at most one verb",
                expected="{actuator: NAME} or {actuator: NAME, VERB: VALUE}",
                found=f"keys {list(inst)}", hint="split it into one command per verb")
    elif keyword in ("type", "enum", "const", "minimum", "maximum", "exclusiveMinimum",
                     "exclusiveMaximum", "pattern", "minLength", "maxLength", "minItems",
                     "maxItems", "multipleOf"):
        message = {"type": "wrong type", "enum": "invalid value", "const": "invalid value",
                   "pattern": "invalid string", "minLength": "string too short",
                   "maxLength": "string too long", "minItems": "too few items",
                   "maxItems": "too many items"}.get(keyword, "value out of range")
        hint = "write {} for none" if keyword == "type" and inst is None and \
            schema.get("type") == "object" else None
        integral = keyword == "type" and "integer" in _types(schema) and \
            "number" not in _types(schema)
        if integral and isinstance(inst, (float, str)) and _whole(inst) is not None:
            hint = f"an integer field takes a whole number written without a point or an " \
                f"exponent: write {_whole(inst)}" if abs(_whole(inst)) <= MAX_INT else \
                f"an integer field takes a whole number within +-1e15"
        elif keyword == "type" and isinstance(inst, str):
            hint = _float_hint(inst)
        if keyword == "enum" and isinstance(inst, str):
            hint = suggest(inst, [v for v in schema["enum"] if isinstance(v, str)])
        if keyword == "maxLength" and isinstance(inst, str):
            col.add(kind, path, message, expected=f"at most {schema['maxLength']} characters",
                    found=f"{len(inst)} characters", hint="shorten it")
            return
        col.add(kind, path, message, expected=_describe(schema), found=found(inst), hint=hint)
    else:
        col.add(kind, path, err.message, found=found(inst))


def _types(schema: Mapping) -> list:
    types = schema.get("type", ())
    return [types] if isinstance(types, str) else list(types)


def _whole(value: Any) -> Optional[int]:
    """The integer a float or a number-like string (``"1e3"``, YAML 1.1 reads it as a string)
    stands for, when it is whole; ``None`` otherwise."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return int(number) if math.isfinite(number) and number.is_integer() else None


def _float_hint(text: str) -> Optional[str]:
    """A fix for ``1e3``, ``1.0e9``, ``.5e3``: numbers to Python, strings to YAML 1.1, whose float
    needs a dot in the mantissa and a sign in the exponent (``1.0e+3``); ``None`` otherwise."""
    m = re.fullmatch(r"([-+]?)(\d*)(?:\.(\d*))?[eE]([-+]?)(\d+)", text)
    if not m or not (m[2] or m[3]) or isinstance(yaml.safe_load(text), float):  # or a quoted float
        return None
    return f"YAML reads {text} as a string; write {m[1]}{m[2] or '0'}.{m[3] or '0'}e{m[4] or '+'}{m[5]}"


def _explain_condition(col, kind, err, prefix, path) -> None:
    inst = err.instance
    if not isinstance(inst, dict):
        col.add(kind, path, _CONDITION_TEXT, expected="a mapping", found=found(inst))
        return
    keys = set(inst)
    branch = keys & {"all", "any", "not"}
    leaf = keys & {"signal", "op", "value"}
    if len(branch) == 1 and not leaf:
        wanted = next(iter(branch))
    elif leaf and not branch:
        wanted = "signal"
    else:
        col.add(kind, path, _CONDITION_TEXT, found=f"keys {sorted(keys)}" if keys else "{}",
                hint="nest the parts: {all: [{signal: a.x, op: '>', value: 1}, {not: ...}]}")
        return
    index = next(i for i, sub in enumerate(err.validator_value)
                 if wanted in sub.get("required", ()))
    for sub_err in err.context:
        if sub_err.relative_schema_path and sub_err.relative_schema_path[0] == index:
            _explain(col, kind, sub_err, prefix)


def _describe(schema: Mapping) -> Optional[str]:
    """A subschema in words: ``"an integer >= 1"``, ``"one of ['enforce', 'audit']"``."""
    if "const" in schema:
        return repr(schema["const"])
    if "enum" in schema:
        return f"one of {list(schema['enum'])}"
    types = schema.get("type", "string" if "pattern" in schema else None)
    if types is None:
        return None
    types = [types] if isinstance(types, str) else list(types)
    text = " or ".join(_TYPE_NAMES.get(t, t) for t in types)
    if schema.get("minItems") == 1 or schema.get("minLength") == 1:
        text = "a non-empty " + text.split(" ", 1)[1]
    limits = [f"{sym} {schema[key]}" for key, sym in (
        ("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"))
        if key in schema]
    if limits:
        text += " " + " and ".join(limits)
    if "pattern" in schema:
        text += f" matching {schema['pattern']}"
    return text


# -------------------------------------------------------------------------- cross-field checks


def _check_references(data: dict, col: "Collector", registry: Any) -> dict:
    """Check names and values against the registry; returns the declared signals."""
    det_regs, act_regs = registry.detectors, registry.actuators
    detectors, actuators = data.get("detectors", {}), data.get("actuators", {})
    declared: dict = {}
    published: dict = {}  # actuator signals "<actuator>.<signal>" -> actuator name
    broken: set = set()  # detector ids / actuator names whose signals cannot be known
    for did, det in detectors.items():
        base = ("detectors", did)
        reg = det_regs.get(det["type"])
        if reg is None:
            col.add(PolicyReferenceError, base + ("type",),
                    f"unknown detector type {det['type']!r}",
                    expected=_one_of(det_regs, "registered detector types"),
                    found=repr(det["type"]), hint=suggest(det["type"], det_regs)
                    or "install the plugin that provides it (`lbw-policy plugins` lists them)")
            broken.add(did)
            continue
        params = det.get("params", {})
        if not _plugin_checks(col, reg, reg.cls.params_schema, reg.cls.validate_params, params,
                              base + ("params",)):
            broken.add(did)
            continue
        try:
            names = tuple(reg.cls.signals_for(params))
        except Exception as exc:  # a plugin bug: report it, don't crash the loader
            col.add(PolicyBoundsError, base + ("params",), f"detector type {det['type']!r} "
                    f"(plugin {_plugin(reg)}) failed to list its signals: {exc!r}")
            broken.add(did)
            continue
        for sig in names:
            declared[f"{did}.{sig}"] = did
    for name, bounds in actuators.items():
        reg = act_regs.get(name)
        if reg is None:
            col.add(PolicyReferenceError, ("actuators", name), f"unknown actuator {name!r}",
                    expected=_one_of(act_regs, "registered actuators"),
                    hint=suggest(name, act_regs) or "install the plugin that provides it")
        elif not _plugin_checks(col, reg, reg.cls.bounds_schema, reg.cls.validate_bounds,
                                bounds, ("actuators", name)):
            broken.add(name)
        else:
            _actuator_signals(col, reg, name, bounds, detectors, published, broken)
    first_of: dict = {}
    for i, rule in enumerate(data["rules"]):
        rpath = ("rules", i)
        if rule["name"] in first_of:
            j = first_of[rule["name"]]
            col.add(PolicyReferenceError, rpath + ("name",),
                    f"duplicate rule name {rule['name']!r}",
                    hint=f"rule names are unique; rules[{j}] (line "
                    f"{col.line_near(('rules', j))}) already has it")
        else:
            first_of[rule["name"]] = i
        for lpath, leaf in _leaves(rule["when"], rpath + ("when",)):
            sig = leaf["signal"]
            did = sig.split(".", 1)[0]
            if sig in declared or sig in published or did in broken:
                continue
            hint = suggest(sig, list(declared) + list(published))
            reg = det_regs.get(detectors[did].get("type")) if did in detectors else None
            optional = getattr(reg.cls, "optional_signals", {}) if reg is not None else {}
            if sig.split(".", 1)[-1] in optional:       # a signal its params turn on
                hint = f"set detectors.{did}.params.{optional[sig.split('.', 1)[-1]]}"
            if hint is None and did not in detectors and did not in actuators:
                hint = f"configure a detector {did!r} under `detectors:`"
            col.add(PolicyReferenceError, lpath + ("signal",), f"unknown signal {sig!r}",
                    expected=_one_of(list(declared) + list(published), "declared signals"),
                    hint=hint)
        used: dict = {}
        for k, cmd in enumerate(rule["then"]):
            _check_command(col, cmd, rpath + ("then", k), used, k, actuators, act_regs)
        if rule.get("gate") == "device":
            _check_gate(col, rule, rpath, declared, detectors)
    return declared


def _check_gate(col, rule, rpath, declared, detectors) -> None:
    """A ``gate: device`` rule: constants against signals of every-step detectors, one bare
    ``skip_step``, no timers (the device evaluates it afresh each step)."""
    for key in ("for", "keep_firing_for", "cooldown"):
        if key in rule:
            col.add(PolicyReferenceError, rpath + (key,), f"a `gate: device` rule cannot have "
                    f"`{key}`", hint="the device evaluates the gate afresh every step; drop "
                    f"`{key}` or the gate")
    then = rule["then"]
    if len(then) != 1 or then[0].get("actuator") != "skip_step" or len(then[0]) != 1:
        col.add(PolicyReferenceError, rpath + ("then",), "a `gate: device` rule's only command "
                "must be a bare skip_step", expected="then: [{actuator: skip_step}]",
                found=repr(then), hint="move other commands (lr_scale, ...) into a separate "
                "host rule with the same condition")
    for lpath, leaf in _leaves(rule["when"], rpath + ("when",)):
        sig = leaf["signal"]
        did = sig.split(".", 1)[0]
        if sig not in declared:
            col.add(PolicyReferenceError, lpath + ("signal",), f"a `gate: device` rule can read "
                    f"only detector signals, found {sig!r}", hint="actuator signals live on the "
                    "host; read them in a host rule")
        elif int(detectors.get(did, {}).get("every", 1)) != 1:
            col.add(PolicyReferenceError, lpath + ("signal",), f"a `gate: device` rule reads "
                    f"{sig!r}, but detector {did!r} runs every "
                    f"{detectors[did].get('every')} steps", hint="gate signals must be emitted "
                    "every step: drop `every` from that detector or the gate from the rule")


def _actuator_signals(col, reg, name, bounds, detectors, published, broken) -> None:
    """Add the signals a configured actuator publishes (``<name>.<signal>``) to ``published``."""
    try:
        names = tuple(reg.cls.signals_for(bounds)) if hasattr(reg.cls, "signals_for") else ()
    except Exception as exc:  # a plugin bug: report it, don't crash the loader
        col.add(PolicyBoundsError, ("actuators", name), f"actuator {name!r} (plugin "
                f"{_plugin(reg)}) failed to list its signals: {exc!r}")
        broken.add(name)
        return
    if names and name in detectors:
        col.add(PolicyReferenceError, ("detectors", name), f"detector id {name!r} is also the "
                f"name of a configured actuator that publishes signals ({name}.{names[0]}, ...)",
                hint=f"rename the detector, e.g. {name + '_det'!r}")
        return
    for sig in names:
        published[f"{name}.{sig}"] = name


def _check_command(col, cmd, cpath, used, k, actuators, act_regs) -> None:
    name = cmd["actuator"]
    verbs = [key for key in cmd if key != "actuator"]
    if name in used:
        col.add(PolicyReferenceError, cpath + ("actuator",),
                f"actuator {name!r} is commanded twice in one rule",
                hint=f"keep one command per actuator (the other is then[{used[name]}])")
        return
    used[name] = k
    reg = act_regs.get(name)
    if name not in actuators:
        if reg is None:
            col.add(PolicyReferenceError, cpath + ("actuator",), f"unknown actuator {name!r}",
                    expected=_one_of(actuators, "configured actuators"),
                    hint=suggest(name, list(actuators) + list(act_regs)))
        else:
            col.add(PolicyReferenceError, cpath + ("actuator",), f"actuator {name!r} is not "
                    "configured", hint=f"add `actuators: {{{name}: {{...}}}}` with its bounds")
        return
    if reg is None:
        return  # reported under actuators:
    commands = reg.cls.commands
    verb = verbs[0] if verbs else "apply"
    vpath = cpath + ((verb,) if verbs else ())
    if not commands:  # an always-on actuator (grad_normalize): its bounds are its whole setting
        col.add(PolicyReferenceError, cpath + ("actuator",), f"actuator {name!r} takes no "
                "commands: it acts on every step in enforce mode, as configured under "
                f"actuators.{name}", hint=f"remove {{actuator: {name}}} from this rule's `then`")
        return
    if verb not in commands:
        if not verbs:
            col.add(PolicyReferenceError, cpath, f"actuator {name!r} needs a verb",
                    expected=_one_of(commands, "verbs"),
                    hint=f"e.g. {{actuator: {name}, {next(iter(commands), 'VERB')}: VALUE}}")
        else:
            col.add(PolicyReferenceError, vpath, f"unknown verb {verb!r} for actuator {name!r}",
                    expected=_one_of(commands, "verbs"), hint=suggest(verb, commands))
        return
    _plugin_checks(col, reg, commands[verb], None, cmd.get(verb), vpath)


def _plugin_checks(col, reg, schema, validate, value, path) -> bool:
    """Check ``value`` against a plugin's JSON Schema, then its ``validate`` hook."""
    before = len(col.items)
    try:
        _schema_problems(col, PolicyBoundsError, schema, value, path)
    except Exception as exc:  # an unusable schema is the plugin's bug
        col.add(PolicyBoundsError, path, f"plugin {_plugin(reg)} has an unusable schema: {exc!r}")
    if len(col.items) == before and validate is not None:
        try:
            validate(value)
        except ValueError as exc:
            col.add(PolicyBoundsError, path, str(exc), found=found(value))
        except Exception as exc:
            col.add(PolicyBoundsError, path, f"plugin {_plugin(reg)} failed checking it: {exc!r}")
    if len(col.items) == before and isinstance(value, Mapping):
        # The guard builds the plugin as cls(**params): try it now (no model needed), so a
        # plugin that cannot take its params fails here, named, not in the middle of a run.
        try:
            reg.cls(**dict(value))
        except ValueError as exc:
            col.add(PolicyBoundsError, path, str(exc), found=found(value))
        except Exception as exc:
            col.add(PolicyBoundsError, path, f"plugin {_plugin(reg)} ({reg.cls.__qualname__}) "
                    f"cannot be built with these values: {type(exc).__name__}: {exc}",
                    hint="a plugin's __init__ takes its params (detectors) or bounds (actuators) "
                    "as keyword arguments (docs/plugins.md)")
    return len(col.items) == before


def _leaves(node: Mapping, path: PathT) -> Iterator[tuple]:
    if "signal" in node:
        yield path, node
    for key in ("all", "any"):
        for i, child in enumerate(node.get(key, ())):
            yield from _leaves(child, path + (key, i))
    if "not" in node:
        yield from _leaves(node["not"], path + ("not",))


# ------------------------------------------------------------------------------------ build


def _build(data: dict, text: str, source: str, lines: dict, signals: dict) -> Policy:
    meta = data["metadata"]
    detectors = {
        did: DetectorSpec(id=did, type=d["type"], params=copy.deepcopy(d.get("params", {})),
                          every=int(d.get("every", 1)))
        for did, d in data.get("detectors", {}).items()}
    actuators = {name: ActuatorSpec(name=name, bounds=copy.deepcopy(bounds))
                 for name, bounds in data.get("actuators", {}).items()}
    rules = []
    for i, r in enumerate(data["rules"]):
        then = []
        for cmd in r["then"]:
            verbs = [key for key in cmd if key != "actuator"]
            then.append(Command(cmd["actuator"], verbs[0], copy.deepcopy(cmd[verbs[0]]))
                        if verbs else Command(cmd["actuator"], "apply", None))
        rules.append(RuleSpec(name=r["name"], when=copy.deepcopy(r["when"]), then=tuple(then),
                              priority=int(r.get("priority", 0)), for_=int(r.get("for", 1)),
                              keep_firing_for=int(r.get("keep_firing_for", 0)),
                              cooldown=int(r.get("cooldown", 0)), index=i, path=f"rules[{i}]",
                              gate=r.get("gate")))
    revision = hashlib.sha256(canonical_json(data)).hexdigest()
    return Policy(data=data, source=source, revision=revision,
                  name=meta["name"], description=meta.get("description", ""),
                  owner=meta.get("owner", ""), mode=data.get("mode", "enforce"),
                  on_error=data.get("on_error", "halt"), transfer=data.get("transfer", "auto"),
                  detectors=detectors, actuators=actuators,
                  rules=tuple(rules), lines=lines, text=text, _signals=signals)


# ---------------------------------------------------------------------------------- helpers


def _one_of(names: Any, what: str, limit: int = 20) -> str:
    names = sorted(str(n) for n in names)
    if not names:
        return f"one of the {what} (there are none)"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"one of the {what} {names[:limit]}{more}"


def _plugin(reg: Any) -> str:
    return repr(getattr(reg, "plugin", "?"))


def _builtin_policies() -> dict:
    """``{name: Path}`` of the YAML files shipped in ``lbw_policy.policies``."""
    try:
        entries = list(resources.files("lbw_policy.policies").iterdir())
    except ModuleNotFoundError:
        return {}
    return {e.name.rsplit(".", 1)[0]: Path(os.fspath(e)) for e in entries
            if e.name.endswith((".yaml", ".yml")) and isinstance(e, os.PathLike)}
