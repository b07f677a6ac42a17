"""What the user sees after training: ``pruning_report.json`` and an expert-usage heatmap."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from hf_moeprune.utils import atomic_write_text

logger = logging.getLogger(__name__)

REPORT_NAME = "pruning_report.json"
HEATMAP_NAME = "expert_usage.png"


def _matrix(usage: dict, layers: list[int], width: int) -> list[list[float]]:
    rows = []
    for layer in layers:
        row = list(usage.get(layer, usage.get(str(layer), [])) or [])
        rows.append(row + [math.nan] * (width - len(row)))
    return rows


def plot_usage_heatmap(report: dict, path: Path) -> Path | None:
    """Per layer (rows) and original expert id (columns), each expert's share of the layer's tokens,
    before the first removal and at the end of training; removed experts are blank."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:  # matplotlib is a dependency, but a report must never fail for a plot
        logger.warning("matplotlib is not available: no heatmap")
        return None
    layers = sorted(int(k) for k in report["original_experts_per_layer"])
    width = max(report["original_experts_per_layer"].values())
    panels = [("after pruning (end of training)", report["usage_after"])]
    if report.get("usage_before"):
        panels.insert(0, ("before pruning", report["usage_before"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(1.5 + 0.35 * width * len(panels), 1.2 + 0.4 * len(layers)))
    axes = np.atleast_1d(axes)
    vmax = max(
        (v for _, usage in panels for row in _matrix(usage, layers, width) for v in row if not math.isnan(v)),
        default=1.0,
    )
    image = None
    for ax, (title, usage) in zip(axes, panels):
        data = np.ma.masked_invalid(np.array(_matrix(usage, layers, width), dtype=float))
        image = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_title(title)
        ax.set_xlabel("original expert id")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    fig.colorbar(image, ax=list(axes), label="share of the layer's tokens")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(report: dict, output_dir: str | os.PathLike) -> list[Path]:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / REPORT_NAME
    atomic_write_text(json_path, json.dumps(report, indent=2, default=str))
    paths = [json_path]
    heatmap = plot_usage_heatmap(report, out / HEATMAP_NAME)
    if heatmap is not None:
        paths.append(heatmap)
    return paths
