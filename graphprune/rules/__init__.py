"""Channel rules: how each op couples, freezes or produces channels (see ``registry``)."""

from .registry import module_rule, op_rule, registered, resizer

__all__ = ["module_rule", "op_rule", "registered", "resizer"]
