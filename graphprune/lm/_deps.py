"""Optional dependencies of graphprune.lm, imported only when a function needs them."""

from __future__ import annotations

from types import ModuleType

from ..errors import ConfigError


def need(module: str, what: str) -> ModuleType:
    """Import ``module`` (``transformers`` or ``tokenizers``) or raise a ConfigError saying how
    to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{what} needs {module}: pip install 'graphprune[hf]'.") from e


def has(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None
