"""Optimizer-side detectors (update_ratio, adam_update_stats) against numpy references and the
optimizer's own step, and the detectors inside a Guard (after_step, resume, early-warning)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from lbw_policy.adapters.guard import Guard
from lbw_policy.demo.gpt import GPT, GPTConfig
from lbw_policy.detectors import AdamUpdateStats, UpdateRatio
from lbw_policy.policy import load_policy, resolve_policy_path
from lbw_policy.telemetry import Telemetry


def _net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    with torch.no_grad():
        net[0].bias.fill_(0.3)
        net[2].bias.fill_(-0.2)
    return net


def _backward(net, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
    net.zero_grad()
    loss = ((net(x) - y) ** 2).mean()
    loss.backward()
    return loss


def _weights(net):
    return [p.detach().double().numpy().copy() for p in net.parameters()]


# ----------------------------------------------------------------------------- update_ratio

@pytest.mark.parametrize("matrices_only", [True, False])
def test_update_ratio_matches_numpy_per_group(matrices_only):
    net = _net()
    opt = torch.optim.SGD([{"params": [net[0].weight, net[0].bias], "lr": 0.5},
                           {"params": [net[2].weight, net[2].bias], "lr": 0.05}])
    det = UpdateRatio(groups=2, matrices_only=matrices_only)
    det.setup(net, opt)
    loss = _backward(net, 0)
    tel = Telemetry(0, loss, opt)
    assert det.compute(tel) == {}               # first evaluation: nothing measured yet
    before = _weights(net)
    opt.step()
    det.after_step(tel, True)
    after = _weights(net)
    loss = _backward(net, 1)
    out = det.compute(Telemetry(1, loss, opt))

    keep = [i for i, w in enumerate(before) if w.ndim >= 2 or not matrices_only]
    d = {i: np.linalg.norm(after[i] - before[i]) for i in keep}
    w = {i: np.linalg.norm(before[i]) for i in keep}
    per = {i: d[i] / w[i] for i in keep}
    glob = lambda ids: math.sqrt(sum(d[i] ** 2 for i in ids)) / math.sqrt(sum(w[i] ** 2 for i in ids))  # noqa: E731
    assert float(out["ratio"]) == pytest.approx(glob(keep), rel=1e-6)
    assert float(out["max"]) == pytest.approx(max(per.values()), rel=1e-6)
    assert float(out["worst"]) == max(per, key=per.get)
    count = sum(before[i].size for i in keep)          # rms: in the weights' units, not relative
    assert float(out["rms"]) == pytest.approx(math.sqrt(sum(d[i] ** 2 for i in keep) / count), rel=1e-6)
    for g, ids in ((0, [0, 1]), (1, [2, 3])):
        ids = [i for i in ids if i in keep]
        assert float(out[f"group{g}.ratio"]) == pytest.approx(glob(ids), rel=1e-6)
        assert float(out[f"group{g}.max"]) == pytest.approx(max(per[i] for i in ids), rel=1e-6)


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
def test_update_ratio_rms_per_lr_divides_each_group_by_its_learning_rate(lr_kind):
    """rms_per_lr is the update's RMS per unit of learning rate, each tensor divided by its own
    group's lr (plain SGD: the RMS of the measured gradients, whatever the lrs); a group at lr 0
    is left out (its tensors do not move and do not count); all at 0: rms_per_lr is NaN."""
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    torch.manual_seed(3)
    lr = (lambda v: torch.tensor(v)) if lr_kind == "tensor" else float
    opt = torch.optim.SGD([{"params": [net[0].weight, net[0].bias], "lr": lr(0.5)},
                           {"params": [net[2].weight], "lr": lr(0.02)},
                           {"params": [net[4].weight, net[4].bias], "lr": lr(0.0)}])
    det = UpdateRatio(groups=3)
    det.setup(net, opt)
    for step, zero_all in ((0, False), (1, True)):
        tel = Telemetry(step, _backward(net, step), opt)
        det.compute(tel)
        grads = [net[0].weight.grad.double(), net[2].weight.grad.double()]
        if zero_all:
            for group in opt.param_groups:
                group["lr"] = lr(0.0)
        opt.step()
        det.after_step(tel, True)
        out = det.compute(Telemetry(step + 1, _backward(net, step + 1), opt))
        if not zero_all:
            ref = math.sqrt(sum(float((g * g).sum()) for g in grads) / sum(g.numel() for g in grads))
            assert float(out["rms_per_lr"]) == pytest.approx(ref, rel=1e-5)
            moved = math.sqrt((0.5 ** 2 * float((grads[0] ** 2).sum()) + 0.02 ** 2 * float((grads[1] ** 2).sum()))
                              / (30 + 20 + 12))                 # rms counts every measured tensor
            assert float(out["rms"]) == pytest.approx(moved, rel=1e-5)
        else:
            assert math.isnan(float(out["rms_per_lr"])) and float(out["ratio"]) == 0.0   # no value


def test_update_ratio_rms_mup_is_rms_times_the_width_inferred_or_given():
    """rms_mup = rms x width; the width is the most frequent size among the measured matrices'
    last two dims (ties: the smaller), or the ``width`` param; no matrix and no param: NaN."""
    from lbw_policy.detectors.update_ratio import infer_width

    assert infer_width([(5, 6), (3, 5)]) == 5                     # _net's two matrices
    assert infer_width([(6, 4), (4, 6)]) == 4                     # a tie: the smaller
    assert infer_width([(7,), (2, 3, 9, 9)]) == 2                 # 1-d left out; channels, not the kernel
    assert infer_width([(64, 64, 3, 3), (128, 64, 3, 3), (128, 128, 1, 1)]) == 64   # a small CNN's channels
    assert infer_width([(7,)]) is None and infer_width([]) is None
    # a transformer's hidden size, whichever way its matrices are stored (HF Conv1D: (in, out))
    cfg = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=4, n_embd=48)
    assert infer_width([p.shape for p in GPT(cfg).parameters()]) == 48
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=100, n_positions=16, n_embd=40,
                                                                n_layer=2, n_head=4))
    assert infer_width([p.shape for p in gpt2.parameters()]) == 40

    for width, expect in ((None, 5), (64, 64)):
        net = _net(2)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        det = UpdateRatio(**({} if width is None else {"width": width}))
        det.setup(net, opt)
        tel = Telemetry(0, _backward(net, 0), opt)
        det.compute(tel)
        opt.step()
        det.after_step(tel, True)
        out = det.compute(Telemetry(1, _backward(net, 1), opt))
        assert float(out["width"]) == expect
        assert float(out["rms_mup"]) == pytest.approx(float(out["rms"]) * expect, rel=1e-12)
        assert float(out["rms"]) > 0
    for width in (None, 4):                                       # only 1-d tensors measured
        det = UpdateRatio(matrices_only=False, **({} if width is None else {"width": width}))
        vec = nn.Parameter(torch.ones(4))
        opt = torch.optim.SGD([vec], lr=0.1)
        if width is None:                                         # nothing to infer it from: said
            with pytest.warns(UserWarning, match="no weight matrix to infer the width from"):
                det.setup(None, opt)
        else:
            det.setup(None, opt)
        vec.grad = torch.ones(4)
        tel = Telemetry(0, torch.tensor(1.0), opt)
        det.compute(tel)
        opt.step()
        det.after_step(tel, True)
        out = det.compute(Telemetry(1, torch.tensor(1.0), opt))
        assert float(out["rms"]) == pytest.approx(0.1)
        if width is None:                                         # nothing to infer it from
            assert math.isnan(float(out["rms_mup"])) and math.isnan(float(out["width"]))
        else:
            assert float(out["rms_mup"]) == pytest.approx(0.4) and float(out["width"]) == 4
    for bad in (0, -3, 2.5, True, "128"):
        with pytest.raises(ValueError, match="width must be an integer >= 1"):
            UpdateRatio(width=bad)
    import jsonschema

    jsonschema.validate({"width": 256}, UpdateRatio.params_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"width": 0}, UpdateRatio.params_schema)


def test_update_ratio_skipped_step_is_zero_and_without_after_step_measures_since_the_copy():
    net = _net(1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    det = UpdateRatio()
    tel = Telemetry(0, _backward(net, 0), opt)
    det.compute(tel)
    det.after_step(tel, False)                  # skipped: the weights did not move
    out = det.compute(Telemetry(1, _backward(net, 1), opt))
    assert float(out["ratio"]) == 0.0 and float(out["group0.ratio"]) == 0.0
    before = _weights(net)
    mats = [net[0].weight.grad.double(), net[2].weight.grad.double()]
    opt.step()
    opt.step()                                  # two steps, no after_step in between
    after = _weights(net)
    out = det.compute(Telemetry(2, _backward(net, 2), opt))
    ref = math.sqrt(sum(np.linalg.norm(after[i] - before[i]) ** 2 for i in (0, 2))) / \
        math.sqrt(sum(np.linalg.norm(before[i]) ** 2 for i in (0, 2)))
    assert float(out["ratio"]) == pytest.approx(ref, rel=1e-6)
    # rms_per_lr divides the change since the copy (2 steps of 0.1 x the same gradients) by the
    # lr in force now: twice the gradients' RMS
    grad_rms = math.sqrt(sum(float((g * g).sum()) for g in mats) / sum(g.numel() for g in mats))
    assert float(out["rms_per_lr"]) == pytest.approx(2 * grad_rms, rel=1e-5)
    with pytest.raises(ValueError, match=r"params\.groups is 2 but the optimizer has 1 parameter group"):
        UpdateRatio(groups=2).setup(net, opt)


@pytest.mark.parametrize("dtypes", [(torch.float64,), (torch.bfloat16,), (torch.float64, torch.bfloat16),
                                    (torch.float32, torch.float16), (torch.float32, torch.float64)])
def test_update_ratio_any_weight_dtype_matches_numpy(dtypes):
    """One foreach reduction for float32/half and for float64 weights, one by one for a mix."""
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(4, 5).to(dtypes[i % len(dtypes)])) for i in range(3)]
    opt = torch.optim.SGD(ps, lr=0.1)
    det = UpdateRatio()
    det.setup(None, opt)
    for p in ps:
        p.grad = torch.randn(4, 5).to(p.dtype)
    tel = Telemetry(0, torch.tensor(1.0), opt)
    det.compute(tel)
    before = [p.detach().double().numpy().copy() for p in ps]
    opt.step()
    det.after_step(tel, True)
    after = [p.detach().double().numpy() for p in ps]
    out = det.compute(Telemetry(1, torch.tensor(1.0), opt))
    ref = math.sqrt(sum(np.linalg.norm(a - b) ** 2 for a, b in zip(after, before))) / \
        math.sqrt(sum(np.linalg.norm(b) ** 2 for b in before))
    half = bool(set(dtypes) & {torch.float16, torch.bfloat16})   # the change itself is rounded
    rel = 2e-2 if half else 1e-12 if set(dtypes) == {torch.float64} else 1e-6
    assert float(out["ratio"]) == pytest.approx(ref, rel=rel)


def test_update_ratio_reuses_its_copy_and_follows_new_parameters():
    net = _net(3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    det = UpdateRatio(groups=2)
    for step in range(2):
        tel = Telemetry(step, _backward(net, step), opt)
        det.compute(tel)
        buffers = det._layout[1]
        if step == 0:
            first = [b.data_ptr() for b in buffers]
        opt.step()
        det.after_step(tel, True)
    assert [b.data_ptr() for b in buffers] == first       # no allocation per step
    extra = nn.Parameter(torch.ones(2, 2))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    extra.grad = torch.ones(2, 2)
    tel = Telemetry(2, _backward(net, 2), opt)
    det.compute(tel)
    opt.step()
    det.after_step(tel, True)
    out = det.compute(Telemetry(3, _backward(net, 3), opt))
    assert len(det._layout[1]) == 3                        # the new matrix is measured
    assert float(out["group1.ratio"]) == pytest.approx(0.5 / 1.0, rel=1e-6)  # ||-0.5*1|| / ||1||
    assert float(out["group1.max"]) == pytest.approx(0.5, rel=1e-6)
    assert float(out["worst"]) == 4.0                     # its index in parameter order


def test_update_ratio_trend_is_theil_sen_and_mann_kendall_of_ln_ratio_and_ln_wnorm():
    """The trend signals equal scipy's Theil-Sen slope and the Mann-Kendall test of ln(ratio)
    and ln(wnorm) against the step; a skipped step's ratio (0) and steps before trend_start are
    not entered; wnorm is the weight matrices' norm before the step; the windows survive a
    state_dict round trip."""
    stats = pytest.importorskip("scipy.stats")
    net = _net(2)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    det = UpdateRatio(trend_window=6, trend_min_points=4, trend_start=2)
    assert set(UpdateRatio.signals_for({"trend_window": 6})) >= {"trend_slope", "trend_growth", "trend_p"}
    assert "trend_p" not in UpdateRatio.signals_for({})
    det.setup(net, opt)
    lrs = [0.01, 0.01, 0.01, 0.012, 0.015, 0.02, 0.0, 0.03, 0.045, 0.07, 0.1]   # 0.0: a skipped step
    seen, wseen, norms, grad_rms, out = [], [], [], [], {}
    for step, lr in enumerate(lrs):
        tel = Telemetry(step, _backward(net, step), opt)
        out = det.compute(tel)
        if step >= 1 and step - 1 >= 2 and lrs[step - 1] > 0:
            seen.append((step - 1, math.log(float(out["ratio"]))))
        if step >= 1 and step - 1 >= 2:
            wseen.append((step - 1, math.log(float(out["wnorm"]))))
        if step == len(lrs) - 1:                # the windows that made the last signals
            in_window = [sorted(r.steps[r.valid].tolist()) for r in (det.trend, det.wnorm_trend, det.rms_per_lr_trend)]
        if step == 4:                           # 2 ratios entered (steps 2, 3): still warming up
            assert float(out["trend_slope"]) == 0.0 and float(out["trend_p"]) == 1.0
        norms.append(math.sqrt(sum(float(p.detach().double().norm()) ** 2
                                   for p in net.parameters() if p.dim() >= 2)))
        mats = [p.grad.double() for p in net.parameters() if p.dim() >= 2]
        grad_rms.append((step, math.sqrt(sum(float((g * g).sum()) for g in mats) / sum(g.numel() for g in mats))))
        for group in opt.param_groups:
            group["lr"] = lr
        if lr > 0:
            opt.step()
        det.after_step(tel, lr > 0)
        if step == 6:
            state = copy.deepcopy(det.state_dict())
    window = seen[-6:]
    x, y = np.array([w[0] for w in window], float), np.array([w[1] for w in window])
    assert in_window[0] == x.tolist() and 6.0 not in in_window[0]   # the skipped step: not entered
    assert float(out["trend_slope"]) == pytest.approx(stats.theilslopes(y, x)[0], rel=1e-9)
    assert float(out["trend_growth"]) == pytest.approx(
        math.expm1(stats.theilslopes(y, x)[0] * (x.max() - x.min())), rel=1e-9)
    n = len(x)                                  # Mann-Kendall: continuity-corrected normal approximation
    s = sum(np.sign(y[j] - y[i]) for i in range(n) for j in range(n) if x[i] < x[j])
    z = (s - np.sign(s)) / math.sqrt(n * (n - 1) * (2 * n + 5) / 18)
    assert float(out["trend_p"]) == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), rel=1e-9)
    assert float(out["trend_p"]) < 0.05 and float(out["trend_slope"]) > 0.1
    wx, wy = np.array([w[0] for w in wseen[-6:]], float), np.array([w[1] for w in wseen[-6:]])
    assert in_window[1] == wx.tolist() and 6.0 in in_window[1]      # but its weight norm is
    assert float(out["wnorm_trend_slope"]) == pytest.approx(stats.theilslopes(wy, wx)[0], rel=1e-9)
    for x_, y_ in wseen:                        # wnorm: the weight matrices' norm before that step
        assert math.exp(y_) == pytest.approx(norms[x_], rel=1e-6)
    dx = np.array(in_window[2], float)          # rms_per_lr: the lr divided out (SGD: the gradient's RMS)
    assert dx.tolist() == x.tolist()
    gy = np.array([math.log(g) for s_, g in grad_rms if s_ in set(dx.tolist())])
    assert float(out["rms_per_lr_trend_slope"]) == pytest.approx(stats.theilslopes(gy, dx)[0], rel=1e-6, abs=1e-12)
    assert abs(float(out["rms_per_lr_trend_slope"])) < 0.2 * float(out["trend_slope"])
    fresh = UpdateRatio(trend_window=6, trend_min_points=4, trend_start=2)
    fresh.load_state_dict(state)
    assert fresh.trend.state_dict() == state["trend"] and state["trend"]
    assert fresh.wnorm_trend.state_dict() == state["wnorm_trend"] and state["wnorm_trend"]
    assert fresh.rms_per_lr_trend.state_dict() == state["rms_per_lr_trend"] and state["rms_per_lr_trend"]
    older = UpdateRatio(trend_window=6, trend_min_points=4, trend_start=2)    # a state saved before
    older.load_state_dict({k: v for k, v in state.items() if k != "rms_per_lr_trend"})   # rms_per_lr existed
    assert older.rms_per_lr_trend.state_dict() == {} and older.trend.state_dict() == state["trend"]
    resumed = UpdateRatio(trend_window=6, trend_min_points=4, trend_start=2)   # resume at the end:
    resumed.setup(net, opt)                     # both see the same next two steps
    resumed.load_state_dict(copy.deepcopy(det.state_dict()))
    for step in (len(lrs), len(lrs) + 1):
        tel = Telemetry(step, _backward(net, step), opt)
        a, b = det.compute(tel), resumed.compute(tel)
        opt.step()
        det.after_step(tel, True)
        resumed.after_step(tel, True)
    assert set(a) == set(b) and a["trend_p"] is not None
    for k in a:
        assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-12), k
    with pytest.raises(ValueError, match=r"trend_min_points \(7\) must be in 3..trend_window \(6\)"):
        UpdateRatio(trend_window=6, trend_min_points=7)
    for kw in ({"trend_start": 5}, {"trend_min_points": 9}):       # the Python API checks too
        with pytest.raises(ValueError, match="need trend_window > 0"):
            UpdateRatio(**kw)
    with pytest.raises(ValueError, match="0 .off. or 4..1024, not 2000"):
        UpdateRatio(trend_window=2000)


def test_update_ratio_weight_norm_trend_can_have_its_own_shorter_window():
    """``wnorm_trend_window``: the weight norm's trend over its own (here shorter) window, equal to
    scipy's Theil-Sen over the last 4 weight norms, emitted from its 4th value while the ratio's
    trend still waits for its 6; the ratio's and rms_per_lr's trends are those of a detector
    without it; a weight norm shrinking by decoupled weight decay gives a negative slope; the
    param needs trend_window and is range-checked; the window survives a state_dict round trip."""
    stats = pytest.importorskip("scipy.stats")
    torch.manual_seed(0)
    net = _net(2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.01, weight_decay=0.0)
    short = UpdateRatio(trend_window=6, wnorm_trend_window=4)
    same = UpdateRatio(trend_window=6)
    short.setup(net, opt)
    same.setup(net, opt)
    norms = []
    for step in range(12):
        if step == 5:                           # from step 5 the decay outweighs the updates
            for g in opt.param_groups:
                g["weight_decay"] = 20.0
        tel = Telemetry(step, _backward(net, step), opt)
        a, b = short.compute(tel), same.compute(tel)
        norms.append(math.sqrt(sum(float(p.detach().double().norm()) ** 2
                                   for p in net.parameters() if p.dim() >= 2)))
        opt.step()
        short.after_step(tel, True)
        same.after_step(tel, True)
        if step == 4:                           # 4 weight norms in: its trend is on, the ratio's is not
            assert float(a["wnorm_trend_p"]) < 1.0 and float(a["trend_p"]) == 1.0
            assert float(b["wnorm_trend_p"]) == 1.0
        for k in ("trend_slope", "trend_p", "rms_per_lr_trend_slope"):
            if k in a:
                assert float(a[k]) == float(b[k]), k
    xs = np.arange(7.0, 11.0)                   # emitted at step 11: the norms before steps 7-10
    ys = np.log(np.array(norms[7:11]))
    # the window holds the last 4 (the after_step of step 11 entered its norm)
    assert sorted(short.wnorm_trend.steps[short.wnorm_trend.valid].tolist()) == (xs + 1).tolist()
    assert float(a["wnorm_trend_slope"]) == pytest.approx(stats.theilslopes(ys, xs)[0], rel=1e-6)
    assert float(a["wnorm_trend_slope"]) < -0.05 and float(a["wnorm_trend_slope"]) != float(b["wnorm_trend_slope"])
    fresh = UpdateRatio(trend_window=6, wnorm_trend_window=4)
    fresh.load_state_dict(short.state_dict())
    assert fresh.wnorm_trend.state_dict() == short.wnorm_trend.state_dict()
    with pytest.raises(ValueError, match="need trend_window > 0"):
        UpdateRatio(wnorm_trend_window=8)
    with pytest.raises(ValueError, match="wnorm_trend_window must be in 4..1024, not 2"):
        UpdateRatio(trend_window=6, wnorm_trend_window=2)


def test_update_ratio_trend_params_and_signals_are_checked_with_the_yaml_path(tmp_path):
    """A bad trend param is an error at load naming the file, line and YAML path; a rule that
    reads a trend signal the detector was not asked for is told which param turns it on."""
    from lbw_policy.errors import PolicyError

    def policy(params, signal):
        path = tmp_path / "p.yaml"
        path.write_text(f"""apiVersion: lbw-policy/v1
kind: Policy
metadata: {{name: t}}
detectors:
  upd: {{type: update_ratio, params: {params}}}
actuators:
  lr_scale: {{min: 0.1, max: 1.0}}
rules:
  - name: r
    when: {{signal: {signal}, op: ">", value: 0.01}}
    then: [{{actuator: lr_scale, multiply: 0.5}}]
""")
        return path

    with pytest.raises(PolicyError) as exc:
        load_policy(policy("{trend_window: 8, trend_min_points: 9}", "upd.trend_slope"))
    assert ":5: detectors.upd.params" in str(exc.value) and "must be in 3..trend_window (8)" in str(exc.value)
    with pytest.raises(PolicyError) as exc:
        load_policy(policy("{}", "upd.trend_slope"))
    assert ":10: rules[0].when.signal: unknown signal 'upd.trend_slope'" in str(exc.value)
    assert "set detectors.upd.params.trend_window" in str(exc.value)
    assert load_policy(policy("{trend_window: 8}", "upd.wnorm_trend_p")).name == "t"


def test_update_ratio_group_without_a_measured_tensor_reads_zero_and_minus_inf():
    net = _net(4)
    opt = torch.optim.SGD([{"params": [net[0].weight, net[2].weight]},
                           {"params": [net[0].bias, net[2].bias]}], lr=0.1)
    det = UpdateRatio(groups=2)                  # matrices only: group 1 holds biases alone
    tel = Telemetry(0, _backward(net, 0), opt)
    det.compute(tel)
    opt.step()
    det.after_step(tel, True)
    out = det.compute(Telemetry(1, _backward(net, 1), opt))
    assert float(out["group1.ratio"]) == 0.0 and float(out["group1.max"]) == -math.inf
    assert float(out["group0.ratio"]) == float(out["ratio"]) > 0


# ----------------------------------------------------------------------------- adam_update_stats

def _stats_np(u, vhat_sqrt, eps, large=0.9, v_floor=10.0):
    flat = np.concatenate([x.reshape(-1) for x in u])
    vs = np.concatenate([x.reshape(-1) for x in vhat_sqrt])
    return {"rms": math.sqrt(np.mean(flat ** 2)), "frac_large": np.mean(np.abs(flat) > large),
            "max_frac_large": max(np.mean(np.abs(x) > large) for x in u),
            "frac_v_small": np.mean(vs < v_floor * eps)}


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_update_stats_predict_the_step_adamw_then_takes(amsgrad):
    """u from the detector before the step == -(W_after - W_before) / lr from AdamW itself."""
    net = _net(2)
    lr, eps = 1e-3, 1e-8
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.8, 0.9), eps=eps, weight_decay=0.0,
                            amsgrad=amsgrad)
    det = AdamUpdateStats()
    det.setup(net, opt)
    for step in range(4):
        loss = _backward(net, step)
        net[2].bias.grad.mul_(1e-9)              # tiny gradients: sqrt(v_hat) below 10 eps
        out = det.compute(Telemetry(step, loss, opt))
        before = _weights(net)
        opt.step()
        after = _weights(net)
        u = [(b - a) / lr for a, b in zip(after, before)]
        bc2 = 1 - 0.9 ** (step + 1)
        key = "max_exp_avg_sq" if amsgrad else "exp_avg_sq"
        vhat_sqrt = [np.sqrt(opt.state[p][key].double().numpy() / bc2) for p in net.parameters()]
        ref = _stats_np(u, vhat_sqrt, eps)
        n = sum(x.size for x in u)
        assert float(out["rms"]) == pytest.approx(ref["rms"], rel=1e-4)
        # entries within float32 rounding of the 0.9 threshold may fall either side
        assert abs(float(out["frac_large"]) - ref["frac_large"]) <= 1.5 / n
        assert float(out["max_frac_large"]) == pytest.approx(ref["max_frac_large"], abs=0.1)
        assert float(out["frac_v_small"]) == pytest.approx(ref["frac_v_small"], abs=1e-12)
        if step == 0:    # Adam's first step is sign descent, |u| ~ 1, except where eps dominates
            assert float(out["frac_large"]) == pytest.approx((n - 3) / n)
        assert float(out["frac_v_small"]) == pytest.approx(3 / n)   # the 3 bias entries


def test_adam_update_stats_refuses_sgd():
    net = _net()
    with pytest.raises(ValueError, match=r"needs an Adam-family optimizer.*param_groups\[0\] of SGD has"):
        AdamUpdateStats().setup(net, torch.optim.SGD(net.parameters(), lr=0.1))


# ----------------------------------------------------------------------------- inside a Guard

def _demo(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=4, n_embd=32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    return model, opt


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 11, (4, 16), generator=g) for _ in range(n)]


def _run(guard, model, opt, batches):
    out = []
    for x in batches:
        _, loss = model(x, x)
        loss.backward()
        out.append(guard.step(loss).signals)
        opt.zero_grad(set_to_none=True)
    return out


def _same(a, b):
    a = {k: v for k, v in a.items() if not k.endswith("cost_ms")}
    b = {k: v for k, v in b.items() if not k.endswith("cost_ms")}
    assert a.keys() == b.keys()
    for k in a:
        assert (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k], k


def test_early_warning_policy_runs_and_a_resumed_guard_continues_identically(tmp_path):
    policy = load_policy(resolve_policy_path("early-warning"))
    model, opt = _demo()
    batches = _batches(10)
    with Guard(opt, policy, model=model, log_dir=tmp_path / "a") as guard:
        first = _run(guard, model, opt, batches[:6])
        # after_step ran: the update of step 0 is reported at step 1
        assert "upd.ratio" not in first[0] and first[1]["upd.ratio"] > 0
        declared = set(policy.signals())
        assert set(first[-1]) <= declared
        state = copy.deepcopy(guard.state_dict())
        model_state = copy.deepcopy(model.state_dict())
        opt_state = copy.deepcopy(opt.state_dict())
        rest = _run(guard, model, opt, batches[6:])

    model2, opt2 = _demo(seed=1)
    model2.load_state_dict(model_state)
    opt2.load_state_dict(opt_state)
    with Guard(opt2, policy, model=model2, log_dir=tmp_path / "b") as guard2:
        guard2.load_state_dict(state)
        rest2 = _run(guard2, model2, opt2, batches[6:])
    for a, b in zip(rest, rest2):
        _same(a, b)


def test_update_ratio_rms_per_lr_divides_by_the_lr_the_step_used_in_a_guard(tmp_path):
    """In enforce mode lr_scale changes the lr for the step and puts it back before the
    detectors' after_step: rms_per_lr divides by the lr the step used (Telemetry.step_lrs), so
    under plain SGD it is the gradients' RMS, not that times the scale."""
    from lbw_policy.policy import loads_policy

    policy = loads_policy("""
apiVersion: lbw-policy/v1
kind: Policy
metadata: {name: t}
mode: enforce
detectors: {upd: {type: update_ratio}}
actuators: {lr_scale: {min: 0.25, max: 1.0}}
rules:
  - name: always
    when: {signal: upd.ratio, op: ">=", value: 0.0}
    then: [{actuator: lr_scale, multiply: 0.25}]
""")

    net = _net(5)
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    rms = []
    with Guard(opt, policy, model=net, log_dir=tmp_path) as guard:
        for step in range(4):
            loss = _backward(net, step)
            mats = [p.grad.double() for p in net.parameters() if p.dim() >= 2]
            rms.append(math.sqrt(sum(float((g * g).sum()) for g in mats) / sum(g.numel() for g in mats)))
            before = [p.detach().clone() for p in net.parameters() if p.dim() >= 2]
            res = guard.step(loss)
            moved = [p.detach() - b for p, b in zip((p for p in net.parameters() if p.dim() >= 2), before)]
            if step >= 2:                       # the rule holds from step 1: the step used 0.2 x 0.25
                assert res.signals["upd.rms_per_lr"] == pytest.approx(rms[step - 1], rel=1e-5)
                assert opt.param_groups[0]["lr"] == 0.2          # put back after the step
                got = math.sqrt(sum(float((d.double() ** 2).sum()) for d in moved) /
                                sum(d.numel() for d in moved))
                assert got == pytest.approx(0.05 * rms[step], rel=1e-5)   # the step was braked


def test_update_ratio_rms_per_lr_leaves_out_groups_without_a_numeric_lr():
    """A group whose lr is None (Adafactor's relative_step) is left out of rms_per_lr; with
    no group left it is NaN; the other signals are measured either way."""
    net = _net(6)
    opt = torch.optim.SGD([{"params": [net[0].weight]}, {"params": [net[2].weight]}], lr=0.1)
    det = UpdateRatio()
    for step, lrs in enumerate(([None, 0.1], [None, None])):
        tel = Telemetry(step, _backward(net, step), opt)
        det.compute(tel)
        g = net[2].weight.grad.double()
        opt.step()                              # (SGD at 0.1 for both groups)
        tel.step_lrs = lrs                      # what the step reports it used
        det.after_step(tel, True)
        out = det.compute(Telemetry(step + 1, _backward(net, step + 1), opt))
        assert float(out["ratio"]) > 0 and float(out["rms"]) > 0
        if lrs[1] is not None:                  # only group 1 counts: its own gradient's RMS
            assert float(out["rms_per_lr"]) == pytest.approx(
                math.sqrt(float((g * g).sum()) / g.numel()), rel=1e-5)
        else:
            assert math.isnan(float(out["rms_per_lr"]))


def test_detector_after_step_error_is_contained(tmp_path):
    from lbw_policy.policy import loads_policy

    policy = loads_policy("""
apiVersion: lbw-policy/v1
kind: Policy
metadata: {name: t}
on_error: continue
detectors:
  upd: {type: update_ratio}
actuators:
  skip_step: {max_consecutive: 2}
rules:
  - name: r
    when: {signal: upd.ratio, op: ">", value: 100}
    then: [{actuator: skip_step}]
""")
    model, opt = _demo()
    guard = Guard(opt, policy, model=model, log_dir=tmp_path)

    def boom(telemetry, stepped):
        raise RuntimeError("after_step failed")
    guard.detectors["upd"].after_step = boom
    _run(guard, model, opt, _batches(2))
    guard.close()
    errors = [r for r in map(__import__("json").loads, (tmp_path / "decisions.jsonl").read_text().splitlines())
              if r["event"] == "error"]
    assert len(errors) == 2 and errors[0]["where"] == "detector upd after_step"
    assert "RuntimeError: after_step failed" in errors[0]["error"]
