"""VLLMInferenceWorker as a Ray actor in the vLLM environment: policy, preference-model and reference adapters
served by one engine agree with the local backend; switching adapters reloads no base weights; adapters the
engine does not hold are never silently replaced by the base model; a killed actor comes back with its
adapters. One engine (a tiny random Llama: vLLM can adapt its unembedding) for the whole module."""

import pytest

from rlhfkit.engine import AdamParams, Datum, ModelInput, SamplingParams, ServiceClient
from rlhfkit.engine.testing import build_tiny_architecture

pytestmark = pytest.mark.vllm
TOLERANCE = 2e-3  # fp32 on both sides; vLLM's CPU kernels sum in another order


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from rlhfkit.engine.local_backend.vllm_client import VLLMUnavailableError, vllm_python

    try:
        python = vllm_python()
    except VLLMUnavailableError as e:
        pytest.skip(str(e))
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install ray==2.60.0)")
    from rlhfkit.engine.vllm_engine.launch import vllm_actor

    model_dir = str(
        build_tiny_architecture(
            tmp_path_factory.mktemp("llama"), "llama", hidden_size=256, overrides={"tie_word_embeddings": True}
        )
    )
    local = ServiceClient(storage_dir=str(tmp_path_factory.mktemp("storage")))
    tokenizer = local.create_sampling_client(base_model=model_dir).get_tokenizer()
    adapters = {
        name: trained_adapter(local, model_dir, tokenizer, name, text, seed)
        for name, text, seed in (
            ("policy", "The quick brown fox jumps over the lazy dog.", 1),
            ("judge", "A: yes. B: no. The better reply is A", 2),
            ("reference", "Once upon a time there was a tiny model.", 3),
        )
    }
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    actor = vllm_actor(
        model_dir, str(tmp_path_factory.mktemp("engine")), python=python, dtype="float32", max_lora_rank=8, max_loras=2
    )  # fewer slots and cache places than adapters
    yield ray, actor, local, tokenizer, model_dir, adapters
    ray.shutdown()


def trained_adapter(service, model_dir, tokenizer, name, text, seed):
    """A LoRA adapter (attention, MLP and unembedding) a few steps away from zero."""
    trainer = service.create_lora_training_client(model_dir, rank=8, seed=seed)
    tokens = tokenizer.encode(text)
    datum = Datum(
        ModelInput.from_ints(tokens[:-1]), {"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)}
    )
    for _ in range(3):
        trainer.forward_backward([datum], "cross_entropy")
        trainer.optim_step(AdamParams(learning_rate=5e-2))
    return trainer.save_weights_for_sampler(name).result().path


def test_adapters_served_by_one_engine_match_the_local_backend(setup):
    ray, actor, local, tokenizer, model_dir, adapters = setup
    for name, path in adapters.items():
        ray.get(actor.load_adapter.remote(name, path))
        ray.get(actor.load_adapter.remote(name, path))  # idempotent
    before = ray.get(actor.health.remote())
    prompt = tokenizer.encode("Once upon a time")
    params = SamplingParams(max_tokens=10, temperature=1.0, stop=[], seed=5)
    for name in ["policy", "judge", None, "reference", "policy"]:  # switching back and forth
        local_client = (
            local.create_sampling_client(model_path=adapters[name])
            if name
            else local.create_sampling_client(base_model=model_dir)
        )
        [response] = ray.get(actor.sample.remote(name, [(prompt, 2, params)]))
        assert len(response.sequences) == 2 and response.sequences[0].tokens != response.sequences[1].tokens
        for seq in response.sequences:
            assert len(seq.tokens) == 10 and seq.stop_reason == "length"
            expected = local_client.compute_logprobs(ModelInput.from_ints(prompt + seq.tokens)).result()
            assert seq.logprobs == pytest.approx(expected[len(prompt) :], abs=TOLERANCE)
            [served] = ray.get(actor.compute_logprobs.remote(name, [prompt + seq.tokens]))  # prompt logprobs
            assert served[0] is None and served[1:] == pytest.approx(expected[1:], abs=TOLERANCE), name
        candidates = tokenizer.encode(" A") + tokenizer.encode(" B")
        prompts = [prompt, tokenizer.encode("Which reply is better? Answer:")]
        remote_scores = ray.get(actor.score_next_token.remote(name, prompts, candidates))
        for got, want in zip(
            remote_scores, local_client.score_next_token_batch([ModelInput.from_ints(p) for p in prompts], candidates)
        ):
            assert got.argmax_token == want.argmax_token
            assert got.candidate_logprobs == pytest.approx(want.candidate_logprobs, abs=TOLERANCE)
    after = ray.get(actor.health.remote())
    # one engine process, started once; base weights untouched (nothing merged or reloaded); every adapter held
    assert after["pid"] == before["pid"] and after["start_seconds"] == before["start_seconds"]
    assert after["base_weights_fingerprint"] == before["base_weights_fingerprint"]
    assert sorted(after["adapters"]) == ["judge", "policy", "reference"]


def test_unknown_adapters_fail_loudly(setup):
    ray, actor, *_ = setup
    from rlhfkit.engine.vllm_engine.core import UnknownAdapterError

    with pytest.raises(UnknownAdapterError, match="not loaded"):
        ray.get(actor.sample.remote("never-loaded", [([1, 2, 3], 1, SamplingParams(max_tokens=2))]))
    with pytest.raises(UnknownAdapterError):
        ray.get(actor.score_next_token.remote("never-loaded", [[1, 2, 3]], [4, 5]))
    with pytest.raises(UnknownAdapterError):
        ray.get(actor.compute_logprobs.remote("never-loaded", [[1, 2, 3]]))


def test_a_killed_actor_restarts_with_its_adapters(setup):
    ray, actor, _local, tokenizer, _model_dir, adapters = setup
    ray.get(actor.load_adapter.remote("policy", adapters["policy"]))
    prompt = tokenizer.encode("Once upon a time")
    greedy = SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    [before] = ray.get(actor.sample.remote("policy", [(prompt, 1, greedy)]))
    pid = ray.get(actor.health.remote())["pid"]
    ray.kill(actor, no_restart=False)
    import time

    deadline = time.time() + 300
    while True:  # what the pool does: retry until the restarted actor answers
        try:
            health = ray.get(actor.health.remote())
            break
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.RayActorError):
            assert time.time() < deadline, "the actor did not come back"
            time.sleep(1)
    assert health["pid"] != pid and "policy" in health["adapters"]
    [after] = ray.get(actor.sample.remote("policy", [(prompt, 1, greedy)]))
    assert after.sequences[0].tokens == before.sequences[0].tokens
