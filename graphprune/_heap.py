"""Garbage collection during the pruning flow (trace -> apply): scan only what the flow creates.

Python's cyclic collector runs every few hundred allocations, and now and then a run scans the
whole heap: in a process that imported torch and holds a few models that is several hundred
thousand objects and ~0.2 s, paid inside whichever call happened to allocate then.
``frozen_heap`` moves the objects that exist when the flow starts to the collector's permanent
generation (``gc.freeze``) and back at the end (``gc.unfreeze``): the collector keeps running,
over the flow's own objects only. Nothing is kept alive longer than without it (frozen objects
that die by reference count are freed as usual; cyclic garbage among them waits for the next
full collection after the flow). A caller who froze objects itself (a pre-fork server) is left
alone: the heap is then not frozen and not unfrozen.
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
from collections.abc import Iterator

_INSIDE = contextvars.ContextVar("graphprune_frozen_heap", default=False)


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Within the block, collections scan only objects created in it (usable as a decorator;
    nested uses cost nothing: ``gc.get_freeze_count`` walks the frozen objects).

    Example:
        >>> with frozen_heap():
        ...     graph = build_graph(model, traced)
    """
    if _INSIDE.get() or not gc.isenabled():  # nested, or the caller manages the collector
        yield
        return
    token = _INSIDE.set(True)
    froze = not gc.get_freeze_count()
    if froze:
        gc.freeze()
    try:
        yield
    finally:
        if froze:
            gc.unfreeze()
        _INSIDE.reset(token)
