"""Views of a ChannelGraph: networkx, Graphviz DOT, and a PNG drawn with matplotlib."""

from __future__ import annotations

import colorsys
import hashlib
from typing import Any

import networkx as nx

from .rules.elements import TInfo
from ._np import unique


def _axis_groups(graph: Any, axis: Any) -> list[str]:
    g = graph.comp_group[graph.comp[axis.elems()]]
    return [graph.groups[i].name for i in unique(g[g >= 0])]


def _infos(info: Any) -> list[TInfo]:
    if isinstance(info, TInfo):
        return [info]
    if isinstance(info, (list, tuple)):
        return [i for v in info for i in _infos(v)]
    return []


def to_networkx(graph: Any) -> nx.DiGraph:
    """Nodes: the channel axes of traced tensors (an axis shared by a conv, its BatchNorm and
    ReLU is one node, ``'<first fx node>:<dims>'``); edges: data flow between axes.

    Node attributes: ``nodes`` (fx nodes carrying the axis), ``dims``, ``size``, ``groups``
    (names of the groups whose channels live on the axis), ``prunable``.
    """
    G = nx.DiGraph()
    infos = graph.infos
    t = graph.traced[0]
    prunable = {g.name for g in graph.prunable_groups}
    ids: dict[int, str] = {}  # id(Axis) -> networkx node
    axes_of: dict[str, list[str]] = {}
    for node in t.graph.nodes:
        mine = []
        for inf in _infos(infos.get(node)):
            for a in inf.axes:
                nid = ids.get(id(a))
                if nid is None:
                    nid = ids[id(a)] = f"{node.name}:{','.join(map(str, a.dims))}"
                    groups = _axis_groups(graph, a)
                    G.add_node(nid, nodes=[node.name], dims=a.dims, size=a.size, groups=groups,
                               prunable=any(g in prunable for g in groups))
                elif node.name not in G.nodes[nid]["nodes"]:
                    G.nodes[nid]["nodes"].append(node.name)
                mine.append(nid)
        axes_of[node.name] = mine
        for src in node.all_input_nodes:
            for u in axes_of.get(src.name, []):
                for v in mine:
                    if u != v:
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
        label = f"{d['nodes'][0]}\\n{d['size']} ch" + (f"\\n{d['groups'][0]}" if d["groups"] else "")
        lines.append(f'  "{n}" [label="{label}", fillcolor="{color}"];')
    for u, v in G.edges():
        lines.append(f'  "{u}" -> "{v}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive backend (matplotlib is an optional extra).

    Raises:
        ConfigError: matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError as e:
        from .errors import ConfigError

        raise ConfigError("Drawing needs matplotlib, which is not installed: pip install "
                          "'graphprune[plot]'.") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_png(graph: Any, path: str, highlight: set[str] | None = None, rows: int = 45) -> None:
    """Draw the channel graph in topological order, snaking through columns of ``rows`` layers
    so that deep networks stay legible; prunable groups are coloured, frozen axes grey, and the
    groups in ``highlight`` (e.g. the pruned ones) red.

    Raises:
        ConfigError: matplotlib is not installed.

    Example:
        >>> graphprune.viz.draw_png(graphprune.trace(model, x), "graph.png")
    """
    plt = pyplot()

    from .io import atomic_path

    G = to_networkx(graph)
    gens = list(nx.topological_generations(G))
    pos: dict[str, tuple[float, float]] = {}
    width = max((len(g) for g in gens), default=1)
    ncols = max(1, -(-len(gens) // rows))
    rows = max(1, -(-len(gens) // ncols))  # balance the columns
    for layer, nodes in enumerate(gens):
        col, row = divmod(layer, rows)
        for j, n in enumerate(sorted(nodes)):
            pos[n] = (col * (width + 1.5) + j - (len(nodes) - 1) / 2, -row)
    fig, ax = plt.subplots(figsize=(min(4.0 + 3.2 * ncols * width, 40), 0.32 * min(len(gens), rows) + 2))
    colors = []
    for _, d in G.nodes(data=True):
        pruned = highlight is not None and any(g in highlight for g in d["groups"])
        colors.append("#e4572e" if pruned else (_color(d["groups"][0]) if d["prunable"] and d["groups"]
                                                 else "#cccccc"))
    nx.draw_networkx_edges(G, pos, ax=ax, arrows=False, width=0.4, edge_color="#999999", alpha=0.7)
    nx.draw_networkx_nodes(G, pos, ax=ax, node_color=colors, node_size=90, linewidths=0)
    labels = {n: f"{d['nodes'][0]} ({d['size']})" for n, d in G.nodes(data=True)}
    nx.draw_networkx_labels(G, pos, labels, ax=ax, font_size=6, horizontalalignment="left")
    ax.set_title(f"{type(graph.model).__name__}: channel axes by group (grey = frozen"
                 + (", red = pruned)" if highlight is not None else ")"), fontsize=10)
    ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
