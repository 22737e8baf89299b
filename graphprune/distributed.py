"""Fine-tuning across processes: who this process is, which device it uses, the process group,
the data shards, BatchNorm over the global batch, and messages from rank 0 to the others
(``from_main``, ``check_all``: the main job prunes and exports on rank 0 alone).

Stage of the flow: after pruning (``prune`` -> ``apply_masks`` -> **fine-tune** -> export).
``graphprune.finetune.finetune`` uses these pieces to run the same optimisation on one process
or on N processes under ``torchrun`` (torch.distributed + ``DistributedDataParallel``); nothing
here is specific to pruning.

The guarantee they are built for: with a global batch ``B`` split as ``B / N`` per process, step
``k`` of every epoch sees exactly the samples a single process sees at step ``k`` (``shards``),
BatchNorm normalises with the statistics of those ``B`` samples (``global_batchnorm``) and DDP
averages the per-process mean gradients, so the update is the single-process update up to the
order of float additions.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, DistributedSampler

from .config import DEVICES
from .errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a run: ``rank`` of ``world_size``, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """This process's rank, world size and local rank, as ``torchrun`` sets them (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``), or those of a process group the caller opened already; a
    single process otherwise.

    Example:
        >>> dist_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
        DistEnv(rank=1, world_size=2, local_rank=1)

    Raises:
        ConfigError: a variable is not an integer, or the rank is outside the world.
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env and "RANK" not in env:
        if environ is None and dist.is_available() and dist.is_initialized():  # the caller's group
            rank = dist.get_rank()
            return DistEnv(rank, dist.get_world_size(), int(env.get("LOCAL_RANK", rank)))
        return DistEnv()

    def read(name: str, default: int | None) -> int:
        raw = env.get(name)
        if raw is None:
            if default is None:
                raise ConfigError(f"The environment sets WORLD_SIZE/RANK but not {name}: launch the "
                                  "processes with torchrun, which sets RANK, WORLD_SIZE and "
                                  "LOCAL_RANK together.")
            return default
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"The environment variable {name} must be an integer. Got {raw!r} "
                              "instead.") from None

    world, rank = read("WORLD_SIZE", None), read("RANK", None)
    local = read("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"The environment describes process RANK={rank} of WORLD_SIZE={world} "
                          f"(LOCAL_RANK={local}): the rank must be in [0, WORLD_SIZE).")
    return DistEnv(rank, world, local)


def resolve_device(device: str | torch.device | None, env: DistEnv = DistEnv(),
                   model: nn.Module | None = None) -> torch.device:
    """The device this process works on.

    ``None``: where ``model`` lives (a CUDA model under torchrun moves to this process's GPU);
    ``'auto'``: this process's GPU (``cuda:LOCAL_RANK``) when CUDA is available, else the CPU;
    ``'cuda'``: this process's GPU; ``'cuda:N'``: that GPU; ``'cpu'``.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')

    Raises:
        ConfigError: an unknown device, or a CUDA device on a machine without it.
    """
    if device is None:
        p = next(iter(model.parameters()), None) if model is not None else None
        dev = p.device if p is not None else torch.device("cpu")
        return _local_gpu(env) if dev.type == "cuda" and env.distributed else dev
    name = str(device)
    if name == "auto":
        return _local_gpu(env) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"The 'device' parameter is {name!r} but CUDA is not available on this "
                              "machine: use 'cpu' or 'auto'.", param="device")
        if name == "cuda":
            return _local_gpu(env)
        idx = name[5:]
        if not idx.isdigit() or int(idx) >= torch.cuda.device_count():
            raise ConfigError(f"The 'device' parameter must be {DEVICES} with N < "
                              f"{torch.cuda.device_count()} (the GPUs of this machine). Got {name!r} "
                              "instead.", param="device")
        return torch.device("cuda", int(idx))
    raise ConfigError(f"The 'device' parameter must be {DEVICES}. Got {name!r} instead.",
                      param="device")


def _local_gpu(env: DistEnv) -> torch.device:
    n = torch.cuda.device_count()
    if env.distributed and env.local_rank >= n:
        raise ConfigError(f"Process LOCAL_RANK={env.local_rank} has no GPU of its own (this machine "
                          f"has {n}): start at most {n} processes per machine.", param="device")
    return torch.device("cuda", env.local_rank % max(1, n))


def backend_for(device: torch.device) -> str:
    """The collective backend for ``device``: NCCL on GPUs, gloo on the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(env: DistEnv, device: torch.device, timeout_s: float = 1800.0
                  ) -> Iterator[str | None]:
    """Join the run's process group for the duration of the block (yields its backend; ``None``
    for a single process). On success every process waits for the others before leaving (so
    nothing exits while rank 0 is still writing); a group this opened is destroyed on the way out.
    A group the caller opened already is used as it is, and left open."""
    if not env.distributed:
        yield None
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owned = not dist.is_initialized()
    if owned:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise ConfigError(f"Process RANK={env.rank} of {env.world_size} cannot find the others: "
                              f"{' and '.join(missing)} are not set. Launch the processes with "
                              "torchrun, which sets them.")
        dist.init_process_group(backend_for(device), rank=env.rank, world_size=env.world_size,
                                timeout=timedelta(seconds=timeout_s),
                                **({"device_id": device} if device.type == "cuda" else {}))
    elif dist.get_world_size() != env.world_size:
        raise ConfigError(f"The open process group has {dist.get_world_size()} processes but the "
                          f"environment says WORLD_SIZE={env.world_size}.")
    try:
        yield dist.get_backend()
        dist.barrier()
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def shards(n: int, batch_size: int, *, seed: int, env: DistEnv = DistEnv()
           ) -> tuple[DistributedSampler, BatchSampler]:
    """The sampler of this process's shard of ``n`` samples and its batches of
    ``batch_size / world_size`` (``batch_size`` is the global batch).

    Both drop the incomplete tail, so every epoch has ``n // batch_size`` steps on every process
    and step ``k``'s per-process batches together are exactly samples
    ``perm[k * batch_size:(k + 1) * batch_size]`` of the epoch's seeded permutation ``perm``, the
    batch a single process uses at step ``k`` (``DistributedSampler`` deals ``perm`` out in turn:
    rank ``r`` gets ``perm[r::world_size]``). Call ``sampler.set_epoch(e)`` before each epoch.

    Example:
        >>> sampler, batches = shards(1347, 64, seed=0, env=DistEnv(1, 2, 1))
        >>> sampler.set_epoch(0); len(list(batches))
        21

    Raises:
        ConfigError: ``batch_size`` is not a multiple of the number of processes, or larger
            than the data.
    """
    w = env.world_size
    if batch_size % w:
        raise ConfigError(f"The 'batch_size' parameter (the global batch) must be a multiple of the "
                          f"number of processes ({w}). Got {batch_size} instead.", param="batch_size")
    if n < batch_size:
        raise ConfigError(f"The 'batch_size' parameter must be at most the number of training "
                          f"samples ({n}): every step uses a full batch. Got {batch_size} instead.",
                          param="batch_size")

    class _Sized:  # DistributedSampler only needs len()
        def __len__(self) -> int:
            return n

    sampler = DistributedSampler(_Sized(), num_replicas=w, rank=env.rank,  # type: ignore[arg-type]
                                 shuffle=True, seed=seed, drop_last=True)
    return sampler, BatchSampler(sampler, batch_size // w, drop_last=True)


# ---------------------------------------------------------------------- BatchNorm over processes
class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; its gradient is the sum of the processes' gradients."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        g = g.clone()
        dist.all_reduce(g)
        return g


class GlobalBatchNorm(nn.Module):
    """Runs a BatchNorm with the statistics of the global batch, summed over the processes: the
    same normalisation, gradient and running statistics as one process with the whole batch.
    Works on any device and backend (``nn.SyncBatchNorm`` refuses the CPU); two all-reduces of
    ``C`` numbers per layer and step. In eval mode it is the wrapped layer."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        if not (bn.training or bn.running_mean is None):
            return bn(x)
        dims = [0, *range(2, x.ndim)]
        shape = [1, -1] + [1] * (x.ndim - 2)  # broadcast over (N, C, ...)
        acc = torch.promote_types(x.dtype, torch.float32)
        xs = x.to(acc)
        count = xs.new_tensor([x.numel() // max(1, x.shape[1])])
        tot = _AllReduceSum.apply(torch.cat([xs.sum(dims), count]))  # (C + 1,)
        n = tot[-1].detach()
        mean = tot[:-1] / n
        d = xs - mean.view(shape)
        var = _AllReduceSum.apply((d * d).sum(dims)) / n  # biased, as BatchNorm normalises
        y = d * torch.rsqrt(var + bn.eps).view(shape)
        if bn.affine:
            y = y * bn.weight.view(shape) + bn.bias.view(shape)
        if bn.training and bn.track_running_stats and bn.running_mean is not None:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
                f = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp(min=1))
                bn.running_mean.mul_(1 - f).add_(mean.to(bn.running_mean.dtype), alpha=f)
                bn.running_var.mul_(1 - f).add_(unbiased.to(bn.running_var.dtype), alpha=f)
        return y.to(x.dtype)


@contextlib.contextmanager
def global_batchnorm(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, every BatchNorm of ``model`` is wrapped in ``GlobalBatchNorm`` (yields
    how many); on exit the original layers are back in place, with their updated parameters
    and running statistics, so the model's state dict is unchanged in keys and shapes."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    if enabled:
        wrappers: dict[int, GlobalBatchNorm] = {}
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.modules.batchnorm._BatchNorm):
                    w = wrappers.setdefault(id(child), GlobalBatchNorm(child))
                    setattr(parent, name, w)
                    swapped.append((parent, name, child))
    try:
        yield len({id(c) for _, _, c in swapped})
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)


@contextlib.contextmanager
def deterministic(device: torch.device) -> Iterator[None]:
    """cuDNN picks deterministic kernels (and no benchmarking) inside the block; CPU kernels
    already are. The previous settings come back on exit."""
    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    old = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = old


# ---------------------------------------------------------------------- one process's results for all
# Waits for work that one process does alone (pruning, export) can last longer than a collective
# timeout suits training: messages go over their own gloo group with a long one. A process that
# dies closes its connections (gloo fails the waiting peers at once) and torchrun stops the others.
MESSAGE_TIMEOUT_S = 24 * 3600.0


@contextlib.contextmanager
def message_group(env: DistEnv, timeout_s: float = MESSAGE_TIMEOUT_S) -> Iterator[Any]:
    """A gloo group of all the processes of the open process group, for ``from_main`` and
    ``check_all`` (CPU tensors on any backend, a timeout as long as a stage rank 0 runs alone);
    ``None`` for a single process. Destroyed on the way out."""
    if not env.distributed:
        yield None
        return
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    try:
        yield group
    finally:
        if dist.is_initialized():
            dist.destroy_process_group(group)


def from_main(env: DistEnv, make: Callable[[], bytes], what: str, group: Any = None) -> bytes:
    """Rank 0 runs ``make()``; every process returns its bytes (sent as a uint8 tensor: no
    pickle). If ``make`` raises on rank 0, rank 0 sends the error instead and raises it, and every
    other process raises it too (the same graphprune error class and message, naming rank 0), so
    no process waits for a result that never comes. On a single process: ``make()``.

    Example:
        >>> plan_json = from_main(env, lambda: r.plan.to_json().encode(), "pruning", group)

    Raises:
        GraphPruneError: on the other processes, when ``make`` failed on rank 0.
    """
    if not env.distributed:
        return make()
    if env.is_main:
        try:
            payload = make()
        except BaseException as e:
            _send(json.dumps({"type": type(e).__name__, "message": str(e),
                              "param": getattr(e, "param", None)}).encode(), 1, group)
            raise
        _send(payload, 0, group)
        return payload
    header = torch.zeros(2, dtype=torch.int64)  # (failed, bytes)
    dist.broadcast(header, 0, group=group)
    data = torch.empty(int(header[1]), dtype=torch.uint8)
    if data.numel():
        dist.broadcast(data, 0, group=group)
    payload = data.numpy().tobytes()
    if int(header[0]):
        raise _main_error(json.loads(payload), what)
    return payload


def _send(payload: bytes, failed: int, group: Any) -> None:
    dist.broadcast(torch.tensor([failed, len(payload)], dtype=torch.int64), 0, group=group)
    if payload:
        dist.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8), 0, group=group)


def _main_error(err: Mapping[str, Any], what: str) -> Exception:
    """Rank 0's error, raised again on another process: its graphprune class, or the base one."""
    from .errors import GraphPruneError

    todo, classes = [GraphPruneError], {}
    while todo:  # the family, wherever its classes are defined
        c = todo.pop()
        classes[c.__name__] = c
        todo += c.__subclasses__()
    cls = classes.get(str(err.get("type")))
    msg = err["message"] if cls else f"{err['type']}: {err['message']} (its traceback is in its output)"
    return (cls or GraphPruneError)(f"Process RANK=0 failed while {what}: {msg}",
                                    param=err.get("param"))


def check_all(env: DistEnv, error: BaseException | None, what: str, group: Any = None) -> None:
    """Every process says whether it failed at ``what``; one that failed raises its ``error``,
    the others raise a GraphPruneError naming the failed ranks, so none goes on alone to wait in
    a collective. Does nothing when all succeeded (raises ``error`` on a single process).

    Example:
        >>> err = None
        >>> try: model = rebuild()
        ... except Exception as e: err = e
        >>> check_all(env, err, "rebuilding the pruned model", group)

    Raises:
        GraphPruneError: another process failed.
    """
    if env.distributed:
        flags = torch.zeros(env.world_size, dtype=torch.int64)
        flags[env.rank] = int(error is not None)
        dist.all_reduce(flags, group=group)
        bad = [r for r in range(env.world_size) if flags[r] and r != env.rank]
    else:
        bad = []
    if error is not None:
        raise error
    if bad:
        from .errors import GraphPruneError

        raise GraphPruneError(f"Process RANK={', '.join(map(str, bad))} failed while {what} (its "
                              "error is in its output); this process stops too.")
