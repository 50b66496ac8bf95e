"""Stage 3 tests: tournament, reward/advantage math, the RL loop on a tiny model with a scripted judge,
resume after a real SIGKILL, and the win-rate evaluator.

Run as a script (`python tests/test_rl.py LOG_PATH MODEL_DIR MAX_STEPS`) it performs one RL run; the kill
test uses that to have a child process to kill.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rlhfkit import checkpoint_utils

from rlhfkit.completers import TokensWithLogprobs
from rlhfkit.engine.types import ModelInput
from rlhfkit.preference.types import Comparison, LabeledComparison, PreferenceModel, PreferenceModelBuilder
from rlhfkit.renderers import ParseTermination, RoleColonRenderer, get_renderer
from rlhfkit.rl import train
from rlhfkit.rl.data_processing import assemble_training_data, compute_advantages, trajectory_to_data
from rlhfkit.rl.preference_envs import (
    PairwisePreferenceDataset,
    PairwisePreferenceGroupBuilder,
    PairwisePreferenceRLDatasetBuilder,
    PreferenceEnv,
    TournamentPattern,
    get_pairs,
    get_pairs_chunked,
)
from rlhfkit.rl.rollouts import score_group
from rlhfkit.rl.types import RLDatasetBuilder, Trajectory, Transition
from rlhfkit.tokenizer_utils import get_tokenizer
from rlhfkit.utils.atomic import read_jsonl

# --------------------------------------------------------------------------------------------------
# Scripted judges and a tiny prompt set


def _content(messages) -> str:
    return messages[0]["content"]


class RankingJudge(PreferenceModel):
    """Prefers the reply ranked higher in a fixed ranking (best first); records every call."""

    def __init__(self, ranking: list[str]):
        self.ranking = ranking
        self.batches: list[list[Comparison]] = []

    async def __call__(self, comparison: Comparison) -> float:
        a = self.ranking.index(_content(comparison.completion_A))
        b = self.ranking.index(_content(comparison.completion_B))
        return -1.0 if a < b else 1.0

    async def judge_batch(self, comparisons):
        self.batches.append(list(comparisons))
        return await super().judge_batch(comparisons)


class ShorterIsBetterJudge(PreferenceModel):
    """-1 if A is shorter, +1 if B is shorter, 0 on equal length. `delay` slows it (for the kill test)."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay

    async def __call__(self, comparison: Comparison) -> float:
        a, b = len(_content(comparison.completion_A)), len(_content(comparison.completion_B))
        return 0.0 if a == b else (-1.0 if a < b else 1.0)

    async def judge_batch(self, comparisons):
        if self.delay:
            await asyncio.sleep(self.delay)
        return await super().judge_batch(comparisons)


class AlwaysAJudge(PreferenceModel):
    async def __call__(self, comparison: Comparison) -> float:
        return -1.0


class JudgeBuilder(PreferenceModelBuilder):
    def __init__(self, judge: PreferenceModel):
        self.judge = judge

    def __call__(self) -> PreferenceModel:
        return self.judge


class StopTokenRenderer(RoleColonRenderer):
    """role_colon prompts, but a reply ends at any of a fixed eighth of the vocabulary. A random tiny model
    never writes "\\n\\nUser:", so this gives replies of varied length that RL can shorten."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.stop_ids = list(range(3, len(tokenizer), 8))
        self._stop_set = set(self.stop_ids)

    def get_stop_sequences(self):
        return self.stop_ids

    def parse_response(self, tokens):
        tokens = list(tokens)
        if tokens and tokens[-1] in self._stop_set:
            return {"role": "assistant", "content": self.tokenizer.decode(tokens[:-1])}, ParseTermination.STOP_SEQUENCE
        return {"role": "assistant", "content": self.tokenizer.decode(tokens)}, ParseTermination.MALFORMED


class PromptRows:
    """A comparison builder over plain prompts (the RL dataset ignores completions and labels)."""

    def __init__(self, n: int):
        self.rows = [{"prompt": f"Hi {k}"} for k in range(n)]

    def get_train_and_test_datasets(self):
        return self.rows, None

    def example_to_labeled_comparison(self, row):
        return LabeledComparison(
            Comparison(
                [{"role": "user", "content": row["prompt"]}],
                [{"role": "assistant", "content": "a"}],
                [{"role": "assistant", "content": "b"}],
            ),
            "A",
        )


class ShortRepliesDatasetBuilder(RLDatasetBuilder):
    def __init__(self, model_dir: str, batch_size: int, n_rows: int, judge_delay: float = 0.0):
        self.model_dir = model_dir
        self.batch_size = batch_size
        self.n_rows = n_rows
        self.judge_delay = judge_delay

    async def __call__(self):
        prompts = PromptRows(self.n_rows)
        renderer = StopTokenRenderer(get_tokenizer(self.model_dir))
        dataset = PairwisePreferenceDataset(
            prompts, prompts.rows, self.batch_size, renderer, ShorterIsBetterJudge(self.judge_delay), group_size=4
        )
        return dataset, None


def rl_config(log_path: str, model_dir: str, max_steps: int, **overrides) -> train.Config:
    settings = dict(
        learning_rate=1e-2,
        dataset_builder=ShortRepliesDatasetBuilder(model_dir, 2, 64),
        model_name=model_dir,
        recipe_name="test_rl",
        max_tokens=12,
        log_path=log_path,
        lora_rank=8,
        eval_every=0,
        save_every=0,
        seed=0,
        max_steps=max_steps,
        policy_kl_num_sequences=8,
    )
    settings.update(overrides)
    return train.Config(**settings)


@pytest.fixture(scope="module")
def stop_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a shared component added to the output embeddings of StopTokenRenderer's stop
    tokens, so "stop sooner" is one direction of the hidden state: learnable in a few steps. (In a purely
    random model the stop tokens have nothing in common and RL cannot find them in a handful of samples.)"""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("stop_model")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    stop_ids = StopTokenRenderer(get_tokenizer(tiny_model_dir)).stop_ids
    model.get_output_embeddings().weight.data[stop_ids] += 0.3 * direction / direction.norm()
    model.save_pretrained(out)
    for f in Path(tiny_model_dir).iterdir():
        if f.suffix in (".json", ".txt") and f.name != "config.json":
            shutil.copy(f, out / f.name)
    return str(out)


# --------------------------------------------------------------------------------------------------
# Tournament and reward math


def test_tournament_pairs():
    assert get_pairs(4, TournamentPattern.ALL_PAIRS_BOTH_WAYS) == [
        (0, 1),
        (0, 2),
        (0, 3),
        (1, 0),
        (1, 2),
        (1, 3),
        (2, 0),
        (2, 1),
        (2, 3),
        (3, 0),
        (3, 1),
        (3, 2),
    ]
    assert get_pairs(4, TournamentPattern.ALL_PAIRS_ONE_WAY) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    chunked = get_pairs_chunked(10, TournamentPattern.ALL_PAIRS_BOTH_WAYS, 4)
    assert len(chunked) == 12 + 12 + 2  # chunks {0..3}, {4..7}, {8, 9}
    assert all(i // 4 == j // 4 for i, j in chunked)
    one_way = TournamentPattern.ALL_PAIRS_ONE_WAY
    assert get_pairs_chunked(4, one_way, 4) == get_pairs(4, one_way)


def _trajectory(renderer, text: str, stop: bool) -> Trajectory:
    prompt = renderer.build_generation_prompt([{"role": "user", "content": "Pick a colour."}])
    tokens = renderer.encode(text + ("\n\nUser:" if stop else ""))
    ac = TokensWithLogprobs(tokens, [-0.5] * len(tokens), "stop" if stop else "length")
    return Trajectory([Transition(prompt, ac, 0.0, True)], ModelInput.empty())


def test_worked_example_rewards_and_advantages(tiny_model_dir):
    """Spec 5.3: judge ranking c2 > c0 > c3 > c1, c1 truncated at max_tokens."""
    renderer = get_renderer("role_colon", get_tokenizer(tiny_model_dir))
    replies = ["Blue.", "Red, because red is the colour of", "Green!", "Yellow."]
    trajectories = [_trajectory(renderer, " " + r, stop=(k != 1)) for k, r in enumerate(replies)]
    judge = RankingJudge([replies[2], replies[0], replies[3], replies[1]])
    builder = PairwisePreferenceGroupBuilder(
        [{"role": "user", "content": "Pick a colour."}],
        renderer,
        TournamentPattern.ALL_PAIRS_BOTH_WAYS,
        judge,
        num_envs=4,
    )
    group = asyncio.run(score_group(builder, [], trajectories))

    assert len(judge.batches) == 1 and len(judge.batches[0]) == 12  # one batched call with all 12 matchups
    assert [(_content(c.completion_A), _content(c.completion_B)) for c in judge.batches[0]] == [
        (replies[i], replies[j]) for i, j in get_pairs(4, TournamentPattern.ALL_PAIRS_BOTH_WAYS)
    ]
    assert [m["format"] for m in group.metrics_G] == [1.0, 0.0, 1.0, 1.0]
    assert [m["win_minus_loss"] for m in group.metrics_G] == pytest.approx([1 / 3, -1, 1, -1 / 3], abs=1e-12)
    assert group.get_total_rewards() == pytest.approx([1 / 3, -2.0, 1.0, -1 / 3], abs=1e-12)
    advantages = compute_advantages([group])[0]
    assert advantages == pytest.approx([7 / 12, -1.75, 1.25, -1 / 12], abs=1e-12)  # reward - mean(-0.25)

    # Datums (spec 5.5): shifted by one; prompt positions get logprob 0, advantage 0, mask 0.
    _data, metadata = assemble_training_data([group], [advantages])
    assert [m["traj_idx"] for m in metadata] == [0, 1, 2, 3]
    datum = trajectory_to_data(trajectories[2], advantages[2])[0]
    ob, ac = trajectories[2].transitions[0].ob.to_ints(), trajectories[2].transitions[0].ac.tokens
    full = ob + ac
    inputs = {k: v.tolist() for k, v in datum.loss_fn_inputs.items()}
    assert datum.model_input.to_ints() == full[:-1] and inputs["target_tokens"] == full[1:]
    assert inputs["mask"] == [0.0] * (len(ob) - 1) + [1.0] * len(ac)
    assert inputs["logprobs"] == [0.0] * (len(ob) - 1) + [-0.5] * len(ac)
    assert inputs["advantages"] == pytest.approx([0.0] * (len(ob) - 1) + [1.25] * len(ac))


def test_kl_penalty_centres_and_discounts(tiny_model_dir):
    from rlhfkit.engine import ServiceClient
    from rlhfkit.rl.data_processing import incorporate_kl_penalty
    from rlhfkit.rl.metrics import compute_reference_logprobs

    renderer = get_renderer("role_colon", get_tokenizer(tiny_model_dir))
    reference = ServiceClient().create_sampling_client(base_model=tiny_model_dir)
    trajectories = [_trajectory(renderer, text, stop=True) for text in (" Blue.", " A longer reply here.")]
    for gamma in (0.0, 0.5):
        data = [d for t, adv in zip(trajectories, (0.25, -0.25)) for d in trajectory_to_data(t, adv)]
        ref = asyncio.run(compute_reference_logprobs(data, reference))
        penalised, metrics = asyncio.run(
            incorporate_kl_penalty(data, reference, kl_penalty_coef=0.1, kl_discount_factor=gamma)
        )
        masks = [d.loss_fn_inputs["mask"].to_numpy() for d in data]
        d_t = [(d.loss_fn_inputs["logprobs"].to_numpy() - r) * m for d, r, m in zip(data, ref, masks)]
        mean_kl = sum(x.sum() for x in d_t) / sum(m.sum() for m in masks)
        assert metrics["kl_policy_base"] == pytest.approx(mean_kl, rel=1e-6)
        for datum in data:  # new datums: the given ones keep their advantages
            assert set(datum.loss_fn_inputs["advantages"].tolist()) <= {0.0, 0.25, -0.25}
        for datum, adv, x, m in zip(penalised, (0.25, -0.25), d_t, masks):
            added = datum.loss_fn_inputs["advantages"].to_numpy() - adv * m
            penalty = 0.1 * m * (mean_kl - x)
            if gamma:  # each action position gets the discounted sum of the penalties from there on
                penalty = m * np.array(
                    [sum(gamma**k * penalty[t + k] for k in range(len(penalty) - t)) for t in range(len(penalty))]
                )
            assert added == pytest.approx(penalty, abs=1e-5)


def test_rl_dataset_from_hhh_prompts(tiny_model_dir):
    from rlhfkit.recipes.preference.datasets import HHHComparisonBuilder

    judge = AlwaysAJudge()
    builder = PairwisePreferenceRLDatasetBuilder(
        HHHComparisonBuilder(role="rl"),
        batch_size=8,
        policy_renderer_name="role_colon",
        policy_model_name=tiny_model_dir,
        preference_model_builder=JudgeBuilder(judge),
        group_size=4,
    )
    dataset, test = asyncio.run(builder())
    assert test is None and len(dataset) > 100
    groups = dataset.get_batch(3)
    assert 0 < len(groups) <= 8 and all(g.preference_model is judge for g in groups)  # one shared PM
    envs = asyncio.run(groups[0].make_envs())
    assert len(envs) == 4 and all(isinstance(e, PreferenceEnv) for e in envs)
    ob, stop = asyncio.run(envs[0].initial_observation())
    text = get_tokenizer(tiny_model_dir).decode(ob.to_ints())
    assert text.startswith("User: ") and text.endswith("\n\nAssistant:") and stop == ["\n\nUser:"]
    assert groups[0].logging_tags() == ["pair_pref"]


# --------------------------------------------------------------------------------------------------
# The RL loop


def _mean_reply_length(model_dir: str, sampler_path: str, n: int = 32) -> float:
    """Mean reply length of a saved policy over n seeded samples of one prompt."""
    from rlhfkit.engine import ServiceClient
    from rlhfkit.engine.types import SamplingParams

    renderer = StopTokenRenderer(get_tokenizer(model_dir))
    sampler = ServiceClient().create_sampling_client(model_path=sampler_path)
    prompt = renderer.build_generation_prompt([{"role": "user", "content": "Hi 1000"}])
    params = SamplingParams(max_tokens=12, stop=renderer.get_stop_sequences(), seed=1234)
    return float(np.mean([len(s.tokens) for s in sampler.sample(prompt, n, params).result().sequences]))


def test_rl_shortens_replies_under_a_shorter_is_better_judge(stop_model_dir, tmp_path):
    log_path = tmp_path / "rl"
    evaluator_builder = lambda: _evaluator(stop_model_dir, ShorterIsBetterJudge(), [("Say hi.", "x" * 500)])
    train.main(
        rl_config(str(log_path), stop_model_dir, max_steps=3, evaluator_builders=[evaluator_builder], eval_every=2)
    )
    records = read_jsonl(log_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]

    # The policy moved the judged way: shorter replies than the starting weights, on the same seeds.
    final = checkpoint_utils.get_last_checkpoint(log_path, required_key="sampler_path")
    assert final.name == "final" and final.batch == 3
    before = _mean_reply_length(stop_model_dir, str(log_path / train.INIT_SAMPLER_DIR))
    after = _mean_reply_length(stop_model_dir, final.sampler_path)
    assert after < 0.6 * before, (before, after)
    assert records[-1]["env/all/ac_tokens_per_turn"] < records[0]["env/all/ac_tokens_per_turn"]

    for r in records:  # on-policy: the trainer's logprobs equal the sampler's, so the IS ratio is 1
        assert r["optim/first_substep_max_abs_logratio"] < 1e-4
        assert abs(r["optim/kl_sample_train_v1"]) < 1e-5
        for key in (
            "env/all/frac_truncated",
            "kl/policy_vs_init",
            "time/sample",
            "time/judge",
            "time/train",
            "env/all/win_minus_loss",
            "env/all/format",
            "env/all/reward/total",
            "optim/entropy",
        ):
            assert key in r
    assert records[0]["kl/policy_vs_init"] == pytest.approx(0.0, abs=1e-4)  # step 0 samples the initial weights
    assert records[-1]["kl/policy_vs_init"] > 0.05
    assert [r["step"] for r in records if "test/win_rate" in r] == [0, 2]
    assert all(r["test/win_rate"] == r["win_rate"] for r in records if "win_rate" in r)

    html = (log_path / "iteration_000002" / "train.html").read_text()
    assert html.count("<h2>Group") == 2 and "doing 12 pairwise matchups" in html and "advantage" in html
    assert "<b>user</b><pre>Hi " in html
    summaries = read_jsonl(log_path / "iteration_000002" / "train_rollout_summaries.jsonl")
    assert len(summaries) == 8 and summaries[0]["schema_version"] == 1 and summaries[0]["steps"][0]["ac_len"] > 0
    assert (log_path / "metrics.png").exists()


def kill_and_resume(log_path: Path, model_dir: str, env: dict[str, str], timeout: float = 120) -> None:
    """Runs a 2-iteration RL run in a child process, SIGKILLs it right after its first periodic checkpoint
    (after iteration 0), runs it again, and checks that it resumed at iteration 1 with no gap or duplicate in
    metrics.jsonl and without re-running iteration 0."""
    command = [sys.executable, __file__, str(log_path), model_dir, "2"]
    env = {**os.environ, "RLHFKIT_DTYPE": "float32", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **env}
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not read_jsonl(log_path / "checkpoints.jsonl") and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)  # right after the first periodic checkpoint (after iteration 0 of 2)
    child.wait()
    checkpoints = read_jsonl(log_path / "checkpoints.jsonl")
    assert [c["name"] for c in checkpoints] == ["000001"], checkpoints
    restart_time = time.time()

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout + 60)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resuming at iteration 1" in second.stdout + second.stderr
    assert [r["step"] for r in read_jsonl(log_path / "metrics.jsonl")] == [0, 1]
    # The iteration before the checkpoint was not re-run; the one after it was.
    assert (log_path / "iteration_000000" / "train.html").stat().st_mtime < restart_time
    assert (log_path / "iteration_000001" / "train.html").stat().st_mtime > restart_time
    assert [(c["name"], c["batch"]) for c in read_jsonl(log_path / "checkpoints.jsonl")] == [
        ("000001", 1),
        ("final", 2),
    ]


def test_killed_run_resumes_without_gap_or_duplicate(stop_model_dir, tmp_path):
    kill_and_resume(tmp_path / "rl", stop_model_dir, {})


# --------------------------------------------------------------------------------------------------
# Win-rate evaluator


def _evaluator(model_dir: str, judge: PreferenceModel, prompts_and_references, max_tokens: int = 4):
    from rlhfkit.preference.comparison_policy_evaluator import ComparisonEvaluator

    comparisons = [
        Comparison([{"role": "user", "content": p}], [{"role": "assistant", "content": ref}], [])
        for p, ref in prompts_and_references
    ]
    return ComparisonEvaluator(JudgeBuilder(judge), comparisons, "role_colon", model_dir, max_tokens=max_tokens)


def test_comparison_evaluator_win_rate(tiny_model_dir):
    from rlhfkit.engine import ServiceClient

    sampler = ServiceClient().create_sampling_client(base_model=tiny_model_dir)
    # Policy replies have at most 4 tokens: shorter than a long reference, longer than an empty one.
    cases = [("Q1", "x" * 400), ("Q2", "y" * 400), ("Q3", ""), ("Q4", "")]
    result = asyncio.run(_evaluator(tiny_model_dir, ShorterIsBetterJudge(), cases)(sampler))
    assert result["win_rate"] == result["test/win_rate"] == pytest.approx(0.5)
    assert result["stderr"] == result["test/stderr"] == pytest.approx(np.std([1, 1, 0, 0], ddof=1) / 2)
    result = asyncio.run(_evaluator(tiny_model_dir, ShorterIsBetterJudge(), cases[:2])(sampler))
    assert result["win_rate"] == 1.0 and result["stderr"] == 0.0
    result = asyncio.run(_evaluator(tiny_model_dir, AlwaysAJudge(), cases)(sampler))
    assert result["win_rate"] == 0.5  # a position-biased judge gives 0.5 whatever the replies


if __name__ == "__main__":  # one RL run in a child process (for the kill test)
    log_path, model_dir, max_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    train.main(
        rl_config(
            log_path,
            model_dir,
            max_steps,
            save_every=1,
            dataset_builder=ShortRepliesDatasetBuilder(model_dir, 2, 64, judge_delay=0.2),
        )
    )


def test_a_sampler_that_did_not_apply_the_adapter_stops_the_run(tiny_model_dir):
    """The guard: replies sampled by the base model (as an engine that silently dropped the policy's adapter
    would) while the trainer holds a trained adapter stop the RL step with an error naming the sampler; the
    policy's own sampler passes."""
    from rlhfkit.engine import ServiceClient
    from rlhfkit.engine.types import AdamParams, Datum, ModelInput, SamplingParams, TensorData
    from rlhfkit.rl.train import SamplerMismatchError, _train_step

    service = ServiceClient()
    client = service.create_lora_training_client(tiny_model_dir, rank=4, seed=0)
    text = [1, 2, 3, 4, 5, 6, 7, 8]
    weights = np.ones(len(text) - 1, dtype=np.float32)
    teach = Datum(ModelInput.from_ints(text[:-1]), {"target_tokens": np.array(text[1:]), "weights": weights})
    for _ in range(5):  # an adapter far from the base model
        client.forward_backward([teach], "cross_entropy").result()
        client.optim_step(AdamParams(learning_rate=5e-2)).result()

    def datums(sampler) -> list[Datum]:
        prompt = [1, 2, 3]
        response = sampler.sample(ModelInput.from_ints(prompt), 4, SamplingParams(max_tokens=8, seed=1, stop=[]))
        out = []
        for seq in response.result().sequences:
            tokens = prompt + seq.tokens
            n = len(tokens) - 1
            mask = np.array([0.0] * (len(prompt) - 1) + [1.0] * len(seq.tokens), dtype=np.float32)
            logprobs = np.array([0.0] * (len(prompt) - 1) + seq.logprobs, dtype=np.float32)
            inputs = {
                "target_tokens": np.array(tokens[1:]),
                "logprobs": logprobs,
                "mask": mask,
                "advantages": np.full(n, 0.1, dtype=np.float32),
            }
            out.append(
                Datum(ModelInput.from_ints(tokens[:-1]), {k: TensorData.from_numpy(v) for k, v in inputs.items()})
            )
        return out

    config = train.Config(
        learning_rate=1e-4,
        dataset_builder=None,
        model_name=tiny_model_dir,
        recipe_name="t",
        max_tokens=8,
        log_path="unused",
    )
    base = service.create_sampling_client(base_model=tiny_model_dir)
    with pytest.raises(SamplerMismatchError, match=r"base sampler.*nats per token"):
        asyncio.run(_train_step(config, client, datums(base), "base sampler"))
    metrics, _ = asyncio.run(
        _train_step(config, client, datums(client.save_weights_and_get_sampling_client()), "policy")
    )
    assert abs(metrics["optim/first_substep_kl_sample_train"]) < 1e-4
