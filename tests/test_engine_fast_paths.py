"""The engine's fast paths give the same numbers as the plain computations: the preallocated decode loop
(cache growth, rows leaving the batch, shared prompts) and shared-prefix scoring."""

import asyncio

import pytest
import torch

from rlhfkit.engine import Datum, ModelInput, SamplingParams, ServiceClient
from rlhfkit.engine.torch_engine import sampler as sampling
from rlhfkit.engine.torch_engine.sampler import MIN_SHARED_PREFIX, shared_prefix_groups


@pytest.fixture(scope="module")
def service():
    return ServiceClient()


@pytest.fixture(scope="module")
def trainer(service, tiny_model_dir):
    return service.create_lora_training_client(tiny_model_dir, rank=4, seed=2)


def forward_logprobs(trainer, tokens):
    datum = Datum(
        ModelInput.from_ints(tokens[:-1]), {"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)}
    )
    return trainer.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()


def test_shared_prefix_groups_find_the_longest_shared_prefixes():
    prompt = list(range(100, 100 + MIN_SHARED_PREFIX + 8))
    replies = [[1, 2, 3] * 4, [4, 5] * 6, [7] * 10]
    # every ordered pair of replies as (A, B) after the same prompt, plus one unrelated short sequence
    sequences = [prompt + [0] + a + [0] + b + [9] for a in replies for b in replies if a is not b] + [[5, 6, 7]]
    groups = shared_prefix_groups(sequences)
    assert sorted(i for _, members in groups for i in members) == list(range(len(sequences)))
    shared = [(n, sorted(m)) for n, m in groups if n > 0]
    assert sorted(m for _, m in shared) == [[0, 1], [2, 3], [4, 5]]  # grouped by A: prompt + A + marker shared
    for n, members in shared:
        a = sequences[members[0]]
        assert all(sequences[i][:n] == a[:n] for i in members)
        assert n == len(prompt) + 1 + len(replies[members[0] // 2]) + 1
    assert (0, [len(sequences) - 1]) in groups


def test_shared_prefix_scoring_equals_plain_scoring(service, tiny_model_dir):
    sampler = service.create_sampling_client(base_model=tiny_model_dir)
    torch.manual_seed(0)
    prompt = torch.randint(10, 5000, (50,)).tolist()
    replies = [torch.randint(10, 5000, (n,)).tolist() for n in (7, 19, 3)]
    prompts = [ModelInput.from_ints(prompt + a + [11] + b + [12]) for a in replies for b in replies if a is not b]
    prompts.append(ModelInput.from_ints(torch.randint(10, 5000, (9,)).tolist()))
    candidates = [13, 14]
    shared = sampler.score_next_token_batch(prompts, candidates)
    plain = sampler.with_settings(share_prefixes=False).score_next_token_batch(prompts, candidates)
    for a, b in zip(shared, plain):
        assert a.argmax_token == b.argmax_token
        assert max(abs(x - y) for x, y in zip(a.candidate_logprobs, b.candidate_logprobs)) < 1e-4


def test_decode_loop_matches_forward_with_cache_growth_and_rows_leaving(trainer, monkeypatch):
    """Rows of different lengths and max_tokens (they leave the batch at different steps), two samples of one
    prompt (a shared prefill), and a row longer than the cache's first allocation (grown twice)."""
    monkeypatch.setattr(sampling, "INITIAL_ROOM", 8)
    sampler = trainer.save_weights_and_get_sampling_client()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21], [30, 31, 32, 33]]
    max_tokens = [3, 9, 30]

    async def sample_all():
        return await asyncio.gather(
            *(
                sampler.sample_async(ModelInput.from_ints(p), 2, SamplingParams(max_tokens=m, stop=[], seed=5))
                for p, m in zip(prompts, max_tokens)
            )
        )

    for prompt, m, response in zip(prompts, max_tokens, asyncio.run(sample_all())):
        for seq in response.sequences:
            assert len(seq.tokens) == m and seq.stop_reason == "length"
            expected = forward_logprobs(trainer, prompt + seq.tokens)[len(prompt) - 1 :]
            assert max(abs(a - b) for a, b in zip(seq.logprobs, expected)) < 1e-4


def test_microbatch_plan_has_the_least_padding_within_the_budget():
    """The planner's cuts are optimal: brute force over every way to cut the length-sorted sequences into
    consecutive microbatches gives no lower cost (padded tokens plus the per-pass overhead)."""
    import itertools
    import random

    from rlhfkit.engine.torch_engine.batching import MICROBATCH_OVERHEAD_TOKENS, plan_microbatches

    def cost(batches, lengths):
        return sum(len(b) * max(lengths[i] for i in b) + MICROBATCH_OVERHEAD_TOKENS for b in batches)

    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 600) for _ in range(rng.randint(1, 8))]
        budget = rng.choice([512, 1024, 4096])
        plan = plan_microbatches(lengths, budget)
        assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
        assert all(len(b) == 1 or len(b) * max(lengths[i] for i in b) <= budget for b in plan)
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        best = float("inf")
        for cuts in itertools.product([False, True], repeat=len(order) - 1):
            batches, current = [], [order[0]]
            for i, cut in zip(order[1:], cuts):
                if cut:
                    batches.append(current)
                    current = []
                current.append(i)
            batches.append(current)
            if all(len(b) == 1 or len(b) * max(lengths[i] for i in b) <= budget for b in batches):
                best = min(best, cost(batches, lengths))
        assert cost(plan, lengths) == best
    # a short sequence gets a pass of its own rather than padding to a long one
    assert plan_microbatches([500, 500, 20], 4096) == [[0, 1], [2]]


def test_compute_logprobs_passes_are_bounded_by_their_logits(trainer, tiny_model_dir, monkeypatch):
    """A compute_logprobs pass holds at most LOGITS_BYTES of logits (its token budget shrinks to fit); cut into
    more passes, the logprobs are those of one pass over all sequences (fp32 rounding), on both scoring paths."""
    sampler = trainer.save_weights_and_get_sampling_client()
    engine = sampler  # the local torch sampler
    vocabulary = engine.model.config.vocab_size
    itemsize = torch.finfo(engine.precision.compute_dtype).bits // 8
    assert engine._scoring_budget(keep_last_only=True) == engine._budget
    torch.manual_seed(0)
    sequences = [torch.randint(3, vocabulary, (n,)).tolist() for n in (23, 17, 30, 9, 30)]
    passes: list[int] = []
    planner = sampling.plan_microbatches
    monkeypatch.setattr(sampling, "plan_microbatches", lambda *a: passes.append(len(planner(*a))) or planner(*a))
    for fast in (True, False):
        monkeypatch.setattr(engine, "_fast_paths", fast)
        monkeypatch.setattr(sampling, "LOGITS_BYTES", 1 << 40)
        passes.clear()
        whole = [sampler.compute_logprobs(ModelInput.from_ints(s)).result() for s in sequences]
        together = engine._logprobs_many([ModelInput.from_ints(s) for s in sequences])
        assert passes[-1] == 1
        monkeypatch.setattr(sampling, "LOGITS_BYTES", 31 * vocabulary * itemsize)
        assert engine._scoring_budget(keep_last_only=False) == 31
        apart = engine._logprobs_many([ModelInput.from_ints(s) for s in sequences])
        assert passes[-1] == 5  # no two of these sequences fit in 31 tokens
        for a, b, c in zip(together, apart, whole):
            assert a[0] is b[0] is None
            torch.testing.assert_close(torch.tensor(a[1:]), torch.tensor(b[1:]), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(torch.tensor(a[1:]), torch.tensor(c[1:]), atol=1e-5, rtol=1e-5)
