"""Training after pruning: a small deterministic loop for classification (``train``,
``evaluate``: the embedded default, tests and examples) and ``finetune``, the same job on one
process or on N under ``torchrun`` with ``DistributedDataParallel``, writing its result files
(the command ``graphprune finetune`` is in ``finetune_cmd``).

Stage of the flow: prune -> (``apply_masks`` on a fresh model) -> **fine-tune** -> export.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("onecycle", "constant")
WEIGHTS_FILE, REPORT_FILE, MASKS_FILE = "model.safetensors", "finetune.json", "masks.safetensors"
REPORT_FORMAT = "graphprune.finetune"


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy (0..1) of ``model`` in eval mode, computed where the model lives."""
    was = model.training
    model.eval()
    dev = _device_of(model)
    correct = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            pred = model(x[i:i + batch_size].to(dev)).argmax(-1)
            correct += int((pred == y[i:i + batch_size].to(dev)).sum())
    model.train(was)
    return correct / max(1, x.shape[0])


def _optimizer(model: nn.Module, optimizer: str, schedule: str, lr: float, weight_decay: float,
               steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9,
                                                     weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps),
                                                 pct_start=0.15) if schedule == "onecycle"
             else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    return opt, sched


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 10,
          lr: float = 3e-3, batch_size: int = 64, weight_decay: float = 1e-4, seed: int = 0,
          after_step: Callable[[], None] | None = None, loss_fn: Loss | None = None,
          optimizer: str = "adamw", schedule: str = "onecycle") -> nn.Module:
    """Train ``model`` in place, where it lives; returns it. ``optimizer`` 'adamw' or 'sgd'
    (momentum 0.9), ``schedule`` 'onecycle' or 'constant' (ADMM wants the weights to keep moving).

    ``after_step`` runs after every optimizer step (e.g. a pruner re-applying its masks);
    ``loss_fn(logits, y)`` replaces cross-entropy (e.g. a distillation or ADMM loss)."""
    g = torch.Generator().manual_seed(seed)
    dev = _device_of(model)
    steps = epochs * max(1, (x.shape[0] + batch_size - 1) // batch_size)
    opt, sched = _optimizer(model, optimizer, schedule, lr, weight_decay, steps)
    loss_fn = loss_fn or nn.functional.cross_entropy
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx].to(dev)), y[idx].to(dev))
            loss.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step()
    model.eval()
    return model


# ---------------------------------------------------------------------- finetune, 1 or N processes
@dataclass
class FinetuneResult:
    """``model``: the fine-tuned model (on its training device, in eval mode); ``report``: what
    ``finetune.json`` holds; ``files``: the files this process wrote (rank 0 only)."""

    model: nn.Module
    report: dict[str, Any]
    files: tuple[str, ...] = ()


def _check(value: Any, name: str, ok: bool, want: str) -> None:
    if not ok:
        from .errors import ConfigError

        raise ConfigError(f"The '{name}' parameter of finetune must be {want}. Got {value!r} instead.",
                          param=name)


def _as_data(data: Any) -> tuple[torch.utils.data.Dataset | None, tuple[torch.Tensor, ...] | None, int]:
    """``(dataset, None, n)`` for a sized Dataset of (input, label) pairs, ``(None, (x, y), n)``
    for a pair of tensors."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor)
                                                                  for t in data):
        x, y = data
        _check(f"tensors of {x.shape[0]} and {y.shape[0]} samples", "data",
               x.ndim > 0 and y.ndim > 0 and x.shape[0] == y.shape[0],
               "(inputs, labels) with one label per input")
        return None, (x, y), int(x.shape[0])
    ok = isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__")
    _check(type(data).__name__, "data", ok, "a pair of tensors (inputs, labels) or a sized "
           "torch Dataset of (input, label) pairs")
    return data, None, len(data)  # type: ignore[arg-type]


def finetune(model: nn.Module, data: Any, *, epochs: int = 5, lr: float = 1e-3, batch_size: int = 64,
             seed: int = 0, device: str | torch.device | None = None,
             out_dir: str | os.PathLike | None = None, weight_decay: float = 1e-4,
             optimizer: str = "adamw", schedule: str = "onecycle",
             eval_data: tuple[torch.Tensor, torch.Tensor] | None = None, loss_fn: Loss | None = None,
             sync_batchnorm: bool = True, num_workers: int = 0, inplace: bool = False,
             meta: Mapping[str, Any] | None = None, extra_files: Mapping[str, bytes] | None = None,
             log: Callable[[str], None] | None = None) -> FinetuneResult:
    """Fine-tune ``model`` (e.g. a pruned one) on one process, or on every process of a
    ``torchrun`` launch (detected from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) with
    ``DistributedDataParallel`` (gloo on the CPU, NCCL on GPUs).

    ``batch_size`` is the global batch: each of N processes takes ``batch_size / N`` samples per
    step from its ``DistributedSampler`` shard, and the step's shards together are the batch one
    process would take (``graphprune.distributed.shards``); BatchNorm uses the statistics of the
    global batch (``sync_batchnorm``) and DDP averages the mean-loss gradients, so N processes
    compute the single-process run up to float rounding. Epochs are ``len(data) // batch_size``
    full steps on a permutation seeded by ``(seed, epoch)``; ``loss_fn`` must average over the batch.

    Args:
        model: the model; copied unless ``inplace``. Every process must pass the same one
            (DDP starts all from rank 0's weights).
        data: ``(inputs, labels)`` tensors or a sized Dataset of ``(input, label)`` pairs.
        device: 'cpu', 'cuda', 'cuda:N', 'auto' (this process's GPU if there is one) or None
            (where ``model`` lives).
        out_dir: if given, rank 0 writes ``model.safetensors`` (the weights), ``finetune.json``
            (the report) and ``extra_files`` (name -> bytes) there, all at once and atomically.
        optimizer / schedule: 'adamw' or 'sgd' (momentum 0.9); 'onecycle' or 'constant'.
        eval_data: ``(x, y)`` tensors; rank 0 reports the final accuracy on them.
        meta: recorded in the report under ``source`` (what the model and data were).

    Returns:
        ``FinetuneResult(model, report, files)``.

    Raises:
        ConfigError: a bad setting, a batch that does not split over the processes, a device
            that does not exist.
        OutputError: ``out_dir`` cannot be written (checked before training).

    Example:
        >>> r = finetune(pruned, (x_train, y_train), epochs=3, batch_size=64, out_dir="out-ft")
        >>> r.report["loss"], r.files
    """
    from ._validate import check_choice, check_int
    from .distributed import deterministic, dist_env, process_group, resolve_device, shards

    check_int(epochs, "epochs", "finetune")
    check_int(batch_size, "batch_size", "finetune", low=1)
    check_int(num_workers, "num_workers", "finetune")
    for name, v in (("lr", lr), ("weight_decay", weight_decay)):
        _check(v, name, isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
               and (v > 0 if name == "lr" else v >= 0), "a positive float" if name == "lr"
               else "a float >= 0")
    check_choice(optimizer, "optimizer", "finetune", OPTIMIZERS)
    check_choice(schedule, "schedule", "finetune", SCHEDULES)
    dataset, xy, n = _as_data(data)
    env = dist_env()
    dev = resolve_device(device, env, model)
    sampler, batches = shards(n, batch_size, seed=seed, env=env)
    if out_dir is not None and env.is_main:
        from .io import check_writable

        check_writable(out_dir)
    say = log if (log is not None and env.is_main) else (lambda _: None)
    net = (model if inplace else copy.deepcopy(model)).to(dev)
    t0 = time.perf_counter()
    gpus = [dev.index or 0] if dev.type == "cuda" else []
    with process_group(env, dev) as backend, deterministic(dev), torch.random.fork_rng(gpus):
        torch.manual_seed(seed + env.rank)  # dropout & co: reproducible per process; the caller's
        # random state is back on exit
        say(f"fine-tuning on {env.world_size} process(es), {dev.type}"
            + (f" ({backend})" if backend else "") + f": {epochs} epochs x {len(batches)} steps "
            f"of {batch_size} samples ({batch_size // env.world_size} per process)")
        losses, n_bn = _loop(net, dataset, xy, sampler, batches, env, dev, epochs=epochs, lr=lr,
                             weight_decay=weight_decay, optimizer=optimizer, schedule=schedule,
                             loss_fn=loss_fn or nn.functional.cross_entropy,
                             sync_batchnorm=sync_batchnorm, num_workers=num_workers, say=say)
        report: dict[str, Any] = {
            "format": REPORT_FORMAT, "version": 1,
            "graphprune": __import__("graphprune").__version__, "torch": torch.__version__,
            "source": dict(meta or {}), "samples": n, "epochs": epochs,
            "steps_per_epoch": len(batches), "batch_size": batch_size,
            "batch_size_per_process": batch_size // env.world_size, "processes": env.world_size,
            "backend": backend, "device": dev.type, "global_batchnorm_layers": n_bn,
            "seed": seed, "lr": lr, "weight_decay": weight_decay, "optimizer": optimizer,
            "schedule": schedule, "loss": losses,
            "params": sum(p.numel() for p in net.parameters()),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        files: tuple[str, ...] = ()
        if env.is_main:
            if eval_data is not None:
                report["accuracy"] = evaluate(net, *eval_data)
                say(f"accuracy {100 * report['accuracy']:.2f}%")
            if out_dir is not None:
                files = _write(out_dir, net, report, extra_files or {})
    return FinetuneResult(net, report, files)


def _loop(net: nn.Module, dataset: Any, xy: tuple[torch.Tensor, ...] | None, sampler: Any,
          batches: Any, env: Any, dev: torch.device, *, epochs: int, lr: float, weight_decay: float,
          optimizer: str, schedule: str, loss_fn: Loss, sync_batchnorm: bool, num_workers: int,
          say: Callable[[str], None]) -> tuple[list[float], int]:
    """The optimisation; returns the mean loss of each epoch over all processes and how many
    BatchNorm layers ran over the global batch."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from .distributed import global_batchnorm

    losses: list[float] = []
    with global_batchnorm(net, enabled=env.distributed and sync_batchnorm) as n_bn:
        ddp = (DDP(net, device_ids=[dev.index] if dev.type == "cuda" else None)
               if env.distributed else net)
        opt, sched = _optimizer(net, optimizer, schedule, lr, weight_decay, epochs * len(batches))
        loader = batches if xy is not None else torch.utils.data.DataLoader(
            dataset, batch_sampler=batches, num_workers=num_workers,
            pin_memory=dev.type == "cuda")
        net.train()
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            total = torch.zeros(2, dtype=torch.float64, device=dev)  # (sum of losses, samples)
            for item in loader:
                if xy is not None:
                    idx = torch.as_tensor(item)
                    xb, yb = xy[0][idx], xy[1][idx]
                else:
                    xb, yb = item
                xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(ddp(xb), yb)
                loss.backward()
                opt.step()
                sched.step()
                total += torch.stack([loss.detach().double() * len(yb),
                                      total.new_tensor(float(len(yb)))])
            if env.distributed:
                dist.all_reduce(total)
            losses.append(float(total[0] / total[1]))
            say(f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}")
        del ddp
    net.eval()
    return losses, n_bn


def _write(out_dir: str | os.PathLike, net: nn.Module, report: dict[str, Any],
           extra_files: Mapping[str, bytes]) -> tuple[str, ...]:
    """The result files, staged and moved into ``out_dir`` together."""
    from ._safetensors import dumps
    from .io import atomic_write_bytes, atomic_write_text, staged_dir

    with staged_dir(out_dir) as stage:
        atomic_write_bytes(os.path.join(stage, WEIGHTS_FILE),
                           dumps(net.state_dict(), {"format": "graphprune.pruned-weights"}))
        for name, blob in extra_files.items():
            atomic_write_bytes(os.path.join(stage, name), blob)
        atomic_write_text(os.path.join(stage, REPORT_FILE),
                          json.dumps(report, indent=1, default=str) + "\n")
    return tuple(sorted({WEIGHTS_FILE, REPORT_FILE, *extra_files}))
