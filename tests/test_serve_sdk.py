"""`rlhfkit serve` driven by the real tinker SDK (0.38): every number equals the in-process engine's (fp32),
retries are answered once, bad input is refused with a clear error and the server keeps serving."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest

tinker = pytest.importorskip("tinker", reason="the serve extra (tinker SDK) is not installed")
from tinker import types as tt  # noqa: E402

from rlhfkit.engine import ServiceClient as EngineService  # noqa: E402
from rlhfkit.engine import types as et  # noqa: E402
from tests.serve_helpers import API_KEY, ServerProcess  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("serve") / "storage").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def sdk(server):
    client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    yield client
    client.close("success").result()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return EngineService(dtype="float32", storage_dir=str(tmp_path_factory.mktemp("engine")))


def _tokens(tiny_model_dir, text: str) -> list[int]:
    from rlhfkit.engine import load_tokenizer

    return load_tokenizer(tiny_model_dir).encode(text)


def _data(ids: list[int], kind: str, sdk: bool):
    """A datum of the given loss kind, as SDK or engine type (same numbers)."""
    n = len(ids) - 1
    weights = np.r_[np.zeros(3), np.ones(n - 3)].astype(np.float32)
    inputs: dict[str, np.ndarray] = {"target_tokens": np.array(ids[1:], dtype=np.int64)}
    if kind == "cross_entropy":
        inputs["weights"] = weights
    else:
        inputs["logprobs"] = np.linspace(-3, -1, n).astype(np.float32)
        inputs["advantages"] = (weights * np.linspace(-1, 1, n)).astype(np.float32)
    if sdk:
        return tt.Datum(
            model_input=tt.ModelInput.from_ints(ids[:-1]),
            loss_fn_inputs={k: tt.TensorData.from_numpy(v) for k, v in inputs.items()},
        )
    return et.Datum(et.ModelInput.from_ints(ids[:-1]), inputs)


TEXTS = ["User: hello there\n\nAssistant: hi, how are you today?", "User: name a color\n\nAssistant: blue."]


def _lp(out, i=0) -> np.ndarray:
    return np.asarray(out.loss_fn_outputs[i]["logprobs"].tolist(), dtype=np.float64)


def test_training_numbers_equal_the_engine(sdk, engine, tiny_model_dir):
    remote = sdk.create_lora_training_client(base_model=tiny_model_dir, rank=4, seed=3).result()
    local = engine.create_lora_training_client(tiny_model_dir, rank=4, seed=3)
    info = remote.get_info()
    assert info.model_data.model_name == tiny_model_dir and info.lora_rank == 4
    assert remote.get_tokenizer().encode(TEXTS[0]) == _tokens(tiny_model_dir, TEXTS[0])
    ids = [_tokens(tiny_model_dir, t) for t in TEXTS]
    for kind in ("cross_entropy", "importance_sampling"):
        r = remote.forward_backward([_data(i, kind, True) for i in ids], kind).result()
        loc = local.forward_backward([_data(i, kind, False) for i in ids], kind).result()
        assert r.metrics["loss:sum"] == pytest.approx(loc.metrics["loss:sum"], abs=TOL, rel=TOL)
        for d in range(len(ids)):
            np.testing.assert_allclose(_lp(r, d), _lp(loc, d), atol=TOL)
        adam = dict(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-8)
        r_step = remote.optim_step(tt.AdamParams(**adam)).result()
        l_step = local.optim_step(et.AdamParams(**adam)).result()
        assert r_step.metrics["optim/grad_norm"] == pytest.approx(l_step.metrics["optim/grad_norm"], rel=1e-4)
    # forward: every position's logprob (no loss input touches the first ones)
    r = remote.forward([_data(ids[0], "cross_entropy", True)], "cross_entropy").result()
    loc = local.forward([_data(ids[0], "cross_entropy", False)], "cross_entropy").result()
    np.testing.assert_allclose(_lp(r), _lp(loc), atol=TOL)
    assert np.all(_lp(r) < 0)

    # forward_backward_custom: a DPO-style loss computed by the SDK on the client (forward, then weights)
    def dpo_like(data, logprobs):
        import torch

        w = [torch.tensor(d.loss_fn_inputs["weights"].tolist()) for d in data]
        margin = (logprobs[0] * w[0]).sum() - (logprobs[1] * w[1]).sum()
        return -torch.nn.functional.logsigmoid(0.1 * margin), {"margin": float(margin.detach())}

    r = remote.forward_backward_custom([_data(i, "cross_entropy", True) for i in ids], dpo_like).result()
    loc = local.forward_backward_custom([_data(i, "cross_entropy", False) for i in ids], dpo_like).result()
    assert r.metrics["margin"] == pytest.approx(loc.metrics["margin"], abs=1e-4)
    remote.optim_step(tt.AdamParams(learning_rate=1e-2)).result()
    local.optim_step(et.AdamParams(learning_rate=1e-2)).result()
    r = remote.forward([_data(ids[1], "cross_entropy", True)], "cross_entropy").result()
    loc = local.forward([_data(ids[1], "cross_entropy", False)], "cross_entropy").result()
    np.testing.assert_allclose(_lp(r), _lp(loc), atol=1e-4)


def test_state_resume_equals_not_stopping(sdk, tiny_model_dir):
    ids = [_tokens(tiny_model_dir, t) for t in TEXTS]
    data = [_data(i, "cross_entropy", True) for i in ids]

    def step(client):
        client.forward_backward(data, "cross_entropy")
        return client.optim_step(tt.AdamParams(learning_rate=5e-3))

    a = sdk.create_lora_training_client(base_model=tiny_model_dir, rank=4, seed=1).result()
    step(a), step(a).result()
    path = a.save_state("two-steps").result().path
    assert path.startswith("tinker://") and path.endswith("/weights/two-steps")
    step(a).result()
    b = sdk.create_training_client_from_state_with_optimizer(path).result()
    step(b).result()
    la = a.forward(data, "cross_entropy").result()
    lb = b.forward(data, "cross_entropy").result()
    np.testing.assert_allclose(_lp(la), _lp(lb), atol=TOL)
    # weights only: the optimizer starts fresh, so the same step differs
    c = sdk.create_training_client_from_state(path).result()
    step(c).result()
    assert not np.allclose(_lp(c.forward(data, "cross_entropy").result()), _lp(la), atol=1e-7)


def test_sampling_equals_the_engine(server, sdk, engine, tiny_model_dir):
    remote = sdk.create_lora_training_client(base_model=tiny_model_dir, rank=4, seed=5).result()
    ids = _tokens(tiny_model_dir, TEXTS[0])
    remote.forward_backward([_data(ids, "cross_entropy", True)], "cross_entropy")
    remote.optim_step(tt.AdamParams(learning_rate=5e-2)).result()
    path = remote.save_weights_for_sampler("sampler-1").result().path
    run_id, _, name = path.removeprefix("tinker://").split("/")
    local_dir = server.storage / "runs" / run_id / "sampler_weights" / name  # a plain engine checkpoint folder
    local = engine.create_sampling_client(model_path=str(local_dir))
    # the server's checkpoint folders are the engine's own: `rlhfkit export` reads them as they are
    from rlhfkit.cli import main as rlhfkit_main

    exported = server.storage.parent / "exported"
    assert rlhfkit_main(["export", str(local_dir), str(exported)]) == 0
    assert (exported / "adapter_config.json").is_file() and (exported / "adapter_model.safetensors").is_file()
    remote_sampler = sdk.create_sampling_client(model_path=path).result()
    live = remote.save_weights_and_get_sampling_client().result()
    prompt = ids[:6]
    for stop in (None, ["\n"], [ids[7], ids[8]]):
        params = dict(max_tokens=6, seed=11, temperature=1.0, stop=stop)
        want = local.sample(et.ModelInput.from_ints(prompt), 3, et.SamplingParams(**params)).result()
        for sampler in (remote_sampler, live):
            got = sampler.sample(tt.ModelInput.from_ints(prompt), 3, tt.SamplingParams(**params)).result()
            assert [s.tokens for s in got.sequences] == [s.tokens for s in want.sequences]
            assert [s.stop_reason for s in got.sequences] == [s.stop_reason for s in want.sequences]
            for g, w in zip(got.sequences, want.sequences):
                np.testing.assert_allclose(g.logprobs, w.logprobs, atol=TOL)
    got = remote_sampler.compute_logprobs(tt.ModelInput.from_ints(ids)).result()
    want = local.compute_logprobs(et.ModelInput.from_ints(ids)).result()
    assert got[0] is None and want[0] is None
    np.testing.assert_allclose(got[1:], want[1:], atol=TOL)
    # the base model alone, and the tutorial's form: model_path together with base_model
    base = sdk.create_sampling_client(base_model=tiny_model_dir).result()
    both = sdk.create_sampling_client(model_path=path, base_model=tiny_model_dir).result()
    p = tt.SamplingParams(max_tokens=4, seed=2)
    assert both.sample(tt.ModelInput.from_ints(prompt), 1, p).result().sequences[0].tokens == (
        remote_sampler.sample(tt.ModelInput.from_ints(prompt), 1, p).result().sequences[0].tokens
    )
    base_want = engine.create_sampling_client(base_model=tiny_model_dir)
    assert base.sample(tt.ModelInput.from_ints(prompt), 1, p).result().sequences[0].tokens == (
        base_want.sample(et.ModelInput.from_ints(prompt), 1, et.SamplingParams(max_tokens=4, seed=2))
        .result()
        .sequences[0]
        .tokens
    )


def _raw(server, path: str, body=None, content: bytes | None = None, headers=None):
    headers = {"X-API-Key": API_KEY, **(headers or {})}
    if content is not None:
        return httpx.post(f"{server.url}/api/v1/{path}", content=content, headers=headers, timeout=30)
    return httpx.post(f"{server.url}/api/v1/{path}", json=body or {}, headers=headers, timeout=30)


def _wait(server, request_id: str):
    for _ in range(100):
        r = _raw(server, "retrieve_future", {"request_id": request_id, "allow_metadata_only": False})
        if r.status_code != 408:
            return r
    raise AssertionError("future never finished")


def test_retried_request_is_answered_once(server, tiny_model_dir):
    session = _raw(server, "create_session", {"tags": [], "user_metadata": {}, "sdk_version": "0.38.0"}).json()
    sid = session["session_id"]
    create = {"session_id": sid, "model_seq_id": 0, "base_model": tiny_model_dir, "lora_config": {"rank": 2}}
    first = _raw(server, "create_model", create).json()["request_id"]
    assert _raw(server, "create_model", create).json()["request_id"] == first  # a retry: the same future
    model_id = _wait(server, first).json()["model_id"]
    step = {"model_id": model_id, "seq_id": 1, "adam_params": {"learning_rate": 1e-3}}
    a = _raw(server, "optim_step", step).json()["request_id"]
    b = _raw(server, "optim_step", step).json()["request_id"]
    assert a == b
    assert _wait(server, a).json()["metrics"]["optim/grad_norm"] == 0.0
    # out-of-order arrival: seq 3 waits for seq 2
    late = _raw(server, "optim_step", {**step, "seq_id": 3}).json()["request_id"]
    time.sleep(0.3)
    early = _raw(server, "save_weights", {"model_id": model_id, "seq_id": 2, "path": "x"}).json()["request_id"]
    assert _wait(server, early).json()["path"].endswith("/weights/x")
    assert "metrics" in _wait(server, late).json()
    assert "never arrived" not in server.log.read_text()  # seq 3 waited for seq 2, not for the gap timeout
    assert _raw(server, f"sessions/{sid}/finish", {"reason": {"type": "success"}}).status_code == 200


def test_bad_input_is_refused_and_the_server_keeps_serving(server, sdk, tiny_model_dir):
    good = sdk.create_lora_training_client(base_model=tiny_model_dir, rank=2, seed=0).result()
    ids = _tokens(tiny_model_dir, TEXTS[1])

    def still_serving():
        assert good.forward([_data(ids, "cross_entropy", True)], "cross_entropy").result().metrics["loss:sum"] > 0

    with pytest.raises(Exception, match="no-such-model"):
        sdk.create_lora_training_client(base_model="/no/such/dir/no-such-model", rank=2).result()
    still_serving()
    with pytest.raises(Exception, match="supported: cross_entropy"):
        good.forward_backward([_data(ids, "cross_entropy", True)], "dro").result()
    still_serving()
    bad = _data(ids, "cross_entropy", True)
    bad.loss_fn_inputs["weights"] = tt.TensorData.from_numpy(np.ones(3, dtype=np.float32))
    with pytest.raises(Exception, match="weights"):
        good.forward_backward([bad], "cross_entropy").result()
    still_serving()
    with pytest.raises(Exception, match=r"\.\."):
        good.save_state("../escape").result()
    assert not (server.storage.parent / "escape").exists()
    still_serving()
    good.save_state("once").result()
    with pytest.raises(Exception, match="exists"):  # the SDK's overwrite=False
        good.save_state("once").result()
    still_serving()
    # a refused request gives up its turn: the next one does not wait for it
    assert "never arrived" not in server.log.read_text()
    r = _raw(server, "forward_backward", content=b"\xff\x00garbage", headers={"Content-Type": "application/x-protobuf"})
    assert r.status_code == 400 and "protobuf" in r.json()["error"]
    r = _raw(server, "create_sampling_session", {"session_id": "x", "sampling_session_seq_id": 0, "model_path": "/etc"})
    assert r.status_code in (400, 404)
    r = _raw(server, "telemetry", content=b"x" * (65 * 1024 * 1024))
    assert r.status_code == 413
    r = _raw(server, "optim_step", {"model_id": "nope", "seq_id": 1, "adam_params": {"learning_rate": "high"}})
    assert r.status_code == 400 and "learning_rate" in r.json()["error"]
    still_serving()


def test_api_key_and_loopback(tmp_path, tiny_model_dir):
    from rlhfkit.serve import ServerSettings

    with pytest.raises(ValueError, match="api-key"):
        ServerSettings(host="0.0.0.0")
    proc = ServerProcess(tmp_path / "storage", "--api-key=tml-secret-key").start()
    try:
        assert httpx.get(f"{proc.url}/api/v1/healthz", timeout=5).status_code == 401
        wrong = tinker.ServiceClient(base_url=proc.url, api_key="tml-wrong-key")
        with pytest.raises(Exception):  # noqa: B017 (the SDK's own error type for a 401)
            wrong.create_lora_training_client(base_model=tiny_model_dir, rank=2).result()
        right = tinker.ServiceClient(base_url=proc.url, api_key="tml-secret-key")
        assert right.create_lora_training_client(base_model=tiny_model_dir, rank=2).result().get_info().lora_rank == 2
        right.close("success").result()  # its heartbeats end with it
    finally:
        proc.stop()


def test_silent_session_is_released(tmp_path, tiny_model_dir):
    proc = ServerProcess(tmp_path / "storage", "--session-timeout", "2").start()
    try:
        sid = _raw(proc, "create_session", {"tags": [], "user_metadata": {}, "sdk_version": "0.38.0"}).json()[
            "session_id"
        ]
        beating = threading.Event()

        def beat():  # a live client's heartbeats, until it goes silent
            while not beating.wait(0.5):
                _raw(proc, "session_heartbeat", {"session_id": sid})

        beater = threading.Thread(target=beat, daemon=True)
        beater.start()
        req = {"session_id": sid, "model_seq_id": 0, "base_model": tiny_model_dir, "lora_config": {"rank": 2}}
        model_id = _wait(proc, _raw(proc, "create_model", req).json()["request_id"]).json()["model_id"]
        saved = _raw(proc, "save_weights", {"model_id": model_id, "seq_id": 1, "path": "kept"}).json()["request_id"]
        _wait(proc, saved)
        beating.set()
        beater.join()
        assert httpx.get(f"{proc.url}/api/v1/healthz").json()["models"] == 1
        deadline = time.monotonic() + 20
        while httpx.get(f"{proc.url}/api/v1/healthz").json()["models"] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert httpx.get(f"{proc.url}/api/v1/healthz").json()["models"] == 0
        assert _raw(proc, "session_heartbeat", {"session_id": sid}).status_code == 410
        assert (proc.storage / "runs" / model_id / "weights" / "kept").is_dir()  # checkpoints stay
    finally:
        proc.stop()


def test_zstd_bodies(tmp_path, tiny_model_dir):
    proc = ServerProcess(tmp_path / "storage", "--zstd").start()
    try:
        sdk = tinker.ServiceClient(base_url=proc.url, api_key=API_KEY)
        client = sdk.create_lora_training_client(base_model=tiny_model_dir, rank=2, seed=0).result()
        ids = _tokens(tiny_model_dir, TEXTS[0])
        out = client.forward_backward([_data(ids, "cross_entropy", True)], "cross_entropy").result()
        assert out.metrics["loss:sum"] > 0 and len(out.loss_fn_outputs[0]["logprobs"].tolist()) == len(ids) - 1
        sdk.close("success").result()
    finally:
        proc.stop()


def test_the_server_command_checks_its_arguments_first():
    import subprocess
    import sys

    for args, named in ((["--host", "0.0.0.0"], "--api-key"), (["colour=red"], "key=value"), (["dtype=fp8"], "dtype")):
        r = subprocess.run(
            [sys.executable, "-m", "rlhfkit", "serve", *args], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 2 and named in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_released_session_frees_its_clients(tmp_path, tiny_model_dir):
    import gc
    import weakref

    from fastapi.testclient import TestClient

    from rlhfkit.serve import ServerSettings, create_app

    app = create_app(ServerSettings(storage=str(tmp_path / "s")), service=EngineService(dtype="float32"))
    with TestClient(app) as http:
        sid = http.post("/api/v1/create_session", json={"tags": [], "user_metadata": {}, "sdk_version": "0.38.0"})
        sid = sid.json()["session_id"]
        req = {"session_id": sid, "model_seq_id": 0, "base_model": tiny_model_dir, "lora_config": {"rank": 2}}
        rid = http.post("/api/v1/create_model", json=req).json()["request_id"]
        model_id = http.post("/api/v1/retrieve_future", json={"request_id": rid}).json()["model_id"]
        save = {"model_id": model_id, "seq_id": 1, "sampling_session_seq_id": 0}
        rid = http.post("/api/v1/save_weights_for_sampler", json=save).json()["request_id"]
        sampler_id = http.post("/api/v1/retrieve_future", json={"request_id": rid}).json()["sampling_session_id"]
        server = app.state.server
        held = [weakref.ref(server.models[model_id].client), weakref.ref(server.samplers[sampler_id].client)]
        assert http.post(f"/api/v1/sessions/{sid}/finish", json={"reason": {"type": "success"}}).status_code == 200
        gc.collect()
        assert [ref() for ref in held] == [None, None]
        assert http.get("/api/v1/healthz").json()["models"] == 0
