"""Built-in detectors, registered as a default plugin through ``register_detectors``.

Each detector is one module; see ``docs/detectors.md`` for the catalogue (formulas, signals,
params, cost).
"""

from lbw_policy.hookspecs import hookimpl

from .adam_update_stats import AdamUpdateStats
from .grad_mean_square import GradMeanSquare
from .attention_logits import AttentionLogits
from .grad_norm import GradNorm
from .grad_norm_trend import GradNormTrend
from .logit_divergence import LogitDivergence
from .loss_spike import LossSpike
from .lr_jump import LRJump
from .moe_router import MoERouter
from .nonfinite import NonFinite
from .spectral_entropy import SpectralEntropy
from .update_ratio import UpdateRatio

__all__ = ["AdamUpdateStats", "AttentionLogits", "GradMeanSquare", "GradNorm", "GradNormTrend", "LogitDivergence",
           "LossSpike", "LRJump", "MoERouter", "NonFinite", "SpectralEntropy", "UpdateRatio"]


@hookimpl
def register_detectors(register):
    register(LossSpike)
    register(GradNorm)
    register(NonFinite)
    register(GradNormTrend)
    register(UpdateRatio)
    register(AdamUpdateStats)
    register(SpectralEntropy)
    register(AttentionLogits)
    register(LogitDivergence)
    register(MoERouter)
    register(LRJump)
    register(GradMeanSquare)
