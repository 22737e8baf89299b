"""graphprune: trace a PyTorch model into its channel-dependency graph, prune it physically,
and ship it to ONNX.

The flow: ``trace`` -> ``ChannelGraph`` (groups) -> scores -> ``Plan`` -> ``apply_plan``
-> smaller model (+ masks) -> ``export_onnx``. ``prune`` runs it in one call.
"""

from ._checks import checking, checks, set_checks
from .apply import apply_plan
from .criteria import criterion, list_criteria
from .errors import (
    ConfigError, ExportError, GraphPruneError, InputError, MaskFileError, ParityError, PlanError,
    TraceError,
)
from . import coding, deploy, hf, quantize
from .export import export_bundle, export_onnx
from .fold import fold_batchnorm
from .capture import trace
from .config import PruneConfig
from .graph import ChannelGraph, Group
from .export.masks import apply_masks, load_masks, plan_from_masks, save_masks
from .plan import GroupPlan, LayerConfig, Plan
from .prune import PruneResult, make_plan, prune
from .report import Report

__version__ = "0.1.0"
__all__ = [
    "ChannelGraph",
    "ConfigError",
    "ExportError",
    "GraphPruneError",
    "Group",
    "GroupPlan",
    "InputError",
    "LayerConfig",
    "MaskFileError",
    "ParityError",
    "Plan",
    "PlanError",
    "PruneConfig",
    "PruneResult",
    "Report",
    "TraceError",
    "apply_masks",
    "apply_plan",
    "checking",
    "checks",
    "coding",
    "criterion",
    "deploy",
    "export_bundle",
    "export_onnx",
    "fold_batchnorm",
    "hf",
    "list_criteria",
    "load_masks",
    "make_plan",
    "plan_from_masks",
    "prune",
    "quantize",
    "save_masks",
    "set_checks",
    "trace",
]
