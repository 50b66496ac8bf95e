"""Tutorial 407 (Full RLHF Pipeline), transcribed to rlhfkit.

The tutorial's code with only these changes:
  * imports: `tinker` -> `rlhfkit.engine`, `tinker_cookbook` -> `rlhfkit`;
  * constants scaled down (and overridable from the command line) so it runs on a CPU;
  * NoRobotsBuilder (a Hub dataset) swapped for LimaBuilder (the offline human-written instruction data);
  * the HH-RLHF builders name their role, because offline only the test splits exist and are split by prompt
    into disjoint roles (preference model / RL prompts and win-rate evaluation);
  * the notebook's top-level `await`s live inside `async def main()`; the API-key cell is gone (local engine).

Run:  python examples/tutorial_407_rlhf_pipeline.py [BASE_MODEL] [LOG_ROOT] [STEPS]
      (defaults: smollm2-135m-instruct, /tmp/rlhfkit-tutorials/rlhf, 4)
"""

import asyncio
import sys
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")

import rlhfkit.engine as tinker

from rlhfkit import checkpoint_utils, model_info
from rlhfkit.renderers import TrainOnWhat

BASE_MODEL = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-instruct"
LORA_RANK = 8
MAX_LENGTH = 384
BATCH_SIZE = 4
LOG_ROOT = sys.argv[2] if len(sys.argv) > 2 else "/tmp/rlhfkit-tutorials/rlhf"
STEPS = int(sys.argv[3]) if len(sys.argv) > 3 else 4  # the tutorial: full epochs for SFT/RM, 40 for RL

renderer_name = model_info.get_recommended_renderer_name(BASE_MODEL)
print(f"Base model:  {BASE_MODEL}")
print(f"Renderer:    {renderer_name}")
print(f"LoRA rank:   {LORA_RANK}")


async def main():
    # Stage 1: Supervised Fine-Tuning (SFT)
    from rlhfkit.recipes.chat_sl.chat_datasets import LimaBuilder
    from rlhfkit.supervised import train as supervised_train
    from rlhfkit.supervised.types import ChatDatasetBuilderCommonConfig

    # Configure the SFT dataset
    sft_common_config = ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=BASE_MODEL,
        renderer_name=renderer_name,
        max_length=MAX_LENGTH,
        batch_size=BATCH_SIZE,
        train_on_what=TrainOnWhat.ALL_ASSISTANT_MESSAGES,
    )
    sft_dataset_builder = LimaBuilder(common_config=sft_common_config, test_size=BATCH_SIZE)

    # Configure and run SFT training
    sft_log_path = f"{LOG_ROOT}/sft"
    sft_config = supervised_train.Config(
        log_path=sft_log_path,
        model_name=BASE_MODEL,
        recipe_name="tutorial_rlhf_sft",
        renderer_name=renderer_name,
        dataset_builder=sft_dataset_builder,
        evaluator_builders=[],
        num_epochs=1,
        learning_rate=2e-4,
        lr_schedule="linear",
        save_every=100,
        eval_every=20,
        lora_rank=LORA_RANK,
        wandb_project=None,
        wandb_name="rlhf-tutorial-sft",
        max_steps=STEPS,
    )

    await supervised_train.main(sft_config)
    print("Stage 1 (SFT) complete.")

    # Stage 2: Train the Preference Model
    from rlhfkit.preference.preference_datasets import (
        ChatDatasetBuilderFromComparisons,
    )
    from rlhfkit.recipes.preference.datasets import HHHComparisonBuilder
    from rlhfkit.supervised.types import (
        ChatDatasetBuilderCommonConfig as CommonConfig,
    )

    # The HHH dataset provides labeled pairwise comparisons
    comparison_builder = HHHComparisonBuilder(test_size=BATCH_SIZE)

    # Wrap comparisons with the renderer for supervised training
    rm_common_config = CommonConfig(
        model_name_for_tokenizer=BASE_MODEL,
        renderer_name=renderer_name,
        max_length=MAX_LENGTH,
        batch_size=BATCH_SIZE,
    )
    rm_dataset_builder = ChatDatasetBuilderFromComparisons(
        common_config=rm_common_config,
        comparison_builder=comparison_builder,
    )

    # Train the preference model
    rm_log_path = f"{LOG_ROOT}/rm"
    rm_config = supervised_train.Config(
        log_path=rm_log_path,
        model_name=BASE_MODEL,
        recipe_name="tutorial_rlhf_rm",
        renderer_name=renderer_name,
        dataset_builder=rm_dataset_builder,
        evaluator_builders=[],
        num_epochs=1,
        learning_rate=3e-4,
        lr_schedule="linear",
        save_every=100,
        eval_every=20,
        lora_rank=LORA_RANK,
        wandb_project=None,
        wandb_name="rlhf-tutorial-rm",
        max_steps=STEPS,
    )

    await supervised_train.main(rm_config)
    print("Stage 2 (Preference Model) complete.")

    # Stage 3: RL Training
    from rlhfkit.preference.comparison_policy_evaluator import (
        ComparisonEvaluator,
    )
    from rlhfkit.preference.types import PreferenceModelBuilderFromChatRenderer
    from rlhfkit.rl import preference_envs
    from rlhfkit.rl import train as rl_train

    # Load checkpoints from Stages 1 and 2
    sft_ckpt = checkpoint_utils.get_last_checkpoint(sft_log_path)
    rm_ckpt = checkpoint_utils.get_last_checkpoint(rm_log_path)
    assert sft_ckpt is not None, f"No SFT checkpoint in {sft_log_path}"
    assert rm_ckpt is not None, f"No RM checkpoint in {rm_log_path}"

    print(f"SFT checkpoint: {sft_ckpt.state_path}")
    print(f"RM checkpoint:  {rm_ckpt.sampler_path}")

    # Build the preference model from the RM checkpoint
    pm_builder = PreferenceModelBuilderFromChatRenderer(
        renderer_name=renderer_name,
        model_name=BASE_MODEL,
        rm_weights_path=rm_ckpt.sampler_path,
    )

    # Build the RL dataset: prompts from HHH, rewards from the preference model
    rl_comparison_builder = HHHComparisonBuilder(role="rl")
    rl_dataset_builder = preference_envs.PairwisePreferenceRLDatasetBuilder(
        comparison_builder=rl_comparison_builder,
        policy_renderer_name=renderer_name,
        policy_model_name=BASE_MODEL,
        preference_model_builder=pm_builder,
        batch_size=BATCH_SIZE,
        group_size=4,
        tournament_pattern=preference_envs.TournamentPattern.ALL_PAIRS_BOTH_WAYS,
    )

    # Build an evaluator that measures win rate on held-out comparisons
    def make_evaluator() -> ComparisonEvaluator:
        eval_builder = HHHComparisonBuilder(test_size=BATCH_SIZE, role="rl")
        _, test_set = eval_builder.get_train_and_test_datasets()
        assert test_set is not None
        comparisons = [
            eval_builder.example_to_labeled_comparison(ex).comparison
            for ex in test_set
            if eval_builder.example_to_labeled_comparison(ex) is not None
        ]
        return ComparisonEvaluator(
            preference_model_builder=pm_builder,
            comparisons=comparisons,
            renderer_name=renderer_name,
            model_name_for_tokenizer=BASE_MODEL,
            max_tokens=32,
        )

    # Configure and run RL
    rl_log_path = f"{LOG_ROOT}/rl"
    rl_config = rl_train.Config(
        model_name=BASE_MODEL,
        recipe_name="tutorial_rlhf_rl",
        renderer_name=renderer_name,
        dataset_builder=rl_dataset_builder,
        load_checkpoint_path=sft_ckpt.state_path,
        learning_rate=1e-5,
        max_tokens=32,
        log_path=rl_log_path,
        evaluator_builders=[make_evaluator],
        wandb_project=None,
        wandb_name="rlhf-tutorial-rl",
        lora_rank=LORA_RANK,
        save_every=100,
        eval_every=10,
        num_groups_to_log=4,
        max_steps=STEPS,
    )

    await rl_train.main(rl_config)
    print("Stage 3 (RL) complete.")

    # Evaluation: Compare Base vs RLHF Policy
    from rlhfkit.engine import types

    from rlhfkit import renderers

    # Create sampling clients for both models
    service = tinker.ServiceClient()

    # Base model (no fine-tuning)
    base_sampler = await service.create_sampling_client_async(base_model=BASE_MODEL)

    # RLHF model (load RL checkpoint)
    rl_ckpt = checkpoint_utils.get_last_checkpoint(rl_log_path)
    assert rl_ckpt is not None
    rlhf_sampler = await service.create_sampling_client_async(
        model_path=rl_ckpt.sampler_path,
        base_model=BASE_MODEL,
    )

    tokenizer_eval = base_sampler.get_tokenizer()
    renderer_eval = renderers.get_renderer(renderer_name, tokenizer_eval)

    # Sample from both models on the same prompt
    test_prompt = "What is the most important thing to consider when learning a new programming language?"
    prompt_tokens = renderer_eval.build_generation_prompt([{"role": "user", "content": test_prompt}])
    params = types.SamplingParams(max_tokens=200, temperature=0.7, stop=renderer_eval.get_stop_sequences())

    base_result = await base_sampler.sample_async(prompt=prompt_tokens, sampling_params=params, num_samples=1)
    rlhf_result = await rlhf_sampler.sample_async(prompt=prompt_tokens, sampling_params=params, num_samples=1)

    print("=== Base Model ===")
    print(test_prompt + tokenizer_eval.decode(base_result.sequences[0].tokens))
    print()
    print("=== RLHF Model ===")
    print(test_prompt + tokenizer_eval.decode(rlhf_result.sequences[0].tokens))


if __name__ == "__main__":
    asyncio.run(main())
