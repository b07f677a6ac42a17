"""The per-layer expert-count plot of a model card."""

from __future__ import annotations

import os
from pathlib import Path

from hf_moeprune.format.layout import ExpertLayout


def plot_expert_counts(layout: ExpertLayout, path: str | os.PathLike) -> Path:
    """Bar chart of the experts each MoE layer keeps, against the original count. Needs matplotlib."""
    # Figure + Agg canvas directly, not pyplot: no global backend or figure state is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    layers = layout.moe_layers
    counts = [layout.experts_per_layer[i] for i in layers]
    fig = Figure(figsize=(max(4.0, 0.28 * len(layers) + 1.5), 3.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(layers, counts, color="#4C72B0", label="experts kept")
    ax.axhline(layout.original_num_experts, color="#C44E52", linestyle="--", label="original")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("experts")
    ax.set_ylim(0, layout.original_num_experts * 1.35)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Experts per layer ({layout.kept_total} of {layout.original_total} kept)")
    ax.legend(loc="upper right", ncol=2, fontsize="small", frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def _matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
