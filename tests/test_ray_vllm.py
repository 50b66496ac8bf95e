"""The Ray backend with vLLM inference engines (`ServiceClient(backend="ray", inference_engine="vllm")`): policy,
preference-model and reference adapters served by one engine give the local backend's sampled-token logprobs
and judgements, without reloading base weights when switching; compute_logprobs (which vLLM's CPU build cannot
serve with LoRA on) comes from the pool's torch engine and equals the local backend's; a vLLM actor killed
mid-request is replaced and the request completes. One vLLM engine (a tiny random Llama with head size 64, as in
tests/test_vllm_inference.py) for the whole module, besides the one the kill test restarts."""

import asyncio
import threading
import time

import pytest

from rlhfkit.engine import ModelInput, SamplingParams, ServiceClient
from rlhfkit.engine.testing import build_tiny_architecture

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]' or scripts/setup.sh)")
pytestmark = [pytest.mark.ray, pytest.mark.vllm]
TOLERANCE = 2e-3  # as tests/test_vllm_inference.py: fp32 on both sides, vLLM's CPU kernels sum in another order


def vllm_or_skip() -> None:
    from rlhfkit.engine.vllm_sampling import VLLMUnavailableError, vllm_python

    try:
        vllm_python()
    except VLLMUnavailableError as e:
        pytest.skip(str(e))


def ray_service(storage: str) -> ServiceClient:
    """A private local Ray instance (127.0.0.1) and a Ray service with one training worker and one vLLM engine."""
    from rlhfkit.engine.ray_cluster import connect

    connect(None)
    return ServiceClient(backend="ray", inference_engine="vllm", num_train_workers=1, num_samplers=1,
                         dtype="float32", storage_dir=storage)


def stop_ray() -> None:
    from rlhfkit.engine.ray_backend import ray_backend

    ray.shutdown()
    ray_backend.cache_clear()  # its pools lived in the instance just stopped


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from test_vllm_inference import trained_adapter

    vllm_or_skip()
    model_dir = str(build_tiny_architecture(tmp_path_factory.mktemp("llama"), "llama", hidden_size=256,
                                            overrides={"tie_word_embeddings": True}))
    local = ServiceClient(dtype="float32", storage_dir=str(tmp_path_factory.mktemp("storage")))
    tokenizer = local.create_sampling_client(base_model=model_dir).get_tokenizer()
    adapters = {name: trained_adapter(local, model_dir, tokenizer, name, text, seed)
                for name, text, seed in (("policy", "The quick brown fox jumps over the lazy dog.", 1),
                                         ("judge", "A: yes. B: no. The better reply is A", 2),
                                         ("reference", "Once upon a time there was a tiny model.", 3))}
    remote = ray_service(str(tmp_path_factory.mktemp("ray-storage")))
    yield remote, local, tokenizer, model_dir, adapters
    stop_ray()


def clients(service, model_dir, adapters, name):
    return (service.create_sampling_client(model_path=adapters[name]) if name
            else service.create_sampling_client(base_model=model_dir))


def test_adapters_on_one_vllm_engine_match_the_local_backend(setup):
    remote, local, tokenizer, model_dir, adapters = setup
    names = ["policy", "judge", None, "reference"]
    remote_clients = {name: clients(remote, model_dir, adapters, name) for name in names}
    local_clients = {name: clients(local, model_dir, adapters, name) for name in names}
    pool = remote_clients["policy"].pool
    engine = pool.actors[0]
    before = ray.get(engine.health.remote())
    assert before["engine"] == "vllm" and "compute_logprobs" in pool.unsupported and pool.fallback is not None
    prompt = ModelInput.from_ints(tokenizer.encode("Once upon a time"))
    params = SamplingParams(max_tokens=10, temperature=1.0, stop=[], seed=5)
    candidates = tokenizer.encode(" A") + tokenizer.encode(" B")
    judged = [prompt, ModelInput.from_ints(tokenizer.encode("Which reply is better? Answer:"))]
    for name in ["policy", "judge", None, "reference", "policy", "judge"]:  # switching back and forth
        response = remote_clients[name].sample(prompt, 2, params).result()
        assert len(response.sequences) == 2
        for seq in response.sequences:
            assert len(seq.tokens) == 10 and seq.stop_reason == "length"
            full = ModelInput.from_ints(prompt.to_ints() + seq.tokens)
            expected = local_clients[name].compute_logprobs(full).result()
            assert seq.logprobs == pytest.approx(expected[prompt.length:], abs=TOLERANCE), name
            # compute_logprobs on the Ray backend: the pool's torch engine (vLLM's prompt logprobs crash with LoRA)
            served = remote_clients[name].compute_logprobs(full).result()
            assert served[0] is None and served[1:] == pytest.approx(expected[1:], abs=1e-4), name

        async def judge_both(client):
            return await asyncio.gather(*(client.score_next_token_async(p, candidates) for p in judged))

        for got, want in zip(asyncio.run(judge_both(remote_clients[name])),
                             local_clients[name].score_next_token_batch(judged, candidates)):
            assert got.argmax_token == want.argmax_token
            assert got.candidate_logprobs == pytest.approx(want.candidate_logprobs, abs=TOLERANCE), name
    after = ray.get(engine.health.remote())
    # one engine process, started once; its base weights untouched while adapters switched; every adapter held
    assert pool.actors[0] is engine and pool.restarts == 0
    assert after["pid"] == before["pid"] and after["start_seconds"] == before["start_seconds"]
    assert after["base_weights_fingerprint"] == before["base_weights_fingerprint"]
    assert sorted(after["adapters"]) == sorted(c.adapter_id for n, c in remote_clients.items() if n)


def test_a_vllm_engine_killed_mid_request_is_replaced_and_the_request_completes(setup):
    remote, local, tokenizer, model_dir, adapters = setup
    policy = remote.create_sampling_client(model_path=adapters["policy"])
    local_policy = local.create_sampling_client(model_path=adapters["policy"])
    pool = policy.pool
    old = pool.actors[0]
    pid, restarts = ray.get(old.health.remote())["pid"], pool.restarts
    prompts = [ModelInput.from_ints(tokenizer.encode(t)) for t in
               ("Once upon a time", "The quick brown fox", "A: yes. B: no.", "Hello there")]
    params = SamplingParams(max_tokens=512, temperature=1.0, stop=[], seed=7)
    first_token = threading.Event()

    async def iteration():
        first_token.set()
        return await asyncio.gather(*(policy.sample_async(p, 8, params) for p in prompts))

    def kill_soon():
        first_token.wait()
        time.sleep(2.0)  # the engine is generating 16k tokens
        ray.kill(old, no_restart=True)

    killer = threading.Thread(target=kill_soon)
    killer.start()
    responses = asyncio.run(iteration())
    killer.join()
    assert pool.restarts == restarts + 1, "the kill came after the request had finished: make it longer"
    assert ray.get(pool.actors[0].health.remote())["pid"] != pid
    for prompt, response in zip(prompts, responses):
        assert len(response.sequences) == 8
        seq = response.sequences[0]
        assert len(seq.tokens) == 512
        expected = local_policy.compute_logprobs(ModelInput.from_ints(prompt.to_ints() + seq.tokens)).result()
        assert seq.logprobs == pytest.approx(expected[prompt.length:], abs=TOLERANCE)
