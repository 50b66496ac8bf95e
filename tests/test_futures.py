"""The engine's execution contract (rlhfkit/engine/futures.py) on the local backend: requests return pending
futures at once and run in submission order; futures are awaitable."""

import asyncio
import threading
import time

import numpy as np
import pytest

from rlhfkit.engine import AdamParams, Datum, ModelInput, SamplingParams, ServiceClient, load_tokenizer
from rlhfkit.engine.model.lora import load_adapter_tensors

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hi there, friend", "Short ones are here too"]


def ce_datum(tokens):
    return Datum(ModelInput.from_ints(tokens[:-1]), {"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})


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


def test_an_idle_request_thread_does_not_keep_its_client_alive(tiny_model_dir):
    """A client whose requests are done is freed with its model once the caller drops it (an RL run makes a
    sampling client per iteration: kept alive by their idle threads, they filled 24 GB in the demo)."""
    import gc
    import weakref

    from rlhfkit.engine import ServiceClient
    from rlhfkit.engine.types import ModelInput

    client = ServiceClient().create_sampling_client(base_model=tiny_model_dir)
    client.compute_logprobs(ModelInput.from_ints([1, 2, 3])).result()
    model = weakref.ref(client.model)
    del client
    gc.collect()
    assert model() is None
