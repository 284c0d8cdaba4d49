"""``spectral_entropy``: normalized spectral entropy of each attention head's QK bilinear form.

For attention layer ``l`` and head ``h`` with query and key weights ``W_{Q,h}``, ``W_{K,h}``
(each ``(hs, d)``: the head's rows of the projection), the pre-softmax logit of tokens ``x``,
``y`` is ``x^T A_h y`` with ``A_h = W_{Q,h}^T W_{K,h}`` (``d x d``, rank <= hs). With
``s_1..s_r`` its ``r = hs`` largest singular values::

    p_k = s_k / sum_j s_j
    H   = -sum_k p_k ln p_k / ln r                  # in [0, 1]; 1 = flat spectrum, 0 = rank one

The **update term** since the previous evaluation, with ``dW = W_now - W_prev``, is the
first-order change of the form at ``W_prev``::

    dA_h = dW_{Q,h}^T W_{K,h,prev} + W_{Q,h,prev}^T dW_{K,h}      # rank <= 2 hs

and its entropy is taken the same way with ``r = min(d, 2 hs)``. A collapsing entropy (the form
concentrating on few directions) and a low-rank update precede attention-logit growth
(arXiv 2606.28116; Zhai et al. 2303.06296 "entropy collapse"). Biases are not part of ``A_h``.

Computation (no ``d x d`` matrix, no full SVD): ``A_h = F G^T`` with ``F = W_{Q,h}^T``,
``G = W_{K,h}^T`` (``d x hs``). With reduced QR ``F = U_F R_F``, ``G = U_G R_G``, the nonzero
singular values of ``A_h`` are those of the small ``R_F R_G^T`` (``hs x hs``), because ``U_F``,
``U_G`` have orthonormal columns. The update term is ``[dF, F] [G, dG]^T``: QR of the
``d x 2hs`` factors, singular values of a ``2hs x 2hs`` matrix. Two routes give these singular
values, chosen by the weights' device (``solver``, below):

- **CPU** (``factored_entropy``): per layer, one batched ``torch.linalg.qr(mode="r")`` per factor
  and ``torch.linalg.svdvals`` of the core (LAPACK), in float32 (or the weights' wider dtype).
  On the CPU nothing waits for a device.

- **CUDA** (``factored_entropy_sync_free``, every layer of the same shape in one batch): no
  operation reads a device value on the host. ``torch.linalg.svdvals`` cannot be used there:
  ``_linalg_svd_out`` always ends in ``_linalg_check_errors(info)``, whose
  ``infos.any().item<bool>()`` is a device-to-host read, and cuSOLVER's gesvdj path first copies
  ``info`` to the host to check convergence (``_check_gesvdj_convergence``: ``infos.cpu()``);
  torch has no ``svd_ex`` ("this function does not have an _ex variant as we always check
  errors", ``aten/src/ATen/native/BatchLinearAlgebra.cpp``), and ``eigh`` / ``eigvalsh`` end in
  the same check. So, in float64 (which also keeps TF32 matmul settings out of the result):

  1. ``R`` factors by ``torch.linalg.qr(mode="r")``. ``linalg_qr_out`` is ``geqrf`` + ``triu``
     with no error check; cuBLAS' batched ``geqrfBatched`` returns its ``info`` in a host
     variable it fills without a device sync ("info is a host variable, we can check it without
     device synchronization"), cuSOLVER's looped ``geqrf`` checks its device ``info`` only in
     debug builds (``TORCH_INTERNAL_ASSERT_DEBUG_ONLY``;
     ``aten/src/ATen/native/cuda/linalg/BatchLinearAlgebraLib.cpp``). A factor of more than 256
     rows and at most 128 columns is reduced in 256-row blocks first (TSQR: the ``R`` of the
     stacked block ``R`` s is the ``R`` of the whole), which keeps those QRs in torch's batched
     cuBLAS regime (``geqrf_kernel`` in ``BatchLinearAlgebra.cu``: rows <= 256, batch >= rows / 16)
     rather than one cuSOLVER call per matrix; both are sync-free.
  2. Four QR passes ``X <- R(X^T)`` on each core (same singular values; they grade the rows by
     size, as the preconditioning QR of Drmac & Veselic's Jacobi SVD, SIAM J. Matrix Anal.
     Appl. 29, 2008, and cut the sweeps needed on graded spectra from >10 to 5).
  3. One-sided (Hestenes) Jacobi on the rows, every core of the evaluation in one batch
     (zero-padded to one size ``n``; zero rows never rotate). Rows are held in pairs as complex
     numbers ``z = a + i b``; ``w = sum_j z_j^2 = |a|^2 - |b|^2 + 2i a.b``, and dividing the pair
     by ``sqrt(sgn(w sign(Re w)))`` is the rotation that makes ``a`` and ``b`` orthogonal (inner
     angle, ``|theta| <= pi/4``). The pairs change by the round-robin ("circle") order, so
     ``n - 1`` rounds meet every pair once (a sweep); a fixed number of sweeps (5 for
     ``n <= 128``, 6 to 512, 7 above) replaces a convergence test, which would read the device.
     One round is 7 kernels: ``matmul`` (the ``w`` of every pair), ``copysign``, ``addcmul``,
     ``sgn``, ``sqrt``, a complex division, ``index_select`` (the next round's pairs).
     The singular values are the row norms.

  The ``info`` of no routine is read, the loop counts are host integers fixed by the shapes,
  and every index and constant is made on the device (``arange`` arithmetic, ``torch.full``):
  no ``.item()``, no host-to-device copy. Accuracy: within 1e-9 of float64 LAPACK (measured:
  5e-10 at most on the demo's trained and diverging weights and on random, graded (1e-6 spread)
  and half-rank cores), where float32 ``svdvals`` (the CPU route) is off by up to 1.6e-7
  (``tests/test_detectors_attention.py``).
  Kernel launches per evaluation: about ``7 * sweeps * (n - 1)`` plus ~150 for the QRs and the
  signals, with ``n = 2 hs`` once there is an update term (``hs`` at the first evaluation or
  with ``update: false``); counted (aten ops dispatched): 2,300 for the demo GPT (hs 32), 4,550
  with hs 64 (GPT-2 small), 10,800 with hs 128, about half of that at the first evaluation. The
  count does not grow with the number of layers or heads (they are the batch).

``solver`` (an attribute, not a param: ``"auto"``, the default, takes the CUDA route on CUDA
weights and the CPU route elsewhere; ``"jacobi"`` / ``"lapack"`` force one, for tests and
benchmarks). Every evaluation is independent of the route taken before it.

Signals (0-dim tensors):

- ``min``: smallest ``H`` over every layer and head (dimensionless).
- ``drop``: largest fall of a layer's minimum below its warm-up baseline,
  ``max_l (base_l - min_h H_{l,h})`` where ``base_l`` is the mean of that layer's minimum over
  the first ``warmup`` evaluations; ``0.0`` during warm-up (never fires).
- ``worst_layer`` / ``worst_head``: the layer index (module order, from 0) and head of the
  ``(l, h)`` whose ``H`` moved most from its own warm-up baseline, ``argmax |H - base|``;
  ``-1`` during warm-up.
- ``update_min``: smallest update-term entropy over layers and heads; NaN on the first
  evaluation (no previous weights) and when no layer's weights changed (skipped steps); a
  layer whose weights did not change (frozen) is left out.
  Emitted only with ``update: true``.
- ``layer<i>.min`` for ``i < layers``: layer ``i``'s minimum over heads.
- ``cost_ms``: host wall-clock time of this evaluation in milliseconds (a Python float). On
  CUDA the evaluation is not waited for: this is the time to enqueue it.

Params: ``q_pattern`` (default ``"*.attn.q_proj"``), ``k_pattern`` (default
``"*.attn.k_proj"``), ``mha_pattern`` (``nn.MultiheadAttention`` modules to include, default
``"*"``; ``""`` for none), ``n_head`` (default: the projections' parent's ``n_head`` /
``num_heads`` attribute), ``warmup`` (evaluations averaged into the baseline, default 3),
``update`` (compute the update term, default true), ``layers`` (number of ``layer<i>.min``
signals, default 0). Layer discovery is described in ``detectors/_attention.py``.

Errors: :meth:`setup` raises ``ValueError`` when no attention layer matches, the patterns pair
up badly, the head count is unknown, or ``layers`` exceeds the layers found.

Sources: arXiv 2606.28116 (QK spectral entropy as an early-warning signal); Roy & Vetterli
2007, "The effective rank: a measure of effective dimensionality" (EUSIPCO), for the
normalized spectral entropy.
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F

from lbw_policy.base import Detector

from ._attention import SITE_PARAMS_SCHEMA, find_attention_sites
from ._ring import to_device

__all__ = ["SpectralEntropy", "normalized_spectral_entropy", "factored_entropy",
           "factored_entropy_sync_free", "jacobi_singular_values", "r_factor", "jacobi_sweeps"]

#: QR passes ``X <- R(X^T)`` before the Jacobi sweeps (step 2 of the CUDA route).
QR_PASSES = 4
#: Rows above which a factor is reduced in blocks on CUDA (torch's batched cuBLAS QR limit).
TSQR_ROWS = 256


def normalized_spectral_entropy(s: torch.Tensor, r: Optional[int] = None) -> torch.Tensor:
    """``-sum p ln p / ln r`` over the last dim of singular values ``s`` ``(..., m)``, ``r >= 2``
    (default ``m``; zeros beyond the ``r`` singular values, such as padding, add nothing); NaN
    where every singular value is 0."""
    r = s.shape[-1] if r is None else r
    p = s / s.sum(dim=-1, keepdim=True)
    return -torch.special.xlogy(p, p).sum(dim=-1) / math.log(r)


def factored_entropy(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Normalized spectral entropy of ``f @ g^T`` for batches ``f`` ``(n, d1, k)``, ``g``
    ``(n, d2, k)``, without forming it: QR of both factors, SVD of ``R_f R_g^T``. Returns
    ``(n,)``. The CPU route (LAPACK; on CUDA ``svdvals`` synchronises)."""
    rf = torch.linalg.qr(f, mode="r").R                       # (n, min(d1, k), k)
    rg = torch.linalg.qr(g, mode="r").R                       # (n, min(d2, k), k)
    s = torch.linalg.svdvals(rf @ rg.transpose(-1, -2))       # (n, min(d1, d2, k))
    return normalized_spectral_entropy(s)


def r_factor(x: torch.Tensor, block: Optional[int] = None) -> torch.Tensor:
    """``R`` of the reduced QR of each matrix of ``x`` ``(n, m, k)``: ``(n, min(m, k), k)``, up to
    the signs of its rows (any ``R`` with ``R^T R = x^T x``: the singular values are those of
    ``x``). With ``block`` (default: 256 on CUDA, none elsewhere), while ``m > block`` and
    ``2k <= block`` the rows are split into ``block``-row blocks (the last zero-padded), each
    block reduced to its ``k x k`` ``R`` in one batched QR, and the ``R`` s stacked (TSQR). No
    host-device sync (see the module docstring)."""
    if block is None:
        block = TSQR_ROWS if x.device.type == "cuda" else 0
    n, m, k = x.shape
    while block and m > block and 2 * k <= block:
        c = -(-m // block)
        if c * block != m:
            x = F.pad(x, (0, 0, 0, c * block - m))
        x = torch.linalg.qr(x.reshape(n * c, block, k), mode="r").R.reshape(n, c * k, k)
        m = c * k
    return torch.linalg.qr(x, mode="r").R


def jacobi_sweeps(n: int) -> int:
    """Jacobi sweeps for ``n x n`` cores after :data:`QR_PASSES` QR passes: 5 up to 128, 6 up to
    512, 7 above (float64; measured: entropy within 1e-9 of LAPACK on random cores, the hardest
    case, and on the demo's trained ones)."""
    return 5 if n <= 128 else 6 if n <= 512 else 7


_ROUND_ROBIN: dict = {}


def _round_robin_index(n: int, device: torch.device) -> torch.Tensor:
    """Gather index (``h * n * 2``, long, on ``device``) that moves the ``n = 2h`` rows, held as
    ``view_as_real`` of ``h`` complex pair-rows ``(h, n, 2)``, to the next round's pairs of the
    circle method: position 0 stays, every other row moves one place around the ring
    ``2, 4, ..., n-2, n-1, n-3, ..., 3, 1``; after ``n - 1`` rounds each row has met every other
    once and all are back in place. Made by ``arange`` arithmetic on the device (no host copy);
    cached per ``(n, device)``."""
    key = (n, torch.device(device))
    idx = _ROUND_ROBIN.get(key)
    if idx is None:
        p = torch.arange(n, device=device)
        if n == 2:
            src = p
        else:                                    # src[p]: the position whose row moves to p
            src = torch.where(p % 2 == 0, p - 2, p + 2)
            src = torch.where(p == 0, 0, torch.where(p == 2, 1, torch.where(p == n - 1, n - 2, src)))
        src = src.view(n // 2, 2)                # target (pair, part) <- source position
        cols = 2 * torch.arange(n, device=device)
        idx = ((src // 2) * (2 * n) + src % 2).unsqueeze(1) + cols.view(1, n, 1)   # (h, n, 2)
        idx = _ROUND_ROBIN[key] = idx.reshape(-1)
    return idx


def _graded(m: torch.Tensor, passes: int) -> torch.Tensor:
    """``passes`` QR passes ``X <- R(X^T)`` (at least 2 for a non-square ``m``): ``(b, r, r)``,
    ``r = min`` of ``m``'s sizes, the same singular values."""
    x = m
    for _ in range(max(passes, 0 if m.shape[-1] == m.shape[-2] else 2)):
        x = torch.linalg.qr(x.transpose(-1, -2), mode="r").R
    return x


def _jacobi_row_norms(x: torch.Tensor, sweeps: int) -> torch.Tensor:
    """Row norms of ``x`` ``(b, n, n)`` (``n`` even, real) after ``sweeps`` one-sided Jacobi
    sweeps: its singular values, in row order (module docstring, step 3)."""
    b, n, _ = x.shape
    h = n // 2
    z = torch.complex(x[:, 0::2], x[:, 1::2])                      # (b, h, n): rows 2i + i row 2i+1
    idx = _round_robin_index(n, x.device)
    one = torch.ones((), dtype=x.dtype, device=x.device)
    tiny = torch.full((), torch.finfo(x.dtype).tiny, dtype=x.dtype, device=x.device)
    for _ in range(sweeps * (n - 1)):
        w = torch.matmul(z.unsqueeze(-2), z.unsqueeze(-1)).view(b, h)   # |a|^2 - |b|^2 + 2i a.b
        v = torch.addcmul(tiny, w, torch.copysign(one, w.real))         # right half-plane; 0 -> tiny
        z = z / torch.sqrt(torch.sgn(v)).unsqueeze(-1)                   # rotate: a.b -> 0
        z = torch.view_as_complex(torch.view_as_real(z).reshape(b, -1).index_select(1, idx).view(b, h, n, 2))
    return torch.linalg.vector_norm(torch.view_as_real(z), dim=-2).reshape(b, n)


def jacobi_singular_values(cores: list, qr_passes: int = QR_PASSES, sweeps: Optional[int] = None) -> list:
    """Singular values of every matrix in each batch of ``cores`` (tensors ``(b_i, p_i, q_i)``
    on one device, one real floating dtype), in one batched Jacobi run: ``[(b_i, min(p_i, q_i))]``,
    in no particular order. Matmul, elementwise and index kernels only: no host-device sync
    (module docstring). ``sweeps`` defaults to :func:`jacobi_sweeps` of the common size."""
    sq = [_graded(c, qr_passes) for c in cores]
    rs = [c.shape[-1] for c in sq]
    n = max(rs) + max(rs) % 2
    x = torch.cat([c if r == n else F.pad(c, (0, n - r, 0, n - r)) for c, r in zip(sq, rs)])
    s = _jacobi_row_norms(x, jacobi_sweeps(n) if sweeps is None else sweeps)
    return [part[:, :r] for part, r in zip(s.split([c.shape[0] for c in sq]), rs)]


def factored_entropy_sync_free(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """:func:`factored_entropy` without a host-device sync on CUDA (float64; the CUDA route of
    the module docstring). Returns ``(n,)`` float64."""
    core = r_factor(f.to(torch.float64)) @ r_factor(g.to(torch.float64)).transpose(-1, -2)
    (s,) = jacobi_singular_values([core])
    return normalized_spectral_entropy(s, min(f.shape[-2], g.shape[-2], f.shape[-1]))


class SpectralEntropy(Detector):
    name = "spectral_entropy"
    signals = ("min", "drop", "worst_layer", "worst_head", "update_min", "cost_ms")
    sharding = ("it takes the singular values of whole query/key weight matrices, which "
                "FSDP2 shards across ranks")
    reductions = {"min": "same", "drop": "same", "worst_layer": "same", "worst_head": "same",
                  "update_min": "same", "cost_ms": "max"}  # weights are replicated
    params_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            **SITE_PARAMS_SCHEMA,
            "warmup": {"type": "integer", "minimum": 1,
                       "description": "evaluations averaged into the baseline; default 3"},
            "update": {"type": "boolean", "description": "compute the update-term entropy; default true"},
            "layers": {"type": "integer", "minimum": 0, "maximum": 1024,
                       "description": "emit layer<i>.min for the first `layers` layers; default 0"},
        },
    }
    #: ``"auto"`` (CUDA route on CUDA weights, CPU route elsewhere), ``"jacobi"`` or ``"lapack"``.
    solver: str = "auto"

    def __init__(self, q_pattern: str = "*.attn.q_proj", k_pattern: str = "*.attn.k_proj",
                 mha_pattern: str = "*", n_head: Optional[int] = None, warmup: int = 3,
                 update: bool = True, layers: int = 0) -> None:
        super().__init__(q_pattern=q_pattern, k_pattern=k_pattern, mha_pattern=mha_pattern,
                         n_head=n_head, warmup=warmup, update=update, layers=layers)
        self.warmup = int(warmup)
        self.update = bool(update)
        self.layers = int(layers)
        self.sites: list = []
        self.evals = 0                                  # evaluations so far
        self._base_sum: Optional[torch.Tensor] = None   # (n_heads_total,) sum of H in warm-up
        self._base_min_sum: Optional[torch.Tensor] = None  # (n_layers,) sum of layer minima
        self._prev: Optional[list] = None               # [(Qf, Kf)] at the previous evaluation
        self._index: dict = {}                          # device -> (layer_of, head_of)

    @classmethod
    def signals_for(cls, params: Mapping[str, Any]) -> tuple[str, ...]:
        names = ["min", "drop", "worst_layer", "worst_head"]
        if params.get("update", True):
            names.append("update_min")
        names.append("cost_ms")
        names += [f"layer{i}.min" for i in range(int(params.get("layers", 0)))]
        return tuple(names)

    def setup(self, model, optimizer, every: int = 1) -> None:
        self.every = int(every)
        p = self.params
        self.sites = find_attention_sites(model, p["q_pattern"], p["k_pattern"], p["mha_pattern"] or None,
                                          p["n_head"], who="spectral_entropy")
        if self.layers > len(self.sites):
            raise ValueError(f"spectral_entropy: params.layers is {self.layers} but the model has "
                             f"{len(self.sites)} attention layers ({[s.name for s in self.sites]})")
        self._index = {}

    def _indices(self, device: torch.device) -> tuple:
        """``(layer_of, head_of)``: float64 ``(total heads,)`` on ``device``, made there by fills
        and ``arange`` (a ``torch.tensor`` of a list would be a blocking host-to-device copy)."""
        if device not in self._index:
            layer_of = torch.cat([torch.full((s.n_head,), float(i), dtype=torch.float64, device=device)
                                  for i, s in enumerate(self.sites)])
            head_of = torch.cat([torch.arange(s.n_head, dtype=torch.float64, device=device) for s in self.sites])
            self._index[device] = (layer_of, head_of)
        return self._index[device]

    def _use_jacobi(self, device: torch.device) -> bool:
        if self.solver not in ("auto", "jacobi", "lapack"):
            raise ValueError(f"spectral_entropy: solver must be 'auto', 'jacobi' or 'lapack', found {self.solver!r}")
        return self.solver == "jacobi" or (self.solver == "auto" and device.type == "cuda")

    def _entropies_lapack(self, factors: list) -> tuple:
        """The CPU route, layer by layer: ``([H (nh,)], [update H (nh,)], prev)``."""
        ents, upd, prev = [], [], []
        for i, (qf, kf) in enumerate(factors):
            ents.append(factored_entropy(qf, kf))                        # (nh,)
            if self.update:
                if self._prev is not None:
                    pq, pk = (to_device(t, qf.device, qf.dtype) for t in self._prev[i])
                    upd.append(factored_entropy(torch.cat([qf - pq, pq], dim=-1),    # (nh, d_q, 2hs)
                                                torch.cat([pk, kf - pk], dim=-1)))   # (nh, d_k, 2hs)
                prev.append((qf.clone(), kf.clone()))
        return ents, upd, prev

    def _entropies_jacobi(self, factors: list) -> tuple:
        """The CUDA route: the layers of each factor shape as one batch, the cores of all of
        them in one Jacobi run. Same return as :meth:`_entropies_lapack` (float64)."""
        groups: dict = {}
        for i, (qf, kf) in enumerate(factors):
            groups.setdefault((tuple(qf.shape[1:]), tuple(kf.shape[1:]), qf.dtype), []).append(i)
        f64 = torch.float64
        cores, ranks, jobs = [], [], []          # jobs: (kind, site indices, moved mask or None)
        prev: list = [None] * len(factors)
        for idx in groups.values():
            fq = torch.cat([factors[i][0] for i in idx])                 # (heads, d_q, hs), a copy
            fk = torch.cat([factors[i][1] for i in idx])                 # (heads, d_k, hs)
            rows = [0]
            for i in idx:
                rows.append(rows[-1] + factors[i][0].shape[0])
            q64, k64 = fq.to(f64), fk.to(f64)
            cores.append(r_factor(q64) @ r_factor(k64).transpose(-1, -2))
            ranks.append(min(fq.shape[1], fk.shape[1], fq.shape[2]))
            jobs.append(("main", idx, None))
            if self.update:
                if self._prev is not None:
                    pq = torch.cat([to_device(self._prev[i][0], fq.device, fq.dtype) for i in idx]).to(f64)
                    pk = torch.cat([to_device(self._prev[i][1], fk.device, fk.dtype) for i in idx]).to(f64)
                    dq, dk = q64 - pq, k64 - pk
                    uq = torch.cat([dq, pq], dim=-1)                     # (heads, d_q, 2hs)
                    uk = torch.cat([pk, dk], dim=-1)                     # (heads, d_k, 2hs)
                    cores.append(r_factor(uq) @ r_factor(uk).transpose(-1, -2))
                    ranks.append(min(uq.shape[1], uk.shape[1], uq.shape[2]))
                    # an exactly unchanged head has no update term (NaN, as the CPU route's 0/0)
                    moved = (dq != 0).any(dim=-1).any(dim=-1) | (dk != 0).any(dim=-1).any(dim=-1)
                    jobs.append(("update", idx, moved))
                for j, i in enumerate(idx):                              # views of the copies
                    prev[i] = (fq[rows[j]:rows[j + 1]], fk[rows[j]:rows[j + 1]])
        svals = jacobi_singular_values(cores)
        ents: list = [None] * len(factors)
        upd_by_site: list = [None] * len(factors)
        for (kind, idx, moved), s, r in zip(jobs, svals, ranks):
            h = normalized_spectral_entropy(s, r)
            if moved is not None:
                h = torch.where(moved, h, math.nan)
            parts = h.split([factors[i][0].shape[0] for i in idx])
            for i, part in zip(idx, parts):
                (ents if kind == "main" else upd_by_site)[i] = part
        upd = [u for u in upd_by_site if u is not None]
        return ents, upd, (prev if self.update else [])

    @torch.no_grad()
    def compute(self, telemetry) -> dict:
        if not self.sites:
            raise RuntimeError("spectral_entropy: setup() was not called (the guard calls it with the model)")
        t0 = time.perf_counter()
        factors = [site.factors() for site in self.sites]               # (nh, d_q, hs), (nh, d_k, hs)
        device = factors[0][0].device
        route = self._entropies_jacobi if self._use_jacobi(device) else self._entropies_lapack
        ents, upd, prev = route(factors)
        flat = torch.cat(ents).to(torch.float64)                # (total heads,)
        mins = torch.stack([h.min() for h in ents]).to(torch.float64)   # (layers,)
        out = {"min": mins.min()}
        if self.evals < self.warmup:
            dev = flat.device
            self._base_sum = flat if self._base_sum is None else to_device(self._base_sum, dev) + flat
            self._base_min_sum = mins if self._base_min_sum is None else to_device(self._base_min_sum, dev) + mins
            out["drop"] = torch.zeros_like(out["min"])
            out["worst_layer"] = out["worst_head"] = torch.full_like(out["min"], -1.0)
        else:
            self._base_sum = to_device(self._base_sum, flat.device)           # no-op unless restored
            self._base_min_sum = to_device(self._base_min_sum, flat.device)
            base = self._base_sum / self.warmup
            base_min = self._base_min_sum / self.warmup
            out["drop"] = (base_min - mins).max()
            moved = torch.nan_to_num((flat - base).abs(), nan=math.inf)  # a NaN head counts as moved most
            idx = moved.argmax()
            layer_of, head_of = self._indices(flat.device)
            out["worst_layer"] = torch.take(layer_of, idx)               # take: no host sync
            out["worst_head"] = torch.take(head_of, idx)
        if self.update:
            # NaN heads (a layer whose weights did not change) are left out; all NaN -> NaN
            u = (torch.cat(upd).to(torch.float64) if upd
                 else torch.full((1,), math.nan, dtype=torch.float64, device=flat.device))
            out["update_min"] = torch.nan_to_num(u, nan=math.inf).min().nan_to_num(posinf=math.nan)
            self._prev = prev
        for i in range(self.layers):
            out[f"layer{i}.min"] = mins[i]
        self.evals += 1
        out["cost_ms"] = (time.perf_counter() - t0) * 1e3      # host time (on CUDA: to enqueue it)
        return out

    def state_dict(self) -> dict:
        return {
            "evals": self.evals,
            "base_sum": None if self._base_sum is None else self._base_sum.tolist(),
            "base_min_sum": None if self._base_min_sum is None else self._base_min_sum.tolist(),
            # The previous evaluation's factors, so the first update term after a resume is the
            # same as without one: 2 * (d * n_head * hs) numbers per layer.
            "prev": None if self._prev is None else [[q.tolist(), k.tolist()] for q, k in self._prev],
        }

    def load_state_dict(self, state) -> None:
        # Restored in host memory; the next evaluation moves them to the weights' device through
        # pinned memory (to_device: no blocking copy).
        self.evals = int(state.get("evals", 0))
        bs, bm = state.get("base_sum"), state.get("base_min_sum")
        self._base_sum = None if bs is None else torch.tensor(bs, dtype=torch.float64)
        self._base_min_sum = None if bm is None else torch.tensor(bm, dtype=torch.float64)
        prev = state.get("prev")
        self._prev = None if prev is None else [(torch.tensor(q), torch.tensor(k)) for q, k in prev]
