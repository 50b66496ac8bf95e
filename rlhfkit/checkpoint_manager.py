"""The checkpoints of a training loop: create or resume its training client, decide when to save, save.

    checkpoints = CheckpointManager(log_path, save_every=20)
    training_client, resume = checkpoints.training_client(service, model_name, lora_rank=32)
    ...
    if step != start_step and checkpoints.due(step, elapsed_tokens):
        checkpoints.save(training_client, f"{step:06d}", {"batch": step}, elapsed_tokens)
    ...
    checkpoints.save(training_client, "final", {"batch": total_steps})

Shared by the supervised and RL loops (and any later one). A loop resumes from the last record of
log_path/checkpoints.jsonl, with its optimizer state; see checkpoint_utils for the files.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhfkit import checkpoint_utils
from rlhfkit.checkpoint_utils import CheckpointRecord
from rlhfkit.engine.clients import TrainingClient

logger = logging.getLogger(__name__)


@dataclass
class CheckpointManager:
    """`save_every` steps (0: off), and optionally every `save_every_tokens` trained tokens or
    `save_every_seconds` of wall time since the last save (0: off)."""

    log_path: Path
    save_every: int
    save_every_tokens: int = 0
    save_every_seconds: float = 0.0
    _last_save_time: float = field(default_factory=time.monotonic, init=False, repr=False)
    _last_save_tokens: int = field(default=0, init=False, repr=False)

    def last(self) -> CheckpointRecord | None:
        """The checkpoint to resume from (the last one with a training state), or None."""
        return checkpoint_utils.get_last_checkpoint(self.log_path)

    def training_client(
        self,
        service: Any,
        model_name: str,
        lora_rank: int,
        load_checkpoint_path: str | None = None,
        seed: int | None = None,
    ) -> tuple[Any, CheckpointRecord | None]:
        """(training client, the checkpoint resumed from or None): resumed with its optimizer state if the
        run has a checkpoint; else the weights of `load_checkpoint_path` with a fresh optimizer; else a new
        LoRA adapter on `model_name`."""
        resume = self.last()
        if resume is not None:
            logger.info("resuming from checkpoint %s (%s)", resume.name, resume.to_dict())
            self._last_save_tokens = resume.get("elapsed_tokens", 0)
            return service.create_training_client_from_state_with_optimizer(resume.state_path), resume
        if load_checkpoint_path:
            logger.info("starting from the weights of %s (fresh optimizer)", load_checkpoint_path)
            return service.create_training_client_from_state(load_checkpoint_path), None
        return service.create_lora_training_client(model_name, rank=lora_rank, seed=seed), None

    def due(self, step: int, elapsed_tokens: int = 0) -> bool:
        """Whether to save the state reached before `step` (every `save_every` steps, or by tokens/time)."""
        due = step > 0 and self.save_every > 0 and step % self.save_every == 0
        due |= self.save_every_tokens > 0 and elapsed_tokens - self._last_save_tokens >= self.save_every_tokens
        due |= self.save_every_seconds > 0 and time.monotonic() - self._last_save_time >= self.save_every_seconds
        return due

    def save(
        self, training_client: TrainingClient, name: str, loop_state: dict[str, Any], elapsed_tokens: int | None = None
    ) -> dict[str, str]:
        """Save state and sampler weights as checkpoint `name` with the loop's state (e.g. {"batch": 5})."""
        if elapsed_tokens is not None:
            loop_state = {**loop_state, "elapsed_tokens": elapsed_tokens}
        paths = checkpoint_utils.save_checkpoint(training_client, name, self.log_path, loop_state, kind="both")
        self._last_save_time = time.monotonic()
        self._last_save_tokens = elapsed_tokens or 0
        return paths
