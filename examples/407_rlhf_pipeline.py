"""Tutorial 407 (Full RLHF Pipeline) as a marimo notebook, on rlhfkit.

The tutorial's cells with only these changes:
  * imports: `tinker` -> `rlhfkit.engine`, `tinker_cookbook` -> `rlhfkit`;
  * the API-key cell is gone (the engine runs on this machine);
  * constants scaled down so it runs on a CPU (environment variables below override them);
  * NoRobotsBuilder (a Hub dataset) swapped for LimaBuilder (the offline human-written instruction data);
  * the HH-RLHF builders name their role: offline only the test splits exist, split by prompt into disjoint roles;
  * each stage's curves (its metrics.png) are shown after it.

    marimo edit examples/407_rlhf_pipeline.py     # interactive
    marimo run examples/407_rlhf_pipeline.py      # as an app
    python examples/407_rlhf_pipeline.py          # headless, top to bottom

Environment: RLHFKIT_TUTORIAL_MODEL (default smollm2-135m-instruct), RLHFKIT_TUTORIAL_LOG_ROOT
(/tmp/rlhfkit-tutorials/rlhf), RLHFKIT_TUTORIAL_STEPS (4; the tutorial: full epochs for SFT/RM, 40 for RL).
"""

import marimo

__generated_with = "0.25.2"
app = marimo.App(width="medium")


@app.cell
def _():
    import marimo as mo

    return (mo,)


@app.cell
def _(mo):
    mo.md(
        r"""
        # Tutorial 407: Full RLHF Pipeline

        Train a model through the complete 3-stage RLHF pipeline:

        ```
        Stage 1: SFT              Stage 2: Preference Model     Stage 3: RL
        +------------------+      +------------------------+     +-------------------+
        | Base model       |      | Base model             |     | SFT policy        |
        | + LIMA data      | ---> | + HHH pairwise data    | --> | + PM as reward    |
        | = initial policy |      | = preference model     |     | = RLHF policy     |
        +------------------+      +------------------------+     +-------------------+
        ```

        Each stage builds on the previous one. The SFT policy initializes the RL agent, and the preference
        model provides the reward signal. All three stages use LoRA.
        """
    )
    return


@app.cell
def _():
    import os
    import warnings

    warnings.filterwarnings("ignore", message="IProgress not found")

    import rlhfkit.engine as tinker

    from rlhfkit import checkpoint_utils, model_info
    from rlhfkit.renderers import TrainOnWhat

    BASE_MODEL = os.environ.get("RLHFKIT_TUTORIAL_MODEL", "smollm2-135m-instruct")
    LORA_RANK = 8
    MAX_LENGTH = 384
    BATCH_SIZE = 4
    LOG_ROOT = os.environ.get("RLHFKIT_TUTORIAL_LOG_ROOT", "/tmp/rlhfkit-tutorials/rlhf")
    STEPS = int(os.environ.get("RLHFKIT_TUTORIAL_STEPS", "4"))

    renderer_name = model_info.get_recommended_renderer_name(BASE_MODEL)
    print(f"Base model:  {BASE_MODEL}")
    print(f"Renderer:    {renderer_name}")
    print(f"LoRA rank:   {LORA_RANK}")
    return (
        BASE_MODEL,
        BATCH_SIZE,
        LOG_ROOT,
        LORA_RANK,
        MAX_LENGTH,
        STEPS,
        TrainOnWhat,
        checkpoint_utils,
        renderer_name,
        tinker,
    )


@app.function
def show_curves(mo, log_path):
    """A stage's curves (its metrics.png), or a note when it has none yet."""
    from pathlib import Path

    image = Path(log_path) / "metrics.png"
    return mo.image(src=str(image), width=720) if image.exists() else mo.md(f"_no curves in {log_path}_")


@app.cell
def _(mo):
    mo.md(
        r"""
        ## Stage 1: Supervised Fine-Tuning (SFT)

        Train the base model on human-written instruction-following examples (LIMA here; NoRobots in the
        tutorial). Loss: next-token prediction on assistant messages only; learning rate 2e-4.
        """
    )
    return


@app.cell
async def _(BASE_MODEL, BATCH_SIZE, LOG_ROOT, LORA_RANK, MAX_LENGTH, STEPS, TrainOnWhat, renderer_name):
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
    return sft_log_path, supervised_train


@app.cell
def _(mo, sft_log_path):
    show_curves(mo, sft_log_path)
    return


@app.cell
def _(mo):
    mo.md(
        r"""
        ## Stage 2: Train the Preference Model

        A model that judges which of two completions is better, trained on Anthropic's HHH pairwise data:
        `[prompt] ==== Completion A ==== [text] ==== Completion B ==== [text] ==== Preference ====`, then "A" or
        "B". Learning rate 3e-4.
        """
    )
    return


@app.cell
async def _(BASE_MODEL, BATCH_SIZE, LOG_ROOT, LORA_RANK, MAX_LENGTH, STEPS, renderer_name, supervised_train):
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
    return HHHComparisonBuilder, rm_log_path


@app.cell
def _(mo, rm_log_path):
    show_curves(mo, rm_log_path)
    return


@app.cell
def _(mo):
    mo.md(
        r"""
        ## Stage 3: RL Training

        1. For each prompt, sample a group of completions from the policy (group_size=4);
        2. the preference model judges every pair, in both orders (ALL_PAIRS_BOTH_WAYS);
        3. each completion is rewarded by its wins;
        4. the policy is updated towards the winners. Learning rate 1e-5.
        """
    )
    return


@app.cell
async def _(
    BASE_MODEL,
    BATCH_SIZE,
    HHHComparisonBuilder,
    LOG_ROOT,
    LORA_RANK,
    STEPS,
    checkpoint_utils,
    renderer_name,
    rm_log_path,
    sft_log_path,
):
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
    return (rl_log_path,)


@app.cell
def _(mo, rl_log_path):
    show_curves(mo, rl_log_path)
    return


@app.cell
def _(mo):
    mo.md(
        r"""
        ## Evaluation: Compare Base vs RLHF Policy

        Sample from the base model and from the RLHF policy on the same prompt.
        """
    )
    return


@app.cell
async def _(BASE_MODEL, checkpoint_utils, renderer_name, rl_log_path, tinker):
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
    return


if __name__ == "__main__":
    app.run()
