"""The real tinker-cookbook (0.6.1), its library code unchanged, against `rlhfkit serve` on a tiny model with local
data (LIMA conversations, HH-RLHF comparisons; tests/cookbook_driver.py): SFT, the preference model, RL with the
stage-2 judge (synchronous, streaming minibatches, asynchronous), DPO and the tutorial's final sampling cell; a new
server on the same storage serves the old one's checkpoints; SIGKILL of the server mid-SFT, then a restart of both,
ends with the weights of an uninterrupted run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tinker_cookbook", reason="tinker-cookbook is not installed (scripts/setup.sh installs it)")

from tests.serve_helpers import REPO, ServerProcess

DRIVER = REPO / "tests" / "cookbook_driver.py"
SHARED = REPO.parent / "shared" / "data"


def run_stage(server: ServerProcess, stage: str, model: str, data: Path, logs: Path, *extra: str, timeout=600) -> dict:
    cmd = [sys.executable, str(DRIVER), stage, "--model", model, "--data", str(data), "--logs", str(logs), *extra]
    proc = subprocess.run(cmd, env=server.client_env(), capture_output=True, text=True, timeout=timeout, cwd=logs)
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and results, (
        f"{stage} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return json.loads(results[-1][len("RESULT ") :])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"the offline data ({SHARED}) is not here")
    folder = tmp_path_factory.mktemp("cookbook_data")
    subprocess.run([sys.executable, str(DRIVER), "data", "--data", str(folder), "--shared", str(SHARED)], check=True)
    return folder


def _nll(metrics: list[dict], key: str) -> list[float]:
    return [m[key] for m in metrics if key in m]


def test_cookbook_rlhf_pipeline_dpo_and_tutorial_cell(tmp_path, data, tiny_model_dir):
    storage, logs = tmp_path / "storage", tmp_path / "logs"
    logs.mkdir()
    server = ServerProcess(storage).start()
    try:
        sft = run_stage(server, "sft", tiny_model_dir, data, logs, "--steps", "4")
        nll = _nll(sft["metrics"], "train_mean_nll")
        assert len(nll) == 4 and nll[-1] < nll[0]
        assert sft["state_path"].startswith("tinker://") and "/weights/" in sft["state_path"]
        rm = run_stage(server, "rm", tiny_model_dir, data, logs, "--steps", "4")
        rm_nll = _nll(rm["metrics"], "train_mean_nll")
        assert rm_nll[-1] < rm_nll[0]
        for mode in ([], ["--stream"], ["--async"]):
            rl = run_stage(server, "rl", tiny_model_dir, data, logs, "--steps", "2", *mode)
            win_rates = [m["win_rate"] for m in rl["metrics"] if "win_rate" in m]
            assert win_rates and all(0 <= w <= 1 for w in win_rates), mode
            assert rl["sampler_path"].startswith("tinker://")
        dpo = run_stage(server, "dpo", tiny_model_dir, data, logs, "--steps", "2")
        assert [m["dpo_loss"] for m in dpo["metrics"] if "dpo_loss" in m]
        replies = run_stage(server, "sample", tiny_model_dir, data, logs)["replies"]
        assert set(replies) == {"base", "rl"}
    finally:
        server.stop()
    # a new server process on the same storage serves the checkpoints the old one wrote
    again = ServerProcess(storage).start()
    try:
        assert set(run_stage(again, "sample", tiny_model_dir, data, logs)["replies"]) == {"base", "rl"}
    finally:
        again.stop()


def _adapter(storage: Path, logs: Path, name: str = "final", key: str = "sampler_path") -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    records = [json.loads(line) for line in (logs / "sft" / "checkpoints.jsonl").read_text().splitlines()]
    path = [r for r in records if r.get("name") == name][-1][key]
    run_id, kind, ckpt = path.removeprefix("tinker://").split("/")
    return load_file(str(storage / "runs" / run_id / kind / ckpt / "adapter_model.safetensors"))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-6, err_msg=key)


@pytest.mark.slow  # about 2.5 minutes: three SFT runs and four server starts (pytest -m slow)
def test_sigkill_server_mid_sft_resumes_to_the_same_weights(tmp_path, data, tiny_model_dir):
    """Killing the server (and the run) after a checkpoint loses nothing: the restarted run ends with the weights
    of a run that stopped cleanly at that checkpoint and resumed. (Not those of a run that never stopped: cookbook
    0.6.1's SFT loop records a checkpoint's batch index after submitting that batch, and `submit_ahead` more, so a
    resume trains on them again, on any server.)"""
    steps = ["--steps", "6"]
    storage_a, logs_a = tmp_path / "a" / "storage", tmp_path / "a" / "logs"
    logs_a.mkdir(parents=True)
    server = ServerProcess(storage_a).start()
    try:
        run_stage(server, "sft", tiny_model_dir, data, logs_a, *steps)
        # a clean stop at the first checkpoint, then a resume: the reference for the killed run
        logs_c = tmp_path / "c" / "logs"
        (logs_c / "sft").mkdir(parents=True)
        first = (logs_a / "sft" / "checkpoints.jsonl").read_text().splitlines()[0]
        (logs_c / "sft" / "checkpoints.jsonl").write_text(first + "\n")
        clean = run_stage(server, "sft", tiny_model_dir, data, logs_c, *steps)
    finally:
        server.stop()
    # killed after its first checkpoint, server and client; both started again
    storage_b, logs_b = tmp_path / "b" / "storage", tmp_path / "b" / "logs"
    logs_b.mkdir(parents=True)
    server = ServerProcess(storage_b).start()
    cmd = [sys.executable, str(DRIVER), "sft", "--model", tiny_model_dir, "--data", str(data), "--logs", str(logs_b)]
    client = subprocess.Popen(
        cmd + steps, env=server.client_env(), cwd=logs_b, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoints = logs_b / "sft" / "checkpoints.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (checkpoints.exists() and checkpoints.read_text().strip()):
        assert client.poll() is None, "the SFT run ended before its first checkpoint"
        time.sleep(0.05)
    server.kill()
    client.kill()
    client.wait(30)
    assert '"final"' not in checkpoints.read_text(), "the run finished before the kill: nothing was interrupted"
    first_name = json.loads(checkpoints.read_text().splitlines()[0])["name"]
    _assert_same(
        _adapter(storage_a, logs_a, first_name, "state_path"), _adapter(storage_b, logs_b, first_name, "state_path")
    )
    server = ServerProcess(storage_b).start()
    try:
        resumed = run_stage(server, "sft", tiny_model_dir, data, logs_b, *steps)
    finally:
        server.stop()
    assert [m["step"] for m in resumed["metrics"]][-1] == [m["step"] for m in clean["metrics"]][-1]
    _assert_same(_adapter(storage_b, logs_b), _adapter(storage_a, logs_c))
