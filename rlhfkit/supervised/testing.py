"""Test helpers for the supervised-style loops (SFT, preference model, DPO): a dataset builder whose batch
`slow` hangs, so a test can SIGKILL the run at a known step, and the kill-then-resume sequence itself."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rlhfkit.supervised.types import SupervisedDataset, SupervisedDatasetBuilder


class SlowAtBatch(SupervisedDatasetBuilder):
    """Wraps a builder; its train dataset sleeps `seconds` before returning batch `slow`."""

    def __init__(self, inner: SupervisedDatasetBuilder, slow: int, seconds: float = 300.0):
        self.inner, self.slow, self.seconds = inner, slow, seconds

    def __call__(self) -> tuple[SupervisedDataset, SupervisedDataset | None]:
        train, test = self.inner()
        return _SlowDataset(train, self.slow, self.seconds), test


class _SlowDataset(SupervisedDataset):
    def __init__(self, inner: SupervisedDataset, slow: int, seconds: float):
        self.inner, self.slow, self.seconds = inner, slow, seconds

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, seed: int = 0) -> None:
        self.inner.set_epoch(seed)

    def get_batch(self, index: int) -> Any:
        if index == self.slow:
            time.sleep(self.seconds)
        return self.inner.get_batch(index)


def kill_at_step_then_resume(script: Path, log_path: Path, model_dir: str, root: Path, step: int) -> None:
    """Run `script LOG_PATH MODEL_DIR ROOT SLOW_BATCH` (a loop whose batch `step + 1` hangs) in a child, SIGKILL
    it once step `step`'s metrics record is on disk, check that only that step's checkpoint was written, then run
    the script again without a slow batch and check it resumed from that checkpoint."""
    from rlhfkit.utils.atomic import read_jsonl

    command = [sys.executable, str(script), str(log_path), model_dir, str(root)]
    child = subprocess.Popen([*command, str(step + 1)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not any(r["step"] == step for r in read_jsonl(log_path / "metrics.jsonl")):
            assert child.poll() is None, "the child run ended before it could be killed"
            assert time.monotonic() < deadline, f"the child run did not reach step {step}"
            time.sleep(0.2)
    finally:
        child.kill()  # SIGKILL
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert [c["name"] for c in read_jsonl(log_path / "checkpoints.jsonl")] == [f"{step:06d}"]
    resumed = subprocess.run([*command, "-1"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from checkpoint {step:06d}" in (log_path / "logs.log").read_text()
