"""The Ray backend: data-parallel training equal to the local backend, inference engines serving adapters,
a two-node cluster running the pipeline, faults."""

import contextlib
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from rlhfkit.engine import AdamParams, Datum, ModelInput, SamplingParams, ServiceClient, load_tokenizer
from rlhfkit.engine.model.lora import load_adapter_tensors
from rlhfkit.utils.atomic import read_jsonl

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]' or scripts/setup.sh)")
pytestmark = pytest.mark.ray


def ce_datum(tokens, weights=None):
    weights = weights if weights is not None else [1.0] * (len(tokens) - 1)
    return Datum(ModelInput.from_ints(tokens[:-1]), {"target_tokens": tokens[1:], "weights": weights})


def is_datum(tokens, sampler_logprobs, advantage):
    n = len(tokens) - 1
    return Datum(
        ModelInput.from_ints(tokens[:-1]),
        {
            "target_tokens": tokens[1:],
            "logprobs": sampler_logprobs[:n],
            "advantages": [0.0] * 2 + [advantage] * (n - 2),
        },
    )


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hi there, friend",
    "Data parallel training must equal one device.",
    "Short ones are here too",
    "A somewhat longer sentence, so that shards differ in their token counts.",
]


# -------------------------------------------------------------------------------------------------
# Ray: a private local instance for this module


@pytest.fixture(scope="module")
def ray_service():
    from rlhfkit.engine.ray_backend.cluster import connect

    connect(None)
    yield ServiceClient(backend="ray", num_train_workers=2, num_samplers=1, inference_engine="torch")
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
        data = [
            is_datum(t, (c["logprobs"].to_numpy() + 0.01).tolist(), float(rng.normal()))
            for t, c in zip(tokens, current)
        ]
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
        assert np.allclose(
            remote.compute_logprobs(full).result()[1:], local.compute_logprobs(full).result()[1:], atol=1e-4
        )
        candidates = tokenizer.encode(" A") + tokenizer.encode(" B")

        async def judged(client):
            return await client.score_next_token_async(prompt, candidates)

        assert np.allclose(
            asyncio.run(judged(remote)).candidate_logprobs, asyncio.run(judged(local)).candidate_logprobs, atol=1e-4
        )


def test_a_dropped_ray_sampling_client_frees_its_adapter_in_the_engine(ray_service, tiny_model_dir, tmp_path):
    """An RL run makes a sampler per iteration: the torch engine (one base per actor) forgets the adapter of a
    sampling client nobody holds, so its memory stays flat."""
    import gc

    tokenizer = load_tokenizer(tiny_model_dir)
    trainer = ServiceClient().create_lora_training_client(tiny_model_dir, rank=4, seed=2)
    prompt = ModelInput.from_ints(tokenizer.encode("dropped samplers are forgotten"))
    kept = None
    for step in range(3):
        path = trainer.save_weights_for_sampler(str(tmp_path / f"step{step}")).result().path
        sampler = ray_service.create_sampling_client(model_path=path)
        sampler.compute_logprobs(prompt).result()
        if kept is None:
            kept = sampler
    adapter_id, kept_id = sampler.adapter_id, kept.adapter_id
    engine = sampler.pool.actors[0]
    assert {adapter_id, kept_id} <= set(ray.get(engine.health.remote())["adapters_loaded"])
    del sampler
    gc.collect()
    loaded = ray.get(engine.health.remote())["adapters_loaded"]  # the release was sent before this request
    assert kept_id in loaded and adapter_id not in loaded
    assert len(loaded) == 1


# -------------------------------------------------------------------------------------------------
# A two-node cluster on this machine (loopback addresses 127.0.0.2 and 127.0.0.3, one CPU each)

REPO = Path(__file__).resolve().parent.parent
CLUSTER_ENV = {
    **os.environ,
    "RLHFKIT_DTYPE": "float32",
    "HF_HUB_OFFLINE": "1",
    "PYTHONHASHSEED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": str(REPO),
    "RLHFKIT_INFERENCE_ENGINE": "torch",
}  # the tiny Qwen2: head size 16


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _processes_of(marker: str) -> list[int]:
    """The processes whose command line or environment contains `marker` (the cluster's temp folder), and their
    descendants."""
    parents: dict[int, int] = {}
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()  # agents rename themselves
            if marker in text.decode(errors="replace"):
                found.add(int(entry.name))
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    grown = True
    while grown:
        more = {pid for pid, parent in parents.items() if parent in found and pid not in found}
        found |= more
        grown = bool(more)
    return sorted(found - {os.getpid()})


def _stop_cluster(marker: str) -> None:
    """Stops this test's Ray processes by pid (`ray stop` would stop every Ray on the machine)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _processes_of(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        time.sleep(3)


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """`ray start --head` plus a second `ray start --address=...`, one CPU each, on loopback."""
    temp = Path(tempfile.mkdtemp(prefix="rlhfkit-ray-"))  # short: Ray's socket paths have a length limit
    ray_cli = str(Path(sys.executable).with_name("ray"))
    port = _free_port("127.0.0.2")
    common = ["--num-cpus=1", "--object-store-memory=100000000", f"--temp-dir={temp}", "--disable-usage-stats"]
    try:
        subprocess.run(
            [
                ray_cli,
                "start",
                "--head",
                f"--port={port}",
                "--node-ip-address=127.0.0.2",
                "--include-dashboard=false",
                *common,
            ],
            env=CLUSTER_ENV,
            check=True,
            capture_output=True,
            timeout=180,
        )
        subprocess.run(
            [ray_cli, "start", f"--address=127.0.0.2:{port}", "--node-ip-address=127.0.0.3", *common],
            env=CLUSTER_ENV,
            check=True,
            capture_output=True,
            timeout=180,
        )
        yield f"127.0.0.2:{port}"
    finally:
        _stop_cluster(str(temp))
        shutil.rmtree(temp, ignore_errors=True)


# about 1.5 minutes here (cluster start 16 s, pipeline 64 s, stop 6 s)
def test_two_node_cluster_runs_the_smoke_pipeline(two_node_cluster, tmp_path):
    root = tmp_path / "smoke"
    command = [
        sys.executable,
        "-m",
        "rlhfkit",
        "pipeline",
        "preset=smoke",
        f"log_root={root}",
        "backend=ray",
        f"ray_address={two_node_cluster}",
        "num_train_workers=2",
    ]
    result = subprocess.run(command, env=CLUSTER_ENV, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert (root / "report.html").exists() and (root / "report.md").exists()
    steps = [r["step"] for r in read_jsonl(root / "rl" / "metrics.jsonl")]
    assert steps == [0, 1, 2]


# -------------------------------------------------------------------------------------------------
# Faults


def test_a_killed_inference_actor_is_replaced_and_its_requests_retried(ray_service, tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    sampler = ray_service.create_sampling_client(base_model=tiny_model_dir)
    prompts = [ModelInput.from_ints(tokenizer.encode(t)) for t in TEXTS]
    params = SamplingParams(max_tokens=64, seed=5, stop=[])

    async def iteration():
        return await asyncio.gather(*(sampler.sample_async(p, 4, params) for p in prompts))

    expected = asyncio.run(iteration())
    pool = sampler.pool
    restarts = pool.restarts

    async def iteration_with_a_kill():
        pending = asyncio.ensure_future(iteration())
        await asyncio.sleep(1.0)  # the engine is generating
        ray.kill(pool.actors[0], no_restart=True)
        return await pending

    got = asyncio.run(iteration_with_a_kill())
    assert pool.restarts == restarts + 1
    assert [[s.tokens for s in r.sequences] for r in got] == [[s.tokens for s in r.sequences] for r in expected]


def test_a_killed_driver_resumes_on_ray_without_gap_or_duplicate(tiny_model_dir, tmp_path):
    from test_rl import kill_and_resume

    temp = tempfile.mkdtemp(prefix="rlhfkit-ray-")  # the children's private Ray instances live here
    try:
        kill_and_resume(
            tmp_path / "rl",
            tiny_model_dir,
            {
                "RLHFKIT_BACKEND": "ray",
                "RLHFKIT_NUM_TRAIN_WORKERS": "2",
                "RLHFKIT_INFERENCE_ENGINE": "torch",
                "RAY_TMPDIR": temp,
                "PYTHONPATH": str(REPO),
            },
            timeout=300,
        )
    finally:  # a SIGKILLed driver's private Ray instance leaves its agent processes behind
        _stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)


# about 1 minute here: the tinker SDK against `rlhfkit serve backend=ray` on the two-node cluster
def test_tinker_sdk_through_rlhfkit_serve_on_the_two_node_cluster(two_node_cluster, tmp_path, tiny_model_dir):
    tinker = pytest.importorskip("tinker")
    from tinker import types as tt

    from rlhfkit.engine import ServiceClient as EngineService
    from rlhfkit.engine import types as et
    from tests.serve_helpers import API_KEY, ServerProcess

    args = ("backend=ray", f"ray_address={two_node_cluster}", "num_train_workers=2")
    server = ServerProcess(tmp_path / "storage", *args, env=CLUSTER_ENV).start()
    try:
        sdk = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
        remote = sdk.create_lora_training_client(base_model=tiny_model_dir, rank=4, seed=2).result()
        local = EngineService(dtype="float32", storage_dir=str(tmp_path / "local")).create_lora_training_client(
            tiny_model_dir, rank=4, seed=2
        )
        ids = load_tokenizer(tiny_model_dir).encode(TEXTS[0])
        inputs = {"target_tokens": np.array(ids[1:]), "weights": np.ones(len(ids) - 1, dtype=np.float32)}
        r = remote.forward_backward(
            [
                tt.Datum(
                    model_input=tt.ModelInput.from_ints(ids[:-1]),
                    loss_fn_inputs={k: tt.TensorData.from_numpy(v) for k, v in inputs.items()},
                )
            ],
            "cross_entropy",
        ).result()
        loc = local.forward_backward([et.Datum(et.ModelInput.from_ints(ids[:-1]), inputs)], "cross_entropy").result()
        assert r.metrics["loss:sum"] == pytest.approx(loc.metrics["loss:sum"], rel=1e-5)
        remote.optim_step(tt.AdamParams(learning_rate=1e-2)).result()
        path = remote.save_weights_for_sampler("ray-1").result().path
        sampler = sdk.create_sampling_client(model_path=path).result()
        sample = sampler.sample(tt.ModelInput.from_ints(ids[:5]), 2, tt.SamplingParams(max_tokens=4, seed=3)).result()
        assert [len(s.tokens) for s in sample.sequences] == [4, 4]
        logprobs = sampler.compute_logprobs(tt.ModelInput.from_ints(ids)).result()
        assert logprobs[0] is None and all(lp < 0 for lp in logprobs[1:])
        sdk.close("success").result()
    finally:
        server.stop()
