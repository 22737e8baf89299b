"""One exception family for everything graphprune reports to its user.

Every error names the culprit (module path, fx node, file or parameter), what was expected,
what was got and, where there is one, how to fix it. Subclasses also derive from the builtin
that describes them (``ValueError``/``TypeError``) so generic handlers keep working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class GraphPruneError(Exception):
    """Base class of every error graphprune raises on purpose. ``param`` names the setting at
    fault when there is one (the command line maps it to its option)."""

    def __init__(self, message: str = "", *, param: str | None = None):
        super().__init__(message)
        self.param = param


class ConfigError(GraphPruneError, ValueError):
    """A parameter or configuration value is invalid."""


class TraceError(GraphPruneError, RuntimeError):
    """The model could not be traced into a graph."""


class InputError(GraphPruneError, ValueError):
    """The example or calibration inputs do not fit the model."""


class PlanError(GraphPruneError, ValueError):
    """A pruning plan or mask file does not fit the model it is applied to."""


class MaskFileError(GraphPruneError, ValueError):
    """A mask or weights file is unreadable, not safetensors, or malformed."""


class ExportError(GraphPruneError, RuntimeError):
    """Exporting to ONNX failed; nothing was written."""


class ParityError(GraphPruneError, AssertionError):
    """A rewritten or exported model does not compute what its source computes."""


class RegistryError(GraphPruneError, KeyError):
    """A name was looked up in a registry (criterion, rule, quantizer) that does not hold it."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest option, or ``""``."""
    close = difflib.get_close_matches(str(name), list(options), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown_name(kind: str, name: str, options: Iterable[str]) -> RegistryError:
    """Build the error for a registry miss: lists what is registered, suggests the nearest."""
    opts = sorted(options)
    return RegistryError(
        f"Unknown {kind} '{name}'. Registered: {', '.join(opts)}.{did_you_mean(name, opts)}"
    )
