"""Inspect the channel-dependency graph of a torchvision ResNet-18: the groups, why some cannot
be pruned, the networkx graph, and a PNG of the channel axes.

    python examples/inspect_graph.py
"""

import os
import sys

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import graphprune as gp  # noqa: E402
from graphprune.viz import draw_png  # noqa: E402

model = torchvision.models.resnet18(weights=None).eval()
g = gp.trace(model, torch.randn(1, 3, 224, 224))
print(g.summary())
print()
print(g.group("layer1.0.conv1"))           # a block-internal group
print(g.groups[0])                         # the residual stream of stage 1: every conv writing it
G = g.to_networkx()
print(f"\nnetworkx: {G.number_of_nodes()} channel axes, {G.number_of_edges()} edges")
draw_png(g, "resnet18-channels.png")
print("wrote resnet18-channels.png")
