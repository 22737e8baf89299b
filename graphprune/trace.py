"""Stage 1 of the flow: model -> torch.fx graph with every value's shape recorded.

``trace_model`` symbolically traces a model. When tracing fails inside a submodule (Python
control flow on shapes, data-dependent branches), that module's class is made an fx leaf and the
trace is retried; the leaves are recorded with the fx reason so the channel graph can freeze what
they touch. The traced graph is then run once on the example inputs, recording the shape of every
tensor and the value of every small Python value (sizes, tuples), which the channel rules read:
on ``meta`` tensors (shape functions only) where that gives the same values, else for real.
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.fx as fx
from torch import nn

from ._metashape import shape_only_call, shape_only_function
from ._modcopy import copy_tensor, copy_tree, meta_args, to_meta
from .errors import InputError, TraceError
from .rules.registry import is_rule_leaf

MAX_LEAF_RETRIES = 64


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor value seen while running the graph."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass
class Traced:
    """A traced model: the fx graph, the recorded values, and what tracing had to give up on.

    ``root`` is a shallow copy of the model that shares its submodules and tensors; fx stores the
    tensor constants it meets on it, so the caller's model never gains attributes.
    """

    model: nn.Module
    root: nn.Module
    graph: fx.Graph
    values: dict[fx.Node, Any]
    leaves: dict[str, str] = field(default_factory=dict)  # module path -> fx reason
    mode: str = "eval"
    tracer: str = "torch.fx"
    inputs: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})

    leaf_types: tuple[type, ...] = ()
    params: dict[str, str] = field(default_factory=dict)  # placeholder name -> parameter FQN
    why: str = ""  # why this tracer was used
    # shapes recorded on meta tensors: the model's shapes and control flow do not read values
    shapes_on_meta: bool = False

    @property
    def gm(self) -> fx.GraphModule:
        """The graph as an executable GraphModule (built on demand)."""
        return fx.GraphModule(self.root, self.graph, type(self.model).__name__)


class Inputs(NamedTuple):
    """Positional and keyword inputs of one forward call, already separated."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def normalize_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Turn a tensor, a tuple/list of positional inputs or a dict of keyword inputs into args."""
    if isinstance(example_inputs, Inputs):
        return tuple(example_inputs.args), dict(example_inputs.kwargs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        if not example_inputs:
            raise InputError("example_inputs is empty: pass a tensor shaped like the model's input.")
        return tuple(example_inputs), {}
    raise InputError(
        "example_inputs must be a tensor, a tuple/list of positional inputs or a dict of keyword "
        f"inputs. Got {type(example_inputs).__name__} instead."
    )


def describe(value: Any) -> Any:
    """Reduce a runtime value to what the rules need: TensorSpec for tensors, small values kept."""
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), value.dtype)
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        out = [describe(v) for v in value]
        return out if isinstance(value, list) else tuple(out)
    if isinstance(value, Mapping):
        return {k: describe(v) for k, v in value.items()}
    return value


class _Tracer(fx.Tracer):
    """An fx tracer that treats chosen module classes as leaves and remembers where it failed."""

    def __init__(self, leaf_types: tuple[type, ...]):
        super().__init__()
        self.leaf_types = leaf_types
        self.failed_at: tuple[str, nn.Module] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if is_rule_leaf(m):  # a channel rule describes the whole module (transformers' Conv1D)
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:  # innermost module whose forward raised
                self.failed_at = (self.path_of_module(m), m)
            raise


def symbolic_trace(model: nn.Module, leaf_types: tuple[type, ...] = ()
                   ) -> tuple[nn.Module, fx.Graph, dict[str, str], tuple[type, ...]]:
    """fx-trace ``model``; classes whose forward cannot be traced become leaves (retrying).

    Returns the root the graph refers to (a shallow copy of ``model``), the graph, the opaque
    module paths with the fx reason, and the leaf classes.
    """
    leaf_types: list[type] = list(leaf_types)
    reasons: dict[str, str] = {}
    for _ in range(MAX_LEAF_RETRIES):
        tracer = _Tracer(tuple(leaf_types))
        root = copy.copy(model)  # fx setattr()s tensor constants on the root: not on the user's
        try:
            graph = tracer.trace(root)
        except Exception as e:  # fx raises many types; all become one TraceError below
            where = tracer.failed_at
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if where is None or where[0] == "" or type(where[1]) in leaf_types:
                raise TraceError(
                    f"torch.fx could not trace {type(model).__name__}"
                    + (f" (in module '{where[0]}')" if where and where[0] else " (in its own forward)")
                    + f": {reason}. graphprune needs a traceable forward: move shape-dependent "
                    "Python control flow into a submodule (it is then traced as an opaque leaf) or "
                    "pass a model whose forward takes only tensors."
                ) from e
            leaf_types.append(type(where[1]))
            reasons[where[0]] = reason
            continue
        # every instance of a leaf class is opaque, not only the one that failed
        if leaf_types:
            for name, m in model.named_modules():
                if isinstance(m, tuple(leaf_types)) and name not in reasons:
                    reasons[name] = f"same class as a module fx could not trace ({type(m).__name__})"
        return root, graph, reasons, tuple(leaf_types)
    raise TraceError(
        f"torch.fx could not trace {type(model).__name__}: gave up after {MAX_LEAF_RETRIES} "
        f"untraceable module classes ({', '.join(t.__name__ for t in leaf_types[:5])}, ...)."
    )


_SMALL_TENSOR = 1 << 20  # plain tensor attributes up to this many elements get their values back
_CONTAINERS = frozenset((dict, OrderedDict, list))
_NOT_TENSOR = frozenset((bool, int, float, str, tuple, type(None), frozenset, set)) | _CONTAINERS


def _snapshot_modules(modules: list[nn.Module]) -> list[tuple[Any, ...]]:
    """Every module's attribute dict as it is now: which objects it holds, the contents of the
    containers it holds (restored into the same container objects, so hook handles stay valid;
    only non-empty ones are copied, most hook tables are empty) and the values of small plain
    tensor attributes (caches that forward fills in place)."""
    snap = []
    for m in modules:
        attrs = m.__dict__.copy()
        vs = attrs.values()
        held = [(v, v[:] if type(v) is list else v.copy())
                for v in vs if type(v) in _CONTAINERS and v]
        values = [(v, v.detach().clone()) for v in vs if type(v) not in _NOT_TENSOR
                  and isinstance(v, torch.Tensor) and _plain_small(v)]
        snap.append((m.__dict__, attrs, held, values))
    return snap


def _plain_small(v: torch.Tensor) -> bool:
    return not isinstance(v, nn.Parameter) and v.device.type != "meta" \
        and v.numel() <= _SMALL_TENSOR and not _is_fake(v)


def _is_fake(t: torch.Tensor) -> bool:
    return type(t).__name__ in ("FakeTensor", "FunctionalTensor") or t.device.type == "meta"


def _restore_modules(snap: list[Any]) -> None:
    for d, attrs, held, values in snap:
        d.clear()
        d.update(attrs)
        for v in attrs.values():  # every container as it was: emptied, then refilled if it held
            if type(v) in _CONTAINERS and v:
                v.clear()
        for c, items in held:
            if type(c) is list:
                c[:] = items
            else:
                c.update(items)
        for t, v in values:
            if t.shape == v.shape and not t.is_inference():
                t.copy_(v)


@contextlib.contextmanager
def kept_buffers(model: nn.Module, mods: list[nn.Module] | None = None) -> Iterator[None]:
    """Restore the values of the model's buffers on exit (``mods``: its modules, if known)."""
    saved, seen = [], set()
    for m in model.modules() if mods is None else mods:  # model.buffers(), one walk
        for b in m._buffers.values():
            if b is not None and id(b) not in seen and b.device.type != "meta":
                seen.add(id(b))
                saved.append((b, b.detach().clone()))
    try:
        yield
    finally:
        for b, v in saved:
            b.copy_(v)


@contextlib.contextmanager
def preserved_state(model: nn.Module, mode: str, buffers: bool = True) -> Iterator[None]:
    """Run in ``mode`` ('eval'/'train') and leave the model exactly as found: modes, buffers'
    values (unless ``buffers=False``: the caller keeps them), the RNG, and every attribute forward
    assigns (a detection head caching anchors, tracers' fake tensors): each module's attributes,
    containers and hooks are restored."""
    mods = list(model.modules())
    snap = _snapshot_modules(mods)
    want = mode == "train"
    if any(m.training != want for m in mods):
        model.train(want)
    try:
        with kept_buffers(model, mods) if buffers else contextlib.nullcontext(), \
                torch.random.fork_rng(devices=[]), torch.no_grad():
            yield
    finally:
        _restore_modules(snap)  # also restores every module's training flag


class _Recorder(fx.Interpreter):
    """Runs the graph and describes every value. With ``meta`` the inputs are meta tensors and
    the model is not copied as a whole: stock layers get their output shapes from their
    attributes (``_metashape``), and a ``meta`` copy is made, once, of each other module the
    graph calls and each tensor it fetches (one memo: tied tensors stay tied)."""

    def __init__(self, root: nn.Module, graph: fx.Graph, meta: bool = False):
        super().__init__(root, graph=graph)
        self.values: dict[fx.Node, Any] = {}
        self._meta = meta
        self._memo: dict[int, Any] = {}

    def _meta_copy(self, v: Any) -> Any:
        if isinstance(v, nn.Module):
            return copy_tree(v, to_meta, self._memo)
        if isinstance(v, torch.Tensor) and v.device.type != "meta":
            return copy_tensor(v, to_meta, self._memo)
        return v

    def get_attr(self, target, args, kwargs):
        v = super().get_attr(target, args, kwargs)
        return self._meta_copy(v) if self._meta else v

    def call_module(self, target, args, kwargs):
        m = self.submodules.get(target)
        if m is None:  # a second path to a shared module (the Interpreter lists each once)
            m = self.fetch_attr(target)
        if self._meta:
            out = shape_only_call(m, args, kwargs)
            if out is not None:
                return out
            m = self._meta_copy(m)
        return m(*args, **kwargs)

    def call_function(self, target, args, kwargs):
        if self._meta:
            out = shape_only_function(target, args, kwargs)
            if out is not None:
                return out
        return super().call_function(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except InputError:
            raise
        except Exception as e:
            target = n.target if n.op != "call_module" else f"module '{n.target}'"
            raise InputError(
                f"The example inputs do not fit the model: node '{n.name}' ({target}) failed with "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Pass example inputs "
                "of the shape and dtype the model's forward expects (batch first)."
            ) from e
        self.values[n] = describe(result)
        return result


def record_values(root: nn.Module, graph: fx.Graph, args: tuple[Any, ...],
                  kwargs: dict[str, Any], *, meta: bool = False) -> dict[fx.Node, Any]:
    """Run ``graph`` (whose targets live on ``root``) and return every node's described value.

    With ``meta`` the run happens on ``meta`` tensors: shapes only, no compute and no memory for
    weights (models that live on the meta device; ``record_shapes`` tries it first).
    """
    if meta:
        return _record(root, graph, meta_args(args), meta_args(kwargs), True)
    return _record(root, graph, args, kwargs)


# what a tensor's device says differs between a meta run and a real one
_DEVICE_ATTRS = frozenset(("device", "is_cuda", "is_cpu", "is_meta", "is_mps", "is_xpu"))
_DEVICE_METHODS = frozenset(("get_device", "is_pinned", "data_ptr"))


def _reads_device(graph: fx.Graph) -> bool:
    for n in graph.nodes:
        if n.op == "call_method" and n.target in _DEVICE_METHODS:
            return True
        if n.op == "call_function" and getattr(n.target, "__name__", "") == "getattr" \
                and len(n.args) > 1 and n.args[1] in _DEVICE_ATTRS:
            return True
    return False


def record_shapes(root: nn.Module, graph: fx.Graph, args: tuple[Any, ...], kwargs: dict[str, Any],
                  *, meta: bool = False) -> tuple[dict[fx.Node, Any], bool]:
    """``record_values`` at the cost of shape functions: the graph runs on ``meta`` tensors
    (no compute: 2-10x faster than the real forward of a CNN at 224x224, see ``_metashape``)
    unless it reads a tensor's device, and on the real inputs whenever the meta run fails (code
    that reads values: ``.item()``, data-dependent shapes, an op without a meta kernel, a tensor
    held where the meta copies do not reach). Every recorded shape and small value is what the real
    run gives. Integer inputs (token ids, indices) take the real run: their values are read (an
    id out of an embedding's range is then an error here, not a wrong shape later).
    Also returns whether the values came from meta tensors."""
    if meta or (not _reads_device(graph) and not _integer_inputs(args, kwargs)):
        try:
            return record_values(root, graph, args, kwargs, meta=True), True
        except Exception:  # the real run below raises the error the caller should see
            if meta:  # a model on the meta device has no real run
                raise
    with kept_buffers(root):  # a real run may update them (the caller keeps everything else)
        return record_values(root, graph, args, kwargs), False


def _integer_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    return any(isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.is_complex())
               for t in leaves)


def on_meta(model: nn.Module, modules: Any = None) -> bool:
    """Whether any parameter lives on the meta device (``modules``: the model's, if at hand)."""
    mods = model.modules() if modules is None else modules
    return any(p is not None and p.device.type == "meta" for m in mods for p in m._parameters.values())


def _record(root: nn.Module, graph: fx.Graph, args: tuple[Any, ...],
            kwargs: dict[str, Any], meta: bool = False) -> dict[fx.Node, Any]:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    ordered = list(args)
    for n in placeholders[len(args):]:
        if n.target in kwargs:
            ordered.append(kwargs[n.target])
        elif n.args:  # default value recorded by fx
            ordered.append(n.args[0])
        else:
            raise InputError(
                f"The model's forward takes input '{n.target}' but example_inputs does not provide "
                f"it (got {len(args)} positional and {sorted(kwargs)} keyword inputs)."
            )
    if len(args) > len(placeholders):
        raise InputError(
            f"example_inputs has {len(args)} positional inputs but the model's forward takes "
            f"{len(placeholders)} ({', '.join(str(n.target) for n in placeholders)})."
        )
    rec = _Recorder(root, graph, meta)
    rec.run(*ordered)
    return rec.values


def trace_model(model: nn.Module, example_inputs: Any, *, mode: str = "eval") -> Traced:
    """Trace ``model`` with torch.fx and record every value on ``example_inputs``.

    The model is traced in ``mode`` ('eval' or 'train'); its modes, buffers and the global RNG are
    restored afterwards, so the caller's model is unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"model must be a torch.nn.Module. Got {type(model).__name__} instead.")
    args, kwargs = normalize_inputs(example_inputs)
    meta = on_meta(model)
    with preserved_state(model, mode, buffers=False):  # record_shapes keeps them
        root, graph, leaves, leaf_types = symbolic_trace(model)
        values, on_meta_tensors = record_shapes(root, graph, args, kwargs, meta=meta)
    return Traced(model=model, root=root, graph=graph, values=values, leaves=leaves, mode=mode,
                  inputs=(args, kwargs), leaf_types=leaf_types, shapes_on_meta=on_meta_tensors)


def export_trace(model: nn.Module, example_inputs: Any, *, mode: str = "eval", why: str = "",
                 inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None) -> Traced:
    """Trace ``model`` with ``torch.export`` (ATen-level graph; parameters are placeholders mapped
    back to their names, so pruning still slices the model's own modules). Every value's shape
    comes from the exporter's fake tensors: nothing runs on real data."""
    args, kwargs = normalize_inputs(example_inputs) if inputs is None else inputs
    try:
        with preserved_state(model, mode):
            ep = torch.export.export(model, args, kwargs, strict=False)
    except Exception as e:
        raise TraceError(f"torch.export could not trace {type(model).__name__} either: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    from torch.export.graph_signature import InputKind

    params = {s.arg.name: s.target for s in ep.graph_signature.input_specs
              if s.kind in (InputKind.PARAMETER, InputKind.BUFFER) and s.target is not None}
    gm = ep.graph_module
    values = {n: describe(n.meta["val"]) for n in gm.graph.nodes if "val" in n.meta}
    return Traced(model=model, root=gm, graph=gm.graph, values=values, mode=mode,
                  tracer="torch.export", inputs=(args, kwargs), params=params, why=why)
