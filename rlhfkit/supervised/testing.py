"""A test helper for the supervised-style loops (SFT, preference model, DPO): a dataset builder whose batch
`slow` hangs, so a test can SIGKILL the run at a known step."""

from __future__ import annotations

import time
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
