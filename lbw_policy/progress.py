"""A progress bar and a printed summary for a plain training loop.

``lbw-policy run`` shows both; your own loop gets them from here::

    from lbw_policy import Guard, TrainingHalted
    from lbw_policy.progress import Progress

    guard = Guard(optimizer, policy="default", model=model, log_dir="runs/r1")
    try:
        with Progress(guard, total=len(loader), close_guard=True) as progress:
            for x, y in loader:
                loss = model(x, y)
                loss.backward()
                progress.update(guard.step(loss))   # loss, lr, lr scale, skipped, decisions
                optimizer.zero_grad(set_to_none=True)
    except TrainingHalted as exc:
        ...                                          # the summary above says HALTED already

The bar is `tqdm <https://tqdm.github.io/>`_'s (a dependency of this package), written to
standard error; the summary (:func:`format_summary` of :meth:`Guard.summary
<lbw_policy.adapters.guard.Guard.summary>`) is printed when the ``with`` block ends, however it
ends. No torch here: the guard's :class:`~lbw_policy.adapters.guard.StepResult` carries plain
floats.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Mapping, Optional, TextIO

from lbw_policy.errors import TrainingHalted

__all__ = ["Progress", "format_summary", "format_decisions"]


def format_decisions(summary: Mapping[str, Any]) -> str:
    """The decision tables of a summary: by rule, by actuator, by event, most frequent first.

    :param summary: :meth:`Guard.summary() <lbw_policy.adapters.guard.Guard.summary>` (or the
        run's ``summary.json``): ``decisions_by_rule``, ``decisions_by_actuator``,
        ``decisions_by_event``, each ``{name: count}``; a missing table reads "none".
    :returns: the lines, joined by ``"\\n"``.
    """
    lines = []
    for title, key in (("decisions by rule", "decisions_by_rule"),
                       ("decisions by actuator", "decisions_by_actuator"),
                       ("decisions by event", "decisions_by_event")):
        table = summary.get(key) or {}
        lines.append(f"{title}:" + ("" if table else " none"))
        for name, n in sorted(table.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {name:<28} {n}")
    return "\n".join(lines)


def format_summary(summary: Mapping[str, Any], halted: Any = None) -> str:
    """A guard's summary as text: steps run and skipped, the halt, the decision tables.

    :param summary: :meth:`Guard.summary() <lbw_policy.adapters.guard.Guard.summary>` (what
        :meth:`Guard.close() <lbw_policy.adapters.guard.Guard.close>` returns): ``steps``,
        ``skipped_steps`` (the host did not take them), ``gated_steps`` (the device gate undid
        them) and the decision tables (:func:`format_decisions`).
    :param halted: the :class:`~lbw_policy.errors.TrainingHalted` that stopped training (or its
        message), or ``None``.
    :returns: the lines, joined by ``"\\n"``, e.g.::

        steps             300 run, 4 skipped (2 on the device)
        decisions by rule:
          spike-skip                   4
        ...
    """
    gated = summary.get("gated_steps") or 0
    skipped = (summary.get("skipped_steps") or 0) + gated
    lines = [f"{'steps':<18}{summary.get('steps', 0)} run, {skipped} skipped"
             + (f" ({gated} on the device)" if gated else "")]
    if halted is not None:
        lines.append(f"{'HALTED':<18}{halted}")
    lines.append(format_decisions(summary))
    return "\n".join(lines)


class Progress:
    """A tqdm progress bar over a guarded loop, and the summary printed at its end.

    Call :meth:`update` with each :class:`~lbw_policy.adapters.guard.StepResult`; the bar shows
    the step's ``loss`` (nats, as given to ``guard.step``), the effective learning rate ``lr``,
    the ``lr_scale`` actuator's scale in force (1 without that actuator), the steps skipped so
    far and the decision records written so far (every event: fired, action, resolved, recover,
    error, halt). Used as a context manager, leaving the block closes the bar and prints
    :func:`format_summary`, also when :class:`~lbw_policy.errors.TrainingHalted` (or any error)
    ends it; the exception is not swallowed.

    :param guard: the :class:`~lbw_policy.adapters.guard.Guard` being stepped.
    :param total: expected number of steps (for the bar's length and time left), or ``None``.
    :param desc: the bar's label (default ``"train"``).
    :param summary: print the summary when closed (default ``True``).
    :param close_guard: :meth:`close` also closes the guard (``run_end``, ``summary.json``) and
        prints the summary it returns, which counts a device-gated last step the open guard has
        not learnt of yet (default ``False``: close the guard yourself, after the block).
    :param file: where the summary is printed (default ``sys.stdout``); the bar goes to tqdm's
        (standard error).
    :param tqdm_kwargs: passed to ``tqdm.tqdm`` (``disable=True`` hides the bar, ``leave``,
        ``mininterval``, ...).
    """

    def __init__(self, guard: Any, total: Optional[int] = None, *, desc: str = "train",
                 summary: bool = True, close_guard: bool = False,
                 file: Optional[TextIO] = None, **tqdm_kwargs: Any) -> None:
        from tqdm import tqdm

        self.guard = guard
        self.print_summary = summary
        self.close_guard = close_guard
        self.file = file
        self.halted: Optional[TrainingHalted] = None  #: the halt that ended the block, if any
        self.summary: Optional[dict] = None  #: what :meth:`close` printed
        self._closed = False
        options = {"desc": desc, "unit": "step", "dynamic_ncols": True, **tqdm_kwargs}
        self.bar = tqdm(total=total, **options)

    def update(self, result: Any) -> None:
        """Advance the bar by one step and show ``result``'s figures.

        :param result: the :class:`~lbw_policy.adapters.guard.StepResult` of ``guard.step``.
        """
        counts = self.guard.counts
        decisions = sum(v for k, v in counts.items() if k.startswith("event:"))
        self.bar.update(1)
        self.bar.set_postfix(loss=_num(result.loss, ".3f"), lr=_num(result.lr, ".2e"),
                             lr_scale=_num(getattr(result, "lr_scale", 1.0), ".3g"),
                             skipped=self.guard.skipped_steps, decisions=decisions, refresh=False)

    def close(self) -> dict:
        """Close the bar (and the guard, with ``close_guard``) and print the summary (with
        ``summary``). Idempotent.

        :returns: the guard's summary (:meth:`Guard.summary
            <lbw_policy.adapters.guard.Guard.summary>`).
        """
        if self._closed:
            return self.summary or {}
        self._closed = True
        self.bar.close()
        self.summary = self.guard.close() if self.close_guard else self.guard.summary()
        if self.print_summary:
            print(format_summary(self.summary, self.halted), file=self.file or sys.stdout)
        return self.summary

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if isinstance(exc, TrainingHalted):
            self.halted = exc
        self.close()


def _num(value: Any, spec: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec) if math.isfinite(value) else str(value)
    return "-"
