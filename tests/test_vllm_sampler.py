"""The vLLM sampling backend against the local one, on a small random Qwen2 model (adapters served with vLLM's
native LoRA; vLLM cannot adapt a Qwen2 unembedding, so these adapters leave it out, and one that does not is
refused). Runs where a Python with vLLM is found (scripts/setup-vllm.sh makes .venv-vllm; .ci/run makes it
too); skipped elsewhere."""

import asyncio

import pytest

from rlhfkit.engine import AdamParams, Datum, ModelInput, SamplingParams, ServiceClient
from rlhfkit.engine.testing import build_tiny_model

pytestmark = pytest.mark.vllm


def _vllm_or_skip() -> None:
    from rlhfkit.engine.local_backend.vllm_client import VLLMUnavailableError, vllm_python

    try:
        vllm_python()
    except VLLMUnavailableError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    _vllm_or_skip()
    # head size 64 (256 / 4 heads): vLLM's CPU attention kernels need a common head size
    return str(build_tiny_model(tmp_path_factory.mktemp("vllm_model"), hidden_size=256))


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    from rlhfkit.engine.local_backend.vllm_client import close_engines

    storage = tmp_path_factory.mktemp("storage")
    yield ServiceClient(storage_dir=str(storage)), ServiceClient(storage_dir=str(storage), sampler="vllm")
    close_engines()  # the worker's memory and threads are not left to the tests that follow


def trained_adapter(service, model_dir, tokenizer, name, train_unembed=False):
    """A LoRA adapter a few steps away from zero (so it changes the model's outputs)."""
    trainer = service.create_lora_training_client(model_dir, rank=8, seed=1, train_unembed=train_unembed)
    tokens = tokenizer.encode("The quick brown fox jumps over the lazy dog, again and again.")
    datum = Datum(
        ModelInput.from_ints(tokens[:-1]), {"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)}
    )
    for _ in range(3):
        trainer.forward_backward([datum], "cross_entropy")
        trainer.optim_step(AdamParams(learning_rate=5e-2))
    return trainer, trainer.save_weights_for_sampler(name).result().path


def test_vllm_samples_carry_the_adapters_logprobs(services, model_dir):
    local, remote = services
    tokenizer = local.create_sampling_client(base_model=model_dir).get_tokenizer()
    _trainer, path = trained_adapter(local, model_dir, tokenizer, "trained")
    prompt = ModelInput.from_ints(tokenizer.encode("Once upon a time"))
    params = SamplingParams(max_tokens=12, temperature=1.0, stop=[], seed=3)

    for model_path in (path, None):  # the adapter, then the base model again (the adapter must not stick)
        vllm_client = (
            remote.create_sampling_client(model_path=model_path)
            if model_path
            else remote.create_sampling_client(base_model=model_dir)
        )
        local_client = (
            local.create_sampling_client(model_path=model_path)
            if model_path
            else local.create_sampling_client(base_model=model_dir)
        )
        response = vllm_client.sample(prompt, 3, params).result()
        again = vllm_client.sample(prompt, 3, params).result()
        assert [s.tokens for s in response.sequences] == [s.tokens for s in again.sequences]  # seeded
        assert len({tuple(s.tokens) for s in response.sequences}) > 1  # samples k use seed + k
        for seq in response.sequences:
            assert len(seq.tokens) == 12 and seq.stop_reason == "length"
            expected = local_client.compute_logprobs(ModelInput.from_ints(prompt.to_ints() + seq.tokens)).result()
            assert seq.logprobs == pytest.approx(expected[prompt.length :], abs=2e-3)
            served = vllm_client.compute_logprobs(ModelInput.from_ints(prompt.to_ints() + seq.tokens)).result()
            assert served[0] is None and served[1:] == pytest.approx(expected[1:], abs=2e-3)  # on vLLM


def test_vllm_stop_rules_and_batching_match_the_local_sampler(services, model_dir):
    local, remote = services
    vllm_client = remote.create_sampling_client(base_model=model_dir)
    local_client = local.create_sampling_client(base_model=model_dir)
    tokenizer = vllm_client.get_tokenizer()
    prompt = ModelInput.from_ints(tokenizer.encode("Numbers:"))
    # greedy decoding is the same sequence on both backends (up to a near-tie in a random model's logits)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, stop=[])
    assert (
        vllm_client.sample(prompt, 1, greedy).result().sequences[0].tokens[:4]
        == local_client.sample(prompt, 1, greedy).result().sequences[0].tokens[:4]
    )
    # a stop token id ends the sequence and stays in it
    first = vllm_client.sample(prompt, 1, greedy).result().sequences[0].tokens
    stop = first[-1]
    stopped = vllm_client.sample(prompt, 1, SamplingParams(max_tokens=8, temperature=0.0, stop=[stop])).result()
    assert stopped.sequences[0].tokens == first[: first.index(stop) + 1]
    assert stopped.sequences[0].stop_reason == "stop"

    async def many():  # concurrent requests are gathered into one vLLM call and answered in order
        return await asyncio.gather(
            *(
                vllm_client.sample_async(
                    ModelInput.from_ints(tokenizer.encode(text)), 2, SamplingParams(max_tokens=5, seed=i, stop=[])
                )
                for i, text in enumerate(["a", "b c", "d e f"])
            )
        )

    responses = asyncio.run(many())
    assert [len(r.sequences) for r in responses] == [2, 2, 2]
    assert all(len(s.tokens) == 5 for r in responses for s in r.sequences)
    # next-token scores come from the engine: the greedy token and full-vocabulary logprobs of the candidates
    remote_scores = vllm_client.score_next_token(prompt, [1, 2, 50]).result()
    local_scores = local_client.score_next_token(prompt, [1, 2, 50]).result()
    assert remote_scores.argmax_token == local_scores.argmax_token
    assert remote_scores.candidate_logprobs == pytest.approx(local_scores.candidate_logprobs, abs=2e-3)


def test_an_adapter_the_engine_cannot_apply_is_refused_with_the_setting_to_change(services, model_dir):
    from rlhfkit.engine.vllm_engine.core import UnsupportedAdapterError
    from rlhfkit.engine.local_backend.vllm_client import VLLMSamplingClient

    local, remote = services
    tokenizer = local.create_sampling_client(base_model=model_dir).get_tokenizer()
    _, path = trained_adapter(local, model_dir, tokenizer, "with-unembedding", train_unembed=True)
    # the sampling client checks its LoraSpec's targets against the engine when it is created
    with pytest.raises(UnsupportedAdapterError, match=r"lm_head.*train_unembed=False"):
        remote.create_sampling_client(model_path=path)
    # an adapter whose spec was not checked is refused when the engine loads it
    client = VLLMSamplingClient(None, model_dir, path, remote.precision)
    with pytest.raises(UnsupportedAdapterError, match=r"lm_head.*train_unembed=False"):
        client.sample(ModelInput.from_ints(tokenizer.encode("Hi")), 1, SamplingParams(max_tokens=2)).result()
    with pytest.raises(UnsupportedAdapterError, match="train_unembed=False"):
        client.score_next_token(ModelInput.from_ints(tokenizer.encode("Hi")), [1, 2]).result()


def test_training_client_hands_out_vllm_samplers_on_its_current_weights(services, model_dir):
    local, remote = services
    tokenizer = local.create_sampling_client(base_model=model_dir).get_tokenizer()
    _, path = trained_adapter(remote, model_dir, tokenizer, "for-remote")
    trainer = remote.create_training_client_from_state(path)
    sampler = trainer.save_weights_and_get_sampling_client()
    assert type(sampler).__name__ == "VLLMSamplingClient"
    prompt = ModelInput.from_ints(tokenizer.encode("Once upon a time"))
    seq = sampler.sample(prompt, 1, SamplingParams(max_tokens=6, stop=[], seed=0)).result().sequences[0]
    expected = (
        local.create_sampling_client(model_path=path)
        .compute_logprobs(ModelInput.from_ints(prompt.to_ints() + seq.tokens))
        .result()
    )
    assert seq.logprobs == pytest.approx(expected[prompt.length :], abs=2e-3)
