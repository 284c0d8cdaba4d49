"""Plugin manager and registry (lbw_policy.plugins): built-ins as default plugins, a third-party
plugin loaded through a real entry point, plugins registered in code, and the registration rules
(duplicate names, non-plugin classes) with their error text."""

from __future__ import annotations

import importlib.metadata
import json
import sys
import textwrap

import pytest
import torch

import lbw_policy
from lbw_policy import plugins
from lbw_policy.actuators import (Beta2, GradClip, GradNormalize, Halt, LRCap, LRScale,
                                  MomentumReset, Rollback, SkipStep, WeightDecayScale)
from lbw_policy.adapters.guard import Guard
from lbw_policy.base import Actuator, Detector
from lbw_policy.cli import main
from lbw_policy.decision_log import read_log
from lbw_policy.detectors import GradNorm, LossSpike, NonFinite
from lbw_policy.errors import PluginError
from lbw_policy.policy import loads_policy

BUILTIN_DETECTORS = {"loss_spike": LossSpike, "grad_norm": GradNorm, "nonfinite": NonFinite}
BUILTIN_ACTUATORS = {"lr_scale": LRScale, "skip_step": SkipStep, "momentum_reset": MomentumReset,
                     "grad_clip": GradClip, "grad_normalize": GradNormalize,
                     "weight_decay_scale": WeightDecayScale, "beta2": Beta2, "rollback": Rollback,
                     "halt": Halt, "lr_cap": LRCap}


@pytest.fixture(autouse=True)
def fresh_plugins():
    """Each test starts from a freshly built plugin manager and leaves none behind."""
    plugins.reset()
    yield
    plugins.reset()


def test_builtins_are_default_plugins_with_the_package_version():
    reg = plugins.get_registry()
    installed = importlib.metadata.version("lbw-policy")
    assert installed == lbw_policy.__version__
    for name, cls in BUILTIN_DETECTORS.items():
        assert reg.detectors[name].cls is cls
    for name, cls in BUILTIN_ACTUATORS.items():
        assert reg.actuators[name].cls is cls
    # Every class the two built-in packages register, and nothing else, is theirs.
    for kind, table, package in (("detector", reg.detectors, "lbw_policy.detectors"),
                                 ("actuator", reg.actuators, "lbw_policy.actuators")):
        for name, r in table.items():
            assert (r.name, r.kind, r.plugin, r.version) == (name, kind, package, installed)
            assert r.cls.__module__.startswith(package + ".") and r.cls.name == name
    assert reg.versions() == {"lbw_policy.actuators": installed, "lbw_policy.detectors": installed}
    # The same manager holds them, under those names.
    pm = plugins.get_plugin_manager()
    assert pm.get_plugin("lbw_policy.detectors") is sys.modules["lbw_policy.detectors"]
    assert pm.get_plugin("lbw_policy.actuators") is sys.modules["lbw_policy.actuators"]
    assert plugins.get_registry() is reg  # built once, cached


# ------------------------------------------------------------------ entry-point plugin

PLUGIN_SOURCE = '''\
import torch

import lbw_policy
from lbw_policy.base import Detector


class Constant(Detector):
    """Emits the constant ``value`` given in params."""

    name = "constant"
    signals = ("value",)
    params_schema = {"type": "object", "additionalProperties": False,
                     "properties": {"value": {"type": "number"}}}

    def __init__(self, value=1.0):
        super().__init__(value=value)
        self.value = float(value)

    def compute(self, telemetry):
        return {"value": torch.tensor(self.value)}


@lbw_policy.hookimpl
def register_detectors(register):
    register(Constant)
'''


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A distribution ``lbw-test-plugin 1.2.3`` on sys.path declaring the entry point
    ``[lbw_policy] constant = lbw_test_plugin``."""
    pkg = tmp_path / "lbw_test_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(PLUGIN_SOURCE, encoding="utf-8")
    info = tmp_path / "lbw_test_plugin-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: lbw-test-plugin\nVersion: 1.2.3\n", encoding="utf-8")
    (info / "entry_points.txt").write_text("[lbw_policy]\nconstant = lbw_test_plugin\n",
                                           encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    plugins.reset()
    sys.modules.pop("lbw_test_plugin", None)


CONSTANT_POLICY = """\
apiVersion: lbw-policy/v1
kind: Policy
metadata: {name: uses-constant}
detectors:
  c: {type: constant, params: {value: 3.5}}
actuators:
  lr_scale: {min: 0.1, max: 1.0}
rules:
  - name: on-constant
    when: {signal: c.value, op: ">", value: 3}
    then: [{actuator: lr_scale, set: 0.5}]
"""


@pytest.mark.parametrize("setting", [None, "constant", " constant ,"])
def test_entry_point_plugin_is_loaded_with_its_distribution_version(installed_plugin, monkeypatch,
                                                                    tmp_path, setting):
    builtins = plugins.get_registry()  # built under the test setting (LBW_POLICY_LOAD_PLUGINS="")
    assert "constant" not in builtins.detectors
    if setting is None:
        monkeypatch.delenv("LBW_POLICY_LOAD_PLUGINS", raising=False)
    else:
        monkeypatch.setenv("LBW_POLICY_LOAD_PLUGINS", setting)
    plugins.reset()
    reg = plugins.get_registry()
    constant = reg.detectors["constant"]
    assert (constant.plugin, constant.version, constant.kind) == ("constant", "1.2.3", "detector")
    assert constant.cls.__module__ == "lbw_test_plugin"
    assert reg.versions()["constant"] == "1.2.3"
    # Built-ins are still there, unchanged.
    assert {n: r.cls for n, r in reg.actuators.items()} == {n: r.cls for n, r in builtins.actuators.items()}
    assert set(reg.detectors) == set(builtins.detectors) | {"constant"}

    policy = loads_policy(CONSTANT_POLICY)  # validated against the default registry
    assert policy.signals() == {"c.value": "c"}
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    with Guard(opt, policy, model=model, log_dir=tmp_path / "run") as guard:
        model(torch.randn(4, 3)).pow(2).mean().backward()
        result = guard.step(model(torch.randn(4, 3)).pow(2).mean().detach())
    assert result.signals == {"c.value": 3.5}
    assert result.lr == 0.1 * 0.5
    assert [d["event"] for d in result.decisions] == ["fired"]
    recs = read_log(tmp_path / "run" / "decisions.jsonl").records
    assert recs[0]["event"] == "run_start"
    assert recs[0]["run"]["plugins"]["detector:constant"] == {"plugin": "constant", "version": "1.2.3"}
    assert recs[0]["run"]["plugins"]["actuator:lr_scale"] == {
        "plugin": "lbw_policy.actuators", "version": lbw_policy.__version__}


def test_naming_an_entry_point_no_package_provides_is_an_error(installed_plugin, monkeypatch):
    monkeypatch.setenv("LBW_POLICY_LOAD_PLUGINS", "other")
    plugins.reset()
    with pytest.raises(PluginError, match=r"LBW_POLICY_LOAD_PLUGINS names \['other'\], which no "
                                          r"installed package provides.*installed: \["):
        plugins.get_registry()
    monkeypatch.setenv("LBW_POLICY_LOAD_PLUGINS", "")
    plugins.reset()
    assert "constant" not in plugins.get_registry().detectors


@pytest.mark.parametrize("setting", [""])
def test_entry_point_plugin_not_loaded_when_not_selected(installed_plugin, monkeypatch, setting):
    monkeypatch.setenv("LBW_POLICY_LOAD_PLUGINS", setting)
    plugins.reset()
    reg = plugins.get_registry()
    assert "constant" not in reg.detectors
    assert "lbw_test_plugin" not in sys.modules
    from lbw_policy.errors import PolicyReferenceError

    with pytest.raises(PolicyReferenceError, match=r"detectors\.c\.type: unknown detector type 'constant'"):
        loads_policy(CONSTANT_POLICY)


# --------------------------------------------------------------------- plugins in code


class Echo(Detector):
    name = "echo"
    signals = ("loss",)

    def compute(self, telemetry):
        return {"loss": telemetry.loss}


class EchoPlugin:
    __version__ = "4.5.6"

    @lbw_policy.hookimpl
    def register_detectors(self, register):
        register(Echo)


class Clash(Detector):
    name = "loss_spike"  # a built-in's name
    signals = ("zscore",)


class Noop(Actuator):
    name = "noop"
    commands = {"apply": {"type": "null"}}


def _plugin(detectors=(), actuators=()):
    class P:
        @lbw_policy.hookimpl
        def register_detectors(self, register):
            for cls in detectors:
                register(cls)

        @lbw_policy.hookimpl
        def register_actuators(self, register):
            for cls in actuators:
                register(cls)

    return P()


def test_register_plugin_in_code():
    name = plugins.register_plugin(EchoPlugin(), name="echo-plugin")
    try:
        assert name == "echo-plugin"
        reg = plugins.get_registry()
        echo = reg.detectors["echo"]
        assert (echo.cls, echo.plugin, echo.version) == (Echo, "echo-plugin", "4.5.6")
        pol = loads_policy("apiVersion: lbw-policy/v1\nkind: Policy\nmetadata: {name: e}\n"
                           "detectors: {e: {type: echo}}\nrules: []\n")
        assert pol.signals() == {"e.loss": "e"}
    finally:
        plugins.unregister_plugin("echo-plugin")
    assert "echo" not in plugins.get_registry().detectors


def test_duplicate_detector_name_names_both_plugins_and_changes_nothing():
    before = plugins.get_registry()
    snapshot = ({n: (r.cls, r.plugin) for n, r in before.detectors.items()},
                {n: (r.cls, r.plugin) for n, r in before.actuators.items()})
    with pytest.raises(PluginError, match=(
            r"^detector name 'loss_spike' registered twice: by plugin 'lbw_policy\.detectors' "
            r"\(lbw_policy\.detectors\.loss_spike\.LossSpike\) and by plugin 'dup' "
            r"\(test_plugins\.Clash\); rename one$")) as info:
        plugins.register_plugin(_plugin(detectors=[Clash], actuators=[Noop]), name="dup")
    assert info.value.plugin == "dup"
    pm = plugins.get_plugin_manager()
    assert not pm.has_plugin("dup")
    # Rebuilt from the manager, the registry is as it was: no 'noop' half-registered.
    plugins.register_plugin(_plugin(), name="empty")  # forces a rebuild of the registry
    after = plugins.get_registry()
    assert after is not before
    assert ({n: (r.cls, r.plugin) for n, r in after.detectors.items()},
            {n: (r.cls, r.plugin) for n, r in after.actuators.items()}) == snapshot
    # The name is free again once the clash is removed.
    plugins.register_plugin(_plugin(actuators=[Noop]), name="dup")
    assert plugins.get_registry().actuators["noop"].plugin == "dup"


def test_duplicate_actuator_name_is_refused():
    class SecondHalt(Actuator):
        name = "halt"

    with pytest.raises(PluginError, match=r"^actuator name 'halt' registered twice: by plugin "
                                          r"'lbw_policy\.actuators' .* and by plugin 'again'"):
        plugins.register_plugin(_plugin(actuators=[SecondHalt]), name="again")
    assert plugins.get_registry().actuators["halt"].cls is Halt


@pytest.mark.parametrize("bad, expected", [
    (dict, r"plugin 'bad' registered <class 'dict'> as a detector; expected a subclass of "
           r"lbw_policy\.Detector"),
    (Noop, r"plugin 'bad' registered <class 'test_plugins\.Noop'> as a detector; expected a "
           r"subclass of lbw_policy\.Detector"),
    (Echo(), r"plugin 'bad' registered <test_plugins\.Echo object at 0x[0-9a-f]+> as a detector"),
])
def test_registering_a_non_detector_is_refused(bad, expected):
    with pytest.raises(PluginError, match=expected):
        plugins.register_plugin(_plugin(detectors=[bad]), name="bad")
    assert not plugins.get_plugin_manager().has_plugin("bad")


def test_registering_a_class_without_a_name_is_refused():
    class Nameless(Detector):
        signals = ("x",)

    with pytest.raises(PluginError, match=r"plugin 'anon' registered detector class "
                                          r".*Nameless with no `name`; set the class attribute"):
        plugins.register_plugin(_plugin(detectors=[Nameless]), name="anon")


def test_a_plugin_written_for_another_api_version_is_refused():
    class Old(Detector):
        name = "old"
        signals = ("x",)
        api_version = 1

    with pytest.raises(PluginError, match=r"plugin 'old-plugin' registered detector class "
                                          r".*Old written for plugin API version 1; this "
                                          r"lbw-policy implements version 2"):
        plugins.register_plugin(_plugin(detectors=[Old]), name="old-plugin")


def test_a_plugin_with_version_1_methods_is_refused_with_the_migration():
    class OldActuator(Actuator):
        name = "old_actuator"

        def bind(self, *, model=None, guard=None):
            pass

        def before_step(self, optimizer):
            return True

    with pytest.raises(PluginError, match=r"class .*OldActuator written for plugin API version "
                                          r"1: bind\(\), before_step\(optimizer\); version 2 "
                                          r"passes bind\(context\), before_step\(optimizer, step\)"):
        plugins.register_plugin(_plugin(actuators=[OldActuator]), name="old-actuator-plugin")


def test_signals_declare_their_cross_rank_reduction():
    class Declared(Detector):
        name = "declared"
        signals = ("peak", "level")
        reductions = {"peak": "max"}

    class Wrong(Detector):
        name = "wrong"
        signals = ("x",)
        reductions = {"x": "median"}

    assert Declared.reduction_for("peak") == "max"
    assert Declared.reduction_for("level") == "mean"  # the documented default
    with pytest.raises(PluginError, match=r"declares unknown reductions \{'x': 'median'\}; "
                                          r"expected one of max, min, sum, mean, any, same"):
        plugins.register_plugin(_plugin(detectors=[Wrong]), name="wrong-plugin")


def test_registering_the_same_plugin_name_or_object_twice_is_refused():
    first = _plugin(detectors=[Echo])
    plugins.register_plugin(first, name="once")
    with pytest.raises(PluginError, match=r"^plugin 'once': that name or that object is already "
                                          r"registered; unregister it first or choose another name$"):
        plugins.register_plugin(_plugin(), name="once")
    with pytest.raises(PluginError, match=r"that name or that object is already registered"):
        plugins.register_plugin(first, name="twice")
    assert plugins.get_registry().detectors["echo"].plugin == "once"


# -------------------------------------------------------------------- lbw-policy plugins


def test_cli_plugins_lists_every_builtin_with_plugin_and_version(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["kind", "name", "plugin", "version", "signals", "(cross-rank",
                              "reduction)", "/", "commands"]
    rows = {line.split()[1]: line.split(None, 4) for line in out[1:]}
    assert len(rows) == len(out) - 1  # one row per name
    version = lbw_policy.__version__
    reg = plugins.get_registry()
    assert set(rows) == set(reg.detectors) | set(reg.actuators)
    for name, r in reg.detectors.items():
        assert rows[name][:4] == ["detector", name, "lbw_policy.detectors", version]
    for name, r in reg.actuators.items():
        assert rows[name][:4] == ["actuator", name, "lbw_policy.actuators", version]
    # The six the guard tests use, and an always-on actuator, written out by hand.
    expected = {
        "loss_spike": ["detector", "loss_spike", "lbw_policy.detectors", version,
                       "zscore (max), ema (mean), delta (max)"],
        "grad_norm": ["detector", "grad_norm", "lbw_policy.detectors", version,
                      "norm (same), ratio (same)"],
        "nonfinite": ["detector", "nonfinite", "lbw_policy.detectors", version,
                      "loss (any), grads (any), any (any)"],
        "lr_scale": ["actuator", "lr_scale", "lbw_policy.actuators", version, "multiply, set, add"],
        "skip_step": ["actuator", "skip_step", "lbw_policy.actuators", version, "apply"],
        "halt": ["actuator", "halt", "lbw_policy.actuators", version, "apply"],
        "grad_normalize": ["actuator", "grad_normalize", "lbw_policy.actuators", version,
                           "(none: always on)"],
    }
    assert {name: rows[name] for name in expected} == expected
    # signals that only some params turn on are listed with those params
    assert rows["update_ratio"][4].endswith("wnorm (same); with trend_window: N (e.g. 48): trend_slope, "
                                            "trend_growth, trend_p, wnorm_trend_slope, "
                                            "wnorm_trend_growth, wnorm_trend_p, rms_per_lr_trend_slope, "
                                            "rms_per_lr_trend_growth, rms_per_lr_trend_p")


def test_cli_plugins_json_includes_code_plugins(capsys):
    plugins.register_plugin(EchoPlugin(), name="echo-plugin")
    assert main(["plugins", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in rows}
    reg = plugins.get_registry()
    assert len(rows) == len(by_name)
    assert set(by_name) == set(reg.detectors) | set(reg.actuators)
    assert "echo" in by_name and set(BUILTIN_DETECTORS) | set(BUILTIN_ACTUATORS) <= set(by_name)
    assert by_name["echo"] == {"kind": "detector", "name": "echo", "plugin": "echo-plugin",
                               "version": "4.5.6", "class": "test_plugins.Echo", "signals": "loss",
                               "reductions": {"loss": "mean"}}  # undeclared: the default
    assert by_name["halt"]["class"] == "lbw_policy.actuators.halt.Halt"
    assert by_name["update_ratio"]["optional_signals"]["trend_p"] == "trend_window: N (e.g. 48)"
    assert "optional_signals" not in by_name["grad_norm"]


def test_hookspecs_are_documented():
    from lbw_policy import hookspecs

    for name in ("register_detectors", "register_actuators"):
        doc = textwrap.dedent(getattr(hookspecs, name).__doc__ or "")
        assert ":param register:" in doc and "PluginError" in doc
