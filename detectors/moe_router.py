"""``moe_router``: routing entropy and load imbalance of mixture-of-experts routers.

For a router with ``E`` experts and logits ``r`` ``(N, E)`` over the ``N`` tokens routed since
the previous evaluation (every forward in training mode is accumulated), ``p = softmax(r)``,
and each token sent to its ``top_k`` largest-logit experts::

    entropy   = mean_tokens ( -sum_e p_e ln p_e ) / ln E      # in [0, 1]; 1 = uniform routing
    f_e       = tokens routed to e / (N * top_k)               # load fraction, sums to 1
    P_e       = mean_tokens p_e                                 # mean router probability
    imbalance = E * max_e f_e                                   # 1 = balanced, E = one expert takes all
    aux       = E * sum_e f_e P_e                               # Switch load-balancing loss, 1 at balance

Signals (0-dim tensors): ``entropy`` (the lowest over routers), ``imbalance`` and ``aux`` (the
highest over routers), ``worst_layer`` (router index in module order, from 0, of the highest
``imbalance``). Collapse of routing onto few experts, and confident but unbalanced routers, are
the MoE failure modes that precede loss spikes (arXiv 2606.28116; Fedus et al. 2101.03961 for
``aux``; Zoph et al. 2202.08906, router z-loss).

Which modules: those named by ``router_pattern`` (``fnmatch``, default ``"*.router"``), whose
output is the router logits ``(..., E)``, or a tuple/list whose element ``output_index``
(default 0) is. A model that computes router logits inline should wrap that projection in an
``nn.Linear`` (or any module) so a hook can see it.

Cost: per forward and router, one softmax over ``(N, E)``, a top-k and a scatter-add into
``E`` counters on the device; no host sync, no tensor kept. No warm-up and no state beyond the
accumulators of forwards not yet evaluated. A due step with no routed token since the previous
evaluation emits nothing.

:raises ValueError: (in :meth:`setup`) no module matches; (in :meth:`compute`) a router's
    output is not ``(..., E)`` logits, or ``top_k`` exceeds ``E``.
"""

from __future__ import annotations

import fnmatch
import math

import torch

from lbw_policy.base import Detector

from ._ring import stat_dtype

__all__ = ["MoERouter"]


class MoERouter(Detector):
    name = "moe_router"
    signals = ("entropy", "imbalance", "aux", "worst_layer")
    reductions = {"entropy": "min", "imbalance": "max", "worst_layer": "same"}  # aux: mean
    params_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "router_pattern": {"type": "string", "minLength": 1,
                               "description": "fnmatch pattern of the router modules; default '*.router'"},
            "top_k": {"type": "integer", "minimum": 1, "description": "experts per token; default 1"},
            "output_index": {"type": "integer", "minimum": 0,
                             "description": "element of a tuple output holding the logits; default 0"},
        },
    }

    def __init__(self, router_pattern: str = "*.router", top_k: int = 1, output_index: int = 0) -> None:
        super().__init__(router_pattern=router_pattern, top_k=top_k, output_index=output_index)
        self.pattern = router_pattern
        self.top_k = int(top_k)
        self.output_index = int(output_index)
        self.routers: list = []
        self._handles: list = []
        self._acc: list = []
        self._error = None

    def setup(self, model, optimizer, every: int = 1) -> None:
        self.every = int(every)
        if model is None:
            raise ValueError("moe_router needs the model: Guard(optimizer, policy, model=model)")
        self.routers = [n for n, _ in model.named_modules() if n and fnmatch.fnmatchcase(n, self.pattern)]
        if not self.routers:
            raise ValueError(f"moe_router: params.router_pattern {self.pattern!r} matched no module; "
                             f"modules are named like {[n for n, _ in model.named_modules() if n][:6]}")
        self._acc = [self._empty() for _ in self.routers]
        for i, name in enumerate(self.routers):
            self._handles.append(model.get_submodule(name).register_forward_hook(self._hook(i)))

    @staticmethod
    def _empty() -> dict:
        return {"n": 0, "ent": None, "load": None, "prob": None}

    def _hook(self, i: int):
        def hook(module, args, output):
            if not module.training or not torch.is_grad_enabled():
                return
            with torch.no_grad():
                capture(output)

        def capture(output):
            r = output[self.output_index] if isinstance(output, (tuple, list)) else output
            if not isinstance(r, torch.Tensor) or r.dim() < 1 or r.shape[-1] < max(2, self.top_k):
                shape = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
                self._error = (f"moe_router: router {self.routers[i]!r} output {shape} is not (..., E) logits "
                               f"with E >= max(2, top_k={self.top_k})")
                return
            e = r.shape[-1]
            r = r.detach().reshape(-1, e).float()                       # (N, E)
            logp = torch.log_softmax(r, dim=-1)
            p = logp.exp()
            dtype = stat_dtype(r.device)
            ent = (-(p * logp).nan_to_num(0.0).sum(-1) / math.log(e)).to(dtype).sum()
            idx = r.topk(self.top_k, dim=-1).indices.reshape(-1)        # (N * top_k,)
            load = torch.zeros(e, dtype=dtype, device=r.device).scatter_add_(
                0, idx, torch.ones(idx.shape, dtype=dtype, device=r.device))
            prob = p.to(dtype).sum(0)                                   # (E,)
            acc = self._acc[i]
            if acc["n"] == 0:
                acc.update(ent=ent, load=load, prob=prob)
            else:
                acc["ent"] = acc["ent"].to(ent.device) + ent
                acc["load"] = acc["load"].to(load.device) + load
                acc["prob"] = acc["prob"].to(prob.device) + prob
            acc["n"] += r.shape[0]
        return hook

    def compute(self, telemetry) -> dict:
        if self._error is not None:
            err, self._error = self._error, None
            raise ValueError(err)
        if any(a["n"] == 0 for a in self._acc):
            return {}
        ents, imbs, auxs = [], [], []
        for a in self._acc:
            n = a["n"]
            e = a["load"].shape[0]
            f = a["load"] / (n * self.top_k)
            ents.append(a["ent"] / n)
            imbs.append(e * f.max())
            auxs.append(e * (f * a["prob"] / n).sum())
        self._acc = [self._empty() for _ in self.routers]
        imb = torch.stack(imbs)
        return {"entropy": torch.stack(ents).min(), "imbalance": imb.max(), "aux": torch.stack(auxs).max(),
                "worst_layer": imb.argmax().to(imb.dtype)}

    def state_dict(self) -> dict:
        return {"acc": [{"n": a["n"], **{k: (None if a[k] is None else a[k].tolist())
                                          for k in ("ent", "load", "prob")}} for a in self._acc]}

    def load_state_dict(self, state) -> None:
        acc = state.get("acc")
        if not acc:
            return
        self._acc = [{"n": int(a["n"]), **{k: (None if a[k] is None else torch.tensor(a[k], dtype=torch.float64))
                                          for k in ("ent", "load", "prob")}} for a in acc]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
