"""Stage 3: scores per channel unit of a group (higher = keep), or data-driven selectors.
See ``registry``."""

from . import activation, magnitude, saliency  # noqa: F401  (registers the built-in criteria)
from ..datadriven import select as _select  # noqa: F401,E402  (registers lasso and greedy)
from .registry import (
    Criterion, ScoreContext, criterion, get_criterion, list_criteria, score_group, selector,
)

__all__ = ["Criterion", "ScoreContext", "criterion", "get_criterion", "list_criteria",
           "score_group", "selector"]
