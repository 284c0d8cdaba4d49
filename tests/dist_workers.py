"""Worker functions of tests/test_distributed.py, run in processes started by
``torch.multiprocessing.spawn`` (gloo on the CPU). Each writes what it saw to ``out/`` as JSON or
``torch.save`` files; the test process compares the ranks. Kept in a module of its own so that
spawned processes can import the functions by name."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

from lbw_policy import Guard
from lbw_policy.demo.train import leave_process_group
from lbw_policy.demo.gpt import GPT, GPTConfig
from lbw_policy.errors import ActuatorError, TrainingHalted

VOCAB, BLOCK, BATCH = 16, 16, 4
NAN_STEP = 12   # rank 1 reports a NaN loss
BAD = range(30, 33)  # rank 1's batches are random tokens (the others learn a pattern); after
                     # the loss detector's 25-step warm-up, so its z-score sees them

COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce",
               "broadcast", "reduce", "reduce_scatter", "reduce_scatter_tensor", "barrier",
               "all_to_all", "all_to_all_single", "gather", "scatter")


def init(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    # a short timeout: a test whose ranks fall out of step fails instead of hanging CI
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


@contextlib.contextmanager
def count_collectives():
    """Count calls of ``torch.distributed``'s collectives (the guard's reduction calls them
    through the module, so wrapping the module's functions sees every one)."""
    counts = {"n": 0}
    saved = {}
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue
        saved[name] = fn

        def wrapper(*a, _fn=fn, **k):
            counts["n"] += 1
            return _fn(*a, **k)

        setattr(dist, name, wrapper)
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def model_and_optimizer(lr: float, ddp: bool = True, fused: bool = False):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=1, n_head=2, n_embd=32))
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), fused=fused or None)
    return model, opt


def batch(rank: int, step: int):
    """A learnable pattern (tokens count up mod VOCAB from a random start), random tokens on
    rank 1's BAD steps."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    if rank == 1 and step in BAD:
        x = torch.randint(0, VOCAB, (BATCH, BLOCK + 1), generator=g)
    else:
        start = torch.randint(0, VOCAB, (BATCH, 1), generator=g)
        x = (start + torch.arange(BLOCK + 1)) % VOCAB
    return x[:, :-1], x[:, 1:]


def train(guard: Guard, model, opt, rank: int, steps: range, decisions: list) -> None:
    for step in steps:
        x, y = batch(rank, step)
        _, loss = model(x, y)
        loss.backward()
        reported = torch.tensor(math.nan) if (rank == 1 and step == NAN_STEP) else loss
        result = guard.step(reported)
        opt.zero_grad(set_to_none=True)
        decisions.append([(r.get("event"), r.get("rule"), r.get("step")) for r in result.decisions])


def flat_weights(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def ddp_fault(rank: int, world: int, out: Path, steps: int, alone: bool,
              transfer: str = "immediate") -> None:
    """DDP under the default policy at a high LR, with rank 1's faults; reduced (and, when
    ``alone``, also each rank governing alone). ``transfer: deferred`` uses fused AdamW, so the
    default's non-finite and spike skips run as the device gate, on the reduced signals."""
    result = {}
    modes = ("reduced", "alone") if alone else ("reduced",)
    for mode in modes:
        model, opt = model_and_optimizer(lr=3e-2, fused=transfer == "deferred")
        log_dir = out / mode if mode == "reduced" else out / f"{mode}-r{rank}"
        guard = Guard(opt, "default", model=model, log_dir=log_dir, transfer=transfer,
                      distributed="auto" if mode == "reduced" else False)
        decisions: list = []
        with count_collectives() as counts:
            train(guard, model, opt, rank, range(steps), decisions)
        guard.close()
        result[mode] = {"decisions": decisions, "collectives": counts["n"],
                        "lr": opt.param_groups[0]["lr"], "gate": guard.gate_mode}
        torch.save(flat_weights(model), out / f"{mode}-weights-r{rank}.pt")
    (out / f"result-r{rank}.json").write_text(json.dumps(result))


HALT_POLICY = """\
apiVersion: lbw-policy/v1
kind: Policy
metadata: {{name: dist-halt, owner: tests}}
mode: enforce
on_error: {on_error}
detectors:
  nan: {{type: nonfinite}}
  gnorm: {{type: grad_norm, params: {{warmup: 3}}}}
  bad: {{type: {bad_type}}}
actuators:
  skip_step: {{max_consecutive: 5}}
  halt: {{}}
rules:
  - name: nan-halt
    when: {{signal: nan.loss, op: ">", value: 0}}
    then: [{{actuator: halt}}]
"""


def halt_and_fault(rank: int, world: int, out: Path) -> None:
    """Rank 1 reports NaN at NAN_STEP (a halt on every rank) and its ``bad`` detector raises at
    step 3 (``on_error: skip_step``, contained on every rank)."""
    import dist_plugins

    policy_path = out / "halt.yaml"
    if rank == 0:
        policy_path.write_text(HALT_POLICY.format(on_error="skip_step", bad_type="rank_fault"))
    dist.barrier()
    model, opt = model_and_optimizer(lr=1e-2)
    guard = Guard(opt, str(policy_path), model=model, log_dir=out / "run",
                  registry=dist_plugins.registry())
    decisions: list = []
    halted = None
    try:
        train(guard, model, opt, rank, range(NAN_STEP + 5), decisions)
    except TrainingHalted as exc:
        halted = {"step": exc.step, "rule": exc.rule}
    torch.save(flat_weights(model), out / f"halt-weights-r{rank}.pt")
    (out / f"halt-r{rank}.json").write_text(json.dumps({"halted": halted, "decisions": decisions}))


def resume(rank: int, world: int, out: Path, steps: int) -> None:
    """Uninterrupted vs. stopped at steps // 2, saved per rank and resumed: same decisions,
    bitwise-equal weights."""
    whole: list = []
    model, opt = model_and_optimizer(lr=3e-2)
    guard = Guard(opt, "default", model=model, log_dir=out / "whole")
    train(guard, model, opt, rank, range(steps), whole)
    guard.close()
    torch.save(flat_weights(model), out / f"whole-r{rank}.pt")

    half = steps // 2
    first: list = []
    model, opt = model_and_optimizer(lr=3e-2)
    guard = Guard(opt, "default", model=model, log_dir=out / "split")
    train(guard, model, opt, rank, range(half), first)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "guard": guard.state_dict()},
               out / f"ckpt-r{rank}.pt")
    guard.close()
    del model, opt, guard
    state = torch.load(out / f"ckpt-r{rank}.pt", weights_only=False)
    model, opt = model_and_optimizer(lr=3e-2)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    guard = Guard(opt, "default", model=model, log_dir=out / "split", resume=True)
    guard.load_state_dict(state["guard"])
    second: list = []
    train(guard, model, opt, rank, range(half, steps), second)
    guard.close()
    torch.save(flat_weights(model), out / f"split-r{rank}.pt")
    (out / f"resume-r{rank}.json").write_text(json.dumps({"whole": whole, "split": first + second}))


GNORM_POLICY = """\
apiVersion: lbw-policy/v1
kind: Policy
metadata: {name: dist-gnorm, owner: tests}
mode: enforce
detectors:
  gnorm: {type: grad_norm}
  nan: {type: nonfinite}
actuators:
  skip_step: {}
rules:
  - name: nan-skip
    when: {signal: nan.any, op: ">", value: 0}
    then: [{actuator: skip_step}]
"""


def fsdp_grad_norm(rank: int, world: int, out: Path) -> None:
    """FSDP2 (fully_shard) on gloo: the guard's grad norm is the whole model's; a detector that
    needs whole weights, and grad_normalize (per-tensor norms), are refused at Guard()."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if rank == 0:
        (out / "gnorm.yaml").write_text(GNORM_POLICY)
        (out / "agn.yaml").write_text(GNORM_POLICY.replace("  skip_step: {}\n",
                                                           "  skip_step: {}\n  grad_normalize: {}\n"))
    dist.barrier()
    mesh = init_device_mesh("cpu", (world,))
    reference, _ = model_and_optimizer(lr=1e-3, ddp=False)  # the same init, unsharded
    model, _ = model_and_optimizer(lr=1e-3, ddp=False)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    norms, refs = [], []
    guard = Guard(opt, str(out / "gnorm.yaml"), model=model, log_dir=out / "fsdp")
    for step in range(3):
        x, y = batch(rank, step)
        _, loss = model(x, y)
        loss.backward()
        result = guard.step(loss)
        norms.append(result.signals["gnorm.norm"])
        opt.zero_grad(set_to_none=True)
        # the unsharded model's gradient of the mean loss over every rank's batch (what FSDP's
        # averaged gradients are); it takes the same optimizer steps below
        reference.zero_grad(set_to_none=True)
        total = sum(reference(*batch(r, step))[1] for r in range(world)) / world
        total.backward()
        refs.append(float(torch.nn.utils.get_total_norm(
            [p.grad for p in reference.parameters() if p.grad is not None])))
        ref_opt = getattr(reference, "_opt", None) or torch.optim.AdamW(reference.parameters(), lr=1e-3)
        reference._opt = ref_opt
        ref_opt.step()
    guard.close()
    refused = None
    try:
        Guard(opt, "default", model=model, log_dir=out / "refused")
    except ValueError as exc:
        refused = str(exc)
    agn_refused = None
    try:
        Guard(opt, str(out / "agn.yaml"), model=model, log_dir=out / "agn")
    except ValueError as exc:
        agn_refused = str(exc)
    # without a distributed guard the actuator refuses by itself at attach
    from lbw_policy.actuators import GradNormalize
    try:
        GradNormalize().attach(opt)
    except ActuatorError as exc:
        agn_refused = f"{agn_refused} | {exc}"
    (out / f"fsdp-r{rank}.json").write_text(json.dumps({"norms": norms, "refs": refs,
                                                        "refused": refused,
                                                        "agn_refused": agn_refused}))


def construction(rank: int, world: int, out: Path) -> None:
    """Rank 1 cannot load its policy, then rank 0 cannot open its run directory (a file stands
    where it should be): both times every rank's Guard() raises (none waits in a collective)."""
    model, opt = model_and_optimizer(lr=1e-2)
    errors = []
    if rank == 0:
        (out / "not-a-dir").write_text("x")
    dist.barrier()
    for policy, log_dir in ((str(out / "missing.yaml") if rank == 1 else "default", out / "run"),
                            ("default", out / "not-a-dir" / "run")):
        try:
            Guard(opt, policy, model=model, log_dir=log_dir)
            errors.append(None)
        except Exception as exc:  # noqa: BLE001 - the test compares the errors
            errors.append(f"{type(exc).__name__}: {exc}")
    (out / f"construction-r{rank}.json").write_text(json.dumps({"errors": errors}))


def scaler_nan(rank: int, world: int, out: Path) -> None:
    """GradScaler over DDP: rank 1's loss is NaN at step 4, so every rank's averaged gradients
    hold NaN (found_inf everywhere) but only rank 1's loss is non-finite. Every rank must take
    the same path (a governed step that is never taken, not the scaler's skip on rank 0 only)."""
    from lbw_policy.integrations import GuardedOptimizer

    model, inner = model_and_optimizer(lr=1e-2)
    opt = GuardedOptimizer(inner, "default", model=model, log_dir=out / "run")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    steps = []
    for step in range(8):
        x, y = batch(rank, step)
        _, loss = model(x, y)
        if rank == 1 and step == 4:
            loss = loss * float("nan")
        scaler.scale(loss).backward()
        opt.observe_loss(loss)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        steps.append([opt.last_result.skipped,
                      [[r.get("event"), r.get("rule")] for r in opt.last_result.decisions]])
    opt.close()
    torch.save(flat_weights(model), out / f"scaler-weights-r{rank}.pt")
    (out / f"scaler-r{rank}.json").write_text(json.dumps(steps))


SCENARIOS = {"scaler_nan": scaler_nan, "construction": construction, "ddp_fault": ddp_fault, "halt_and_fault": halt_and_fault, "resume": resume,
             "fsdp_grad_norm": fsdp_grad_norm}


def run_scenarios(rank: int, world: int, store: str, out: str, scenarios: list) -> None:
    """One process group for several scenarios (process start-up is the slow part): each
    ``(name, kwargs)`` writes into ``out/<name>/``."""
    init(rank, world, store)
    for name, kwargs in scenarios:
        where = Path(out) / name
        if rank == 0:
            where.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        SCENARIOS[name](rank, world, where, **kwargs)
        dist.barrier()
    leave_process_group()       # gc, destroy, exit 0 without the finalization that can abort


def spawn(world: int, out: str, scenarios: list) -> None:
    """Run :func:`run_scenarios` on ``world`` processes (gloo); raise if any fails."""
    import tempfile

    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        mp.spawn(run_scenarios, args=(world, store, out, scenarios), nprocs=world, join=True)
