"""Stage 5: apply a plan — physically shrink every coupled layer (``shrink``)."""

from .shrink import Applied, apply_plan, expected_shapes

__all__ = ["Applied", "apply_plan", "expected_shapes"]
