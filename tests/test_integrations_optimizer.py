"""GuardedOptimizer: a real torch.optim.Optimizer over a Guard; GradScaler (forced fp16
overflows on the CPU), bf16 autocast, gradient accumulation, clipping order and schedulers with
the default policy."""

from __future__ import annotations

import math

import pytest
import torch

from integration_helpers import batches, corpus, decisions, demo_gpt, events
from lbw_policy.decision_log import verify_log
from lbw_policy.adapters.guard import Guard
from lbw_policy.integrations.optimizer import GuardedOptimizer


@pytest.fixture(scope="module")
def chars():
    return corpus()


def _guarded(model, tmp_path, name="run", lr=1e-3, policy="default", **kw):
    inner = torch.optim.AdamW(model.parameters(), lr=lr)
    return inner, GuardedOptimizer(inner, policy, model=model, log_dir=tmp_path / name, **kw)


def test_is_an_optimizer_sharing_the_inner_objects_and_state_dict(chars, tmp_path):
    model = demo_gpt(chars.vocab_size)
    inner, opt = _guarded(model, tmp_path)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    assert opt.defaults is inner.defaults
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for x, y in batches(chars, 3):
        _, loss = model(x, y)
        loss.backward()
        opt.step(loss=loss)
        sched.step()
        opt.zero_grad()
    assert inner.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 ** 3)  # the scheduler's dicts
    assert opt.guard.step_count == 3 and int(inner.state[next(iter(inner.state))]["step"]) == 3
    sd = opt.state_dict()  # torch-shaped: loads into a bare AdamW
    assert set(sd) == {"state", "param_groups"}
    bare = torch.optim.AdamW(demo_gpt(chars.vocab_size).parameters(), lr=1e-3)
    bare.load_state_dict(sd)
    assert {int(st["step"]) for st in bare.state.values()} == {3}
    opt.load_state_dict(sd)
    assert opt.param_groups is inner.param_groups
    with pytest.raises(ValueError, match="no loss for the guard"):
        opt.step()
    with pytest.raises(TypeError, match="not guarded yet"):
        GuardedOptimizer(opt)
    opt.close()


def test_closure_gives_the_loss_and_runs_first(chars, tmp_path):
    model = demo_gpt(chars.vocab_size)
    _, opt = _guarded(model, tmp_path)
    x, y = batches(chars, 1)[0]

    def closure():
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        return loss

    out = opt.step(closure)
    assert opt.last_result.loss == pytest.approx(float(out.detach()))
    opt.close()


def _amp_run(chars, tmp_path, name, steps=14, nan_at=None):
    model = demo_gpt(chars.vocab_size)
    _, opt = _guarded(model, tmp_path, name, lr=3e-3)
    # init_scale 2**24: the fp16 backward overflows for the first steps (the case)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24)
    results, det_states = [], []
    for s, (x, y) in enumerate(batches(chars, steps)):
        with torch.autocast("cpu", dtype=torch.float16):
            _, loss = model(x, y)
        if s == nan_at:
            loss = loss * float("nan")
        scaler.scale(loss).backward()
        opt.observe_loss(loss)
        before = {k: d.state_dict() for k, d in opt.guard.detectors.items()}
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        results.append(opt.last_result)
        det_states.append((before, {k: d.state_dict() for k, d in opt.guard.detectors.items()}))
    opt.close()
    return model, opt, results, det_states


def test_gradscaler_overflow_is_a_scaler_skip_not_a_fault(chars, tmp_path):
    _, opt, results, det_states = _amp_run(chars, tmp_path, "amp")
    skipped = [r.step for r in results if r.skipped]
    overflows = events(tmp_path / "amp", "scaler_skipped")
    assert len(overflows) >= 3 and [r["step"] for r in overflows] == skipped  # real overflows
    assert skipped == list(range(len(skipped)))  # the first steps, until the scale came down
    for r in overflows:
        assert r["rule"] is None and "actions" not in r
    for s in skipped:  # no detector statistic was updated with an overflowed step
        assert det_states[s][0] == det_states[s][1]
    # no rule read the overflow: nothing non-finite, no halt, no brake
    assert not [r for r in decisions(tmp_path / "amp") if "nonfinite" in str(r.get("rule"))]
    assert opt.guard.summary()["decisions_by_event"]["scaler_skipped"] == len(skipped)
    # the governed steps saw unscaled gradients: a grad norm of a few units, not ~2**20
    first = results[len(skipped)]
    assert 0 < first.signals["gnorm.norm"] < 100
    assert verify_log(tmp_path / "amp" / "decisions.jsonl").ok


def test_a_real_nan_loss_under_the_scaler_still_fires(chars, tmp_path):
    model, _, results, _ = _amp_run(chars, tmp_path, "nan", steps=12, nan_at=10)
    fired = [r for r in decisions(tmp_path / "nan") if r["event"] == "fired"]
    assert {"nonfinite-skip", "nonfinite-brake"} <= {r["rule"] for r in fired if r["step"] == 10}
    assert results[10].skipped and not events(tmp_path / "nan", "scaler_skipped")[-1]["step"] == 10
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_nan_loss_in_audit_mode_is_logged_and_never_stepped(chars, tmp_path):
    """Audit mode changes nothing, but a step whose gradients hold inf/NaN (found_inf) is
    still not taken: the scaler's contract."""
    from lbw_policy.policy import resolve_policy_path

    model = demo_gpt(chars.vocab_size)
    _, opt = _guarded(model, tmp_path, "audit", policy=resolve_policy_path("audit-only"))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for s, (x, y) in enumerate(batches(chars, 4)):
        _, loss = model(x, y)
        if s == 3:
            loss = loss * float("nan")
        before = [p.detach().clone() for p in model.parameters()]
        scaler.scale(loss).backward()
        opt.observe_loss(loss)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert opt.last_result.skipped and opt.guard.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.close()


def test_bf16_autocast_needs_nothing(chars, tmp_path):
    model = demo_gpt(chars.vocab_size)
    _, opt = _guarded(model, tmp_path, "bf16", lr=1e-3)
    for x, y in batches(chars, 12):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        opt.step(loss=loss)
        opt.zero_grad()
        assert math.isfinite(opt.last_result.loss) and not opt.last_result.skipped
    assert all(math.isfinite(v) for v in opt.last_result.signals.values() if v is not None)
    assert not [r for r in decisions(tmp_path / "bf16") if "nonfinite" in str(r.get("rule"))]
    opt.close()


def test_accumulation_is_one_guard_step_on_the_mean_micro_batch_loss(chars, tmp_path):
    model = demo_gpt(chars.vocab_size)
    inner, opt = _guarded(model, tmp_path, "acc")
    micro = []
    for i, (x, y) in enumerate(batches(chars, 12)):
        _, loss = model(x, y)
        (loss / 4).backward()
        opt.observe_loss(loss)
        micro.append(float(loss.detach()))
        if i % 4 == 3:
            opt.step()
            opt.zero_grad()
            assert opt.last_result.loss == pytest.approx(sum(micro[-4:]) / 4, rel=1e-6)
    assert opt.guard.step_count == 3
    assert int(inner.state[next(iter(inner.state))]["step"]) == 3
    opt.close()


def test_guard_clips_after_the_detectors_read_the_unclipped_norm(chars, tmp_path):
    """The issue's foot-gun: clip_grad_norm_ before guard.step hid a x50 spike. With the guard's
    clip, grad_norm sees the spike (the step is skipped) and clean steps are still clipped."""
    model = demo_gpt(chars.vocab_size)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seen = []
    inner.register_step_pre_hook(lambda o, a, k: seen.append(float(torch.nn.utils.get_total_norm(
        [p.grad for p in model.parameters() if p.grad is not None]))))
    guard = Guard(inner, "default", model=model, log_dir=tmp_path / "clip", clip_grad_norm=0.5)
    for s, (x, y) in enumerate(batches(chars, 40)):
        _, loss = model(x, y)
        (loss * (50.0 if s == 35 else 1.0)).backward()
        result = guard.step(loss)
        inner.zero_grad()
        if s == 35:
            assert result.signals["gnorm.ratio"] > 8 and result.skipped
    assert max(seen) <= 0.5 + 1e-4  # every step the optimizer took was clipped
    assert len(seen) == 39
    with pytest.raises(ValueError, match="clip_grad_norm"):
        Guard(inner, "default", log_dir=tmp_path / "bad", clip_grad_norm=0)
    guard.close()


def _schedule_run(chars, tmp_path, name, make_sched, steps=60, fault=None, plateau=False):
    model = demo_gpt(chars.vocab_size)
    # ReduceLROnPlateau has no warm-up: start it where Adam's first steps stay below 6%
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3 if plateau else 3e-3)
    guard = Guard(inner, "default", model=model, log_dir=tmp_path / name)
    sched = make_sched(inner)
    effective = []
    for s, (x, y) in enumerate(batches(chars, steps, batch=4)):
        _, loss = model(x, y)
        loss.backward()
        scheduled = inner.param_groups[0]["lr"]
        if fault is not None and s in fault:  # a config / scheduler fault: 30x for a few steps
            for group in inner.param_groups:
                group["lr"] = scheduled * 30
        result = guard.step(loss)
        if fault is not None and s in fault:
            for group in inner.param_groups:
                group["lr"] = scheduled
        effective.append((scheduled, result.lr))
        inner.zero_grad()
        sched.step(loss.item()) if plateau else sched.step()
    guard.close()
    return effective, decisions(tmp_path / name)


def _warmup(kind, warm=15, total=60):
    def f(s):
        if s < warm:
            return (s + 1) / warm
        p = (s - warm) / (total - warm)
        if kind == "linear":
            return 1 - 0.9 * p
        if kind == "cosine":
            return 0.1 + 0.45 * (1 + math.cos(math.pi * p))
        return 1.0 if p < 0.7 else 1 - (p - 0.7) / 0.3 * 0.9  # warm-up-stable-decay
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, f)


SCHEDULES = {
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=60),
    "linear-warmup": _warmup("linear"),
    "cosine-warmup": _warmup("cosine"),
    "wsd": _warmup("wsd"),
    "plateau": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=2, factor=0.5),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_default_policy_does_not_fight_common_schedules(chars, tmp_path, name):
    effective, recs = _schedule_run(chars, tmp_path, name, SCHEDULES[name], plateau=name == "plateau")
    assert recs == []  # no decision at all on a clean run
    assert all(sched == eff for sched, eff in effective)


@pytest.mark.parametrize("name", ["onecycle", "cosine-warmup"])
def test_an_lr_x30_fault_is_still_capped(chars, tmp_path, name):
    fault = range(8, 11) if name == "onecycle" else range(40, 43)  # inside the warm-up / decay
    effective, recs = _schedule_run(chars, tmp_path, name, SCHEDULES[name], fault=fault)
    capped = [r["step"] for r in recs if r["rule"] == "lr-jump-cap" and r["event"] in ("fired", "action")]
    assert sorted(set(capped)) == list(fault)
    for s in fault:
        scheduled, eff = effective[s]
        assert eff <= 2 * scheduled  # capped at the recent rate (the median in a decay), not 30x
