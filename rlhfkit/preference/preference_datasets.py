"""Comparison data sets, and the supervised data set that trains a preference model on them (spec 4.4)."""

from __future__ import annotations

import logging
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from rlhfkit.engine.types import Datum
from rlhfkit.preference.types import ComparisonRendererFromChatRenderer, LabeledComparison
from rlhfkit.supervised.common import datum_from_model_input_weights
from rlhfkit.supervised.data import SupervisedDatasetFromList
from rlhfkit.supervised.types import ChatDatasetBuilder, SupervisedDataset

logger = logging.getLogger(__name__)


class ComparisonDatasetBuilder(ABC):
    """Raw train/test rows plus a parser from a row to a LabeledComparison (None = unusable row).
    Subclasses are frozen dataclasses with a `swap: bool` field: True makes get_labeled_comparisons() also emit
    each comparison with A and B exchanged."""

    swap: bool

    @abstractmethod
    def get_train_and_test_datasets(self) -> tuple[list[Any], list[Any] | None]: ...

    @abstractmethod
    def example_to_labeled_comparison(self, example: Any) -> LabeledComparison | None: ...

    def _labeled(self, rows: list[Any]) -> list[LabeledComparison]:
        out = []
        for row in rows:
            labeled = self.example_to_labeled_comparison(row)
            if labeled is not None:
                out += [labeled, labeled.swap()] if self.swap else [labeled]
        return out

    def get_labeled_comparisons(self) -> tuple[list[LabeledComparison], list[LabeledComparison] | None]:
        train, test = self.get_train_and_test_datasets()
        return self._labeled(train), (self._labeled(test) if test is not None else None)

    def held_out_comparisons(self) -> list[LabeledComparison]:
        """The usable test rows as labelled comparisons, as given (never swapped)."""
        _, test = self.get_train_and_test_datasets()
        comparisons = [self.example_to_labeled_comparison(row) for row in test or []]
        return [c for c in comparisons if c is not None]


@dataclass(frozen=True)
class ChatDatasetBuilderFromComparisons(ChatDatasetBuilder):
    """Preference-model training data: each comparison rendered as "... ==== Preference ====" followed by
    its label's first token (the only trained token), reduction "none".

    One random.Random(0) decides the A/B order: with swap=False each comparison is swapped with probability
    0.5 (so about half the labels are "B"); with swap=True both orders are emitted. [local choice] The
    draws are made up front (test rows first, then train rows) instead of lazily as batches are built, so
    a resumed run sees the same data. Comparisons longer than max_length would lose their label token to
    truncation; they are skipped (counted, logged once) instead of becoming datums with no trained token.
    """

    comparison_builder: ComparisonDatasetBuilder
    swap: bool = False

    @property
    def comparison_renderer(self) -> ComparisonRendererFromChatRenderer:
        return ComparisonRendererFromChatRenderer(self.renderer)

    def __call__(self) -> tuple[SupervisedDataset, SupervisedDataset | None]:
        train_rows, test_rows = self.comparison_builder.get_train_and_test_datasets()
        rng = random.Random(0)
        test_items = self._orient(test_rows or [], rng)
        train_items = self._orient(train_rows, rng)
        comparison_renderer = self.comparison_renderer
        max_length = self.common_config.max_length
        too_long = 0

        def to_datums(item: list[LabeledComparison]) -> list[Datum]:
            nonlocal too_long
            datums = []
            for labeled in item:
                model_input, weights = comparison_renderer.to_model_input_weights(labeled)
                if max_length is not None and model_input.length > max_length:
                    if too_long == 0:
                        logger.warning(
                            "skipping comparisons longer than max_length=%d tokens (the label token "
                            "would be cut off); first one has %d tokens",
                            max_length,
                            model_input.length,
                        )
                    too_long += 1
                    continue
                datums.append(datum_from_model_input_weights(model_input, weights, max_length, reduction="none"))
            return datums

        train = SupervisedDatasetFromList(train_items, self.common_config.batch_size, flatmap_fn=to_datums)
        test = SupervisedDatasetFromList(test_items, len(test_items), flatmap_fn=to_datums) if test_items else None
        return train, test

    def _orient(self, rows: list[Any], rng: random.Random) -> list[list[LabeledComparison]]:
        """Per usable row, the labelled comparisons to train on (one randomly oriented, or both orders)."""
        items = []
        for row in rows:
            labeled = self.comparison_builder.example_to_labeled_comparison(row)
            if labeled is None:
                continue
            if self.swap:
                items.append([labeled, labeled.swap()])
            else:
                items.append([labeled.swap() if rng.random() < 0.5 else labeled])
        return items
