"""Training-time compression that plugs into your own loop: mask pruners (level, AGP, lottery
ticket, staged), ADMM (pruning, quantization, custom projections) and joint sparsity-quantization
budgets (with knowledge distillation). All take the same NNI-style config list (``targets.py``)."""

from .admm import ADMM
from .joint import JointBudget, compression_report, distillation_loss
from .projections import ChannelSparsity, Intersection, Levels, Projection, Sparsity
from .pruners import (
    AGPPruner, LevelPruner, LotteryTicketPruner, MaskPruner, StagedPruner, masked_weights_are_zero,
)

__all__ = ["ADMM", "AGPPruner", "ChannelSparsity", "Intersection", "JointBudget", "LevelPruner",
           "Levels", "LotteryTicketPruner", "MaskPruner", "Projection", "Sparsity", "StagedPruner",
           "compression_report", "distillation_loss", "masked_weights_are_zero"]
