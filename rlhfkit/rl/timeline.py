"""When each part of an RL run ran: `timeline.jsonl` (one span per line) and its picture `timeline.png`.

A span is {"kind", "step", "start", "end", ...} with wall-clock seconds (time.time(), so the spans of a run
killed and started again line up on one axis). Kinds: sample and judge (one span per group, or per batch in
the synchronous loop), reference (the reference models' logprobs for the KL penalty and kl/policy_vs_init),
train, eval, checkpoint and sync_weights (the new sampler after an update). `step` is the training iteration
the span served: for a group, the iteration that trained on it, or -1 for a group that was sampled and then
thrown away (too stale: it was sampled again). Resume drops the spans of the iterations the
new run redoes, as metrics.jsonl drops their records.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from rlhfkit.run_files import TIMELINE_FILE, TIMELINE_PLOT
from rlhfkit.utils.atomic import append_jsonl, read_jsonl, rewrite_jsonl_atomic

logger = logging.getLogger(__name__)

KINDS = ("sample", "judge", "reference", "train", "eval", "checkpoint", "sync_weights")
DISCARDED = -1  # the step of a span whose work was thrown away


class Timeline:
    """Appends spans to log_path/timeline.jsonl; drops those of iterations >= start_step first (resume)."""

    def __init__(self, log_path: str | Path, start_step: int):
        self.path = Path(log_path) / TIMELINE_FILE
        records = read_jsonl(self.path)
        kept = [r for r in records if r.get("step", DISCARDED) < start_step]
        if len(kept) != len(records) or self.path.exists():
            rewrite_jsonl_atomic(self.path, kept)

    def add(self, kind: str, step: int, start: float, end: float, **extra: Any) -> None:
        append_jsonl(self.path, {"kind": kind, "step": int(step), "start": start, "end": end, **extra})

    @contextlib.contextmanager
    def span(self, kind: str, step: int, timer: Any = None, **extra: Any) -> Iterator[None]:
        """Record the enclosed block as a span (and as time/<kind> of `timer`, when given)."""
        start = time.time()
        try:
            if timer is None:
                yield
            else:
                with timer.span(kind):
                    yield
        finally:
            self.add(kind, step, start, time.time(), **extra)


def plot_timeline(records: Sequence[dict], path: str | Path, title: str = "") -> bool:
    """One row per kind, one bar per span, coloured by the iteration it served (grey: discarded work), the
    iteration's number on its train bars. False (and nothing written) when there are no spans."""
    spans = [r for r in records if r.get("kind") in KINDS and r.get("end", 0) >= r.get("start", 0)]
    if not spans:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min(r["start"] for r in spans)
    kinds = [k for k in KINDS if any(r["kind"] == k for r in spans)]
    colours = plt.get_cmap("tab10")
    width = min(24.0, max(8.0, (max(r["end"] for r in spans) - t0) / 10))
    fig, ax = plt.subplots(figsize=(width, 0.6 * len(kinds) + 1.4))
    for row, kind in enumerate(kinds):
        for r in (r for r in spans if r["kind"] == kind):
            step = r.get("step", DISCARDED)
            colour = "lightgrey" if step < 0 else colours(step % 10)
            left, length = r["start"] - t0, max(r["end"] - r["start"], 1e-3)
            ax.barh(row, length, left=left, height=0.8, color=colour, edgecolor="black", linewidth=0.3, alpha=0.85)
            if kind == "train" and step >= 0:
                ax.text(left + length / 2, row, str(step), ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(kinds)), kinds)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first span (colour: the iteration served; grey: discarded, sampled again)")
    ax.set_title(title or "RL timeline", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_timeline_plot(log_path: str | Path, title: str = "") -> Path | None:
    """log_path/timeline.png from log_path/timeline.jsonl (None when there is nothing to draw)."""
    path = Path(log_path) / TIMELINE_PLOT
    try:
        return path if plot_timeline(read_jsonl(Path(log_path) / TIMELINE_FILE), path, title) else None
    except Exception as e:  # a picture must never stop training
        logger.warning("could not write %s: %s", path, e)
        return None
