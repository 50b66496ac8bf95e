"""The pipeline's data builders, made from its settings: SFT conversations and comparisons per role."""

from __future__ import annotations

from typing import Literal

from rlhfkit.preference.types import LabeledComparison
from rlhfkit.recipes.chat_sl.chat_datasets import chat_builder
from rlhfkit.recipes.preference.datasets import ComparisonBuilderFromSource, offline_hh_splits
from rlhfkit.recipes.preference.rlhf.pipeline_config import PipelineConfig
from rlhfkit.supervised.types import ChatDatasetBuilder, ChatDatasetBuilderCommonConfig


def sft_dataset_builder(cfg: PipelineConfig, common: ChatDatasetBuilderCommonConfig) -> ChatDatasetBuilder:
    return chat_builder(common, cfg.sft_data, cfg.sft_columns, cfg.sft_test_size)


def comparison_builder(
    cfg: PipelineConfig, role: Literal["preference_model", "rl"], test_size: int = 1024
) -> ComparisonBuilderFromSource:
    """The run's comparisons for a role ("preference_model": PM train/test, "rl": RL prompts/win-rate prompts),
    from pref_data (else hh_data), split disjointly by prompt."""
    return ComparisonBuilderFromSource(
        data=comparison_data(cfg), columns=cfg.pref_columns, role=role, test_size=test_size, max_chars=cfg.hh_max_chars
    )


def comparison_data(cfg: PipelineConfig) -> str | None:
    """The run's comparison data spec: pref_data, else hh_data (None: the four offline HH-RLHF splits)."""
    return cfg.pref_data if cfg.pref_data is not None else cfg.hh_data


def held_out_comparisons(
    cfg: PipelineConfig, role: Literal["preference_model", "rl"], count: int
) -> list[LabeledComparison]:
    """The first `count` held-out labelled comparisons of the run's data for a role (the same ones at any count: a
    larger count extends the list)."""
    return comparison_builder(cfg, role, count).held_out_comparisons()


def out_of_distribution_splits(cfg: PipelineConfig) -> tuple[str, ...]:
    """The offline HH-RLHF splits the run's comparisons leave out, when its data names only offline splits (a
    strict subset of the four); () for any other data (all four splits, files, the Hub)."""
    data = comparison_data(cfg)
    if data is None:
        return ()
    named = {part.strip() for part in data.split(",") if part.strip()}
    splits = offline_hh_splits()
    if not named <= set(splits):
        return ()
    return tuple(name for name in splits if name not in named)


def held_out_ood_comparisons(cfg: PipelineConfig, count: int) -> list[LabeledComparison]:
    """The first `count` PM-test comparisons of the splits the run left out (out_of_distribution_splits; none:
    []), with the run's role split and hh_max_chars: prompts the preference model never trained on, from
    conversations of another kind."""
    splits = out_of_distribution_splits(cfg)
    if not splits:
        return []
    return ComparisonBuilderFromSource(
        data=",".join(splits), role="preference_model", test_size=count, max_chars=cfg.hh_max_chars
    ).held_out_comparisons()
