"""The engine's execution contract (futures) on the local backend, and the Ray backend: data-parallel training
equal to the local backend, inference engines serving adapters, faults."""

import asyncio
import threading
import time

import numpy as np
import pytest

from rlhfkit.engine import AdamParams, Datum, ModelInput, SamplingParams, ServiceClient, load_tokenizer
from rlhfkit.engine.lora import load_adapter_tensors

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")


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
# The futures contract on the local backend


def test_local_requests_are_pending_and_run_in_submission_order(tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_model_dir)
    tc = ServiceClient().create_lora_training_client(tiny_model_dir, rank=4, seed=3)
    batch = [ce_datum(tokenizer.encode(t)) for t in TEXTS]
    gate = threading.Event()
    blocker = tc._queue.submit(gate.wait)  # holds the client's worker thread
    fb = tc.forward_backward(batch, "cross_entropy")
    step = tc.optim_step(AdamParams(learning_rate=1e-2))
    saved = tc.save_state(str(tmp_path / "after-step"))  # submitted without waiting for the step
    assert not fb.done() and not step.done() and not saved.done()  # submission returned at once
    gate.set()
    path = saved.result(timeout=120).path
    assert blocker.done() and fb.done() and step.done()
    assert load_adapter_tensors(path).keys()
    # the saved state saw the step: a client restored from it has the stepped weights
    after = {k: v.clone() for k, v in load_adapter_tensors(path).items()}
    reference = ServiceClient().create_lora_training_client(tiny_model_dir, rank=4, seed=3)
    ref_path = reference.save_state(str(tmp_path / "no-step")).result().path
    before = load_adapter_tensors(ref_path)
    assert any(not np.allclose(after[k].numpy(), before[k].numpy()) for k in after)

    async def awaited():
        future = await tc.forward_async(batch, "cross_entropy")  # returns once submitted
        assert hasattr(future, "result_async")
        out = await future.result_async()
        again = await tc.forward(batch, "cross_entropy")  # a future is awaitable too
        return out, again

    out, again = asyncio.run(awaited())
    assert out.metrics["loss:sum"] == pytest.approx(again.metrics["loss:sum"])


def test_local_sampling_futures_are_pending_until_computed(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    sampler = ServiceClient().create_sampling_client(base_model=tiny_model_dir)
    gate = threading.Event()
    sampler._queue.submit(gate.wait)
    future = sampler.sample(ModelInput.from_ints(tokenizer.encode("Hello")), 2, SamplingParams(max_tokens=4, seed=1))
    time.sleep(0.1)
    assert not future.done()
    gate.set()
    assert len(future.result(timeout=60).sequences) == 2


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
