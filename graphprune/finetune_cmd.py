"""``graphprune finetune``: every process rebuilds the pruned model from its files (a model SPEC,
the mask file, the weights: no pruning code needed), then ``finetune`` trains it on one process or
on all the processes of a ``torchrun`` launch, and rank 0 writes the result.

Stage of the flow: prune -> **rebuild + fine-tune** -> export.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch
from torch import nn

from .finetune import MASKS_FILE, OPTIMIZERS, REPORT_FILE, SCHEDULES, WEIGHTS_FILE, finetune


def load_pruned(spec: str, *, masks: str | None = None, weights: str | None = None,
                input_shape: tuple[int, ...] | None = None, seed: int = 0
                ) -> tuple[nn.Module, tuple[int, ...]]:
    """Rebuild a pruned model without its pruning code: a fresh ``spec`` model, shrunk by the
    mask file (``apply_masks``), with ``weights`` loaded, which may be the dense model's (loaded
    before the masks) or the pruned model's (after). Deterministic (the fresh model's random
    init is seeded with ``seed``), so every process of a run builds the same model. Returns
    ``(model, input_shape)``.

    Example:
        >>> model, shape = load_pruned("digits", masks="out/masks.safetensors",
        ...                            weights="out/model.safetensors")

    Raises:
        ConfigError: unknown spec, or no input shape known for it.
        InputError / MaskFileError / PlanError: a file that does not fit the model.
    """
    from .errors import ConfigError, InputError
    from .export.masks import apply_masks
    from .specs import load_model, load_weights

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, shape = load_model(spec)
    shape = tuple(input_shape) if input_shape else shape
    if shape is None:
        raise ConfigError(f"The model '{spec}' has no default input shape: give the input shape "
                          "(e.g. (1, 3, 224, 224)).", param="input_shape")
    dense = False
    if weights and masks:
        try:
            load_weights(model, weights)
            dense = True
        except InputError:
            pass  # the pruned model's weights: loaded after the masks
    elif weights:
        load_weights(model, weights)
    if masks:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        model = apply_masks(model, masks, x)
        if weights and not dense:
            try:
                load_weights(model, weights)
            except InputError as e:
                raise InputError(f"weights file '{weights}' fits neither the '{spec}' model nor the "
                                 f"model pruned by '{masks}': {e}", param="weights") from e
    return model.eval(), shape


# ---------------------------------------------------------------------- command line
def add_finetune_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``graphprune finetune`` (options mirror ``finetune``'s arguments)."""
    p = subparsers.add_parser(
        "finetune", help="fine-tune a pruned model on one process, or on many under torchrun",
        description="Fine-tune a pruned model (a model SPEC + its mask file, or a bundle written by "
                    "'graphprune prune'). Under 'torchrun --nproc_per_node N -m graphprune finetune' "
                    "N processes train it with DistributedDataParallel; rank 0 writes "
                    f"{WEIGHTS_FILE}, {REPORT_FILE} (and {MASKS_FILE}) to --out.")
    p.add_argument("--bundle", help="a directory written by 'graphprune prune' or 'graphprune "
                                    "finetune': model SPEC, masks and weights (flags override them)")
    p.add_argument("--model", help="SPEC of the unpruned architecture: a models/ name, "
                                   "torchvision:NAME, timm:NAME or package.module:callable")
    p.add_argument("--masks", help="mask file (masks.safetensors): every process rebuilds the pruned "
                                   "model from a fresh --model with it")
    p.add_argument("--weights", help="weights to start from: the pruned model's (model.safetensors "
                                     "of a bundle) or the dense model's")
    p.add_argument("--input-shape", help="example input shape, batch first, e.g. 1,3,224,224")
    p.add_argument("--data", help="labelled data: digits, a .npz (x, y or x_train...), or a folder "
                                  "of images in class sub-folders (default: the bundle's, or digits)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64,
                   help="global batch: N processes take batch-size/N each (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--schedule", choices=SCHEDULES, default="onecycle")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto: this process's GPU "
                                                    "(cuda:LOCAL_RANK) if there is one (default)")
    p.add_argument("--no-sync-bn", action="store_true",
                   help="BatchNorm over each process's batch only (not the same as one process)")
    p.add_argument("--out", default="out-finetune", help="output directory (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(fn=cli_finetune)
    return p


def _bundle(path: str) -> dict[str, Any]:
    """Model spec, input shape, data, masks and weights recorded in a bundle directory."""
    from .errors import InputError

    if not os.path.isdir(path):
        raise InputError(f"--bundle '{path}' is not a directory.", param="bundle")
    out: dict[str, Any] = {}
    for name in (REPORT_FILE, "recipe.json"):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            try:
                with open(f, encoding="utf-8") as fh:
                    d = json.load(fh)
            except (OSError, ValueError) as e:
                raise InputError(f"cannot read '{f}' as JSON: {e}", param="bundle") from e
            src = d.get("source", {}) if name == REPORT_FILE else {
                "model": d.get("model", {}).get("spec"),
                "input_shape": d.get("model", {}).get("input_shape"),
                "data": d.get("data", {}).get("source")}
            out = {k: v for k, v in src.items() if k in ("model", "input_shape", "data") and v}
            break
    for key, name in (("masks", MASKS_FILE), ("weights", WEIGHTS_FILE)):
        if os.path.isfile(os.path.join(path, name)):
            out[key] = os.path.join(path, name)
    if "model" not in out:
        raise InputError(f"--bundle '{path}' records no model (no {REPORT_FILE} or recipe.json): "
                         "give --model.", param="bundle")
    return out


def cli_finetune(args: argparse.Namespace) -> int:
    """``graphprune finetune``: rebuild the pruned model, fine-tune it, write the result."""
    from .datasets import load_data
    from .distributed import dist_env
    from .errors import ConfigError, InputError
    from .io import read_file
    from .specs import parse_shape

    b = _bundle(args.bundle) if args.bundle else {}
    spec = args.model or b.get("model")
    if not spec:
        raise ConfigError("finetune needs the model: --model SPEC (with --masks) or --bundle DIR.")
    masks = args.masks or b.get("masks")
    weights = args.weights or b.get("weights")
    shape = parse_shape(args.input_shape) if args.input_shape else b.get("input_shape")
    out_weights = os.path.join(args.out, WEIGHTS_FILE)
    if weights and os.path.exists(out_weights) and os.path.samefile(weights, out_weights):
        raise ConfigError(f"--out '{args.out}' would overwrite the weights being fine-tuned "
                          f"('{weights}'): choose another output directory.", param="out")
    model, shape = load_pruned(spec, masks=masks, weights=weights, input_shape=shape,
                               seed=args.seed)
    data = args.data or b.get("data") or ("digits" if tuple(shape[1:]) == (1, 8, 8) else None)
    if data is None:
        raise ConfigError(f"--data is needed: '{spec}' does not take digits.", param="data")
    x, y, ex, ey = load_data(data, tuple(shape))
    if y is None:
        raise InputError(f"The data source '{data}' has no labels; fine-tuning needs (input, "
                         "label) pairs: a .npz with x and y, digits, or images in class folders.",
                         param="data")
    env = dist_env()
    quiet = args.quiet or args.json or not env.is_main
    log = None if quiet else (lambda m: print(m, flush=True))
    meta = {"model": spec, "input_shape": list(shape), "data": data,
            "masks": os.path.abspath(masks) if masks else None,
            "weights": os.path.abspath(weights) if weights else None}
    extra = {MASKS_FILE: read_file(masks, "mask file", InputError)} if masks else {}
    r = finetune(model, (x, y), epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                 seed=args.seed, device=args.device, out_dir=args.out,
                 weight_decay=args.weight_decay, optimizer=args.optimizer, schedule=args.schedule,
                 eval_data=(ex, ey) if ey is not None and len(ey) else None,
                 sync_batchnorm=not args.no_sync_bn, meta=meta, extra_files=extra, log=log)
    if env.is_main:
        if args.json:
            print(json.dumps(r.report | {"out": os.path.abspath(args.out)}, indent=1, default=str))
        elif not args.quiet:
            print(f"wrote {os.path.abspath(args.out)}/: {', '.join(r.files)}")
    return 0
