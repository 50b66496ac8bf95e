"""The training loops' policy for NaN or infinite losses and gradients.

The engine already skips such an update (weights and optimizer state unchanged) and reports
`optim/skipped_nonfinite`; `NonFiniteGuard` logs each skipped step with its batch's rows and stops the run
with a NonFiniteError after `max_in_a_row` skipped steps in a row (the last checkpoint stays as it was).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Sequence

from rlhfkit.errors import NonFiniteError

logger = logging.getLogger(__name__)


def describe_rows(batch: Sequence[Any], tokenizer: Any, max_tokens: int = 24) -> str:
    """One line per datum: its length and its first tokens, to find the rows in the data."""
    lines = []
    for index, datum in enumerate(batch):
        tokens = datum.model_input.to_ints()
        lines.append(f"  row {index}: {len(tokens)} tokens: {tokenizer.decode(tokens[:max_tokens])!r}...")
    return "\n".join(lines)


class NonFiniteGuard:
    def __init__(self, max_in_a_row: int, log_path: str):
        if max_in_a_row < 1:
            raise ValueError(f"max_nonfinite_in_a_row must be >= 1, got {max_in_a_row}")
        self.max_in_a_row = max_in_a_row
        self.log_path = log_path
        self.in_a_row = 0

    def check(self, step: int, loss: float, metrics: dict[str, Any], rows: Callable[[], str]) -> None:
        """After a step's update: count it if it was skipped; raise once `max_in_a_row` were skipped in a row."""
        skipped = metrics.get("optim/skipped_nonfinite", 0.0) > 0 or not math.isfinite(loss)
        if not skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        logger.warning(
            "step %d: the loss (%s) or gradient norm (%s) is not finite; the update was skipped "
            "(weights and optimizer state unchanged), %d of %d allowed in a row. The batch:\n%s",
            step,
            loss,
            metrics.get("optim/grad_norm"),
            self.in_a_row,
            self.max_in_a_row,
            rows(),
        )
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"step {step}: {self.in_a_row} steps in a row had a NaN or infinite loss or gradient, so training "
                f"stopped (the batches are in {self.log_path}/logs.log); the checkpoints in {self.log_path} are "
                f"intact: lower the learning rate or fix the data, then run again"
            )
