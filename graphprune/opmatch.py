"""Which modules an NNI-style config-list entry selects, shared by pruning, quantization and the
training-time methods: ``op_types`` are class names ('default' = the caller's default layer
classes; None = any class), ``op_names`` module paths with shell globs (empty = any path)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Collection, Sequence


def op_matches(path: str, type_name: str, op_types: Collection[str] | None, op_names: Sequence[str],
               default: Collection[str] | Callable[[str], bool]) -> bool:
    """Does the module at ``path`` of class ``type_name`` match the entry?"""
    is_default = default if callable(default) else default.__contains__
    type_ok = op_types is None or type_name in op_types or ("default" in op_types
                                                        and is_default(type_name))
    return type_ok and (not op_names or any(fnmatch.fnmatchcase(path, p) for p in op_names))
