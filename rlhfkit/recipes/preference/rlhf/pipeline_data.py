"""The pipeline's data builders, made from its settings: SFT conversations and HH-RLHF comparisons per role."""

from __future__ import annotations

from typing import Literal

from rlhfkit.preference.types import LabeledComparison
from rlhfkit.recipes.chat_sl import chat_datasets
from rlhfkit.recipes.preference.datasets import HHHComparisonBuilder, hh_data_files
from rlhfkit.recipes.preference.rlhf.pipeline_config import PipelineConfig
from rlhfkit.supervised.types import ChatDatasetBuilder, ChatDatasetBuilderCommonConfig


def sft_dataset_builder(cfg: PipelineConfig, common: ChatDatasetBuilderCommonConfig) -> ChatDatasetBuilder:
    if cfg.sft_data == "lima":
        return chat_datasets.LimaBuilder(common_config=common, test_size=cfg.sft_test_size)
    if cfg.sft_data == "no_robots":
        return chat_datasets.NoRobotsBuilder(common_config=common)
    if cfg.sft_data == "hh_chosen":
        return chat_datasets.HHChosenBuilder(common_config=common, test_size=cfg.sft_test_size)
    return chat_datasets.JsonlChatBuilder(common_config=common, train_path=cfg.sft_data)


def hh_builder(cfg: PipelineConfig, role: Literal["preference_model", "rl"],
               test_size: int = 1024) -> HHHComparisonBuilder:
    """HH-RLHF comparisons for a role ("preference_model": PM train/test, "rl": RL prompts/win-rate prompts)."""
    files = hh_data_files(cfg.hh_data)
    data_files = tuple(str(f) for f in files) if isinstance(files, list) else files
    return HHHComparisonBuilder(test_size=test_size, role=role, data_files=data_files, max_chars=cfg.hh_max_chars)


def held_out_comparisons(cfg: PipelineConfig, role: Literal["preference_model", "rl"],
                         count: int) -> list[LabeledComparison]:
    """The first `count` held-out labelled comparisons of the run's HH data for a role (the same ones at any
    count: a larger count extends the list)."""
    return hh_builder(cfg, role, count).held_out_comparisons()
