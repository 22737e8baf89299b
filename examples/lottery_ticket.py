"""The lottery ticket procedure (Frankle & Carbin 2019): train, prune 50% of the remaining
weights, rewind the survivors to their initial values, repeat; the winning ticket is trained
from its original initialisation.

    python examples/lottery_ticket.py
"""

import torch
from _common import evaluate, train

from graphprune.datasets import digits
from graphprune.models import digits_net
from graphprune.training import LotteryTicketPruner

torch.manual_seed(0)
xtr, ytr, xte, yte = digits()
model = digits_net()
pruner = LotteryTicketPruner(model, [{"sparsity": 0.5, "op_types": ["default"]}], rounds=3)
pruner.compress()  # remembers the initial weights
for r in range(1, 4):
    train(model, xtr, ytr, epochs=6, after_step=pruner.step)
    print(f"round {r}: trained accuracy {evaluate(model, xte, yte):.4f} at sparsity "
          f"{1 - 0.5 ** (r - 1):.3f}")
    pruner.next_round()  # prune from the trained weights, rewind to the initial ones
train(model, xtr, ytr, epochs=6, after_step=pruner.step)
print(f"winning ticket at sparsity {1 - 0.5 ** 3:.3f}: accuracy {evaluate(model, xte, yte):.4f}")
