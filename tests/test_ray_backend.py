"""The Ray backend: data-parallel training equal to the local backend, inference engines serving adapters,
a two-node cluster running the pipeline, faults."""

import asyncio

import numpy as np
import pytest

from rlhfkit.engine import AdamParams, Datum, ModelInput, SamplingParams, ServiceClient, load_tokenizer
from rlhfkit.engine.lora import load_adapter_tensors

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]' or scripts/setup.sh)")
pytestmark = pytest.mark.ray


def ce_datum(tokens, weights=None):
    weights = weights if weights is not None else [1.0] * (len(tokens) - 1)
    return Datum(ModelInput.from_ints(tokens[:-1]), {"target_tokens": tokens[1:], "weights": weights})


def is_datum(tokens, sampler_logprobs, advantage):
    n = len(tokens) - 1
    return Datum(ModelInput.from_ints(tokens[:-1]),
                 {"target_tokens": tokens[1:], "logprobs": sampler_logprobs[:n],
                  "advantages": [0.0] * 2 + [advantage] * (n - 2)})


TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hi there, friend", "Data parallel training must equal one device.",
         "Short ones are here too", "A somewhat longer sentence, so that shards differ in their token counts."]


# -------------------------------------------------------------------------------------------------
# Ray: a private local instance for this module


@pytest.fixture(scope="module")
def ray_service():
    from rlhfkit.engine.ray_cluster import connect

    connect(None)
    yield ServiceClient(backend="ray", num_train_workers=2, num_samplers=1)
    ray.shutdown()


def _train(tc, tokenizer, steps=3):
    """Three cross_entropy steps then three importance_sampling steps; the loss metrics of each."""
    ce = [ce_datum(tokenizer.encode(t)) for t in TEXTS]
    adam = AdamParams(learning_rate=5e-3, grad_clip_norm=1.0)
    losses = []
    for _ in range(steps):
        losses.append(tc.forward_backward(ce, "cross_entropy").result().metrics["loss:sum"])
        tc.optim_step(adam).result()
    rng = np.random.default_rng(0)
    for _ in range(steps):
        tokens = [tokenizer.encode(t) for t in TEXTS]
        current = tc.forward(ce, "cross_entropy").result().loss_fn_outputs
        data = [is_datum(t, (c["logprobs"].to_numpy() + 0.01).tolist(), float(rng.normal()))
                for t, c in zip(tokens, current)]
        losses.append(tc.forward_backward(data, "importance_sampling").result().metrics["loss:sum"])
        tc.optim_step(adam).result()
    return losses


def test_two_training_workers_equal_the_local_backend(ray_service, tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_model_dir)
    local = ServiceClient().create_lora_training_client(tiny_model_dir, rank=4, seed=5)
    remote = ray_service.create_lora_training_client(tiny_model_dir, rank=4, seed=5)
    assert len(remote.workers) == 2
    local_losses, remote_losses = _train(local, tokenizer), _train(remote, tokenizer)
    assert remote_losses == pytest.approx(local_losses, rel=1e-5, abs=1e-5)
    local_weights = load_adapter_tensors(local.save_state(str(tmp_path / "local")).result().path)
    remote_weights = load_adapter_tensors(remote.save_state(str(tmp_path / "ray")).result().path)
    assert local_weights.keys() == remote_weights.keys()
    worst = max(float((local_weights[k] - remote_weights[k]).abs().max()) for k in local_weights)
    assert worst < 1e-5
    # outputs come back in data order: per-datum logprobs equal the local ones
    batch = [ce_datum(tokenizer.encode(t)) for t in TEXTS]
    a = local.forward(batch, "cross_entropy").result().loss_fn_outputs
    b = remote.forward(batch, "cross_entropy").result().loss_fn_outputs
    for x, y in zip(a, b):
        assert np.allclose(x["logprobs"].to_numpy(), y["logprobs"].to_numpy(), atol=1e-5)


def test_inference_engine_serves_adapters_like_the_local_sampler(ray_service, tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_model_dir)
    local_service = ServiceClient()
    trainer = local_service.create_lora_training_client(tiny_model_dir, rank=4, seed=1)
    batch = [ce_datum(tokenizer.encode(t)) for t in TEXTS]
    trainer.forward_backward(batch, "cross_entropy")
    trainer.optim_step(AdamParams(learning_rate=5e-2))
    path = trainer.save_weights_for_sampler(str(tmp_path / "policy")).result().path
    prompt = ModelInput.from_ints(tokenizer.encode("The quick brown fox"))
    params = SamplingParams(max_tokens=8, seed=11)
    for model_path in (path, None):  # an adapter, then the base model, on the same engine
        kwargs = {"model_path": model_path} if model_path else {"base_model": tiny_model_dir}
        local = local_service.create_sampling_client(**kwargs)
        remote = ray_service.create_sampling_client(**kwargs)
        want = local.sample(prompt, 2, params).result()
        got = remote.sample(prompt, 2, params).result()
        assert [s.tokens for s in got.sequences] == [s.tokens for s in want.sequences]
        for g, w in zip(got.sequences, want.sequences):
            assert np.allclose(g.logprobs, w.logprobs, atol=1e-4)
        full = ModelInput.from_ints(prompt.to_ints() + want.sequences[0].tokens)
        assert np.allclose(remote.compute_logprobs(full).result()[1:], local.compute_logprobs(full).result()[1:],
                           atol=1e-4)
        candidates = tokenizer.encode(" A") + tokenizer.encode(" B")

        async def judged(client):
            return await client.score_next_token_async(prompt, candidates)

        assert np.allclose(asyncio.run(judged(remote)).candidate_logprobs,
                           asyncio.run(judged(local)).candidate_logprobs, atol=1e-4)
