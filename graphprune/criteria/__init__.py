"""Stage 3: scores per channel unit of a group (higher = keep). See ``registry``."""

from . import magnitude  # noqa: F401  (registers l1, l2, fpgm, random)
from .registry import ScoreContext, criterion, get_criterion, list_criteria, score_group

__all__ = ["ScoreContext", "criterion", "get_criterion", "list_criteria", "score_group"]
