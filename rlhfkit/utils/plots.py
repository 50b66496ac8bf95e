"""A PNG of a run's metric curves (one panel per group of keys), written atomically."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

# Panels of the keys the three stages log; a panel is drawn only if one of its keys is present.
DEFAULT_PANELS: list[list[str]] = [
    ["train_mean_nll", "test/nll"],
    ["train_mean_bpb", "test/bpb"],
    ["dpo_loss"],
    ["accuracy"],
    ["margin", "chosen_reward", "rejected_reward"],
    ["env/all/reward/total", "env/all/win_minus_loss"],
    ["env/all/format"],
    ["test/win_rate", "win_rate"],
    ["optim/kl_sample_train_v1", "optim/kl_sample_train_v2", "kl_policy_base"],
    ["optim/entropy"],
    ["env/all/ac_tokens_per_turn"],
    ["learning_rate", "optim/lr"],
]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_metrics(
    records: Sequence[dict],
    path: str | os.PathLike,
    panels: Sequence[Sequence[str]] | None = None,
    title: str | None = None,
    xlabel: str = "step",
) -> bool:
    """Plot `records` ({"step": s, key: value, ...}; `xlabel` names what "step" counts) to `path`; returns False if
    nothing was plottable."""
    present = {k for r in records for k, v in r.items() if _is_number(v)}
    panels = [[k for k in panel if k in present] for panel in (panels or DEFAULT_PANELS)]
    panels = [p for p in panels if p]
    if not panels:
        return False

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.4 * nrows), squeeze=False)
    for ax, keys in zip(axes.flat, panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if _is_number(r.get(key))]
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=key)
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=80)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True
