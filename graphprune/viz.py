"""Views of a ChannelGraph: networkx, Graphviz DOT, and a PNG drawn with matplotlib."""

from __future__ import annotations

import colorsys
import hashlib
from typing import Any

import networkx as nx
import numpy as np

from .rules.builder import TInfo


def _axis_groups(graph: Any, axis: Any) -> list[str]:
    g = graph.comp_group[graph.comp[axis.elems()]]
    return [graph.groups[i].name for i in np.unique(g[g >= 0])]


def to_networkx(graph: Any) -> nx.DiGraph:
    """Nodes: channel axes of traced tensors, ``'<fx node>:<dims>'``; edges: data flow.

    Node attributes: ``node`` (fx node name), ``op``, ``dims``, ``size``, ``groups`` (names of
    the groups whose channels live on this axis), ``prunable``.
    """
    G = nx.DiGraph()
    b = graph.builder
    t = graph.traced[0]
    prunable = {g.name for g in graph.prunable_groups}
    axes_of: dict[str, list[str]] = {}
    for node in t.graph.nodes:
        info = b.infos.get(node)
        infos = [info] if isinstance(info, TInfo) else [i for i in (info or []) if isinstance(i, TInfo)] \
            if isinstance(info, (list, tuple)) else []
        ids = []
        for inf in infos:
            for a in inf.axes:
                nid = f"{node.name}:{','.join(map(str, a.dims))}"
                if nid in G:
                    continue
                groups = _axis_groups(graph, a)
                G.add_node(nid, node=node.name, op=node.op, target=str(node.target), dims=a.dims,
                           size=a.size, groups=groups, prunable=any(g in prunable for g in groups))
                ids.append(nid)
        axes_of[node.name] = ids
        for src in node.all_input_nodes:
            for u in axes_of.get(src.name, []):
                for v in ids:
                    G.add_edge(u, v)
    return G


def _color(name: str) -> str:
    h = int(hashlib.md5(name.encode()).hexdigest()[:6], 16) / 0xFFFFFF
    r, g, b = colorsys.hsv_to_rgb(h, 0.45, 0.95)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def to_dot(graph: Any) -> str:
    """Graphviz DOT: prunable groups filled with one colour each, frozen axes grey."""
    G = to_networkx(graph)
    lines = ["digraph channels {", '  rankdir=TB; node [shape=box, style=filled, fontsize=10];']
    for n, d in G.nodes(data=True):
        color = _color(d["groups"][0]) if d["prunable"] and d["groups"] else "#dddddd"
        label = f"{d['node']}\\n{d['size']} ch" + (f"\\n{d['groups'][0]}" if d["groups"] else "")
        lines.append(f'  "{n}" [label="{label}", fillcolor="{color}"];')
    for u, v in G.edges():
        lines.append(f'  "{u}" -> "{v}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw_png(graph: Any, path: str, highlight: set[str] | None = None) -> None:
    """Draw the channel graph top-down (topological layers), coloured by group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_path

    G = to_networkx(graph)
    for layer, nodes in enumerate(nx.topological_generations(G)):
        for n in nodes:
            G.nodes[n]["layer"] = layer
    pos = nx.multipartite_layout(G, subset_key="layer", align="horizontal", scale=1.0)
    pos = {k: (float(v[0]), -float(v[1])) for k, v in pos.items()}  # inputs on top
    n_layers = 1 + max((d["layer"] for _, d in G.nodes(data=True)), default=0)
    width = max(6.0, 1.2 * max((len(list(c)) for c in nx.topological_generations(G)), default=1))
    fig, ax = plt.subplots(figsize=(min(width, 30), min(max(6.0, 0.35 * n_layers), 200)))
    colors = []
    for _, d in G.nodes(data=True):
        pruned = highlight is not None and any(g in highlight for g in d["groups"])
        colors.append("#e4572e" if pruned else (_color(d["groups"][0]) if d["prunable"] and d["groups"]
                                                 else "#cccccc"))
    nx.draw_networkx_edges(G, pos, ax=ax, arrows=False, width=0.5, edge_color="#888888")
    nx.draw_networkx_nodes(G, pos, ax=ax, node_color=colors, node_size=60, linewidths=0)
    labels = {n: f"{d['node']} ({d['size']})" for n, d in G.nodes(data=True)}
    nx.draw_networkx_labels(G, pos, labels, ax=ax, font_size=5)
    ax.set_title(f"{type(graph.model).__name__}: channel axes by group (grey = frozen"
                 + (", red = pruned)" if highlight is not None else ")"))
    ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
