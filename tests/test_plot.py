"""Tests for ``lbw-policy plot`` (lbw_policy.plot): the PNG is written and valid, and what is
drawn is the telemetry itself (line data compared with telemetry.jsonl) with the decisions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from runhelpers import AUDIT_POLICY, AUDIT_SCALE_AT, make_run

from lbw_policy.cli import main
from lbw_policy.decision_log import read_log
from lbw_policy.plot import default_signals, plot_run
from lbw_policy.telemetry_log import read_telemetry

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("plot") / "run"
    make_run(run_dir, AUDIT_POLICY, steps=40, scale_at=AUDIT_SCALE_AT)
    return run_dir


def same(a, b) -> bool:
    return np.array_equal(np.asarray(a, dtype=float), np.asarray(b, dtype=float), equal_nan=True)


def test_png_is_written_and_valid(run, tmp_path):
    out = tmp_path / "timeline.png"
    plot_run(run, out)
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 800 and height > 600


def test_line_data_are_the_telemetry_values(run):
    rows, _ = read_telemetry(run / "telemetry.jsonl")
    fig = plot_run(run)
    axes = fig.axes
    steps = [r["step"] for r in rows]
    loss_line = axes[0].lines[0]
    assert same(loss_line.get_xdata(), steps)
    assert same(loss_line.get_ydata(), [r["loss"] for r in rows])
    assert math.isinf(loss_line.get_ydata()[30])  # the non-finite step is in the data...
    bad = [line for line in axes[0].lines if line.get_label() == "non-finite loss"][0]
    assert list(bad.get_xdata()) == [30, 31]       # ...and marked
    skipped = [line for line in axes[0].lines if line.get_label() == "skipped step"][0]
    assert list(skipped.get_xdata()) == [30, 31]
    lr_line = axes[1].lines[0]
    assert same(lr_line.get_ydata(), [r["lr"] for r in rows])
    records = read_log(run / "decisions.jsonl").records
    assert default_signals(run, list(rows[0]["signals"])) == [
        "nan.any", "loss.delta", "gn.ratio"]  # without records: the rules' signals, rule order
    available = list(dict.fromkeys(k for r in rows for k in r["signals"]))
    signals = default_signals(run, available, records)
    fired = [s for r in records if r["event"] in ("fired", "action") for s in r["signals"]]
    assert signals[0] == fired[0]  # with them: the signals of the rules that fired, first
    assert sorted(signals) == ["gn.ratio", "loss.delta", "nan.any"]
    for ax, name in zip(axes[2:], signals):
        line = ax.lines[0]
        assert ax.get_ylabel() == name
        assert same(line.get_xdata(), [r["step"] for r in rows if name in r["signals"]])
        assert same(line.get_ydata(), [r["signals"][name] for r in rows if name in r["signals"]])
    gn = axes[2 + signals.index("gn.ratio")].lines[0]
    assert list(gn.get_xdata()) == list(range(0, 40, 3))  # emitted every 3 steps, not held


def test_decisions_and_thresholds_are_marked(run):
    fig = plot_run(run, signals=["loss.delta"])
    ax = fig.axes[0]
    vlines = {(line.get_xdata()[0], line.get_color()) for line in ax.lines
              if len(line.get_xdata()) == 2 and line.get_xdata()[0] == line.get_xdata()[1]}
    assert {(20, "tab:red"), (30, "tab:red"), (22, "tab:green"), (32, "tab:green")} <= vlines
    recover = [line for line in fig.axes[1].lines if line.get_label() == "recover"][0]
    assert list(recover.get_xdata()) == [25, 36]
    thresholds = [line.get_ydata()[0] for line in fig.axes[2].lines
                  if len(set(line.get_ydata())) == 1 and line.get_linestyle() == ":"]
    assert thresholds == [0.5]


def test_cli_plot_and_errors(run, tmp_path, capsys):
    out = tmp_path / "t.png"
    assert main(["plot", str(run), "-o", str(out), "--signals", "loss.zscore,nan.any"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert main(["plot", str(run), "-o", str(out), "--signals", "loss.zscor"]) == 2
    assert "error: signal(s) ['loss.zscor'] not in" in capsys.readouterr().err
    assert main(["plot", str(tmp_path), "-o", str(out)]) == 2
    assert "error: no telemetry at" in capsys.readouterr().err
