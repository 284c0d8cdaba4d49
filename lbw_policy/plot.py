"""``lbw-policy plot``: a run's timeline as a PNG (matplotlib, Agg backend, no display needed).

Panels, sharing the step axis:

1. the training loss (nats) per step; steps whose loss was not finite are marked with ``x`` at
   the top of the panel, skipped steps with a grey tick at the bottom;
2. the learning rate the optimizer used per step (after ``lr_scale``); ``recover`` decisions
   are marked with dots;
3. one panel per chosen signal (default: the signals the policy's rules read, at most four),
   plotted at the steps its detector emitted it, with each rule's threshold on it dotted.

On every panel, decisions are vertical lines: ``fired`` red, ``resolved`` green (dashed),
``halt`` black, ``error`` magenta. :func:`plot_run` returns the
:class:`matplotlib.figure.Figure`, whose line data are the telemetry values.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from lbw_policy.decision_log import read_log
from lbw_policy.telemetry_log import read_telemetry
from lbw_policy.records import from_json_number

__all__ = ["plot_run", "default_signals"]

#: Most signal panels drawn when none are chosen.
MAX_DEFAULT_SIGNALS = 4
#: Most "fired" markers labelled with their rule's name (more would be unreadable).
MAX_RULE_LABELS = 20
_EVENT_STYLE = {"fired": ("tab:red", "-"), "resolved": ("tab:green", "--"),
                "halt": ("black", "-"), "error": ("magenta", ":")}


def default_signals(run_dir: Path, available: Sequence[str], records: Sequence[dict] = ()) -> list:
    """The signals that drove decisions first (those read by rules that fired, in order of
    first firing), then the other signals the run's policy rules read (``policy.yaml``, rule
    order), then the first telemetry signals; only signals the telemetry holds. At most
    :data:`MAX_DEFAULT_SIGNALS`."""
    fired = [s for r in records if r.get("event") in ("fired", "action")
             for s in (r.get("signals") or {})]
    wanted = [s for s in fired + [s for s, _ in _thresholds(run_dir)] if s in available]
    seen = list(dict.fromkeys(wanted)) or list(available)
    return seen[:MAX_DEFAULT_SIGNALS]


def _thresholds(run_dir: Path) -> list:
    """``[(signal, value)]`` of every condition leaf of the run's policy (empty if unreadable)."""
    from lbw_policy.errors import PolicyError
    from lbw_policy.yamlsource import Collector, decode, parse, read_source

    path = run_dir / "policy.yaml"
    try:  # the policy loader's bounded reader and parser: a hostile file costs nothing here
        data = parse(decode(read_source(path, "policy file", PolicyError), str(path)),
                     Collector(str(path), {}))
    except (OSError, PolicyError):
        return []
    out: list = []

    def walk(node: Any) -> None:
        if not isinstance(node, dict):
            return
        if isinstance(node.get("signal"), str):
            out.append((node["signal"], node.get("value")))
        for key in ("all", "any"):
            for child in node.get(key) or ():
                walk(child)
        walk(node.get("not"))

    rules = data.get("rules") if isinstance(data, dict) else None
    for rule in rules if isinstance(rules, list) else ():
        if isinstance(rule, dict):
            walk(rule.get("when"))
    return out


def plot_run(run_dir: Union[str, "os.PathLike[str]"], out: Union[str, "os.PathLike[str]", None] = None,
             *, signals: Optional[Sequence[str]] = None, title: Optional[str] = None):
    """Draw a run's timeline; save it to ``out`` (PNG) when given.

    :param run_dir: a run directory with ``telemetry.jsonl`` (and ``decisions.jsonl``).
    :param out: the image file to write, or ``None`` to only return the figure.
    :param signals: signal names to plot (default :func:`default_signals`).
    :param title: figure title (default: the run directory's name and its policy).
    :returns: the :class:`matplotlib.figure.Figure`.
    :raises FileNotFoundError: no telemetry in ``run_dir``.
    :raises ValueError: a requested signal is not in the telemetry, or there is nothing to plot.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run = Path(run_dir)
    rows, _ = read_telemetry(run / "telemetry.jsonl")
    if not rows:
        raise ValueError(f"{run / 'telemetry.jsonl'}: no telemetry rows to plot")
    available = list(dict.fromkeys(k for r in rows for k in r["signals"]))
    records = []
    if (run / "decisions.jsonl").is_file():
        records = read_log(run / "decisions.jsonl").records
    if signals is None:
        signals = default_signals(run, available, records)
    unknown = [s for s in signals if s not in available]
    if unknown:
        raise ValueError(f"signal(s) {unknown} not in {run / 'telemetry.jsonl'}; it holds "
                         f"{available}")

    steps = [r["step"] for r in rows]
    losses = [_float(r.get("loss")) for r in rows]
    lrs = [_float(r.get("lr")) for r in rows]
    n = 2 + len(signals)
    fig = Figure(figsize=(11, 2.1 * n + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]

    ax = axes[0]
    ax.plot(steps, losses, color="tab:blue", lw=1.0, label="loss")
    bad = [s for s, v in zip(steps, losses) if not math.isfinite(v)]
    if bad:
        ax.plot(bad, [1.0] * len(bad), "x", color="tab:red", transform=ax.get_xaxis_transform(),
                clip_on=False, label="non-finite loss")
    skipped = [r["step"] for r in rows if r.get("skipped")]
    if skipped:
        ax.plot(skipped, [0.03] * len(skipped), "|", color="0.3", ms=12, mew=1.5,
                transform=ax.get_xaxis_transform(), clip_on=False, label="skipped step")
    ax.set_ylabel("loss (nats)")

    ax = axes[1]
    ax.plot(steps, lrs, color="tab:orange", lw=1.0, label="learning rate")
    lr_at = dict(zip(steps, lrs))
    rec_steps = [r["step"] for r in records if r.get("event") == "recover" and r.get("step") in lr_at]
    if rec_steps:
        ax.plot(rec_steps, [lr_at[s] for s in rec_steps], ".", color="tab:blue", ms=4,
                label="recover")
    ax.set_ylabel("learning rate")

    thresholds = _thresholds(run)
    for ax, name in zip(axes[2:], signals):
        xs = [r["step"] for r in rows if name in r["signals"]]
        ys = [_float(r["signals"][name]) for r in rows if name in r["signals"]]
        ax.plot(xs, ys, color="tab:purple", lw=1.0, label=name)
        for value in {v for s, v in thresholds if s == name and isinstance(v, (int, float))
                      and not isinstance(v, bool)}:
            ax.axhline(value, color="tab:red", ls=":", lw=0.8)
        ax.set_ylabel(name)

    marked: set = set()
    marked_rules: list = []
    for r in records:
        style = _EVENT_STYLE.get(r.get("event"))
        if style is None or not isinstance(r.get("step"), int):
            continue
        for ax in axes:
            ax.axvline(r["step"], color=style[0], ls=style[1], lw=0.8, alpha=0.7,
                       label=r["event"] if r["event"] not in marked and ax is axes[0] else None)
        marked.add(r["event"])
        if r["event"] == "fired" and r.get("rule") and len(marked_rules) < MAX_RULE_LABELS:
            marked_rules.append(r["rule"])  # which rule fired, over the loss panel
            axes[0].annotate(r["rule"], (r["step"], 1.0), xycoords=("data", "axes fraction"),
                             rotation=90, fontsize=6, va="top", ha="right", color=style[0])
    axes[-1].set_xlabel("step")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[0].legend(loc="upper right", fontsize=8, ncol=3)
    if rec_steps:
        axes[1].legend(loc="upper right", fontsize=8)
    pol = next((r.get("policy") for r in records if r.get("policy")), None) or {}
    fig.suptitle(title or f"{run.name}: policy {pol.get('name', '?')} "
                 f"(revision {str(pol.get('revision', '?'))[:12]})")
    if out is not None:
        # PNG whatever the name says (matplotlib would append ".png" to a name without a suffix)
        fig.savefig(out, dpi=110, format="png")
    return fig


def _float(v: Any) -> float:
    v = from_json_number(v)
    if isinstance(v, bool):
        return float(v)
    return float(v) if isinstance(v, (int, float)) else math.nan
