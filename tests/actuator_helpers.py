"""Shared pieces of the actuator tests: a scripted detector, a spy actuator, tiny models for
AdamW / Adam / SGD, deterministic batches and log readers."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lbw_policy.base import Actuator, Detector
from lbw_policy.decision_log import read_log
from lbw_policy.plugins import Registration, Registry, get_registry

HEAD = """\
apiVersion: lbw-policy/v1
kind: Policy
metadata: {name: actuator-test}
"""

OPTIMIZERS = ("adamw", "adam", "sgd")


class Schedule(Detector):
    """Emits, for each ``name: [steps]`` of ``at``, the signal ``name`` = 1.0 at those steps and
    0.0 elsewhere; for each ``name: [v0, v1, ...]`` of ``values``, ``name`` = ``values[step]``."""

    name = "schedule"
    params_schema = {"type": "object", "additionalProperties": False,
                     "properties": {"at": {"type": "object"}, "values": {"type": "object"}}}

    def __init__(self, at=None, values=None):
        super().__init__(at=at or {}, values=values or {})
        self.at = {k: set(v) for k, v in (at or {}).items()}
        self.values = {k: list(v) for k, v in (values or {}).items()}

    @classmethod
    def signals_for(cls, params):
        return tuple(params.get("at", {})) + tuple(params.get("values", {}))

    def compute(self, telemetry):
        out = {k: torch.tensor(1.0 if telemetry.step in steps else 0.0) for k, steps in self.at.items()}
        for k, vals in self.values.items():
            out[k] = torch.tensor(float(vals[telemetry.step]) if telemetry.step < len(vals) else 0.0)
        return out


class Spy(Actuator):
    """Records, right before each optimizer step, what the optimizer's param group 0 holds
    (configure it last: it then sees every other actuator's change)."""

    name = "spy"
    commands = {}
    seen: list = []

    def before_step(self, optimizer, step):
        g = optimizer.param_groups[0]
        Spy.seen.append({"lr": g["lr"], "weight_decay": g.get("weight_decay"),
                         "beta2": g["betas"][1] if "betas" in g else None})
        return True


def registry() -> Registry:
    base = get_registry()
    dets = dict(base.detectors)
    acts = dict(base.actuators)
    dets[Schedule.name] = Registration(Schedule.name, "detector", Schedule, "tests", "0.0.1")
    acts[Spy.name] = Registration(Spy.name, "actuator", Spy, "tests", "0.0.1")
    return Registry(detectors=dets, actuators=acts)


def make(kind: str = "adamw", seed: int = 0, lr: float = 0.01, wd: float = 0.1, **kw):
    """A 2-layer MLP (8 -> 16 -> 2) and an optimizer over it."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    if kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, **kw)
    elif kind == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd, **kw)
    elif kind == "sgd":
        kw.setdefault("momentum", 0.9)
        opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd, **kw)
    else:
        raise ValueError(kind)
    return model, opt


TEACHER = torch.randn(8, 2, generator=torch.Generator().manual_seed(7)) * 0.3


def batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(32, 8, generator=g)
    return x, torch.tanh(x @ TEACHER) + 0.05 * torch.randn(32, 2, generator=g)


def forward_backward(model, step: int, scale: float = 1.0):
    x, y = batch(step)
    loss = F.mse_loss(model(x), y) * scale
    loss.backward()
    return loss


def run_step(opt, actuators, step=None):
    """The guard's protocol around ``optimizer.step()``: before_step in order, after_step in
    reverse order; returns whether the step was taken. ``step`` defaults to a count of this
    optimizer's run_step calls (0, 1, ...), as the guard's step index (kept on the optimizer
    object: an id could be reused by a later test's optimizer)."""
    if step is None:
        step = getattr(opt, "_test_run_steps", 0)
    opt._test_run_steps = step + 1
    proceed = True
    for a in actuators:
        proceed = a.before_step(opt, step) and proceed
    if proceed:
        opt.step()
    for a in reversed(actuators):
        a.after_step(opt, proceed, step)
    return proceed


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def opt_state(opt):
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            out.append({k: v.detach().clone() for k, v in st.items()})
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, dict):
            assert x.keys() == y.keys()
            for k in x:
                assert torch.equal(x[k], y[k]), k
        else:
            assert torch.equal(x, y)


def records(log_dir) -> list:
    read = read_log(Path(log_dir) / "decisions.jsonl")
    assert not read.torn_tail and not read.bad_lines
    return read.records


def decisions_of(recs, events=("fired", "action", "resolved", "recover", "halt", "error")):
    return [r for r in recs if r["event"] in events]
