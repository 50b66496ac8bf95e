"""The judging contract and the asynchronous and streaming RL loops (spec 5.8), on tiny models.

- One judging contract: an RL iteration's groups are judged in one batched scoring call, not one per group.
- max_steps_off_policy=0: the asynchronous loop trains on exactly the synchronous loop's groups and ends with
  its weights; no trained group is older than max_steps_off_policy; streaming with k minibatches makes exactly
  k optimizer steps per iteration; on the `shorter` recipe every mode shortens replies.
- A killed asynchronous run resumes from its checkpoint with no gap or duplicate in metrics.jsonl.

Run as a script (`python tests/test_rl_async.py LOG_PATH MODEL_DIR MAX_STEPS`) it performs one asynchronous RL
run; the kill test uses that to have a child process to kill.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_rl import (
    PromptRows,
    ShortRepliesDatasetBuilder,
    StopTokenRenderer,
    _mean_reply_length,
    rl_config,
)
from test_rl import stop_model_dir  # noqa: F401  (a fixture; the tests below take it, hence noqa: F811)

from rlhfkit import checkpoint_utils
from rlhfkit.config import ConfigError
from rlhfkit.preference.types import PreferenceModelFromChatRenderer
from rlhfkit.renderers import get_renderer
from rlhfkit.rl import train
from rlhfkit.rl.preference_envs import PairwisePreferenceDataset
from rlhfkit.rl.timeline import TIMELINE_FILE, TIMELINE_PLOT
from rlhfkit.rl.types import RLDatasetBuilder
from rlhfkit.tokenizer_utils import get_tokenizer
from rlhfkit.utils.atomic import read_jsonl

# --------------------------------------------------------------------------------------------------
# One judging contract


class CountingPMDataset(RLDatasetBuilder):
    """Prompts judged by a real chat preference model on the tiny model; every batched scoring call of its
    sampling client (the backend's `_score_many`) is recorded with its number of prompts."""

    def __init__(self, model_dir: str, batch_size: int, calls: list[int]):
        self.model_dir, self.batch_size, self.calls = model_dir, batch_size, calls

    async def __call__(self):
        from rlhfkit.engine import ServiceClient

        client = ServiceClient().create_sampling_client(base_model=self.model_dir)
        score_many = client._score_many

        def counted(prompts, candidates):
            self.calls.append(len(prompts))
            return score_many(prompts, candidates)

        client._score_many = counted
        tokenizer = get_tokenizer(self.model_dir)
        pm = PreferenceModelFromChatRenderer(get_renderer("role_colon", tokenizer), client, "probability")
        prompts = PromptRows(16)
        return PairwisePreferenceDataset(
            prompts, prompts.rows, self.batch_size, StopTokenRenderer(tokenizer), pm, 4
        ), None


def test_an_iteration_judges_all_its_groups_in_one_batched_scoring_call(tiny_model_dir, tmp_path):
    calls: list[int] = []
    groups = 3
    config = rl_config(
        str(tmp_path / "rl"), tiny_model_dir, 2, dataset_builder=CountingPMDataset(tiny_model_dir, groups, calls)
    )
    train.main(config)
    # Two iterations, each one call with all 3 groups' 12 matchups (before: one call per group, 3 per iteration).
    assert calls == [groups * 12, groups * 12]


def test_the_win_rate_judges_both_orders_in_one_scoring_call(tiny_model_dir):
    from rlhfkit.engine import ServiceClient
    from rlhfkit.preference.comparison_policy_evaluator import judge_against_reference
    from rlhfkit.preference.types import Comparison

    client = ServiceClient().create_sampling_client(base_model=tiny_model_dir)
    calls: list[int] = []
    score_many = client._score_many
    client._score_many = lambda prompts, candidates: calls.append(len(prompts)) or score_many(prompts, candidates)
    pm = PreferenceModelFromChatRenderer(get_renderer("role_colon", get_tokenizer(tiny_model_dir)), client, "symmetric")
    comparisons = [
        Comparison([{"role": "user", "content": f"Q{k}"}], [{"role": "assistant", "content": "ref"}], [])
        for k in range(5)
    ]
    replies = [{"role": "assistant", "content": f"reply {k}"} for k in range(5)]
    result = asyncio.run(judge_against_reference(pm, comparisons, replies))
    assert calls == [10]  # 5 prompts x 2 orders, one call
    # symmetric rewards: policy-as-B and policy-as-A verdicts are exact opposites; P(win) consistent with them
    np.testing.assert_allclose(result.verdicts_policy_as_b, -np.asarray(result.verdicts_policy_as_a), atol=1e-12)
    np.testing.assert_allclose(2 * result.symmetric - 1, result.verdicts_policy_as_b, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# The asynchronous and streaming loops


def _adapter(sampler_path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(Path(sampler_path) / "adapter_model.safetensors"))


def _final(log_path: Path) -> checkpoint_utils.CheckpointRecord:
    final = checkpoint_utils.get_last_checkpoint(log_path, required_key="sampler_path")
    assert final is not None and final.name == "final"
    return final


def _trained_groups(log_path: Path, iteration: int) -> list[tuple]:
    """What iteration trained on: per trajectory its (group, reply length, reward, metrics, sampler step)."""
    records = read_jsonl(log_path / f"iteration_{iteration:06d}" / "train_rollout_summaries.jsonl")
    return [
        (r["group_idx"], r["steps"][0]["ac_len"], r["total_reward"], r["trajectory_metrics"], r["sampling_client_step"])
        for r in records
    ]


def test_async_with_no_staleness_trains_on_the_synchronous_groups_and_ends_with_its_weights(stop_model_dir, tmp_path):  # noqa: F811
    steps = 3
    train.main(rl_config(str(tmp_path / "sync"), stop_model_dir, steps))
    train.main(rl_config(str(tmp_path / "async"), stop_model_dir, steps, async_config=train.AsyncConfig(0, 2)))
    for i in range(steps):
        assert _trained_groups(tmp_path / "async", i) == _trained_groups(tmp_path / "sync", i)
    sync_weights, async_weights = (_adapter(_final(tmp_path / run).sampler_path) for run in ("sync", "async"))
    assert sync_weights.keys() == async_weights.keys()
    for name in sync_weights:  # the same batches of the same computations: the same numbers
        np.testing.assert_array_equal(async_weights[name], sync_weights[name])
    assert any(abs(v).max() > 0 for k, v in async_weights.items() if "lora_B" in k)  # it did train

    records = read_jsonl(tmp_path / "async" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(steps))
    assert all(r["sampling_client/staleness_max"] == 0 for r in records)
    # Its samplers ran one iteration ahead, as the reference's do; what they sampled was stale, so sampled again.
    assert sum(r["async/resampled_groups"] for r in records) >= 2
    spans = read_jsonl(tmp_path / "async" / TIMELINE_FILE)
    assert {s["kind"] for s in spans} >= {"sample", "judge", "train", "sync_weights"}
    assert any(s["step"] == -1 for s in spans)  # the discarded samples
    assert (tmp_path / "async" / TIMELINE_PLOT).exists() and (tmp_path / "sync" / TIMELINE_PLOT).exists()


def test_no_trained_group_is_older_than_max_steps_off_policy(stop_model_dir, tmp_path):  # noqa: F811
    log_path = tmp_path / "rl"
    steps, max_off_policy = 4, 1
    # a judge that takes a moment (as a model's does), so the next iteration's judging spans a training step
    # whatever the machine's speed; the overlap below is then a property of the loop, not of the timing
    judged_slowly = ShortRepliesDatasetBuilder(stop_model_dir, 2, 64, judge_delay=0.2)
    config = rl_config(
        str(log_path),
        stop_model_dir,
        steps,
        dataset_builder=judged_slowly,
        async_config=train.AsyncConfig(max_off_policy, 2),
    )
    train.main(config)
    staleness = [i - g[-1] for i in range(steps) for g in _trained_groups(log_path, i)]
    assert len(staleness) == steps * 2 * 4
    assert max(staleness) == max_off_policy and min(staleness) >= 0  # off policy, but never more than allowed
    records = read_jsonl(log_path / "metrics.jsonl")
    assert [r["sampling_client/staleness_max"] for r in records] == [
        max(i - g[-1] for g in _trained_groups(log_path, i)) for i in range(steps)
    ]
    for key in ("sampling_client/step_mean", "time/sampling_time_max", "time/sampling_time_min"):
        assert all(key in r for r in records)
    # Trained and sampled at once: some group's sampling or judging overlapped a training step.
    spans = read_jsonl(log_path / TIMELINE_FILE)
    trains = [s for s in spans if s["kind"] == "train"]
    samples = [s for s in spans if s["kind"] in ("sample", "judge")]
    assert any(s["start"] < t["end"] and t["start"] < s["end"] for s in samples for t in trains)


def test_streaming_makes_one_optimizer_step_per_minibatch(stop_model_dir, tmp_path):  # noqa: F811
    log_path = tmp_path / "rl"
    steps, k = 2, 2
    config = rl_config(
        str(log_path),
        stop_model_dir,
        steps,
        dataset_builder=ShortRepliesDatasetBuilder(stop_model_dir, 4, 64),
        stream_minibatch_config=train.StreamMinibatchConfig(groups_per_batch=4, num_minibatches=k),
    )
    train.main(config)
    records = read_jsonl(log_path / "metrics.jsonl")
    assert [r["optim/steps"] for r in records] == [k] * steps
    state = json.loads((log_path / _final(log_path).state_path / "rlhfkit_state.json").read_text())
    assert state["optimizer_steps"] == k * steps  # counted by the trainer itself
    spans = read_jsonl(log_path / TIMELINE_FILE)
    assert [s["step"] for s in spans if s["kind"] == "train"] == [i for i in range(steps) for _ in range(k)]
    assert all(r["sampling_client/staleness_max"] == 0 for r in records)  # streaming alone is on-policy

    from rlhfkit.report import timeline_section

    md, page = timeline_section(tmp_path, tmp_path)  # the report's section (tmp_path stands for log_root)
    assert "stream_minibatch_config" in md[2] and f"{steps} iterations" in md[2] and "rl_timeline.png" in page
    assert (tmp_path / "rl_timeline.png").stat().st_size > 0


def test_groups_per_batch_need_not_be_the_datasets_batch_size(stop_model_dir, tmp_path):  # noqa: F811
    """3 groups per step from dataset batches of 2: the steps take the groups in dataset order across batches."""
    log_path = tmp_path / "rl"
    train.main(rl_config(str(log_path), stop_model_dir, 2, async_config=train.AsyncConfig(1, 3)))
    trained = [s for s in read_jsonl(log_path / TIMELINE_FILE) if s["kind"] == "sample" and s["step"] >= 0]
    assert [(s["step"], tuple(s["group"])) for s in trained] == [
        (0, (0, 0)),
        (0, (0, 1)),
        (0, (1, 0)),
        (1, (1, 1)),
        (1, (2, 0)),
        (1, (2, 1)),
    ]
    assert _final(log_path).get("next_group") == [3, 0]
    assert [r["env/all/total_episodes"] for r in read_jsonl(log_path / "metrics.jsonl")] == [12, 12]


def test_streaming_and_async_settings_are_checked():
    with pytest.raises(ConfigError, match="num_minibatches"):
        train.StreamMinibatchConfig(groups_per_batch=2, num_minibatches=3)
    with pytest.raises(ConfigError, match="max_steps_off_policy"):
        train.AsyncConfig(max_steps_off_policy=-1, groups_per_batch=2)
    with pytest.raises(ConfigError, match="num_substeps"):
        rl_config("unused", "unused", 1, num_substeps=2, stream_minibatch_config=train.StreamMinibatchConfig(2, 2))


class ShorterRecipeDataset(RLDatasetBuilder):
    """The `shorter` recipe's prompts and rule-based judge, with the tiny model's stop tokens as reply ends."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir

    async def __call__(self):
        from rlhfkit.recipes.preference.shorter import ShorterComparisonBuilder, ShorterPreferenceModelBuilder

        rows, _ = ShorterComparisonBuilder().get_train_and_test_datasets()
        renderer = StopTokenRenderer(get_tokenizer(self.model_dir))
        judge = ShorterPreferenceModelBuilder()()
        return PairwisePreferenceDataset(ShorterComparisonBuilder(), rows, 2, renderer, judge, group_size=4), None


@pytest.mark.parametrize(
    "mode",
    [
        {},
        {"async_config": train.AsyncConfig(max_steps_off_policy=1, groups_per_batch=2)},
        {"stream_minibatch_config": train.StreamMinibatchConfig(groups_per_batch=2, num_minibatches=2)},
    ],
    ids=["sync", "async", "streaming"],
)
def test_the_shorter_recipe_shortens_replies_in_every_mode(stop_model_dir, tmp_path, mode):  # noqa: F811
    log_path = tmp_path / "rl"
    train.main(
        rl_config(str(log_path), stop_model_dir, 4, dataset_builder=ShorterRecipeDataset(stop_model_dir), **mode)
    )
    before = _mean_reply_length(stop_model_dir, str(log_path / train.INIT_SAMPLER_DIR))
    after = _mean_reply_length(stop_model_dir, _final(log_path).sampler_path)
    assert after < 0.6 * before, (before, after)


def test_rlhfkit_rl_preset_shorter_runs_asynchronously(tmp_path):
    from rlhfkit.cli import main as rlhfkit_main
    from rlhfkit.recipes.preference.rlhf.pipeline_config import parse_args

    cfg = parse_args(["preset=shorter"])
    assert cfg.rl_judge == "shorter" and cfg.rl_max_steps_off_policy is None and cfg.rl_stream_minibatches is None
    args = ["preset=shorter", "base_model=tiny", f"log_root={tmp_path}", "rl_max_steps=2", "rl_batch_size=2"]
    args += ["rl_group_size=2", "rl_max_tokens=8", "rl_max_steps_off_policy=1", "rl_stream_minibatches=2"]
    assert rlhfkit_main(["rl", *args]) == 0
    config = json.loads((tmp_path / "rl" / "config.json").read_text())
    assert (
        config["async_config"]["max_steps_off_policy"] == 1
        and config["stream_minibatch_config"]["num_minibatches"] == 2
    )
    records = read_jsonl(tmp_path / "rl" / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1] and all(r["optim/steps"] == 2 for r in records)
    assert not (tmp_path / "sft").exists() and not (tmp_path / "rm").exists()  # no SFT or preference model
    assert (tmp_path / "rl" / TIMELINE_PLOT).exists()


def test_a_killed_async_run_resumes_from_its_checkpoint_without_gap_or_duplicate(stop_model_dir, tmp_path):  # noqa: F811
    log_path = tmp_path / "rl"
    command = [sys.executable, __file__, str(log_path), stop_model_dir, "3"]
    env = {**os.environ, "RLHFKIT_DTYPE": "float32", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not read_jsonl(log_path / "checkpoints.jsonl") and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)  # right after the first periodic checkpoint (after iteration 0 of 3)
    child.wait()
    checkpoints = read_jsonl(log_path / "checkpoints.jsonl")
    assert [(c["name"], c["next_group"]) for c in checkpoints] == [("000001", [1, 0])], checkpoints
    assert [r["step"] for r in read_jsonl(log_path / "metrics.jsonl")] == [0]  # logged before its checkpoint
    restart_time = time.time()

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resuming at iteration 1" in second.stdout + second.stderr
    assert [r["step"] for r in read_jsonl(log_path / "metrics.jsonl")] == [0, 1, 2]
    assert (log_path / "iteration_000000" / "train.html").stat().st_mtime < restart_time  # not re-run
    assert [(c["name"], c["batch"]) for c in read_jsonl(log_path / "checkpoints.jsonl")] == [
        ("000001", 1),
        ("000002", 2),
        ("final", 3),
    ]
    # The timeline keeps iteration 0 from the first run and iterations 1 and 2 from the second only.
    trains = [s for s in read_jsonl(log_path / TIMELINE_FILE) if s["kind"] == "train"]
    assert [s["step"] for s in trains] == [0, 1, 2]
    assert trains[0]["end"] < restart_time < trains[1]["start"]


if __name__ == "__main__":  # one asynchronous RL run in a child process (for the kill test)
    log_path, model_dir, max_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    train.main(
        rl_config(
            log_path,
            model_dir,
            max_steps,
            save_every=1,
            dataset_builder=ShortRepliesDatasetBuilder(model_dir, 2, 64, judge_delay=0.2),
            async_config=train.AsyncConfig(max_steps_off_policy=1, groups_per_batch=2),
        )
    )


@pytest.mark.ray
def test_on_ray_sampling_judging_and_training_run_at_once(stop_model_dir, tmp_path, monkeypatch):  # noqa: F811
    """backend=ray: the policy's samplers and the judge on an inference-engine actor, the trainer on a training
    actor; the asynchronous loop keeps both busy at once (a group's sampling overlaps a training step)."""
    pytest.importorskip("ray", reason="Ray is not installed")
    monkeypatch.setenv("RLHFKIT_INFERENCE_ENGINE", "torch")  # the tiny model's head size is not vLLM's
    log_path = tmp_path / "rl"
    config = rl_config(
        str(log_path),
        stop_model_dir,
        3,
        backend="ray",
        num_train_workers=1,
        num_samplers=1,
        policy_kl_num_sequences=0,  # no kl/policy_vs_init pass: training follows judging at once
        async_config=train.AsyncConfig(max_steps_off_policy=1, groups_per_batch=2),
    )
    try:
        train.main(config)
    finally:
        import ray

        ray.shutdown()
    assert [r["step"] for r in read_jsonl(log_path / "metrics.jsonl")] == [0, 1, 2]
    spans = read_jsonl(log_path / TIMELINE_FILE)
    trains = [s for s in spans if s["kind"] == "train"]
    samples = [s for s in spans if s["kind"] in ("sample", "judge")]
    assert any(s["start"] < t["end"] and t["start"] < s["end"] for s in samples for t in trains)
