"""DPO training data from labelled comparisons (spec §12): each comparison becomes an adjacent pair of datums,
the chosen reply (even index) then the rejected one (odd index)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from rlhfkit.engine.types import Datum
from rlhfkit.preference.preference_datasets import ComparisonDatasetBuilder
from rlhfkit.preference.types import LabeledComparison
from rlhfkit.renderers import Renderer, RendererError, TrainOnWhat
from rlhfkit.supervised.data import SupervisedDatasetFromList, conversation_to_datum
from rlhfkit.supervised.types import (
    ChatDatasetBuilderCommonConfig,
    SupervisedDataset,
    SupervisedDatasetBuilder,
    renderer_for,
)

logger = logging.getLogger(__name__)


def comparison_to_dpo_pair(labeled: LabeledComparison, renderer: Renderer, max_length: int | None) -> list[Datum] | str:
    """[chosen datum, rejected datum] (prompt + reply, trained on the last assistant message, reduction
    "none"), or the reason the comparison gives no pair: a tie, a conversation that does not render, or a
    reply with no trained token left after truncation to max_length."""
    if labeled.label == "Tie":
        return "a tie has no chosen reply"
    comparison = labeled.comparison
    chosen, rejected = (
        (comparison.completion_A, comparison.completion_B)
        if labeled.label == "A"
        else (comparison.completion_B, comparison.completion_A)
    )
    pair = []
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        try:
            datum = conversation_to_datum(
                [*comparison.prompt_conversation, *completion],
                renderer,
                max_length,
                TrainOnWhat.LAST_ASSISTANT_MESSAGE,
                reduction="none",
            )
        except (RendererError, ValueError) as e:
            return f"the {name} conversation cannot be rendered: {e}"
        if sum(datum.loss_fn_inputs["weights"].data) <= 0:
            return f"the {name} reply has no trained token left after truncation to max_length={max_length}"
        pair.append(datum)
    return pair


@dataclass(frozen=True)
class DPODatasetBuilderFromComparisons(SupervisedDatasetBuilder):
    """(train, test) datasets of DPO pairs. A train batch holds `common_config.batch_size` comparisons, i.e.
    up to twice as many datums: rows the comparison builder cannot parse, ties and pairs that do not render or
    lose a reply to truncation emit nothing (the first one is logged). Test = one batch of the whole test
    split. No A/B swapping (the order of A and B does not matter to DPO)."""

    common_config: ChatDatasetBuilderCommonConfig  # tokenizer, renderer, max_length, batch_size (comparisons)
    comparison_builder: ComparisonDatasetBuilder  # raw rows and the row -> LabeledComparison parser

    def __call__(self) -> tuple[SupervisedDataset, SupervisedDataset | None]:
        train_rows, test_rows = self.comparison_builder.get_train_and_test_datasets()
        renderer = renderer_for(self.common_config)
        max_length = self.common_config.max_length
        skipped = 0

        def to_pair(row: Any) -> list[Datum]:
            nonlocal skipped
            labeled = self.comparison_builder.example_to_labeled_comparison(row)
            pair = (
                comparison_to_dpo_pair(labeled, renderer, max_length)
                if labeled is not None
                else "the comparison builder could not parse the row"
            )
            if isinstance(pair, str):
                if skipped == 0:
                    where = (
                        f"{row['_source']}, row {row['_row']}"
                        if isinstance(row, dict) and "_row" in row
                        else "a comparison"
                    )
                    logger.warning("DPO data: skipping comparisons that give no pair; first: %s: %s", where, pair)
                skipped += 1
                return []
            return pair

        train = SupervisedDatasetFromList(train_rows, self.common_config.batch_size, flatmap_fn=to_pair)
        test = SupervisedDatasetFromList(test_rows, len(test_rows), flatmap_fn=to_pair) if test_rows else None
        return train, test
