"""Supervised dataset interfaces (spec 3.1)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from rlhfkit.engine.types import Datum
from rlhfkit.renderers import Renderer, TrainOnWhat, get_renderer


@dataclass(frozen=True)
class ChatDatasetBuilderCommonConfig:
    model_name_for_tokenizer: str
    renderer_name: str | None
    max_length: int | None
    batch_size: int
    train_on_what: TrainOnWhat | None = None


class SupervisedDataset(ABC):
    """Batches of datums. `set_epoch(seed)` reshuffles the order deterministically."""

    @abstractmethod
    def get_batch(self, index: int) -> list[Datum]: ...

    @abstractmethod
    def __len__(self) -> int: ...

    def set_epoch(self, seed: int = 0) -> None:
        pass


class SupervisedDatasetBuilder(ABC):
    """Zero-argument factory of (train dataset, test dataset or None)."""

    @abstractmethod
    def __call__(self) -> tuple[SupervisedDataset, SupervisedDataset | None]: ...


@dataclass(frozen=True)
class ChatDatasetBuilder(SupervisedDatasetBuilder):
    """A builder of chat datasets, with the tokenizer and renderer its common config names."""

    common_config: ChatDatasetBuilderCommonConfig

    @property
    def tokenizer(self) -> Any:
        from rlhfkit.tokenizer_utils import get_tokenizer

        return get_tokenizer(self.common_config.model_name_for_tokenizer)

    @property
    def renderer(self) -> Renderer:
        return renderer_for(self.common_config)


def renderer_for(common_config: ChatDatasetBuilderCommonConfig) -> Renderer:
    """The renderer a common config names (None: the recommended one for its tokenizer's model)."""
    from rlhfkit.tokenizer_utils import get_tokenizer

    name = common_config.renderer_name
    if name is None:
        from rlhfkit.model_info import get_recommended_renderer_name

        name = get_recommended_renderer_name(common_config.model_name_for_tokenizer)
    return get_renderer(name, get_tokenizer(common_config.model_name_for_tokenizer))
