"""The main job under torchrun (``pipeline.run`` on N processes): how the processes end up with
one model. Rank 0 prunes and sends its plan with the pruned model's signature and a digest of
its data (``plan_message``); every other process applies the plan to its own fresh model and
checks it is the same (``rebuild``); after fine-tuning with DDP, every process checks it holds
rank 0's weights bit for bit (``check_same_weights``). A step that fails on one process stops
them all (``everywhere``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import InputError

if TYPE_CHECKING:
    from .pipeline import Data
    from .recipe import Recipe


def everywhere(env: Any, group: Any, what: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` on this process; if it failed on any process, every process raises (``check_all``).

    Example:
        >>> pruned = everywhere(env, group, "applying rank 0's plan", lambda: rebuild(...))

    Raises:
        GraphPruneError: ``fn`` failed on another process (on this one: its own error).
    """
    from .distributed import check_all

    out, err = None, None
    try:
        out = fn()
    except Exception as e:
        err = e
    check_all(env, err, what, group)
    return out


def _state(model: nn.Module) -> list[tuple[str, str, torch.Tensor]]:
    """(kind, name, tensor) of every parameter, then every buffer: DDP's order (it broadcasts
    rank 0's values of exactly these at start)."""
    return [("parameter", n, t) for n, t in model.named_parameters()] + \
        [("buffer", n, t) for n, t in model.named_buffers()]


def _signature(model: nn.Module) -> list[list[Any]]:
    """Kind, name, shape and dtype of every parameter and buffer, in DDP's order."""
    return [[kind, n, list(t.shape), str(t.dtype)] for kind, n, t in _state(model)]


def _digest(tensors: Any) -> str:
    """SHA-256 of the tensors' bytes, in order (None skipped)."""
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _data_digest(data: Data) -> str:
    """The calibration data's digest: every process must have loaded the same."""
    return _digest((data.calib_x, data.calib_y))


def plan_message(r: Any, data: Data) -> bytes:
    """What the other processes need to build rank 0's pruned model: the plan, the model's
    signature and the digest of the data they must hold too (JSON)."""
    return json.dumps({"plan": r.plan.to_json(), "signature": _signature(r.model),
                       "data": _data_digest(data)}).encode()


def rebuild(model: nn.Module, example: torch.Tensor, recipe: Recipe, message: bytes,
            data: Data) -> nn.Module:
    """Rank 0's pruned model on this process: its plan (``message``, from ``plan_message``)
    applied to the same fresh model, checked to have the same parameters and buffers (DDP then
    starts from rank 0's values of them: the trained dense weights and the refitted consumers).

    Raises:
        InputError: this process loaded other data than rank 0.
        PlanError: the plan gives another model here than on rank 0.
    """
    from .apply import apply_plan
    from .capture import trace
    from .errors import PlanError
    from .plan import Plan

    msg = json.loads(message)
    if _data_digest(data) != msg["data"]:
        raise InputError(f"The data '{data.source}' loaded by this process differs from rank 0's: "
                         "every process must read the same data.", param="data")
    graph = trace(model, example, tracer=recipe.prune.tracer, strict=recipe.prune.strict,
                  gqa=recipe.prune.gqa)  # as prune traced it on rank 0
    plan = Plan.from_json(msg["plan"], "rank 0's plan")
    plan.validate(graph)
    pruned = apply_plan(graph, plan).model
    mine, want = _signature(pruned), msg["signature"]
    if mine != want:
        diff = next((f"{a} vs rank 0's {b}" for a, b in zip(mine, want) if a != b),
                    f"{len(mine)} parameters and buffers vs rank 0's {len(want)}")
        raise PlanError(f"Rank 0's plan applied on this process gives another model than rank 0's "
                        f"pruned model: {diff}.")
    return pruned


def check_same_weights(env: Any, model: nn.Module, group: Any) -> None:
    """Every process ends fine-tuning with rank 0's parameters and buffers, bit for bit (DDP
    broadcast them at start and every step applied the same averaged gradient).

    Raises:
        GraphPruneError: some process holds other weights than rank 0.
    """
    from .distributed import check_all, from_main
    from .errors import GraphPruneError

    if not env.distributed:
        return
    mine = _digest(t for _, _, t in _state(model))
    theirs = from_main(env, mine.encode, "fine-tuning", group).decode()
    err = None if mine == theirs else GraphPruneError(
        f"After fine-tuning, process RANK={env.rank} holds other weights than rank 0: the "
        "processes did not train the same model.")
    check_all(env, err, "comparing the fine-tuned weights", group)
