"""One prepared command for a CUDA machine: correctness, overhead and stress of the guard on a
GPT-2-small-shaped demo GPT, in one process, within a time budget.

Exact command (one H200, about 5 to 7 minutes; ``--data`` a text file or a folder of ``*.txt``,
e.g. a copy of ``../shared/data/wikitext-2``; without it, the interpreter's standard library)::

    PYTHONUNBUFFERED=1 python benchmarks/gpu_check.py --out OUT --data DATA [--runs-dir /tmp/gc_runs]

The package need not be installed: a checkout that is not pip-installed is imported as is (its
dependencies, jsonschema among them, must be importable). ``--runs-dir`` outside ``OUT`` keeps
``OUT`` to six files (the run directories go into ``OUT/runs.tar.gz``).

CPU smoke run (well under a minute; the tests and sync sections are skipped without CUDA)::

    OMP_NUM_THREADS=1 python benchmarks/gpu_check.py --tiny --out /tmp/gc_tiny

Sections, run in order, each wrapped: a failure is recorded (traceback in the JSON) and the next
section still runs; ``results.json`` and ``results.md`` are rewritten after every section.

1. ``tests``: every test marked ``gpu`` (the test files that carry the mark), as a pytest
   subprocess with a timeout: counts and the tail of its output (full output in ``pytest.txt``).
2. ``sync``: for ``default`` and ``early-warning``, warmed-up training up to a step where every
   detector is due (a multiple of every ``every:``), then that step and the next one (where the
   guard reads that step's signals) under ``torch.cuda.set_sync_debug_mode("error")``; and a NaN
   gradient under the default policy: gated on the device without a sync, weights and optimizer
   state bitwise unchanged. bf16 autocast, fused AdamW.
3. ``overhead``: plain ``opt.step()`` vs ``guard.step(loss)`` with ``default`` and with
   ``early-warning``, three models in one process, blocks of N steps in rotating order; per round
   a ratio governed/plain of steps/s; median with a 95 % bootstrap interval. Peak device memory
   per arm in a separate phase, one arm alive at a time (the guard's buffers count).
4. ``stress``: AdamW alone vs governed by ``default`` at each of ``--lrs``, warm-up then cosine;
   final train / validation loss, divergence, loss spikes, first action, skipped steps; the
   timeline of the most stressed governed run as ``timeline.png``.

Host-device syncs in the timed loops: only at block boundaries (overhead) and once at the end of a
run (stress: the per-step losses live in a preallocated device tensor read once). Batches are
drawn on the device from a device-resident corpus with a device generator, so drawing one never
syncs.

Out folder: ``results.json``, ``results.md``, ``timeline.png``, ``pytest.txt``, ``log.txt`` and
``runs/`` or ``runs.tar.gz`` (the guard's run directories: decisions.jsonl, telemetry.jsonl,
policy.yaml, and summary.json for the stress runs).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ROOT / "policies"
GOVERNED = ("default", "early-warning")
ARMS = ("plain",) + GOVERNED
# Spike: a step whose loss is non-finite or more than SPIKE_NATS above the mean of the
# SPIKE_WINDOW losses before it (all finite); steps before SPIKE_WINDOW are not judged.
SPIKE_NATS, SPIKE_WINDOW = 1.0, 10
# Events that are not an action on training (recover is a return toward neutral).
_NOT_ACTIONS = {"run_start", "run_end", "resolved", "recover", "error", "resume"}


def _ensure_importable() -> Optional[str]:
    """Make ``lbw_policy`` and its built-in plugin packages (``detectors/``, ``actuators/``,
    ``policies/`` at the top of the repository, installed as ``lbw_policy.<name>``) importable
    from a checkout that was not pip-installed. Returns a note when it had to, else ``None``."""
    try:
        import lbw_policy.actuators  # noqa: F401
        import lbw_policy.detectors  # noqa: F401
        import lbw_policy.policies  # noqa: F401
        return None
    except ImportError:
        pass
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import lbw_policy

    for sub in ("detectors", "actuators", "policies"):
        name = f"lbw_policy.{sub}"
        if name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(name, ROOT / sub / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / sub)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        setattr(lbw_policy, sub, mod)
    return "lbw_policy was not installed: imported from the checkout (pip install -e . --no-deps)"


# ---------------------------------------------------------------------------- training pieces
class DeviceBatches:
    """Random windows of a token tensor that lives on the device, offsets drawn with a generator
    on the same device: drawing a batch never syncs. Same seed, same batches.

    :param data: token ids ``(N,)`` ``torch.long`` on the training device.
    :returns: (on call) ``(x, y)``, both ``(B, T)``, ``y`` the next token of ``x``.
    """

    def __init__(self, data, batch_size: int, block_size: int, seed: int) -> None:
        import torch

        self.data, self.B, self.T = data, batch_size, block_size
        self.gen = torch.Generator(device=data.device).manual_seed(seed)
        self.offsets = torch.arange(block_size, device=data.device)  # (T,)

    def __call__(self):
        import torch

        ix = torch.randint(len(self.data) - self.T, (self.B,), device=self.data.device,
                           generator=self.gen)  # (B,)
        pos = ix[:, None] + self.offsets  # (B, T)
        return self.data[pos], self.data[pos + 1]


def make_model(config, device, lr: float, seed: int = 0):
    """The demo GPT and ``AdamW(fused=True, betas=(0.9, 0.95), weight_decay=0.1)``."""
    import torch

    from lbw_policy.demo.gpt import GPT

    torch.manual_seed(seed)
    model = GPT(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.1, fused=True)
    return model, opt


def train_step(model, opt, guard, batches: Callable, amp: bool):
    """One step: forward (bf16 autocast when ``amp``), backward, ``opt.step()`` or
    ``guard.step(loss)``, ``zero_grad``. Returns ``(loss tensor, StepResult or None)``; no sync."""
    import torch

    x, y = batches()
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
        _, loss = model(x, y)
    loss.backward()
    result = opt.step() if guard is None else guard.step(loss)
    opt.zero_grad(set_to_none=True)
    return loss, result


def _free() -> None:
    """Drop what the last piece of work left: garbage, cached device blocks, sync-debug mode."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.empty_cache()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()  # host-device sync: block boundaries and run ends only


def _policy(name: str) -> Path:
    return POLICIES / f"{name}.yaml"


def _run_start(records: list) -> dict:
    """The log's ``run_start`` record (transfer mode, device gate), or ``{}``."""
    return next((r for r in records if r.get("event") == "run_start"), {})


def _where() -> str:
    """The frames of the exception being handled, innermost last (where a sync came from)."""
    return "".join(traceback.format_exc().splitlines(keepends=True)[-24:])


def _fresh(run_dir: Path) -> Path:
    """An empty run directory (a rerun into the same --out starts new logs, not a resumed chain)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    return run_dir


def sync_check(policy: str, config, device, batches: Callable, log_dir, *, amp: bool = True,
               lr: float = 6e-4, min_warmup: int = 100) -> dict:
    """Train under ``policy`` up to the first step >= ``min_warmup`` where every detector is due
    (a multiple of the lcm of the ``every:`` cadences; the default 100 is past every shipped
    detector's warm-up: 25 steps for the loss and grad-norm EMAs, 16 trend points at every 4
    steps), so the steady-state code paths run; then that step and the next one under
    ``torch.cuda.set_sync_debug_mode("error")`` (only ``guard.step``; forward and backward run
    outside it, embedding backward syncs on its own). Returns ``ok``, the due step, the lcm and,
    per checked step, ``ok`` / ``error`` (the sync error's text)."""
    import torch

    from lbw_policy import Guard
    from lbw_policy.decision_log import read_log
    from lbw_policy.policy import load_policy

    every = math.lcm(*(spec.every for spec in load_policy(_policy(policy)).detectors.values()))
    due = every * math.ceil(min_warmup / every)
    model, opt = make_model(config, device, lr)
    guard = Guard(opt, str(_policy(policy)), model=model, log_dir=log_dir)
    checks = []
    try:
        for _ in range(due):
            train_step(model, opt, guard, batches, amp)
        for step in (due, due + 1):
            x, y = batches()
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                _, loss = model(x, y)
            loss.backward()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            error = where = None
            try:
                guard.step(loss)
            except Exception as exc:  # the sync error, or anything else the step raised
                error, where = f"{type(exc).__name__}: {exc}", _where()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            opt.zero_grad(set_to_none=True)
            checks.append({"step": step, "every_detector_due": step % every == 0,
                           "ok": error is None, "error": error, "where": where})
            if error is not None:
                break  # the guard's state after a failed step is not worth a second check
    finally:
        guard.close()
    records = read_log(Path(log_dir) / "decisions.jsonl").records
    start = _run_start(records)
    # A policy with on_error: continue (early-warning) turns a detector's sync error into an
    # error record and goes on: the log, not the exception, tells.
    errors = [{"step": r.get("step"), "where": r.get("where"), "error": r.get("error")}
              for r in records if r.get("event") == "error"]
    for c in checks:
        c["error_records"] = [e for e in errors if e["step"] == c["step"]]
        c["ok"] = c["ok"] and not c["error_records"]
    return {"policy": policy, "transfer": start.get("transfer"), "gate": start.get("gate"),
            "cadence_lcm": every, "due_step": due, "checks": checks, "error_records": errors,
            "ok": len(checks) == 2 and all(c["ok"] for c in checks) and not errors}


def nan_gate_check(config, device, batches: Callable, log_dir, *, policy: str = "default",
                   amp: bool = True, lr: float = 6e-4, warmup: int = 30) -> dict:
    """After ``warmup`` steps, a step whose loss (hence every gradient) is NaN, governed under
    ``set_sync_debug_mode("error")``: with the policy's non-finite rule gated on the device, the
    guard makes no sync and the weights and the whole optimizer state stay bitwise as they were.
    One clean step follows (the host learns of the gated step), then the log is read for the
    ``nonfinite-skip`` records."""
    import torch

    from lbw_policy import Guard
    from lbw_policy.decision_log import read_log

    model, opt = make_model(config, device, lr)
    guard = Guard(opt, str(_policy(policy)), model=model, log_dir=log_dir)
    try:
        for _ in range(warmup):
            train_step(model, opt, guard, batches, amp)
        x, y = batches()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            _, loss = model(x, y)
        loss = loss * float("nan")
        loss.backward()
        weights = [p.detach().clone() for p in model.parameters()]
        state = [(id(p), k, v.clone()) for p, s in opt.state.items() for k, v in s.items()
                 if isinstance(v, torch.Tensor)]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        error = where = None
        try:
            guard.step(loss)
        except Exception as exc:
            error, where = f"{type(exc).__name__}: {exc}", _where()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        opt.zero_grad(set_to_none=True)
        weights_same = all(torch.equal(a, p.detach()) for a, p in zip(weights, model.parameters()))
        live = {(id(p), k): v for p, s in opt.state.items() for k, v in s.items()}
        state_same = all((i, k) in live and torch.equal(v, live[(i, k)]) for i, k, v in state)
        if error is None:
            train_step(model, opt, guard, batches, amp)
    finally:
        guard.close()
    log = read_log(Path(log_dir) / "decisions.jsonl").records
    records = [{"step": r.get("step"), "event": r.get("event"), "device": r.get("device", False),
                "applied_step": [a.get("applied_step") for a in r.get("actions") or []]}
               for r in log if r.get("rule") == "nonfinite-skip"]
    start = _run_start(log)
    return {"policy": policy, "nan_step": warmup, "transfer": start.get("transfer"), "gate": start.get("gate"),
            "sync_error": error, "where": where,
            "weights_unchanged": weights_same, "optimizer_state_unchanged": state_same,
            "nonfinite_skip_records": records,
            "ok": error is None and weights_same and state_same and any(r["device"] for r in records)}


# ---------------------------------------------------------------------------- statistics
def median_ci(ratios: list) -> list:
    """95 % percentile-bootstrap interval of the median: ``benchmarks/overhead.py``'s helper
    (scipy), or the same resampling in plain Python where scipy / numpy are missing."""
    if len(ratios) < 2:
        return [ratios[0], ratios[0]] if ratios else [None, None]
    try:
        spec = importlib.util.spec_from_file_location("lbw_overhead", ROOT / "benchmarks" / "overhead.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod._median_ci(ratios)
    except ImportError:
        rng = random.Random(0)
        meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
        return [round(meds[49], 4), round(meds[1949], 4)]


def count_spikes(losses: list) -> int:
    """Steps ``t >= SPIKE_WINDOW`` whose loss is non-finite or exceeds the mean of the
    ``SPIKE_WINDOW`` losses before it by more than ``SPIKE_NATS``, those all being finite."""
    n = 0
    for t in range(SPIKE_WINDOW, len(losses)):
        prev = losses[t - SPIKE_WINDOW:t]
        if all(math.isfinite(v) for v in prev):
            n += not math.isfinite(losses[t]) or losses[t] > sum(prev) / SPIKE_WINDOW + SPIKE_NATS
    return n


def _took_effect(record: dict, action: dict) -> bool:
    applied = action.get("applied", True)
    return (applied is not None and applied is not False
            and (record.get("device", False) or action.get("before") != action.get("after")))


def first_action_step(records: list) -> Optional[int]:
    """The first step at which the guard changed training: over enforced records (not recovery
    or run events) with an applied action that changed something (a device-gated skip always
    does), the smallest step the action applied to: its ``applied_step`` (a device-gated skip,
    recorded one step later, ``device: true``), else the record's ``step`` (host decisions apply
    at the step they are made; under the deferred transport that is one step after
    ``signals_step``, the step whose signals they read). From the log, not from when
    ``guard.step`` returned a record."""
    steps = [a.get("applied_step", r["step"]) for r in records
             if r.get("event") not in _NOT_ACTIONS and r.get("enforced", True)
             for a in r.get("actions") or [] if _took_effect(r, a)]
    return min(steps) if steps else None


def gated_skips(records: list) -> int:
    """Steps the device gate skipped (``device: true`` skip_step actions; the host's
    ``skipped_steps`` does not count them)."""
    return sum(1 for r in records if r.get("device") and r.get("enforced", True)
               for a in r.get("actions") or [] if a.get("actuator") == "skip_step" and _took_effect(r, a))


def _finite(v) -> Optional[float]:
    return v if v is not None and math.isfinite(v) else None


# ---------------------------------------------------------------------------- the check
class Check:
    """The run's state: arguments, device, deadline, results; writes JSON + Markdown."""

    def __init__(self, args, device) -> None:
        self.args = args
        self.device = device
        self.amp = device.type == "cuda"  # bf16 autocast on CUDA; fp32 on the CPU
        self.install_note: Optional[str] = None  # set when lbw_policy had to be imported from the checkout
        self.corpus = self.train = self.config = None  # set by main once the data is loaded
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        # Run directories: under the out folder, or elsewhere and packed into out/runs.tar.gz after
        # every section (the device tool brings back only a few files from its out folder).
        self.runs = Path(args.runs_dir) if args.runs_dir else self.out / "runs"
        self.runs.mkdir(parents=True, exist_ok=True)
        self.archive = None if self.runs.resolve() == (self.out / "runs").resolve() else self.out / "runs.tar.gz"
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget_s
        self.results: dict = {"command": [sys.executable] + sys.argv if args.argv is None
                              else [sys.executable, str(Path(__file__))] + list(args.argv),
                              "args": {k: v for k, v in vars(args).items() if k != "argv"},
                              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "runs": str(self.runs), "runs_archive": self.archive and self.archive.name,
                              "sections": {}}
        self._log = open(self.out / "log.txt", "a", encoding="utf-8")
        self.step_s: dict = {}  # arm -> measured seconds per step (overhead), for budgeting

    def log(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self._log.write(line + "\n")
        self._log.flush()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run_dir(self, name: str) -> Path:
        return _fresh(self.runs / name)

    def pack(self) -> None:
        """``runs.tar.gz`` in the out folder: the run directories under ``runs/``."""
        if self.archive is not None and any(self.runs.iterdir()):
            tmp = self.archive.with_suffix(".tmp")
            with tarfile.open(tmp, "w:gz") as tar:
                tar.add(self.runs, arcname="runs")
            os.replace(tmp, self.archive)

    def run_section(self, name: str, fn: Callable) -> None:
        self.log(f"== {name} (budget left {self.left():.0f} s)")
        t = time.monotonic()
        res: dict = {"status": "ok"}
        self.results["sections"][name] = res
        try:
            fn(res)
        except Exception as exc:
            res.update(status="error", error=f"{type(exc).__name__}: {exc}",
                       traceback=traceback.format_exc())
            self.log(f"{name}: ERROR {type(exc).__name__}: {exc}")
        finally:
            _free()
            res["wall_s"] = round(time.monotonic() - t, 2)
            self.log(f"{name}: {res['status']} in {res['wall_s']} s")
            self.pack()
            self.write()

    def write(self) -> None:
        self.results["wall_s"] = round(time.monotonic() - self.t0, 2)
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=str), encoding="utf-8")
        os.replace(tmp, self.out / "results.json")
        (self.out / "results.md").write_text(markdown(self.results), encoding="utf-8")


def _environment(check: Check) -> None:
    import torch

    env = {"python": platform.python_version(), "platform": platform.platform(),
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "device": str(check.device),
           "threads": torch.get_num_threads(), "install_note": check.install_note}
    if torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(0)
        env["cudnn"] = torch.backends.cudnn.version()
    from importlib import metadata

    for dist in ("numpy", "scipy", "matplotlib", "pytest", "PyYAML", "jsonschema", "pluggy", "tqdm"):
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[dist] = None
    try:
        env["git"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, timeout=10).stdout.strip() or None
    except Exception:
        env["git"] = None
    check.results["environment"] = env
    check.log(f"device {env.get('device_name', check.device)}, torch {env['torch']}, cuda {env['cuda']}")


def _load_corpus(check: Check):
    from lbw_policy.demo.data import CharCorpus, load_text

    data, args = check.args.data, check.args
    cap = 200_000 if args.tiny else None
    if data is None:
        text, source = load_text(None, max_bytes=cap), "standard library (no --data)"
    elif Path(data).is_dir():
        files = [Path(data) / f for f in ("train.txt", "valid.txt", "test.txt") if (Path(data) / f).is_file()]
        files = files or sorted(Path(data).glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"--data {data!r}: a folder without *.txt files")
        text = "\n".join(load_text(f) for f in files)[:cap]
        source = ", ".join(str(f) for f in files)
    else:
        text, source = load_text(data, max_bytes=cap), str(data)
    corpus = CharCorpus(text)  # character level, last 10 % held out for validation
    check.results["data"] = {"source": source, "characters": len(text), "vocab_size": corpus.vocab_size,
                             "train_tokens": len(corpus.train), "val_tokens": len(corpus.val)}
    check.log(f"data: {source}: {len(text)} characters, vocab {corpus.vocab_size}")
    return corpus


# ---------------------------------------------------------------------------- sections
def section_tests(check: Check, res: dict) -> None:
    import torch

    if not torch.cuda.is_available():
        res.update(status="skipped", reason="no CUDA device: the gpu-marked tests would all skip")
        return
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "mark.gpu" in p.read_text(encoding="utf-8", errors="replace"))
    pytest_args = ["-q", "-m", "gpu", "-p", "no:cacheprovider", "-rfEs", "--continue-on-collection-errors", *files]
    if check.install_note is None:
        cmd = [sys.executable, "-m", "pytest", *pytest_args]
    else:  # not installed: the same import shim as this process, then pytest
        cmd = [sys.executable, "-c", "import sys; sys.path.insert(0, %r); import gpu_check; "
               "gpu_check._ensure_importable(); import pytest; sys.exit(pytest.main(%r))"
               % (str(Path(__file__).parent), pytest_args)]
    timeout = max(10.0, min(check.args.tests_timeout, 0.4 * check.left()))
    res.update(command=cmd, files=files, timeout_s=round(timeout))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        output = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x or ""
                         for x in (exc.stdout, exc.stderr))
        output += f"\n[gpu_check: pytest killed after {timeout:.0f} s]"
        rc = None
        res.update(status="partial", reason=f"timed out after {timeout:.0f} s")
    (check.out / "pytest.txt").write_text(output, encoding="utf-8")
    counts = {k: 0 for k in ("passed", "failed", "skipped", "errors", "xfailed", "xpassed")}
    last = [line for line in output.splitlines() if line.strip()][-1:] or [""]
    for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", last[0]):
        counts["errors" if kind.startswith("error") else kind] = int(n)
    res.update(returncode=rc, **counts, tail=output[-3000:])
    check.log(f"tests: rc {rc}, {counts}")


def section_sync(check: Check, res: dict) -> None:
    import torch

    if check.device.type != "cuda":
        res.update(status="skipped", reason="no CUDA device: sync-debug mode needs CUDA")
        return
    cfg, amp = check.config, check.amp
    t = time.perf_counter()
    model, opt = make_model(cfg, check.device, 6e-4)
    batches = DeviceBatches(check.train, check.args.batch, cfg.block_size, seed=0)
    train_step(model, opt, None, batches, amp)
    torch.cuda.synchronize()
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(5):
        train_step(model, opt, None, batches, amp)
    torch.cuda.synchronize()
    steady = (time.perf_counter() - t) / 5
    res.update(params=model.num_params(), first_step_s=round(first, 3), plain_step_ms=round(1e3 * steady, 2))
    check.log(f"first step (model build + CUDA/cuBLAS init) {first:.2f} s; plain step {1e3 * steady:.1f} ms "
              f"({model.num_params() / 1e6:.1f} M params)")
    del model, opt
    res["checks"] = []
    for policy in GOVERNED:
        try:
            r = sync_check(policy, cfg, check.device, DeviceBatches(check.train, check.args.batch,
                           cfg.block_size, seed=1), check.run_dir(f"sync-{policy}"), amp=amp)
        except Exception as exc:
            r = {"policy": policy, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                 "traceback": traceback.format_exc()}
        res["checks"].append(r)
        check.log(f"sync {policy}: {'ok' if r['ok'] else 'FAILED'} "
                  f"{r.get('error') or [c.get('error') for c in r.get('checks', []) if c.get('error')]}")
        _free()
    try:
        r = nan_gate_check(cfg, check.device, DeviceBatches(check.train, check.args.batch, cfg.block_size, seed=2),
                           check.run_dir("sync-nan-default"), amp=amp)
    except Exception as exc:
        r = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    res["nan_gate"] = r
    check.log(f"NaN gradient gated on the device: {'ok' if r['ok'] else 'FAILED'} "
              f"{ {k: v for k, v in r.items() if k != 'traceback'} }")


def section_overhead(check: Check, res: dict) -> None:
    import torch

    from lbw_policy import Guard

    args, cfg, dev, amp = check.args, check.config, check.device, check.amp
    cuda = dev.type == "cuda"
    lr = 6e-4
    if check.left() < 20:
        res.update(status="skipped", reason=f"budget: {check.left():.0f} s left")
        return

    def build(arm: str, phase: str):
        model, opt = make_model(cfg, dev, lr)
        guard = None if arm == "plain" else Guard(opt, str(_policy(arm)), model=model,
                                                   log_dir=check.run_dir(f"overhead-{phase}-{arm}"))
        return {"model": model, "opt": opt, "guard": guard,
                "batches": DeviceBatches(check.train, args.batch, cfg.block_size, seed=3)}

    def block(a: dict, n: int) -> float:
        _sync(dev)  # host-device sync at the block boundary (not inside the block)
        t = time.perf_counter()
        for _ in range(n):
            train_step(a["model"], a["opt"], a["guard"], a["batches"], amp)
        _sync(dev)  # ... and at its end
        return time.perf_counter() - t

    # Phase 1, memory: one arm alive at a time, from an empty allocator; the first step per arm
    # is timed (lazy init included).
    res["memory"] = {}
    for arm in ARMS:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        a = build(arm, "memory")
        first = block(a, 1)
        block(a, args.mem_steps)
        peak = torch.cuda.max_memory_allocated() - base if cuda else None
        res["memory"][arm] = {"peak_bytes": peak, "first_step_s": round(first, 3)}
        res.setdefault("params", a["model"].num_params())
        if a["guard"] is not None:
            a["guard"].close()
        del a
        check.log(f"memory {arm}: peak {peak / 2**30:.2f} GiB, first step {first:.2f} s" if cuda
                  else f"memory {arm}: not measured (no CUDA), first step {first:.2f} s")
    if cuda:
        for arm in GOVERNED:
            res["memory"][arm]["ratio"] = round(res["memory"][arm]["peak_bytes"]
                                                / res["memory"]["plain"]["peak_bytes"], 4)
    else:
        res["memory_note"] = "peak device memory needs CUDA: not measured"
    check.log(f"overhead model: {res['params'] / 1e6:.1f} M params")

    # Phase 2, speed: three arms alive together, warm-up block each, then rounds.
    arms = {arm: build(arm, "speed") for arm in ARMS}
    warm = max(3, args.mem_steps)
    for arm in ARMS:
        check.step_s[arm] = block(arms[arm], warm) / warm
    # A block is a whole number of cadence cycles (lcm of every `every:`; early-warning: 100), so
    # each block runs every detector as often as training does in the long run.
    from lbw_policy.policy import load_policy

    cycle = math.lcm(*(spec.every for name in GOVERNED for spec in load_policy(_policy(name)).detectors.values()))
    n = args.block or cycle * max(1, round(args.block_s / (cycle * check.step_s["plain"])))
    round_s = n * sum(check.step_s.values())
    stress_est = _stress_estimate(check)
    room = min(args.overhead_s, check.left() - stress_est - 10)
    rounds = max(3, min(args.rounds, int(room // round_s)))
    stop_at = time.monotonic() + max(room, 3 * round_s) + 0.5 * round_s  # slack: rounds vary a little
    res.update(block_steps=n, cadence_cycle=cycle, rounds_planned=rounds, stress_estimate_s=round(stress_est),
               step_ms_warmup={k: round(1e3 * v, 2) for k, v in check.step_s.items()})
    check.log(f"overhead: {rounds} rounds x {len(ARMS)} blocks of {n} steps (~{round_s:.1f} s a round; "
              f"warm-up steps ms {res['step_ms_warmup']}; stress needs ~{stress_est:.0f} s)")
    sps: dict = {arm: [] for arm in ARMS}
    for r in range(rounds):
        if r >= 2 and time.monotonic() + round_s > min(stop_at, check.deadline):
            res.update(status="partial", reason=f"budget: stopped after {r} of {rounds} rounds")
            check.log(res["reason"])
            break
        order = ARMS[r % len(ARMS):] + ARMS[:r % len(ARMS)]  # rotating order
        for arm in order:
            sps[arm].append(n / block(arms[arm], n))
    for a in arms.values():
        if a["guard"] is not None:
            a["guard"].close()
    del arms
    res["rounds"] = len(sps["plain"])
    res["steps_per_s"] = {arm: [round(v, 3) for v in sps[arm]] for arm in ARMS}
    res["median_steps_per_s"] = {arm: round(statistics.median(sps[arm]), 3) for arm in ARMS}
    res["ratios"] = {}
    for arm in GOVERNED:
        ratios = [g / p for g, p in zip(sps[arm], sps["plain"])]
        res["ratios"][arm] = {"median": round(statistics.median(ratios), 4), "ci95": median_ci(ratios),
                              "rounds": [round(x, 4) for x in ratios]}
        check.step_s[arm] = 1.0 / res["median_steps_per_s"][arm]
    check.step_s["plain"] = 1.0 / res["median_steps_per_s"]["plain"]
    mem = res["memory"]
    res["goals"] = [
        _goal("default steps/s >= 0.98x plain", res["ratios"]["default"]["median"], lambda v: v >= 0.98),
        _goal("early-warning steps/s >= 0.95x plain", res["ratios"]["early-warning"]["median"], lambda v: v >= 0.95),
        _goal("default peak memory <= 1.02x plain", mem["default"].get("ratio"), lambda v: v <= 1.02)]
    for arm in GOVERNED:
        r = res["ratios"][arm]
        check.log(f"overhead {arm}: median ratio {r['median']:.3f} (95 % CI {r['ci95'][0]} to {r['ci95'][1]})"
                  + (f", peak memory {mem[arm]['ratio']:.3f}x plain" if cuda else ""))
    for g in res["goals"]:
        check.log(_goal_line(g))


def _goal(text: str, value, test: Callable) -> dict:
    """A goal: ``met`` is None when there is no value to judge (e.g. memory without CUDA)."""
    return {"goal": text, "value": value, "met": None if value is None else bool(test(value))}


def _goal_line(g: dict) -> str:
    verdict = "met" if g["met"] else "n/a" if g["met"] is None else "NOT met"
    return f"{verdict}: {g['goal']} ({_fmt(g['value'])})"


def _stress_estimate(check: Check) -> float:
    """Seconds the stress grid needs, from the measured step times (plain and default)."""
    a = check.args
    per_step = (check.step_s.get("plain", 0.0) + check.step_s.get("default", 0.0)) / 2 * 1.1
    return len(a.lrs) * (2 * a.steps * per_step + 2 * (0.5 if a.tiny else 4.0))


def stress_run(check: Check, method: str, lr: float) -> dict:
    """One training run, AdamW alone (``adamw``) or governed by ``default`` (``lbw``)."""
    import torch

    from lbw_policy import Guard
    from lbw_policy.decision_log import read_log
    from lbw_policy.demo.gpt import evaluate
    from lbw_policy.demo.train import TrainConfig, lr_lambda
    from lbw_policy.errors import TrainingHalted

    args, cfg, dev, amp = check.args, check.config, check.device, check.amp
    model, opt = make_model(cfg, dev, lr, seed=args.seed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(TrainConfig(
        steps=args.steps, warmup_steps=args.warmup_steps, min_lr_ratio=0.1)))
    run_dir = check.run_dir(f"stress-{method}-lr{lr:g}")
    guard = None
    if method == "lbw":
        guard = Guard(opt, str(_policy("default")), model=model, log_dir=run_dir)
    batches = DeviceBatches(check.train, args.batch, cfg.block_size, seed=args.seed + 100)
    losses = torch.full((args.steps,), float("nan"), device=dev)  # per-step losses stay on the device
    halted = None
    done = 0
    _sync(dev)
    t = time.perf_counter()
    try:
        for step in range(args.steps):
            loss, _ = train_step(model, opt, guard, batches, amp)
            losses[step] = loss.detach()  # device-to-device copy: no sync
            sched.step()
            done = step + 1
    except TrainingHalted as exc:
        halted = {"step": exc.step, "rule": exc.rule, "message": str(exc)}
    finally:
        _sync(dev)  # host-device sync: once, at the end of the run
        wall = time.perf_counter() - t
        summary = guard.close() if guard is not None else None
    host = losses.tolist()[:done]  # the one read of the per-step losses
    val_batches = check.corpus.fixed_batches("val", args.eval_batches, args.batch, cfg.block_size, seed=1234)
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
        val = evaluate(model, val_batches)
    tail = [v for v in host[-10:] if math.isfinite(v)]  # a gated NaN step leaves the model intact
    train = sum(tail) / len(tail) if tail else float("nan")
    ln_v = math.log(check.corpus.vocab_size)
    row = {"method": method, "lr": lr, "steps_run": done, "final_train_loss": _finite(train),
           "final_val_loss": _finite(val), "nonfinite_steps": sum(not math.isfinite(v) for v in host),
           "spikes": count_spikes(host), "wall_s": round(wall, 2), "halted": halted,
           "losses": [round(v, 4) if math.isfinite(v) else None for v in host]}
    row["diverged"] = not all(v is not None and v <= ln_v for v in (row["final_train_loss"], row["final_val_loss"]))
    if guard is not None:
        records = read_log(run_dir / "decisions.jsonl").records
        gated = gated_skips(records)
        row.update(run_dir=f"runs/{run_dir.name}", first_action_step=first_action_step(records),
                   skipped_steps=summary["skipped_steps"] + gated, skipped_on_host=summary["skipped_steps"],
                   skipped_on_device=gated, decisions_by_rule=summary["decisions_by_rule"],
                   transfer=_run_start(records).get("transfer"), gate=_run_start(records).get("gate"))
        # as `lbw-policy run` writes it: `lbw-policy verify` then also checks the record count and head
        (run_dir / "summary.json").write_text(json.dumps(dict(row, **summary), indent=1) + "\n", encoding="utf-8")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        row.update(run_dir=None, first_action_step=None, skipped_steps=0)
    return row


def section_stress(check: Check, res: dict) -> None:
    args = check.args
    res.update(vocab_size=check.corpus.vocab_size, ln_vocab=round(math.log(check.corpus.vocab_size), 4),
               spike_definition=f"a step t >= {SPIKE_WINDOW} whose loss is non-finite or more than {SPIKE_NATS} nat "
                                f"above the mean of the {SPIKE_WINDOW} losses before it (all finite)",
               train_loss_definition="mean of the finite losses of the last 10 steps",
               diverged_definition="final train loss or final validation loss non-finite or above ln V",
               runs=[])
    for lr in args.lrs:
        for method in ("adamw", "lbw"):
            est = _stress_estimate(check) / len(args.lrs) / 2
            if check.step_s and check.left() < est:
                res["runs"].append({"method": method, "lr": lr, "skipped": f"budget: {check.left():.0f} s left, "
                                                                          f"run needs ~{est:.0f} s"})
                res.update(status="partial", reason="budget: some runs skipped")
                check.log(f"stress {method} lr {lr:g}: skipped (budget)")
                continue
            try:
                row = stress_run(check, method, lr)
            except Exception as exc:
                row = {"method": method, "lr": lr, "error": f"{type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc()}
            res["runs"].append(row)
            _free()
            if "wall_s" in row and not check.step_s:
                check.step_s["plain"] = check.step_s["default"] = row["wall_s"] / max(1, row["steps_run"])
            check.log(f"stress {method} lr {lr:g}: " + (row.get("error") or
                      f"train {_fmt(row['final_train_loss'])}, val {_fmt(row['final_val_loss'])}, "
                      f"diverged {row['diverged']}, "
                      f"spikes {row['spikes']}, first action {row['first_action_step']}, "
                      f"skipped {row['skipped_steps']}, {row['wall_s']} s"))
            check.write()
    res["goals"] = _stress_goals(res["runs"])
    for g in res["goals"]:
        check.log(_goal_line(g))
    res["plot"] = _plot(check, res)


def _val(rows: list, method: str) -> dict:
    return {r["lr"]: r.get("final_val_loss") for r in rows if r["method"] == method and "final_val_loss" in r}


def _stress_goals(rows: list) -> list:
    adamw, lbw = _val(rows, "adamw"), _val(rows, "lbw")
    finite = {lr: v for lr, v in adamw.items() if v is not None}
    if not finite:
        return [_goal("AdamW has a finite run to compare with", None, bool)]
    best_lr = min(finite, key=finite.get)
    best = finite[best_lr]
    goals = []
    for lr, v in adamw.items():
        bad = next(r for r in rows if r["method"] == "adamw" and r["lr"] == lr)
        if (bad.get("diverged") or v is None or v > best + 1.0) and lr in lbw:
            g = lbw[lr]
            goals.append(_goal(f"lr {lr:g}: AdamW {v if v is None else round(v, 4)} (stressed); governed within "
                               f"0.15 nat of AdamW's best {best:.4f}", g, lambda x: x <= best + 0.15))
    if best_lr in lbw:
        goals.append(_goal(f"best AdamW lr {best_lr:g} ({best:.4f}): governed <= AdamW + 0.02", lbw[best_lr],
                           lambda x: x <= best + 0.02))
    return [dict(g, met=False) if g["value"] is None else g for g in goals]


def _plot(check: Check, res: dict) -> Optional[str]:
    """The timeline of the governed run at the highest LR where AdamW diverged, else where it
    ended worst."""
    adamw = [r for r in res["runs"] if r["method"] == "adamw" and "error" not in r and "skipped" not in r]
    governed = {r["lr"]: r for r in res["runs"] if r["method"] == "lbw" and r.get("run_dir")}
    pick = [r["lr"] for r in adamw if r["diverged"] and r["lr"] in governed]
    if pick:
        lr = max(pick)
    else:
        cands = [r for r in adamw if r["lr"] in governed]
        if not cands:
            return None
        lr = max(cands, key=lambda r: r["final_val_loss"] if r["final_val_loss"] is not None else math.inf)["lr"]
    from lbw_policy.plot import plot_run

    plot_run(check.runs / Path(governed[lr]["run_dir"]).name, check.out / "timeline.png",
             title=f"default policy, lr {lr:g} (most stressed)")
    check.log(f"timeline of the governed run at lr {lr:g}: timeline.png")
    return "timeline.png"


# ---------------------------------------------------------------------------- report
def _fmt(v, nd: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def markdown(results: dict) -> str:
    """``results.md``: correctness, overhead + memory and stress tables, goals, plot."""
    env = results.get("environment", {})
    s = results["sections"]
    out = [f"# GPU check ({env.get('device_name', env.get('device', '?'))}, torch {env.get('torch')}, "
           f"CUDA {env.get('cuda')})", "", f"Command: `{' '.join(results['command'])}`", "",
           f"Data: {results.get('data', {}).get('source', '-')}; wall {results.get('wall_s')} s; sections: "
           + ", ".join(f"{k} {v.get('status')} ({v.get('wall_s', '?')} s)" for k, v in s.items()), ""]
    if "setup_error" in results:
        out.append(f"- **setup failed**: {results['setup_error']['error']}")
    if results.get("runs_archive"):
        out.append(f"- run directories (runs/...): {results['runs_archive']}")
    for k, v in s.items():
        if v.get("status") in ("skipped", "error", "partial"):
            out.append(f"- **{k}** {v['status']}: {v.get('reason') or v.get('error')}")
    out += ["", "## Correctness", "", "| check | result | detail |", "|---|---|---|"]
    t = s.get("tests", {})
    if t.get("status") == "skipped":
        out.append(f"| gpu tests | skipped | {t.get('reason')} |")
    elif t:
        verdict = "ok" if t.get("returncode") == 0 else "FAILED"
        out.append(f"| gpu tests ({len(t.get('files', []))} files) | {verdict} | "
                   f"{t.get('passed', 0)} passed, {t.get('failed', 0)} failed, {t.get('skipped', 0)} skipped, "
                   f"{t.get('errors', 0)} errors (pytest.txt) |")
    sy = s.get("sync", {})
    if sy.get("status") == "skipped":
        out.append(f"| no-sync step | skipped | {sy.get('reason')} |")
    for c in sy.get("checks", []):
        detail = c.get("error") or "; ".join(
            f"step {x['step']}{' (all due)' if x['every_detector_due'] else ''}: {'ok' if x['ok'] else x['error']}"
            for x in c.get("checks", []))
        out.append(f"| no-sync step, {c['policy']} | {'ok' if c['ok'] else 'FAILED'} | {_cell(detail)} |")
    if "nan_gate" in sy:
        n = sy["nan_gate"]
        detail = n.get("error") or (f"sync: {n['sync_error'] or 'none'}; weights unchanged {n['weights_unchanged']}; "
                                    f"optimizer state unchanged {n['optimizer_state_unchanged']}; "
                                    f"nonfinite-skip records {n['nonfinite_skip_records']}")
        out.append(f"| NaN gradient gated on the device | {'ok' if n['ok'] else 'FAILED'} | {_cell(detail)} |")
    o = s.get("overhead", {})
    out += ["", "## Overhead and memory", ""]
    if "ratios" in o:
        out += [f"{_fmt(o.get('params'))} parameters; {o['rounds']} rounds of {o['block_steps']} steps per arm.", "",
                "| arm | steps/s (median) | ratio to plain (95 % CI) | peak memory GiB | memory ratio | first step s |",
                "|---|---|---|---|---|---|"]
        for arm in ARMS:
            m = o["memory"].get(arm, {})
            r = o["ratios"].get(arm)
            ratio = f"{r['median']:.3f} ({r['ci95'][0]} to {r['ci95'][1]})" if r else "1"
            peak = m.get("peak_bytes")
            gib = "-" if peak is None else f"{peak / 2**30:.2f}"
            out.append(f"| {arm} | {o['median_steps_per_s'][arm]:.2f} | {ratio} | {gib} | "
                       f"{_fmt(m.get('ratio', 1.0 if peak else None), 3)} | {_fmt(m.get('first_step_s'), 2)} |")
        out += [""] + [f"- {_goal_line(g)}" for g in o.get("goals", [])]
        if o.get("memory_note"):
            out.append(f"- {o['memory_note']}")
    else:
        out.append(f"not run: {o.get('reason') or o.get('error') or '-'}")
    st = s.get("stress", {})
    out += ["", "## Stress", ""]
    if st.get("runs"):
        out += [f"ln V = {st.get('ln_vocab')}. Train loss: {st.get('train_loss_definition')}. Spike: "
                f"{st.get('spike_definition')}. Diverged: {st.get('diverged_definition')}.", "",
                "| lr | method | train loss | val loss | diverged | spikes | first action step | skipped | wall s |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in st["runs"]:
            if "error" in r or "skipped" in r:
                out.append(f"| {r['lr']:g} | {r['method']} | {_cell(r.get('error') or r.get('skipped'))} |||||||")
                continue
            diverged = f"{r['diverged']}{' (halted)' if r.get('halted') else ''}"
            out.append(f"| {r['lr']:g} | {r['method']} | {_fmt(r['final_train_loss'])} | "
                       f"{_fmt(r['final_val_loss'])} | {diverged} | {r['spikes']} | "
                       f"{_fmt(r['first_action_step'])} | {r['skipped_steps']} | {r['wall_s']} |")
        out += [""] + [f"- {_goal_line(g)}" for g in st.get("goals", [])]
        out += ["", f"Timeline: {st.get('plot') or 'none'}"]
    else:
        out.append(f"not run: {st.get('reason') or st.get('error') or '-'}")
    return "\n".join(out) + "\n"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:400]


# ---------------------------------------------------------------------------- main
SECTIONS = {"tests": section_tests, "sync": section_sync, "overhead": section_overhead, "stress": section_stress}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (results.json, results.md, timeline.png, runs/)")
    p.add_argument("--runs-dir", default=None, help="where the guard's run directories go (default OUT/runs); "
                                                    "elsewhere, they are packed into OUT/runs.tar.gz")
    p.add_argument("--data", default=None, help="text file, or a folder of *.txt (e.g. ../shared/data/wikitext-2); "
                                                "default: the interpreter's standard library")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget of the whole check, s (default 420; tiny 120)")
    p.add_argument("--tiny", action="store_true", help="tiny model, few steps: a CPU smoke run in well under a minute")
    p.add_argument("--sections", default="tests,sync,overhead,stress", help="comma list of sections to run")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; tiny: 1)")
    p.add_argument("--lrs", default=None, help="peak learning rates of the stress grid (default 6e-4,6e-3,2e-2,6e-2)")
    p.add_argument("--steps", type=int, default=None, help="stress steps per run (default 300)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear LR warm-up steps (default 30), then cosine to 10 %%")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 8)")
    p.add_argument("--block-size", type=int, default=None, help="context, characters (default 1024)")
    p.add_argument("--n-layer", type=int, default=None, help="default 12 (GPT-2 small)")
    p.add_argument("--n-embd", type=int, default=None, help="default 768")
    p.add_argument("--n-head", type=int, default=None, help="default 12")
    p.add_argument("--eval-batches", type=int, default=None, help="validation batches at the end of a run (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overhead-s", type=float, default=None, help="target seconds of overhead rounds (default 100)")
    p.add_argument("--rounds", type=int, default=None, help="most overhead rounds (default 20; tiny 3)")
    p.add_argument("--block", type=int, default=None, help="steps per overhead block (default: the multiple of the "
                                                           "detectors' cadence cycle nearest --block-s; tiny 4)")
    p.add_argument("--block-s", type=float, default=1.0, help="target seconds per overhead block (default 1)")
    p.add_argument("--mem-steps", type=int, default=None, help="steps per arm in the memory phase (default 11)")
    p.add_argument("--tests-timeout", type=float, default=150.0, help="pytest subprocess timeout, s (default 150)")
    args = p.parse_args(argv)
    args.argv = argv
    full = dict(budget_s=420.0, lrs="6e-4,6e-3,2e-2,6e-2", steps=300, warmup_steps=30, batch=8, block_size=1024,
                n_layer=12, n_embd=768, n_head=12, eval_batches=10, overhead_s=100.0, rounds=20, mem_steps=11,
                block=0)
    tiny = dict(budget_s=120.0, lrs="3e-3,1e-1", steps=20, warmup_steps=3, batch=4, block_size=32, n_layer=2,
                n_embd=64, n_head=4, eval_batches=2, overhead_s=5.0, rounds=3, mem_steps=2, block=4, threads=1)
    for k, v in (tiny if args.tiny else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if isinstance(args.lrs, str):
        args.lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    args.sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    check = Check(args, torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    flush = check.device.type == "cpu" and torch.set_flush_denormal(True)
    if check.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        try:
            check.install_note = _ensure_importable()
            _environment(check)
            from lbw_policy.demo.gpt import GPT, GPTConfig

            check.corpus = _load_corpus(check)
            check.train = check.corpus.train.to(check.device)  # the train split lives on the device
            check.config = GPTConfig(vocab_size=check.corpus.vocab_size, block_size=args.block_size,
                                     n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
        except Exception as exc:  # nothing can run without data and a model config
            check.results["setup_error"] = {"error": f"{type(exc).__name__}: {exc}",
                                            "traceback": traceback.format_exc()}
            check.log(f"setup failed: {type(exc).__name__}: {exc}")
            return 2
        with torch.device("meta"):  # counted without allocating
            params = GPT(check.config).num_params()
        check.log(f"model: {params / 1e6:.1f} M parameters ({args.n_layer} layers, d {args.n_embd}, "
                  f"{args.n_head} heads, context {args.block_size}, vocab {check.config.vocab_size})")
        check.results["config"] = {"model": vars(check.config), "params": params, "batch": args.batch,
                                   "amp_bf16": check.amp,
                                   "optimizer": "AdamW(fused=True, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)"}
        for name in [n for n in SECTIONS if n in args.sections]:
            check.run_section(name, lambda res, fn=SECTIONS[name]: fn(check, res))
        failed = [k for k, v in check.results["sections"].items() if v["status"] == "error"]
        check.log(f"done in {time.monotonic() - check.t0:.0f} s; results in {check.out}/results.md"
                  + (f"; sections with errors: {failed}" if failed else ""))
        return 1 if failed else 0
    finally:
        check.write()
        check._log.close()
        if flush:
            torch.set_flush_denormal(False)


if __name__ == "__main__":
    sys.exit(main())
