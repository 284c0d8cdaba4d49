"""``lbw-policy test``: policy unit tests written in YAML, in the spirit of ``promtool test rules``.

A test file names a policy and lists cases. Each case feeds signal series to the policy's rule
engine and real actuators (:class:`~lbw_policy.shadow.Shadow`: no model, no training) and
compares the decisions taken with the ones expected::

    policy: ../default.yaml            # relative to this file
    optimizer: {betas: [0.9, 0.95]}    # optional: the stand-in AdamW's hyperparameters
    tests:
      - name: a loss spike halves the learning rate and skips the step
        signals:                       # one value per step, from step 0
          loss.zscore: "0x30 6 0x20"   # thirty 0s, one 6, twenty 0s
        expect:                        # every decision, in order (exhaustive)
          - {step: 30, rule: loss-spike-brake, event: fired, actuator: lr_scale, value: 0.5}
          - {step: 30, rule: loss-spike-brake, event: fired, actuator: skip_step, value: true}
          - {step: 36, rule: loss-spike-brake, event: resolved}
          - {steps: "40:50", event: recover, actuator: lr_scale}   # one row per step 40..50
        skipped: [30]                  # optional: exactly these optimizer steps skipped
        halted_at: null                # optional: the step training halts at (null: never)

Series notation (a YAML list of numbers, or a string of space-separated tokens):

* ``4.5``, ``-1e-3``, ``nan``, ``inf``, ``-inf``: one value;
* ``_`` (or ``null`` in a list): nothing emitted this step; the signal keeps its last value,
  as a detector that is not due (sample-and-hold, like the guard);
* ``VxN``: ``V`` repeated N times (``0x30`` is thirty zeros; ``_x5`` five silent steps);
* ``A+BxN`` / ``A-BxN``: a ramp of N values ``A, A+B, ..., A+(N-1)B``;
* ``(A B ...)xN``: the group repeated N times (``(3.9 4.1)x20`` flaps 40 steps).

The case runs ``steps`` steps (default: the longest series); a series that ends earlier emits
nothing afterwards. Decisions become rows (:func:`~lbw_policy.shadow.action_rows`): one per
action, ``{step, rule, event, actuator, value, clamped}`` with ``value`` the *applied* value
after clamping, or ``{step, rule, event}`` for a decision without actions. An expected row
gives ``step`` (or ``steps: "A:B"``, inclusive, or ``"A:B:STRIDE"``) and any of ``rule``, ``event``, ``actuator``,
``value`` (numbers compared to 1e-9 relative), ``clamped``; a field left out matches anything.
Rows of the events in ``ignore`` (e.g. ``[recover]``) are left out of the comparison.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from lbw_policy.errors import PolicyError, Problem
from lbw_policy.policy import Policy, load_policy
from lbw_policy.records import DECISION_EVENTS, action_rows
from lbw_policy.shadow import STAND_IN_HYPERPARAMETERS as _HYPER, Shadow
from lbw_policy.yamlsource import Collector, decode, format_path, parse, read_source, suggest

__all__ = ["PolicyTestFileError", "PolicyTestFile", "PolicyTestCase", "CaseResult",
           "FileResult", "parse_series", "load_test_file", "run_case", "run_test_file",
           "format_results", "format_actual"]

#: Most steps one case may run.
MAX_STEPS = 1_000_000
_ROW_KEYS = ("step", "steps", "rule", "event", "actuator", "value", "clamped")
_CASE_KEYS = ("name", "description", "steps", "signals", "expect", "ignore", "skipped",
              "halted_at")
_FILE_KEYS = ("policy", "description", "optimizer", "transfer", "tests")
HOLD = None  # a step at which the signal is not emitted


class PolicyTestFileError(PolicyError):
    """A policy test file is malformed (its problems name file, line and path)."""


@dataclass
class PolicyTestCase:
    """One case of a test file, with its series expanded and expected rows parsed."""

    name: str
    signals: dict
    steps: int
    expect: list
    ignore: frozenset = frozenset()
    skipped: Optional[list] = None
    halted_at: Any = "unset"   # "unset": not checked; None: never halts; int: that step
    path: str = ""
    line: Optional[int] = None


@dataclass
class PolicyTestFile:
    """A parsed test file: its path, the policy it tests, its cases, and the stand-in
    optimizer's ``{type, hyperparameters...}`` (``optimizer:``; default AdamW, torch's
    defaults)."""

    path: Path
    policy: Policy
    cases: list
    optimizer: dict = field(default_factory=dict)
    transfer: str = "immediate"


@dataclass
class CaseResult:
    """Outcome of one case: ``diff`` lists the differences (empty when it passed)."""

    name: str
    passed: bool
    diff: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    halted_at: Optional[int] = None


@dataclass
class FileResult:
    """Outcome of one test file; ``error`` is set when it could not be run at all."""

    path: str
    policy: Optional[Policy] = None
    cases: list = field(default_factory=list)
    error: Optional[str] = None

    @property
    def passed(self) -> bool:
        return self.error is None and all(c.passed for c in self.cases)


# ------------------------------------------------------------------------------ series


def parse_series(spec: Any) -> list:
    """Expand a series (see the module docstring) into one value per step (``None``: not
    emitted).

    :raises ValueError: a token is not a number, ``_``, ``VxN``, ``A+BxN`` or ``(...)xN``; a
        count is too large. The message names the token.
    """
    if isinstance(spec, list):
        out = []
        for i, v in enumerate(spec):
            if v is None or v == "_":
                out.append(HOLD)
            elif isinstance(v, bool) or isinstance(v, (int, float)):
                out.append(v)
            elif isinstance(v, str):
                out.append(_number(v, f"item {i}"))
            else:
                raise ValueError(f"item {i}: expected a number, null or '_', found {v!r}")
        return out
    if isinstance(spec, bool) or isinstance(spec, (int, float)):
        return [spec]
    if not isinstance(spec, str):
        raise ValueError(f"expected a list or a string of tokens, found {type(spec).__name__}")
    return _parse_text(spec, 0)


def _parse_text(text: str, depth: int) -> list:
    if depth > 8:
        raise ValueError("groups nested more than 8 deep")
    out: list = []
    i = 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        if text[i] == "(":
            level, j = 0, i
            while j < len(text):
                level += {"(": 1, ")": -1}.get(text[j], 0)
                if level == 0:
                    break
                j += 1
            m = re.match(r"x(\d+)", text[j + 1:]) if j < len(text) else None
            if m is None:
                raise ValueError(f"group {text[i:j + 1]!r}: a group is written (A B ...)xN, "
                                 "with its closing parenthesis and a count")
            inner = _parse_text(text[i + 1:j], depth + 1)
            if len(out) + len(inner) * int(m.group(1)) > MAX_STEPS:
                raise ValueError(f"group {text[i:j + 1]!r}: more than {MAX_STEPS} steps")
            out += inner * int(m.group(1))
            i = j + 1 + m.end()
            continue
        j = i
        while j < len(text) and not text[j].isspace() and text[j] not in "()":
            j += 1
        if j == i:
            raise ValueError(f"unexpected {text[i]!r} at character {i + 1}")
        out += _token(text[i:j], len(out))
        i = j
    return out


def _token(token: str, have: int) -> list:
    if "x" not in token:
        return [HOLD if token == "_" else _number(token, f"token {token!r}")]
    head, _, count = token.rpartition("x")
    if not count.isdigit():
        raise ValueError(f"token {token!r}: the count after 'x' must be a whole number")
    n = int(count)
    if have + n > MAX_STEPS:
        raise ValueError(f"token {token!r}: more than {MAX_STEPS} steps")
    if head == "_":
        return [HOLD] * n
    start, step = _ramp(head, token)
    # 12 significant digits, so 1+0.1x71 ends at exactly 8.0, not 8.000000000000002
    return [float(f"{start + i * step:.12g}") if step else start for i in range(n)]


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{what}: not a number (expected e.g. 4, 0.5, -1e-3, nan, inf, _, 0x30 "
                         "or 1+0.5x10)") from None


def _ramp(head: str, token: str) -> tuple:
    try:
        return float(head), 0.0
    except ValueError:
        pass
    for i in range(1, len(head)):
        if head[i] in "+-" and head[i - 1] not in "eE":
            try:
                a, b = float(head[:i]), float(head[i + 1:])
            except ValueError:
                continue
            return a, (b if head[i] == "+" else -b)
    raise ValueError(f"token {token!r}: expected VxN or A+BxN (e.g. 0x30, 1+0.5x10)")


def _steps(spec: Any) -> list:
    """``5`` -> [5]; ``"3:6"`` -> [3, 4, 5, 6] (inclusive); ``"1:7:2"`` -> [1, 3, 5, 7]."""
    if isinstance(spec, int) and not isinstance(spec, bool) and spec >= 0:
        return [spec]
    if isinstance(spec, str):
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*(?::\s*(\d+)\s*)?", spec)
        if m:
            a, b, stride = int(m.group(1)), int(m.group(2)), int(m.group(3) or 1)
            if a <= b and stride >= 1 and b - a < MAX_STEPS:
                return list(range(a, b + 1, stride))
    raise ValueError(f"expected a step >= 0 or an inclusive range \"A:B\" (or \"A:B:STRIDE\") "
                     f"with A <= B, found {spec!r}")


# ------------------------------------------------------------------------------ loading


def load_test_file(path: "str | Path", *, registry: Any = None) -> PolicyTestFile:
    """Read and check a test file and load the policy it names.

    :raises PolicyError: the test file is malformed (:class:`PolicyTestFileError`, every
        problem with file, line and path) or the policy is invalid.
    """
    # The policy loader's parser (lbw_policy.yamlsource): one YAML document of plain data, lines
    # of every node, no tags constructed, no anchors bomb.
    path = Path(path)
    try:  # regular files of at most 4 MiB (yamlsource.MAX_BYTES), like policies
        raw = read_source(path, "test file", PolicyTestFileError)
    except FileNotFoundError as exc:
        raise PolicyTestFileError(f"cannot read test file: {exc.strerror or exc}",
                                  file=str(path)) from None
    col = Collector(str(path), {})
    data = parse(decode(raw, str(path)), col)
    col.raise_if_any()
    problem = _Problems(str(path), col)
    problems = problem.items

    if not isinstance(data, dict):
        problem((), "a test file must be a mapping", expected="policy: FILE and tests: [cases]")
        raise PolicyTestFileError(problems)
    for key in data:
        if key not in _FILE_KEYS:
            problem((key,), f"unknown key {key!r}", expected=f"one of {list(_FILE_KEYS)}")
    if not isinstance(data.get("policy"), str) or not data.get("policy"):
        problem(("policy",), "missing or empty 'policy'",
                expected="the policy file, relative to this test file")
    if not isinstance(data.get("tests"), list) or not data.get("tests"):
        problem(("tests",), "missing or empty 'tests'", expected="a non-empty list of cases")
    optimizer = data.get("optimizer", {})
    if not isinstance(optimizer, dict) or optimizer.get("type", "AdamW") not in _HYPER:
        problem(("optimizer",), "invalid 'optimizer'", found=repr(optimizer),
                expected=f"a mapping with type one of {sorted(_HYPER)} and its hyperparameters")
    else:
        for key in optimizer:
            if key != "type" and key not in _HYPER[optimizer.get("type", "AdamW")]:
                problem(("optimizer", key), f"unknown key {key!r}",
                        expected=f"type or one of {list(_HYPER[optimizer.get('type', 'AdamW')])}")
    transfer = data.get("transfer", "immediate")
    if transfer not in ("immediate", "deferred"):
        problem(("transfer",), "invalid 'transfer'", found=repr(transfer),
                expected="immediate (default) or deferred")
    if problems:
        raise PolicyTestFileError(problems)
    policy_path = Path(os.path.normpath(path.parent / data["policy"]))
    try:
        policy = load_policy(policy_path, registry=registry)
    except PolicyError as exc:
        if not policy_path.exists():
            problem(("policy",), f"policy file not found: {str(policy_path)!r}",
                    hint="the path is relative to the test file")
            raise PolicyTestFileError(problems) from None
        raise
    cases = []
    names: dict = {}
    for i, raw_case in enumerate(data["tests"]):
        case = _check_case(raw_case, ("tests", i), policy, problem)
        if case is not None:
            case.line = col.line_near(("tests", i))
            if case.name in names:
                problem(("tests", i, "name"), f"duplicate case name {case.name!r}",
                        hint=f"tests[{names[case.name]}] already has it")
            names.setdefault(case.name, i)
            cases.append(case)
    if problems:
        raise PolicyTestFileError(problems)
    return PolicyTestFile(path=path, policy=policy, cases=cases, optimizer=dict(optimizer),
                          transfer=transfer)


class _Problems:
    """Collects problems, each with the file, the line of its node (or nearest ancestor)."""

    def __init__(self, file: str, col: Any) -> None:
        self.file, self.col, self.items = file, col, []

    def __call__(self, p: tuple, message: str, **kw: Any) -> None:
        self.items.append(Problem(message, file=self.file, line=self.col.line_near(p) or 1,
                                  path=_fmt(p), **kw))


def _check_case(case: Any, p: tuple, policy: Policy, problem: _Problems) -> Optional[PolicyTestCase]:
    before = len(problem.items)
    if not isinstance(case, dict):
        problem(p, "a case must be a mapping", expected="{name, signals, expect}")
        return None
    for key in case:
        if key not in _CASE_KEYS:
            problem(p + (key,), f"unknown key {key!r}", expected=f"one of {list(_CASE_KEYS)}",
                    hint=suggest(key, _CASE_KEYS))
    name = case.get("name")
    if not isinstance(name, str) or not name.strip():
        problem(p + ("name",), "missing or empty 'name'", expected="a string naming the case")
    declared = policy.signals()
    series: dict = {}
    signals = case.get("signals")
    if not isinstance(signals, dict) or not signals:
        problem(p + ("signals",), "missing or empty 'signals'",
                expected="a mapping of signal name -> series")
        signals = {}
    for sig, spec in signals.items():
        if sig.split(".", 1)[0] in policy.actuators and sig not in declared:
            problem(p + ("signals", sig), f"signal {sig!r} is published by the actuator "
                    f"{sig.split('.', 1)[0]!r}, whose state the test simulates",
                    hint="feed the detector signals that drive it; the actuator's own signals "
                    "follow from the decisions")
            continue
        if sig not in declared:
            problem(p + ("signals", sig), f"unknown signal {sig!r}",
                    expected=f"one of the policy's signals {sorted(declared)}",
                    hint=suggest(sig, declared))
            continue
        try:
            series[sig] = parse_series(spec)
        except ValueError as exc:
            problem(p + ("signals", sig), f"bad series: {exc}")
    steps = case.get("steps")
    if steps is not None and not (isinstance(steps, int) and not isinstance(steps, bool)
                                  and 1 <= steps <= MAX_STEPS):
        problem(p + ("steps",), "invalid 'steps'", expected=f"an integer in [1, {MAX_STEPS}]",
                found=repr(steps))
        steps = None
    n = steps or max((len(s) for s in series.values()), default=0)
    if n == 0 and "signals" in case and signals:
        problem(p + ("signals",), "every series is empty", expected="at least one step")
    expect: list = []
    raw_expect = case.get("expect")
    if not isinstance(raw_expect, list):
        problem(p + ("expect",), "missing 'expect'",
                expected="a list of expected decisions ([] for none)")
        raw_expect = []
    rules = {r.name for r in policy.rules}
    for k, row in enumerate(raw_expect):
        rp = p + ("expect", k)
        if not isinstance(row, dict):
            problem(rp, "an expected decision must be a mapping",
                    expected="{step, rule, event, actuator, value}", found=repr(row))
            continue
        bad = [key for key in row if key not in _ROW_KEYS]
        for key in bad:
            problem(rp + (key,), f"unknown key {key!r}", expected=f"one of {list(_ROW_KEYS)}",
                    hint=suggest(key, _ROW_KEYS))
        if ("step" in row) == ("steps" in row):
            problem(rp, "give exactly one of 'step' and 'steps'",
                    expected="step: N or steps: \"A:B\"")
            continue
        try:
            at = _steps(row.get("step", row.get("steps")))
        except ValueError as exc:
            problem(rp + ("step" if "step" in row else "steps",), str(exc))
            continue
        if "rule" in row and row["rule"] is not None and row["rule"] not in rules:
            problem(rp + ("rule",), f"unknown rule {row['rule']!r}",
                    expected=f"one of the policy's rules {sorted(rules)}",
                    hint=suggest(str(row["rule"]), rules))
        if "event" in row and row["event"] not in DECISION_EVENTS:
            problem(rp + ("event",), f"unknown event {row['event']!r}",
                    expected=f"one of {list(DECISION_EVENTS)}")
        if "actuator" in row and row["actuator"] not in policy.actuators:
            problem(rp + ("actuator",), f"unknown actuator {row['actuator']!r}",
                    expected=f"one of the policy's actuators {sorted(policy.actuators)}")
        if "clamped" in row and not isinstance(row["clamped"], bool):
            problem(rp + ("clamped",), "wrong type", expected="true or false",
                    found=repr(row["clamped"]))
        fields = {key: row[key] for key in ("rule", "event", "actuator", "value", "clamped")
                  if key in row}
        expect += [dict(fields, step=s) for s in at]
    ignore = case.get("ignore", [])
    if not isinstance(ignore, list) or any(e not in DECISION_EVENTS for e in ignore):
        problem(p + ("ignore",), "invalid 'ignore'",
                expected=f"a list of events from {list(DECISION_EVENTS)}", found=repr(ignore))
        ignore = []
    skipped = None
    if "skipped" in case:
        try:
            if not isinstance(case["skipped"], list):
                raise ValueError(f"expected a list, found {case['skipped']!r}")
            skipped = sorted({s for spec in case["skipped"] for s in _steps(spec)})
        except ValueError as exc:
            problem(p + ("skipped",), f"invalid 'skipped': {exc}")
    halted_at = case.get("halted_at", "unset")
    if halted_at not in ("unset", None) and not (isinstance(halted_at, int)
                                                 and not isinstance(halted_at, bool)
                                                 and halted_at >= 0):
        problem(p + ("halted_at",), "invalid 'halted_at'", expected="a step >= 0 or null",
                found=repr(halted_at))
    if len(problem.items) > before:
        return None
    return PolicyTestCase(name=name, signals=series, steps=n, expect=expect,
                          ignore=frozenset(ignore), skipped=skipped, halted_at=halted_at,
                          path=_fmt(p))


def _fmt(p: tuple) -> str:
    return format_path(p)


# ------------------------------------------------------------------------------ running


def run_case(policy: Policy, case: PolicyTestCase, *, registry: Any = None,
             optimizer: Optional[dict] = None, transfer: str = "immediate") -> CaseResult:
    """Run one case through a fresh :class:`~lbw_policy.shadow.Shadow` and compare.

    :param optimizer: the stand-in optimizer, ``{"type": "AdamW", "betas": [...], ...}``.
    :param transfer: ``"immediate"`` (default): step t's signals are evaluated at step t.
        ``"deferred"``: as the guard on CUDA, at step t+1, while ``gate: device`` rules (enforce
        mode) skip step t itself, recorded at t+1 as ``device`` actions.
    """
    optimizer = dict(optimizer or {})
    shadow = Shadow(policy, registry=registry, optimizer=optimizer.pop("type", "AdamW"),
                    hyperparameters=optimizer, transfer=transfer)
    records: list = []
    skipped: list = []
    halted_at = None
    previous: Optional[tuple] = None  # (step, emitted): the signals in flight (deferred)
    for t in range(case.steps):
        emitted = {name: s[t] for name, s in case.signals.items()
                   if t < len(s) and s[t] is not HOLD}
        if transfer == "deferred":  # host rules read the previous step's signals
            out = shadow.step(t, previous[1] if previous else {},
                              signals_step=previous[0] if previous else None,
                              gate_signals=emitted)
            previous = (t, emitted)
        else:
            out = shadow.step(t, emitted)
        records += out.records
        if out.halted:
            halted_at = t
            break
        if out.skipped or out.gated:
            skipped.append(t)
    rows = [r for r in action_rows(records) if r["event"] not in case.ignore]
    diff = _diff_rows(case.expect, rows)
    if case.skipped is not None and case.skipped != skipped:
        diff += [f"- skipped steps {_ranges(case.skipped)}", f"+ skipped steps {_ranges(skipped)}"]
    if case.halted_at != "unset" and case.halted_at != halted_at:
        diff += [f"- halted at {_never(case.halted_at)}", f"+ halted at {_never(halted_at)}"]
    return CaseResult(name=case.name, passed=not diff, diff=diff, rows=rows, skipped=skipped,
                      halted_at=halted_at)


def run_test_file(path: "str | Path", *, registry: Any = None) -> FileResult:
    """Load and run every case of a test file; problems become ``FileResult.error``."""
    try:
        tf = load_test_file(path, registry=registry)
    except PolicyError as exc:
        return FileResult(path=str(path), error=str(exc))
    result = FileResult(path=str(path), policy=tf.policy)
    for case in tf.cases:
        try:
            result.cases.append(run_case(tf.policy, case, registry=registry,
                                         optimizer=tf.optimizer, transfer=tf.transfer))
        except Exception as exc:  # an actuator that cannot be simulated, a plugin bug
            result.cases.append(CaseResult(name=case.name, passed=False,
                                           diff=[f"! the case could not run: "
                                                 f"{type(exc).__name__}: {exc}"]))
    return result


def _matches(exp: dict, act: dict) -> bool:
    for key, want in exp.items():
        got = act.get(key)
        if key == "value" and _is_num(want) and _is_num(got):
            if isinstance(want, bool) or isinstance(got, bool):
                if bool(want) != bool(got) or isinstance(want, bool) != isinstance(got, bool):
                    return False
            elif not (math.isclose(want, got, rel_tol=1e-9, abs_tol=1e-12)
                      or (math.isnan(want) and math.isnan(got))):
                return False
        elif want != got:
            return False
    return True


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float))


#: Most difference lines shown for one case.
MAX_DIFF_LINES = 40


def _diff_rows(expected: list, actual: list) -> list:
    """Exhaustive matching, most specific expected rows first; returns ``-``/``+`` lines."""
    used = [False] * len(actual)
    missing = []
    order = sorted(range(len(expected)), key=lambda i: -len(expected[i]))
    for i in order:
        exp = expected[i]
        for j, act in enumerate(actual):
            if not used[j] and act.get("step") == exp["step"] and _matches(exp, act):
                used[j] = True
                break
        else:
            missing.append(exp)
    extra = [a for j, a in enumerate(actual) if not used[j]]
    if not missing and not extra:
        return []
    width = max([len(str(r.get("rule"))) for r in missing + extra] + [8]) + 2
    lines = [(r["step"], 0, "- " + _row_text(r, width, wildcard=True)) for r in missing]
    lines += [(r["step"], 1, "+ " + _row_text(r, width)) for r in extra]
    lines = [text for _, _, text in sorted(lines, key=lambda t: (t[0], t[1]))]
    header = "  " + _row_text({"step": "step", "rule": "rule", "event": "event",
                               "actuator": "actuator", "value": "value"}, width, header=True)
    more = len(lines) - MAX_DIFF_LINES
    if more > 0:
        lines = lines[:MAX_DIFF_LINES] + [f"... {more} more difference(s) (--show prints every "
                                          "decision the case produced)"]
    return [header] + lines


def _value_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.12g}"
    return "-" if v is None else str(v)


def _row_text(r: dict, rule_width: int = 24, wildcard: bool = False, header: bool = False) -> str:
    def cell(key: str, width: int) -> str:
        if key not in r:
            text = "*" if wildcard else "-"
        else:
            text = str(r[key]) if header else _value_text(r[key])
        # at least one space after a cell longer than its column (weight_decay_scale)
        return f"{text:<{width - 1}} " if width else text

    text = cell("step", 6) + cell("rule", rule_width) + cell("event", 10) + cell("actuator", 12)
    text += cell("value", 0).rstrip()
    if r.get("clamped") is True:
        text += " (clamped)"
    return text.rstrip()


def _ranges(steps: Sequence[int]) -> str:
    if not steps:
        return "none"
    parts, start = [], steps[0]
    for a, b in zip(steps, list(steps[1:]) + [None]):
        if b != a + 1:
            parts.append(str(start) if start == a else f"{start}:{a}")
            start = b
    return ", ".join(parts)


def _never(step: Any) -> str:
    return "never" if step is None else f"step {step}"


# ------------------------------------------------------------------------------ output


def format_results(results: Sequence[FileResult]) -> str:
    """One line per case (``ok`` / ``FAIL`` with its diff), then the totals."""
    lines = []
    passed = failed = 0
    for fr in results:
        if fr.error is not None:
            failed += 1
            lines.append(f"ERROR {fr.path}")
            lines += [f"  {line}" for line in fr.error.splitlines()]
            continue
        pol = fr.policy
        lines.append(f"{fr.path}: policy {pol.source} ({pol.name}, revision {pol.revision[:12]})")
        for c in fr.cases:
            if c.passed:
                passed += 1
                lines.append(f"  ok    {c.name}")
            else:
                failed += 1
                lines.append(f"  FAIL  {c.name}")
                lines += [f"        {d}" for d in c.diff]
    files = len(results)
    lines.append(f"{passed} passed, {failed} failed ({files} file{'s' if files != 1 else ''})")
    return "\n".join(lines)


def format_actual(results: Sequence[FileResult]) -> str:
    """The decisions each case actually produced, as YAML ready to paste under the case
    (consecutive identical rows folded into ``steps: "A:B"``). Review them before pasting:
    a test that only restates what the policy does proves nothing."""
    lines = []
    for fr in results:
        if fr.error is not None:
            lines += [f"# ERROR {fr.path}"] + [f"#   {x}" for x in fr.error.splitlines()]
            continue
        lines.append(f"# {fr.path}")
        for c in fr.cases:
            lines.append(f"# case: {c.name}")
            lines.append("    expect:" + (" []" if not c.rows else ""))
            for row, first, last in _fold(c.rows):
                at = f"step: {first}" if first == last else f'steps: "{first}:{last}"'
                body = ", ".join(f"{k}: {_yaml_value(row[k])}"
                                 for k in ("rule", "event", "actuator", "value")
                                 if k in row and not (k == "rule" and row[k] is None))
                lines.append(f"      - {{{at}, {body}}}")
            lines.append(f"    skipped: [{', '.join(_quoted_ranges(c.skipped))}]")
            lines.append(f"    halted_at: {'null' if c.halted_at is None else c.halted_at}")
    return "\n".join(lines)


def _fold(rows: list) -> list:
    """Fold runs of consecutive steps that have the same rows (but for the step) into ranges:
    ``[(row, first_step, last_step)]`` in step order."""
    by_step: list = []  # [(step, [rows])]
    for r in rows:
        if by_step and by_step[-1][0] == r["step"]:
            by_step[-1][1].append(r)
        else:
            by_step.append((r["step"], [r]))

    def key(group: list) -> list:
        return [{k: v for k, v in r.items() if k not in ("step", "clamped")} for r in group]

    runs: list = []  # [[first, last, rows]]
    for step, group in by_step:
        if runs and runs[-1][1] == step - 1 and key(runs[-1][2]) == key(group):
            runs[-1][1] = step
        else:
            runs.append([step, step, group])
    return [(r, first, last) for first, last, group in runs for r in group]


def _yaml_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, float):
        if math.isnan(v):
            return ".nan"
        if math.isinf(v):
            return ".inf" if v > 0 else "-.inf"
    return _value_text(v)


def _quoted_ranges(steps: Sequence[int]) -> list:
    return [f'"{p}"' if ":" in p else p for p in _ranges(steps).split(", ")] if steps else []
