"""Mask files: what a plan removes, as 0/1 tensors of the ORIGINAL parameter shapes.

Masks are saved with safetensors (never pickle) together with the plan in the file's metadata.
``apply_masks`` rebuilds the pruned model from a fresh instance of the architecture: prune on one
machine, ship the small mask file, rebuild anywhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import MaskFileError, PlanError
from ..capture import trace
from ..graph import ChannelGraph
from .._safetensors import dumps
from ..io import atomic_write_bytes, read_file
from ..plan import GroupPlan, Plan

MASK_FORMAT = "graphprune.masks"
MASK_VERSION = "1"


def save_masks(masks: Mapping[str, torch.Tensor], path: str | os.PathLike,
               plan: Plan | None = None) -> None:
    """Write ``masks`` (name -> bool tensor) to a safetensors file, atomically.

    The bytes are deterministic: the same masks and plan always give the same file.

    Raises:
        OutputError: the file cannot be written (nothing is left behind).

    Example:
        >>> r = graphprune.prune(model, x, sparsity=0.5)
        >>> graphprune.save_masks(r.masks, "masks.safetensors", plan=r.plan)
    """
    tensors = {}
    for k, v in masks.items():
        if not isinstance(v, torch.Tensor):
            raise MaskFileError(f"mask '{k}' must be a tensor. Got {type(v).__name__}.")
        tensors[k] = v.detach().to("cpu", torch.bool)
    meta = {"format": MASK_FORMAT, "version": MASK_VERSION}
    if plan is not None:
        meta["plan"] = json.dumps(plan.to_dict(), separators=(",", ":"))
    atomic_write_bytes(path, dumps(tensors, meta))


_PICKLE_HINT = (
    "graphprune never unpickles files (a pickle can run arbitrary code). Convert it once, in a "
    "trusted environment, with: safetensors.torch.save_file({k: v.bool().contiguous() for k, v "
    "in torch.load(path, weights_only=True).items()}, 'masks.safetensors')"
)


def read_safetensors(path: str | os.PathLike, what: str = "mask file"
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file with a clear error for pickles, truncation and corruption."""
    path = os.fspath(path)
    data = read_file(path, what, MaskFileError)
    if data[:2] == b"PK" or data[:1] == b"\x80":
        raise MaskFileError(f"{what} '{path}' is a pickle / torch.save archive, not safetensors. "
                            + _PICKLE_HINT)
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
    except (SafetensorError, ValueError, json.JSONDecodeError, Exception) as e:
        raise MaskFileError(f"{what} '{path}' is not a valid safetensors file "
                            f"({type(e).__name__}: {e}). It may be truncated or corrupted.") from e
    return tensors, dict(header.get("__metadata__") or {})


def load_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read masks written by ``save_masks`` (any safetensors file of 0/1 tensors is accepted).

    Raises:
        MaskFileError: the file is missing, a pickle, truncated, or holds non-0/1 values.

    Example:
        >>> masks = graphprune.load_masks("masks.safetensors")
        >>> small = graphprune.apply_masks(fresh_model, masks, x)
    """
    tensors, meta = read_safetensors(path)
    if meta.get("format") not in (None, MASK_FORMAT):
        raise MaskFileError(f"'{path}' is a {meta.get('format')} file, not a graphprune mask file.")
    if meta.get("version") not in (None, MASK_VERSION):
        raise MaskFileError(f"mask file '{path}' has version {meta.get('version')}; this "
                            f"graphprune reads version {MASK_VERSION}.")
    out = {}
    for k, v in tensors.items():
        if v.dtype != torch.bool:
            if not torch.all((v == 0) | (v == 1)):
                raise MaskFileError(f"mask '{k}' in '{path}' holds values other than 0 and 1.")
            v = v != 0
        out[k] = v
    return out


def plan_from_masks(graph: ChannelGraph, masks: Mapping[str, torch.Tensor]) -> Plan:
    """The plan that produces ``masks`` on ``graph``'s model.

    Raises:
        PlanError: a mask names a parameter the model lacks, has another shape, removes part of
            a unit, or removes channels of a frozen group.

    Example:
        >>> plan = graphprune.plan_from_masks(graphprune.trace(model, x), masks)
    """
    unknown = [k for k in masks if k not in graph.aliases]
    if unknown:
        raise PlanError(
            f"the masks name {len(unknown)} tensor(s) the model does not have: "
            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}. The mask file is "
            "from another architecture (or the model is wrapped differently).")
    kept: dict[tuple[str, int], np.ndarray] = {}
    for k, m in masks.items():
        canon = graph.aliases[k]
        t = graph.params[canon]
        if tuple(m.shape) != tuple(t.shape):
            raise PlanError(f"mask '{k}' has shape {tuple(m.shape)} but the model's tensor has "
                            f"{tuple(t.shape)}: the mask file is from another architecture or width.")
        m = m.bool()
        for d in range(m.ndim):
            other = [x for x in range(m.ndim) if x != d]
            kept[(canon, d)] = (m.any(dim=other) if other else m).numpy()
    groups = {}
    for g in graph.groups:
        removed = np.zeros(g.size, dtype=bool)
        seen = np.zeros(g.size, dtype=bool)
        for mem in g.members:
            kv = kept.get((mem.param, mem.dim))
            if kv is None:
                continue
            r = ~kv[mem.index]
            clash = seen[mem.unit] & (removed[mem.unit] != r)
            if clash.any():
                u = int(mem.unit[clash][0])
                raise PlanError(f"the masks disagree on channel {u} of group '{g.name}': "
                                f"'{mem.param}' keeps it and another member removes it (or the "
                                "reverse). Masks must remove whole coupled channels.")
            removed[mem.unit] |= r
            seen[mem.unit] = True
        if removed.any():
            if removed.all():
                raise PlanError(f"the masks remove every channel of group '{g.name}'.")
            groups[g.name] = GroupPlan(g.size, tuple(int(i) for i in np.flatnonzero(~removed)))
    return Plan(groups=groups, meta={"source": "masks"})


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor] | str | os.PathLike,
                example_inputs: Any, *, inplace: bool = False, verify: bool = True) -> nn.Module:
    """Rebuild the pruned model from a fresh ``model`` and masks (a dict or a mask file path).

    Raises:
        MaskFileError: the mask file is unreadable or not safetensors.
        PlanError: the masks do not fit the model (another architecture or width).

    Example:
        >>> graphprune.save_masks(result.masks, "masks.safetensors")
        >>> small = graphprune.apply_masks(resnet18(), "masks.safetensors", torch.randn(1, 3, 224, 224))
    """
    from ..apply import apply_plan

    if isinstance(masks, (str, os.PathLike)):
        masks = load_masks(masks)
    graph = trace(model, example_inputs)
    plan = plan_from_masks(graph, masks)
    applied = apply_plan(graph, plan, inplace=inplace, verify=verify)
    # masks that zero entries inside kept channels are not channel masks: refuse them
    for k, m in masks.items():
        want = applied.masks.get(k)
        if want is None:
            if not bool(m.all()):
                raise PlanError(f"mask '{k}' removes entries that are not whole channels graphprune "
                                "can remove (unstructured sparsity?). Channel masks only.")
        elif not torch.equal(want, m.bool()):
            raise PlanError(f"mask '{k}' zeroes entries inside kept channels (unstructured "
                            "sparsity?): apply_masks rebuilds channel-pruned models only.")
    return applied.model
