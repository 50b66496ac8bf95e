"""The Ray backend with vLLM inference engines (`ServiceClient(backend="ray", inference_engine="vllm")`): policy,
preference-model and reference adapters served by one engine give the local backend's sampled-token logprobs
and judgements, without reloading base weights when switching; compute_logprobs (vLLM's prompt logprobs) equals the
local backend's; a vLLM actor killed
mid-request is replaced and the request completes. One vLLM engine (a tiny random Llama with head size 64, as in
tests/test_vllm_inference.py) for the whole module, besides the one the kill test restarts; the smoke pipeline
end to end on backend=ray with a vLLM engine (its own process and Ray instance)."""

import asyncio
import time

import pytest

from rlhfkit.engine import ModelInput, SamplingParams, ServiceClient
from rlhfkit.engine.testing import build_tiny_architecture

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]' or scripts/setup.sh)")
pytestmark = [pytest.mark.ray, pytest.mark.vllm]
TOLERANCE = 2e-3  # as tests/test_vllm_inference.py: fp32 on both sides, vLLM's CPU kernels sum in another order


def vllm_or_skip() -> None:
    from rlhfkit.engine.local_backend.vllm_client import VLLMUnavailableError, vllm_python

    try:
        vllm_python()
    except VLLMUnavailableError as e:
        pytest.skip(str(e))


def ray_service(storage: str) -> ServiceClient:
    """A private local Ray instance (127.0.0.1) and a Ray service with one training worker and one vLLM engine."""
    from rlhfkit.engine.ray_backend.cluster import connect

    connect(None)
    return ServiceClient(
        backend="ray",
        inference_engine="vllm",
        num_train_workers=1,
        num_samplers=1,
        dtype="float32",
        storage_dir=storage,
    )


def stop_ray() -> None:
    from rlhfkit.engine.ray_backend.backend import ray_backend

    ray.shutdown()
    ray_backend.cache_clear()  # its pools lived in the instance just stopped


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from test_vllm_inference import trained_adapter

    vllm_or_skip()
    model_dir = str(
        build_tiny_architecture(
            tmp_path_factory.mktemp("llama"), "llama", hidden_size=256, overrides={"tie_word_embeddings": True}
        )
    )
    local = ServiceClient(dtype="float32", storage_dir=str(tmp_path_factory.mktemp("storage")))
    tokenizer = local.create_sampling_client(base_model=model_dir).get_tokenizer()
    adapters = {
        name: trained_adapter(local, model_dir, tokenizer, name, text, seed)
        for name, text, seed in (
            ("policy", "The quick brown fox jumps over the lazy dog.", 1),
            ("judge", "A: yes. B: no. The better reply is A", 2),
            ("reference", "Once upon a time there was a tiny model.", 3),
        )
    }
    remote = ray_service(str(tmp_path_factory.mktemp("ray-storage")))
    yield remote, local, tokenizer, model_dir, adapters
    stop_ray()


def clients(service, model_dir, adapters, name):
    return (
        service.create_sampling_client(model_path=adapters[name])
        if name
        else service.create_sampling_client(base_model=model_dir)
    )


def test_adapters_on_one_vllm_engine_match_the_local_backend(setup):
    remote, local, tokenizer, model_dir, adapters = setup
    names = ["policy", "judge", None, "reference"]
    remote_clients = {name: clients(remote, model_dir, adapters, name) for name in names}
    local_clients = {name: clients(local, model_dir, adapters, name) for name in names}
    pool = remote_clients["policy"].pool
    engine = pool.actors[0]
    before = ray.get(engine.health.remote())
    assert before["engine"] == "vllm"
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
            assert seq.logprobs == pytest.approx(expected[prompt.length :], abs=TOLERANCE), name
            # compute_logprobs on the Ray backend: vLLM's prompt logprobs, on the same engine
            served = remote_clients[name].compute_logprobs(full).result()
            assert served[0] is None and served[1:] == pytest.approx(expected[1:], abs=TOLERANCE), name

        async def judge_both(client):
            return await asyncio.gather(*(client.score_next_token_async(p, candidates) for p in judged))

        for got, want in zip(
            asyncio.run(judge_both(remote_clients[name])),
            local_clients[name].score_next_token_batch(judged, candidates),
        ):
            assert got.argmax_token == want.argmax_token
            assert got.candidate_logprobs == pytest.approx(want.candidate_logprobs, abs=TOLERANCE), name
    after = ray.get(engine.health.remote())
    # one engine process, started once; its base weights untouched while adapters switched; every adapter held
    assert pool.actors[0] is engine and pool.restarts == 0
    assert after["pid"] == before["pid"] and after["start_seconds"] == before["start_seconds"]
    assert after["base_weights_fingerprint"] == before["base_weights_fingerprint"]
    assert sorted(after["adapters"]) == sorted(c.adapter_id for n, c in remote_clients.items() if n)


def test_a_vllm_engine_killed_mid_request_is_replaced_and_the_request_completes(setup, monkeypatch):
    remote, local, tokenizer, _, adapters = setup
    policy = remote.create_sampling_client(model_path=adapters["policy"])
    local_policy = local.create_sampling_client(model_path=adapters["policy"])
    pool = policy.pool
    pid, restarts = ray.get(pool.actors[0].health.remote())["pid"], pool.restarts
    submit, killed = pool._submit, []

    def submit_then_kill(*args):
        """The first request reaches the engine; while it runs, the engine actor is killed."""
        actor, load, ref = submit(*args)
        if not killed:
            killed.append(actor)
            time.sleep(1.0)  # the engine is generating
            ray.kill(actor, no_restart=True)
        return actor, load, ref

    monkeypatch.setattr(pool, "_submit", submit_then_kill)
    prompts = [
        ModelInput.from_ints(tokenizer.encode(t))
        for t in ("Once upon a time", "The quick brown fox", "A: yes. B: no.", "Hello there")
    ]
    params = SamplingParams(max_tokens=96, temperature=1.0, stop=[], seed=7)

    async def iteration():
        return await asyncio.gather(*(policy.sample_async(p, 4, params) for p in prompts))

    responses = asyncio.run(iteration())
    assert killed and pool.restarts == restarts + 1
    assert ray.get(pool.actors[0].health.remote())["pid"] != pid
    for prompt, response in zip(prompts, responses):
        assert len(response.sequences) == 4
        for seq in response.sequences:
            assert len(seq.tokens) == 96
            full = ModelInput.from_ints(prompt.to_ints() + seq.tokens)
            expected = local_policy.compute_logprobs(full).result()
            assert seq.logprobs == pytest.approx(expected[prompt.length :], abs=TOLERANCE)


# about 1.5 minutes here (a vLLM engine start, the three smoke stages): in the slow set; the default run has the
# smoke pipeline on a Ray cluster (test_ray_backend.py) and the vLLM engine on Ray (the tests above)
@pytest.mark.slow
def test_the_smoke_pipeline_runs_on_ray_with_a_vllm_engine(tmp_path):
    import json
    import subprocess
    import sys
    import tempfile

    from test_ray_backend import CLUSTER_ENV, REPO, _stop_cluster

    from rlhfkit.engine.local_backend.vllm_client import vllm_python
    from rlhfkit.utils.atomic import read_jsonl

    vllm_or_skip()
    model_dir = build_tiny_architecture(
        tmp_path / "llama", "llama", hidden_size=256, overrides={"tie_word_embeddings": True}
    )
    temp = tempfile.mkdtemp(prefix="rlhfkit-ray-")  # the pipeline's private Ray instance lives here
    root = tmp_path / "smoke"
    command = [
        sys.executable,
        "-m",
        "rlhfkit",
        "pipeline",
        "preset=smoke",
        f"base_model={model_dir}",
        f"log_root={root}",
        "backend=ray",
        "inference_engine=vllm",
        "num_train_workers=1",
        "report=false",
    ]
    env = {**CLUSTER_ENV, "RAY_TMPDIR": temp, "RLHFKIT_VLLM_PYTHON": vllm_python(), "RLHFKIT_VLLM_KV_GB": "1"}
    try:
        result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=1200)
    finally:
        _stop_cluster(temp)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert json.loads((root / "pipeline_config.json").read_text())["inference_engine"] == "vllm"  # not the preset's
    records = read_jsonl(root / "rl" / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    # the trainer's logprobs of the tokens vLLM sampled equal vLLM's: the engine applied each policy version
    key = "optim/first_substep_max_abs_logratio"
    logratios = [r[key] for r in records if key in r]
    assert logratios and max(logratios) < 0.05
