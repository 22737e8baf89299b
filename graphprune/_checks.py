"""How hard graphprune checks its own work, when a call does not say: ``strict`` (a channel rule
that crashes raises instead of freezing the channels it touches) and ``verify`` (after applying a
plan: ``True`` checks every layer's input/output shapes, ``"full"`` re-traces the pruned model and
checks every intermediate value, ``False`` skips the check).

Explicit arguments (``trace(strict=...)``, ``prune(verify=...)``) always win; these defaults are
for test suites and debugging sessions:

    >>> with graphprune.checking(strict=True, verify="full"):
    ...     graphprune.prune(model, x, sparsity=0.5)
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, replace

from ._validate import check_choice


@dataclass(frozen=True)
class Checks:
    strict: bool = False
    verify: bool | str = True

    def __post_init__(self) -> None:
        check_choice(self.verify, "verify", "checking", (True, False, "full"))
        object.__setattr__(self, "strict", bool(self.strict))


_GLOBAL = Checks()
_OVERRIDE: contextvars.ContextVar[Checks | None] = contextvars.ContextVar("graphprune_checks",
                                                                         default=None)


def checks() -> Checks:
    """The defaults in force (``Checks(strict, verify)``).

    Example:
        >>> graphprune.checks().verify   # True
    """
    return _OVERRIDE.get() or _GLOBAL


def _with(strict: bool | None, verify: bool | str | None) -> Checks:
    given = {"strict": strict, "verify": verify}
    return replace(checks(), **{k: v for k, v in given.items() if v is not None})


def set_checks(*, strict: bool | None = None, verify: bool | str | None = None) -> Checks:
    """Change the defaults for the whole process; returns the new ones.

    Example:
        >>> graphprune.set_checks(strict=True, verify="full")   # in a test suite's conftest
    """
    global _GLOBAL
    _GLOBAL = _with(strict, verify)
    return _GLOBAL


@contextlib.contextmanager
def checking(*, strict: bool | None = None, verify: bool | str | None = None) -> Iterator[Checks]:
    """Use these defaults inside the ``with`` block only (this thread / task).

    Example:
        >>> with graphprune.checking(strict=True):
        ...     graphprune.trace(model, x)   # a crashing rule raises instead of freezing
    """
    token = _OVERRIDE.set(_with(strict, verify))
    try:
        yield checks()
    finally:
        _OVERRIDE.reset(token)
