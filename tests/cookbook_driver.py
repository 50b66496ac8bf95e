"""Runs the real tinker-cookbook's library code, unchanged, against a `rlhfkit serve` (TINKER_BASE_URL), on local
data: the three stages of the RLHF pipeline (the cookbook's recipes/preference/rlhf/rlhf_pipeline.py with the
Hub data sets replaced by local JSONL files and renderer_name="role_colon"), DPO, and the tutorial's final cell.

    python tests/cookbook_driver.py STAGE --model DIR --data DIR --logs DIR [--steps N] [--stream] [--async]

STAGE: data (write the JSONL files from ../shared/data), sft, rm, rl, dpo, sample. Each prints one JSON line of
its results; the tests read it.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import sys
from pathlib import Path

RENDERER = "role_colon"


def write_data(data_dir: Path, shared: Path, n_sft: int = 24, n_pairs: int = 40) -> None:
    """LIMA as conversations JSONL, HH-RLHF harmless-base as comparisons JSONL (train/test), small and short."""
    data_dir.mkdir(parents=True, exist_ok=True)
    lima = json.loads((shared / "lima" / "lima.json").read_text())
    rows = []
    for ex in lima:
        if len(ex["instruction"]) + len(ex["output"]) < 400 and not ex.get("history"):
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": ex["instruction"]},
                        {"role": "assistant", "content": ex["output"]},
                    ]
                }
            )
        if len(rows) == n_sft:
            break
    (data_dir / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = []
    with gzip.open(shared / "hh-rlhf" / "harmless-base-test.jsonl.gz", "rt") as f:
        for line in f:
            row = json.loads(line)
            chosen, rejected = _turns(row["chosen"]), _turns(row["rejected"])
            if not chosen or not rejected or chosen[:-1] != rejected[:-1] or len(row["chosen"]) > 500:
                continue
            if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
                continue
            a_first = len(pairs) % 2 == 0
            pairs.append(
                {
                    "comparison": {
                        "prompt_conversation": chosen[:-1],
                        "completion_A": [chosen[-1] if a_first else rejected[-1]],
                        "completion_B": [rejected[-1] if a_first else chosen[-1]],
                    },
                    "label": "A" if a_first else "B",
                }
            )
            if len(pairs) == n_pairs:
                break
    half = len(pairs) * 3 // 4
    (data_dir / "pm_train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[:half]))
    (data_dir / "pm_test.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[half:]))


def _turns(transcript: str) -> list[dict]:
    turns = []
    for part in transcript.split("\n\n"):
        for prefix, role in (("Human: ", "user"), ("Assistant: ", "assistant")):
            if part.startswith(prefix):
                turns.append({"role": role, "content": part[len(prefix) :].strip()})
                break
        else:
            if turns and part.strip():
                turns[-1]["content"] += "\n\n" + part.strip()
    return turns


def common(model: str, batch_size: int):
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

    return ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=model, renderer_name=RENDERER, max_length=192, batch_size=batch_size
    )


def comparisons(data: Path):
    from tinker_cookbook.preference.preference_datasets import ComparisonBuilderFromJsonl

    return ComparisonBuilderFromJsonl(train_path=str(data / "pm_train.jsonl"), test_path=str(data / "pm_test.jsonl"))


def last(log_path: Path, key: str = "state_path") -> str:
    from tinker_cookbook import checkpoint_utils

    record = checkpoint_utils.get_last_checkpoint(str(log_path), required_key=key)
    assert record is not None, f"no checkpoint with {key} in {log_path}"
    return getattr(record, key)


def metrics(log_path: Path) -> list[dict]:
    path = log_path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_supervised(args, stage: str, dataset_builder) -> Path:
    """The cookbook's supervised loop (SFT, and the preference model as SFT on the label token) on `stage`."""
    from tinker_cookbook.supervised import train

    log_path = Path(args.logs) / stage
    config = train.Config(
        log_path=str(log_path),
        model_name=args.model,
        recipe_name=f"rlhfkit_test_{stage}",
        renderer_name=RENDERER,
        dataset_builder=dataset_builder,
        learning_rate=5e-3,
        lora_rank=8,
        max_steps=args.steps,
        save_every=2,
        eval_every=2,
    )
    asyncio.run(train.main(config))
    return log_path


def run_sft(args) -> dict:
    from tinker_cookbook.supervised.data import FromConversationFileBuilder

    builder = FromConversationFileBuilder(
        common_config=common(args.model, 4), file_path=str(Path(args.data) / "sft.jsonl"), test_size=4
    )
    log_path = run_supervised(args, "sft", builder)
    return {"metrics": metrics(log_path), "state_path": last(log_path), "sampler_path": last(log_path, "sampler_path")}


def run_rm(args) -> dict:
    from tinker_cookbook.preference.preference_datasets import ChatDatasetBuilderFromComparisons

    builder = ChatDatasetBuilderFromComparisons(
        common_config=common(args.model, 4), comparison_builder=comparisons(Path(args.data))
    )
    log_path = run_supervised(args, "rm", builder)
    return {"metrics": metrics(log_path), "sampler_path": last(log_path, "sampler_path")}


def run_rl(args) -> dict:
    from tinker_cookbook.preference.comparison_policy_evaluator import ComparisonEvaluator
    from tinker_cookbook.preference.types import PreferenceModelBuilderFromChatRenderer
    from tinker_cookbook.rl import preference_envs, train

    data = Path(args.data)
    name = "rl_stream" if args.stream else "rl_async" if args.async_mode else "rl"
    log_path = Path(args.logs) / name
    judge = PreferenceModelBuilderFromChatRenderer(
        renderer_name=RENDERER, model_name=args.model, rm_weights_path=last(Path(args.logs) / "rm", "sampler_path")
    )
    builder = preference_envs.PairwisePreferenceRLDatasetBuilder(
        comparison_builder=comparisons(data),
        policy_renderer_name=RENDERER,
        policy_model_name=args.model,
        preference_model_builder=judge,
        batch_size=2,
        group_size=2,
        tournament_pattern=preference_envs.TournamentPattern.ALL_PAIRS_BOTH_WAYS,
    )

    def evaluator() -> ComparisonEvaluator:
        cb = comparisons(data)
        _, test = cb.get_train_and_test_datasets()
        labeled = [cb.example_to_labeled_comparison(ex) for ex in test]
        return ComparisonEvaluator(
            preference_model_builder=judge,
            comparisons=[lc.comparison for lc in labeled if lc is not None][:4],
            renderer_name=RENDERER,
            model_name_for_tokenizer=args.model,
            max_tokens=12,
        )

    extra = {}
    if args.stream:
        extra["stream_minibatch_config"] = train.StreamMinibatchConfig(groups_per_batch=2, num_minibatches=2)
    if args.async_mode:
        extra["async_config"] = train.AsyncConfig(
            max_steps_off_policy=1, groups_per_batch=2, loss_fn="importance_sampling"
        )
    config = train.Config(
        model_name=args.model,
        recipe_name="rlhfkit_test_rl",
        renderer_name=RENDERER,
        dataset_builder=builder,
        load_checkpoint_path=last(Path(args.logs) / "sft"),
        learning_rate=1e-3,
        max_tokens=12,
        log_path=str(log_path),
        evaluator_builders=[evaluator],
        lora_rank=8,
        save_every=1,
        eval_every=args.steps,
        max_steps=args.steps,
        **extra,
    )
    asyncio.run(train.main(config))
    return {"metrics": metrics(log_path), "sampler_path": last(log_path, "sampler_path")}


def run_dpo(args) -> dict:
    from tinker_cookbook.preference import train_dpo
    from tinker_cookbook.preference.dpo_datasets import DPODatasetBuilderFromComparisons

    log_path = Path(args.logs) / "dpo"
    config = train_dpo.Config(
        log_path=str(log_path),
        model_name=args.model,
        recipe_name="rlhfkit_test_dpo",
        renderer_name=RENDERER,
        dataset_builder=DPODatasetBuilderFromComparisons(
            common_config=common(args.model, 2), comparison_builder=comparisons(Path(args.data))
        ),
        learning_rate=1e-3,
        lora_rank=8,
        max_steps=args.steps,
    )
    train_dpo.main(config)
    return {"metrics": metrics(log_path), "sampler_path": last(log_path, "sampler_path")}


def run_sample(args) -> dict:
    """The tutorial's final cell (407_rlhf_pipeline.py), with BASE_MODEL = the local model folder."""
    import tinker
    from tinker_cookbook import renderers

    BASE_MODEL = args.model
    rl_sampler_path = last(Path(args.logs) / "rl", "sampler_path")

    async def cell() -> dict:
        service_client = tinker.ServiceClient()
        base_sampler = await service_client.create_sampling_client_async(base_model=BASE_MODEL)
        rl_sampler = await service_client.create_sampling_client_async(
            model_path=rl_sampler_path, base_model=BASE_MODEL
        )
        tokenizer = base_sampler.get_tokenizer()
        renderer = renderers.get_renderer(RENDERER, tokenizer)
        prompt = renderer.build_generation_prompt([{"role": "user", "content": "How do I bake bread?"}])
        params = tinker.SamplingParams(max_tokens=20, temperature=0.7, stop=renderer.get_stop_sequences())
        replies = {}
        for label, sampler in (("base", base_sampler), ("rl", rl_sampler)):
            result = await sampler.sample_async(prompt=prompt, num_samples=1, sampling_params=params)
            replies[label] = renderer.parse_response(result.sequences[0].tokens)[0]["content"]
        return replies

    return {"replies": asyncio.run(cell())}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=["data", "sft", "rm", "rl", "dpo", "sample"])
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--logs")
    parser.add_argument("--shared", default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--async", dest="async_mode", action="store_true")
    args = parser.parse_args()
    if args.stage == "data":
        write_data(Path(args.data), Path(args.shared))
        return 0
    result = {"sft": run_sft, "rm": run_rm, "rl": run_rl, "dpo": run_dpo, "sample": run_sample}[args.stage](args)
    print("RESULT " + json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
