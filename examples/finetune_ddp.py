"""Fine-tune a pruned model on one process, or on several with torchrun (DistributedDataParallel:
gloo on the CPU, NCCL on GPUs). Every process builds the same pruned digits CNN (trained and
pruned deterministically on the CPU), then ``graphprune.finetune`` trains it with a global batch
of 64 split over the processes; rank 0 writes ``model.safetensors`` and ``finetune.json``.

    python examples/finetune_ddp.py                                   # one process
    torchrun --nproc_per_node 2 examples/finetune_ddp.py              # two CPU processes (gloo)
    torchrun --nproc_per_node 4 examples/finetune_ddp.py --device cuda  # four GPUs (NCCL)

The runs compute the same weights up to float rounding: compare the ``loss`` of their
``finetune.json``. With real models, rebuild the pruned model from its files on every process
instead: ``graphprune.finetune_cmd.load_pruned(spec, masks=..., weights=...)`` or
``torchrun ... -m graphprune finetune --bundle out/``.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import graphprune as gp  # noqa: E402
from graphprune.datasets import digits  # noqa: E402
from graphprune.distributed import dist_env  # noqa: E402
from graphprune.finetune import evaluate, finetune, train  # noqa: E402
from graphprune.models import digits_net  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("out", nargs="?", default="out/finetune-ddp")
p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
p.add_argument("--epochs", type=int, default=5)
args = p.parse_args()
torch.set_num_threads(1)
main = dist_env().is_main

# the same dense model and the same pruned model on every process (CPU, seeded)
torch.manual_seed(0)
x_train, y_train, x_test, y_test = digits()
dense = train(digits_net(), x_train, y_train, epochs=6, seed=0)
r = gp.prune(dense, x_train[:1], sparsity=0.6, method="l1")
if main:
    print(f"dense {evaluate(dense, x_test, y_test):.4f}, pruned (no fine-tuning) "
          f"{evaluate(r.model, x_test, y_test):.4f}; {r.report.params[0]:,} -> "
          f"{r.report.params[1]:,} parameters")

res = finetune(r.model, (x_train, y_train), epochs=args.epochs, lr=1e-3, batch_size=64, seed=0,
               device=args.device, out_dir=args.out, eval_data=(x_test, y_test),
               log=print, meta={"model": "digits", "method": "l1", "sparsity": 0.6})
if main:
    rep = res.report
    print(f"{rep['processes']} process(es) on {rep['device']}: loss per epoch "
          f"{', '.join(f'{v:.4f}' for v in rep['loss'])}; accuracy {rep['accuracy']:.4f}")
    print(f"wrote {args.out}/: {', '.join(res.files)}")
