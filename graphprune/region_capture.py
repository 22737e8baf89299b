"""Capture policy for region graphs, first half (stage 1): one real forward of the whole model with
hooks that record what every submodule is fed (``capture_calls``), and the maximal submodules that
torch.fx or torch.export capture on exactly those inputs (``find_regions``). ``graphprune.regions``
ties the regions together into one ``ChannelGraph``.
"""

from __future__ import annotations

import contextlib
import functools
import io
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .errors import GraphPruneError, TraceError
from .rules.registry import is_rule_leaf, module_rule_for
from .trace import Traced, export_trace, preserved_state, trace_model


# ---------------------------------------------------------------------- one real forward
@dataclass
class ModuleCall:
    """One call of a module: its inputs as pytree leaves (+ spec), its output and the modules that
    were running when it was made."""

    order: int
    leaves: list[Any]
    spec: Any
    output: Any
    parents: tuple[str, ...]


def tensor_ids(x: Any) -> list[int]:
    """The ids of the tensors among ``x``'s pytree leaves (a tensor is known by its identity)."""
    return [id(t) for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


def capture_calls(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                  ) -> tuple[dict[str, list[ModuleCall]], Any, list[Any]]:
    """Run ``model`` once (eval mode, state preserved) recording every module call.

    Returns path -> calls, the model's output, and the values that must stay alive while tensor
    ids are compared.
    """
    calls: dict[str, list[ModuleCall]] = defaultdict(list)
    active: list[str] = []
    counter = [0]
    pending: dict[int, list[tuple[int, tuple[str, ...]]]] = defaultdict(list)
    handles = []

    def pre(path: str, m: nn.Module, a: Any, kw: Any) -> None:
        pending[id(m)].append((counter[0], tuple(active)))
        counter[0] += 1
        active.append(path)

    def post(path: str, m: nn.Module, a: Any, kw: Any, out: Any) -> None:
        active.pop()
        order, parents = pending[id(m)].pop()
        leaves, spec = tree_flatten((tuple(a), dict(kw)))
        calls[path].append(ModuleCall(order, leaves, spec, out, parents))

    for path, m in model.named_modules():
        if path:
            handles.append(m.register_forward_pre_hook(functools.partial(pre, path),
                                                       with_kwargs=True))
            handles.append(m.register_forward_hook(functools.partial(post, path),
                                                   with_kwargs=True))
    try:
        with preserved_state(model, "eval"):
            y = model(*args, **kwargs)
    except Exception as e:
        raise TraceError(f"{type(model).__name__} does not run on the example inputs: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    finally:
        for h in handles:
            h.remove()
    return dict(calls), y, [calls, y]


# ---------------------------------------------------------------------- a region's root
class _RegionRoot(nn.Module):
    """The model's module tree (same children, so the same module paths) whose forward makes one
    recorded call of one submodule: ``forward(*tensors)`` puts the tensors back among the call's
    other arguments and calls the submodule."""

    def _gp_call(self, tensors: list[Any]) -> Any:
        leaves = list(self._gp_leaves)
        for i, t in zip(self._gp_pos, tensors):
            leaves[i] = t
        args, kwargs = tree_unflatten(leaves, self._gp_spec)
        return self.get_submodule(self._gp_path)(*args, **kwargs)


@functools.cache
def _root_class(n: int) -> type:
    # torch.fx makes one placeholder per named parameter of forward (not of *args)
    names = ", ".join(f"t{i}" for i in range(n))
    ns: dict[str, Any] = {}
    exec(f"def forward(self, {names}):\n    return self._gp_call([{names}])\n", ns)  # noqa: S102
    return type(f"Region{n}", (_RegionRoot,), {"forward": ns["forward"], "__module__": __name__})


def region_root(model: nn.Module, path: str, call: ModuleCall) -> tuple[nn.Module, tuple[Any, ...]]:
    """A root module that makes ``call`` of submodule ``path``, and the call's tensors."""
    pos = [i for i, v in enumerate(call.leaves) if isinstance(v, torch.Tensor)]
    root = _root_class(len(pos))()
    # only the path down to the submodule: its parameters keep their names in the model, and
    # torch.export lifts no other parameter
    parent = root
    parts = path.split(".")
    for name in parts[:-1]:
        shell = nn.Module()
        parent._modules[name] = shell
        parent = shell
    parent._modules[parts[-1]] = model.get_submodule(path)
    root._gp_path, root._gp_spec, root._gp_pos = path, call.spec, pos
    root._gp_leaves = [None if i in set(pos) else v for i, v in enumerate(call.leaves)]
    return root, tuple(call.leaves[i] for i in pos)


# ---------------------------------------------------------------------- tracing regions
def opaque_leaves(model: nn.Module, t: Traced) -> list[str]:
    """Opaque fx leaves with parameters and no module rule: their channels would be frozen."""
    if not t.leaves:
        return []
    mods = dict(model.named_modules())
    return [p for p in t.leaves if p in mods and module_rule_for(mods[p]) is None
            and any(True for _ in mods[p].parameters())]


def _trace_region(model: nn.Module, path: str, call: ModuleCall) -> Traced | None:
    """torch.fx, or torch.export when fx fails or hides parameterised modules; None if neither
    captures the whole call (its submodules are tried instead)."""
    root, tensors = region_root(model, path, call)
    if not tensors:
        return None
    try:
        t = trace_model(root, tensors, mode="eval")
        if not opaque_leaves(root, t):
            return t
    except GraphPruneError:
        pass
    try:  # torch.export prints the partial graph of a failure on stderr: not our user's concern
        with contextlib.redirect_stderr(io.StringIO()):
            return export_trace(root, tensors, mode="eval")
    except GraphPruneError:
        return None


def _is_candidate(m: nn.Module) -> bool:
    has_params = any(True for _ in m.parameters())
    return has_params or is_rule_leaf(m)


def find_regions(model: nn.Module, calls: dict[str, list[ModuleCall]]) -> list[tuple[str, Traced]]:
    """The maximal submodules that trace, in call order (producers before consumers).

    A submodule qualifies if it is called exactly once and every module inside it is only
    called from within it; otherwise its children are tried.
    """
    paths = list(calls)
    found: list[tuple[str, Traced]] = []

    def own(path: str) -> bool:
        inside = [p for p in paths if p.startswith(path + ".")]
        return len(calls[path]) == 1 and all(path in c.parents for p in inside for c in calls[p])

    def visit(path: str, m: nn.Module) -> None:
        if path not in calls or not _is_candidate(m):
            return
        t = _trace_region(model, path, calls[path][0]) if own(path) else None
        if t is not None:
            found.append((path, t))
            return
        for name, child in m.named_children():
            visit(f"{path}.{name}", child)

    for name, child in model.named_children():
        visit(name, child)
    found.sort(key=lambda pt: calls[pt[0]][0].order)
    return found
