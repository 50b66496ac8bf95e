"""The pipeline's data builders, made from its settings: SFT conversations and comparisons per role."""

from __future__ import annotations

from typing import Literal

from rlhfkit.preference.types import LabeledComparison
from rlhfkit.recipes.chat_sl.chat_datasets import chat_builder
from rlhfkit.recipes.preference.datasets import ComparisonBuilderFromSource
from rlhfkit.recipes.preference.rlhf.pipeline_config import PipelineConfig
from rlhfkit.supervised.types import ChatDatasetBuilder, ChatDatasetBuilderCommonConfig


def sft_dataset_builder(cfg: PipelineConfig, common: ChatDatasetBuilderCommonConfig) -> ChatDatasetBuilder:
    return chat_builder(common, cfg.sft_data, cfg.sft_columns, cfg.sft_test_size)


def comparison_builder(cfg: PipelineConfig, role: Literal["preference_model", "rl"],
                       test_size: int = 1024) -> ComparisonBuilderFromSource:
    """The run's comparisons for a role ("preference_model": PM train/test, "rl": RL prompts/win-rate prompts),
    from pref_data (else hh_data), split disjointly by prompt."""
    data = cfg.pref_data if cfg.pref_data is not None else cfg.hh_data
    return ComparisonBuilderFromSource(data=data, columns=cfg.pref_columns, role=role, test_size=test_size,
                                       max_chars=cfg.hh_max_chars)


def held_out_comparisons(cfg: PipelineConfig, role: Literal["preference_model", "rl"],
                         count: int) -> list[LabeledComparison]:
    """The first `count` held-out labelled comparisons of the run's data for a role (the same ones at any count: a
    larger count extends the list)."""
    return comparison_builder(cfg, role, count).held_out_comparisons()
