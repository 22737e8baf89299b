"""Block-wise caching for sequential data-driven pruning: the traced graph of the working copy is
run node by node from a cached *frontier* (the values live at one position of the graph, for
every calibration batch) instead of from the images for every group.

A group whose first touched node is at position ``p`` cannot change any value computed before
``p``. So ``collect`` runs from the frontier to the group's last consumer, moving the frontier to
``p`` on the way, and samples the consumers' inputs. Groups come in producer order, so over a
whole model the frontier moves forward once, plus each group's span from ``p`` to its last
consumer: a few passes in total instead of one partial pass per group. A group touching nodes
before the frontier restarts it from the inputs (always correct, only slower).

Values cached in the frontier are never changed: an in-place node about to write into a cached
tensor first copies its storage (copy-on-write, views keep sharing the copy); a frontier larger than
``FRONTIER_BYTES`` is not kept (the next group re-runs from the inputs). Graphs that cannot
be replayed this way (torch.export graphs, ``*args`` forwards) return ``None`` from ``build`` and
the caller runs the whole model instead.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..calibration import Calibration
from ..graph import ChannelGraph
from .collect import Samples, Sampler, batch_inputs

FRONTIER_BYTES = 2 << 30  # a larger frontier is dropped (the next group re-runs from the inputs)
_INPLACE_FUNCS = {operator.setitem, operator.iadd, operator.isub, operator.imul,
                  operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow,
                  operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
                  operator.imatmul}


def _tensors(v: Any):
    if isinstance(v, torch.Tensor):
        yield v
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from _tensors(x)
    elif isinstance(v, dict):
        for x in v.values():
            yield from _tensors(x)


def _rebuild(v: Any, ptr: int, storage: torch.UntypedStorage) -> Any:
    """``v`` with every tensor on the storage at ``ptr`` re-pointed at ``storage``."""
    if isinstance(v, torch.Tensor):
        if v.untyped_storage().data_ptr() != ptr:
            return v
        return torch.empty(0, dtype=v.dtype, device=v.device).set_(
            storage, v.storage_offset(), v.size(), v.stride())
    if isinstance(v, (list, tuple)) and not isinstance(v, torch.Size):
        out = [_rebuild(x, ptr, storage) for x in v]
        return type(v)(out) if not hasattr(v, "_fields") else type(v)(*out)
    if isinstance(v, dict):
        return {k: _rebuild(x, ptr, storage) for k, x in v.items()}
    return v


class FrontierRunner:
    """Replays ``graph.traced[0]`` on ``work`` (a copy of the traced model) from a frontier."""

    def __init__(self, graph: ChannelGraph, work: nn.Module, calib: Calibration,
                 device: torch.device | None, max_bytes: int = FRONTIER_BYTES):
        t = graph.traced[0]
        self.graph, self.calib, self.device = graph, calib, device
        self.nodes = [n for n in t.graph.nodes if n.op != "output"]
        self.output = next((n for n in t.graph.nodes if n.op == "output"), None)
        self.outputs: list[Any] = []
        self.pos_of = {n: i for i, n in enumerate(self.nodes)}
        self.mods = dict(work.named_modules(remove_duplicate=False))
        self.work, self.root = work, t.root
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        n_nodes = len(self.nodes)
        self.last_use = {n: max((self.pos_of.get(u, n_nodes) for u in n.users), default=-1)
                         for n in self.nodes}
        self.frees = [[a for a in n.all_input_nodes if self.last_use[a] == i]
                      for i, n in enumerate(self.nodes)]
        self.inplace = [self._is_inplace(n) for n in self.nodes]
        self.reads = self._reads(graph, work)
        self.first_call: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            if n.op == "call_module":
                self.first_call.setdefault(str(n.target), i)
        self.pos = 0
        self.frontier: list[dict[fx.Node, Any]] = [{} for _ in range(len(calib))]
        self.max_bytes = max_bytes
        self._held = 0
        self.node_runs = 0  # nodes executed, summed over batches (for tests and benchmarks)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, graph: ChannelGraph, work: nn.Module, calib: Calibration,
              device: torch.device | None) -> FrontierRunner | None:
        """A runner, or None when the traced graph cannot be replayed on ``work``."""
        t = graph.traced[0]
        if t.tracer != "torch.fx":
            return None
        mods = dict(work.named_modules(remove_duplicate=False))
        n_inputs = len(calib.batches[0])
        for i, n in enumerate(n for n in t.graph.nodes if n.op == "placeholder"):
            if str(n.target).startswith("*") or (i >= n_inputs and not n.args):
                return None
        for n in t.graph.nodes:
            if n.op == "call_module" and n.target not in mods:
                return None
        return cls(graph, work, calib, device)

    def _is_inplace(self, n: fx.Node) -> bool:
        if n.op == "call_module":
            return bool(getattr(self.mods[n.target], "inplace", False))
        if n.op == "call_function":
            name = getattr(n.target, "__name__", "")
            return (n.target in _INPLACE_FUNCS or bool(n.kwargs.get("inplace"))
                    or (name.endswith("_") and not name.endswith("__")))
        if n.op == "call_method":
            name = str(n.target)
            return (name.endswith("_") and not name.endswith("__")) or name in (
                "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__")
        return False

    def _reads(self, graph: ChannelGraph, work: nn.Module) -> list[set[str]]:
        """Canonical names of the parameters/buffers each node reads."""
        named = list(work.named_parameters(remove_duplicate=False))
        named += [(k, b) for k, b in work.named_buffers(remove_duplicate=False) if b is not None]
        canon = {k: graph.aliases.get(k, k) for k, _ in named}
        out = []
        for n in self.nodes:
            if n.op == "call_module":
                pre = f"{n.target}." if n.target else ""
                out.append({c for k, c in canon.items() if k.startswith(pre)})
            elif n.op == "get_attr":
                pre = f"{n.target}."
                out.append({c for k, c in canon.items() if k == n.target or k.startswith(pre)})
            else:
                out.append(set())
        return out

    # ------------------------------------------------------------------ queries
    def first_read(self, params: set[str]) -> int:
        """Position of the first node that reads any of ``params`` (canonical names)."""
        for i, r in enumerate(self.reads):
            if r & params:
                return i
        return len(self.nodes)

    # ------------------------------------------------------------------ running
    def _attr(self, target: str) -> Any:
        obj: Any = self.work
        try:
            for a in target.split("."):
                obj = getattr(obj, a)
            return obj
        except AttributeError:
            obj = self.root
            for a in target.split("."):
                obj = getattr(obj, a)
            return obj

    def _exec(self, n: fx.Node, env: dict[fx.Node, Any], xs: tuple) -> Any:
        if n.op == "placeholder":
            i = self.placeholders.index(n)
            return xs[i] if i < len(xs) else n.args[0]
        if n.op == "get_attr":
            return self._attr(str(n.target))
        args = fx.node.map_arg(n.args, env.__getitem__)
        kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
        if n.op == "call_module":
            return self.mods[n.target](*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        obj, *rest = args  # call_method
        return getattr(obj, n.target)(*rest, **kwargs)

    def _copy_on_write(self, n: fx.Node, env: dict[fx.Node, Any], shared: set[int]) -> None:
        """Before ``n`` writes in place into a cached tensor: give this run its own storage."""
        arg = n.args[0] if n.args else None
        if not isinstance(arg, fx.Node):
            return
        for t in _tensors(env.get(arg)):
            ptr = t.untyped_storage().data_ptr()
            if ptr in shared:
                storage = t.untyped_storage().clone()
                for k in list(env):
                    env[k] = _rebuild(env[k], ptr, storage)
                shared.discard(ptr)

    def _run(self, b: int, stop: int, capture: int,
             before: Callable[[int, dict[fx.Node, Any]], None],
             after: Callable[[int, dict[fx.Node, Any]], None], execute_last: bool) -> Any:
        """Run batch ``b`` from the frontier through node ``stop``, calling ``before(i, env)`` and
        ``after(i, env)`` around node ``i``; the frontier moves to ``capture``. Returns the
        model's output when the run reaches the end of the graph."""
        env = dict(self.frontier[b])
        shared = {p for v in env.values() for t in _tensors(v)
                  if (p := t.untyped_storage().data_ptr())}
        xs = batch_inputs(self.calib.batches[b], self.device)
        for i in range(self.pos, stop + 1):
            if i == capture:
                self.frontier[b] = dict(env)
                storages = {s.data_ptr(): s.nbytes() for v in env.values() for t in _tensors(v)
                            if (s := t.untyped_storage()).data_ptr()}
                shared |= set(storages)
                self._held += sum(storages.values())
            before(i, env)
            if i == stop and not execute_last:
                return None
            n = self.nodes[i]
            if self.inplace[i]:
                self._copy_on_write(n, env, shared)
            env[n] = self._exec(n, env, xs)
            self.node_runs += 1
            after(i, env)
            for a in self.frees[i]:
                env.pop(a, None)
            if self.last_use[n] < 0:
                env.pop(n, None)
        if stop == len(self.nodes) - 1 and self.output is not None:
            return fx.node.map_arg(self.output.args[0], env.__getitem__)
        return None

    def collect(self, paths: list[str], start: int, rows: int, *, inputs: bool = True,
                outputs: bool = False, to_end: bool = False) -> dict[str, Samples]:
        """Sample the layers at ``paths`` (inputs and/or outputs) on every calibration batch,
        running from the frontier; the frontier moves to ``start``. No value computed before
        ``start`` may depend on anything changed since the frontier was captured. With
        ``to_end`` the whole graph runs and ``self.outputs`` holds the model's output per batch."""
        at: dict[int, list[str]] = {}
        for p in paths:
            at.setdefault(self.first_call[p], []).append(p)
        stop = len(self.nodes) - 1 if to_end else max(at)
        start = min(start, min(at))
        if start < self.pos:  # restart from the inputs
            self.pos, self.frontier = 0, [{} for _ in range(len(self.calib))]
        sampler = Sampler(paths, self.calib, rows)
        self.outputs = []
        self._held = 0
        b = 0

        def before(i: int, env: dict[fx.Node, Any]) -> None:
            if inputs:
                for p in at.get(i, ()):
                    sampler.inputs(self.mods[p], p, b, env[self.nodes[i].args[0]])

        def after(i: int, env: dict[fx.Node, Any]) -> None:
            if outputs:
                for p in at.get(i, ()):
                    n = self.nodes[i]
                    sampler.outputs(self.mods[p], p, b, env[n.args[0]], env[n])

        with torch.no_grad():
            for b in range(len(self.calib)):
                y = self._run(b, stop, start, before, after, execute_last=outputs or to_end)
                if to_end:
                    self.outputs.append(y)
        self.pos = start
        if self._held > self.max_bytes:  # too large to keep: the next group starts from the inputs
            self.pos, self.frontier = 0, [{} for _ in range(len(self.calib))]
        return sampler.result()
