"""Kill anywhere: SIGKILL a stage of the smoke pipeline at seeded moments, restart, and compare with an unbroken run.

Every stage runs alone in the pipeline from copies of the finished earlier stages (so a new stage such as DPO
is one more STAGES entry). An unbroken run of the stage, with RLHFKIT_FAULT_TRACE set, lists the fault points
it reaches (inside checkpoint writes, metrics appends, optimizer steps, the preference-model evaluation, the
report); a killed run dies at one of them (RLHFKIT_FAULT_KILL_AT), and a restarted run must then end with the
same weights (bitwise, CPU fp32), the same metrics (one record per step), the same checkpoint list, and no
partial files.

    pytest tests/test_faults.py                    # the fast subset: one seeded kill per stage
    pytest tests/test_faults.py -m faults_full     # the full sweep: FULL_KILLS per stage, every kind of point
"""

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from rlhfkit.utils.faults import KILL_ENV, TRACE_ENV

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "RLHFKIT_DTYPE": "float32", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
FULL_KILLS = 8
SEED = 19


@dataclass(frozen=True)
class Stage:
    name: str
    folders: tuple[str, ...]  # the folders this stage writes under log_root
    needs: tuple[str, ...]  # earlier stages whose finished folders it starts from
    args: tuple[str, ...]  # pipeline arguments that run this stage alone


STAGES = [
    Stage("sft", ("sft",), (), ("run_rm=false", "run_rl=false")),
    Stage("rm", ("rm",), ("sft",), ("run_sft=false", "run_rl=false")),  # training and the PM evaluation
    Stage("rl", ("rl",), ("sft", "rm"), ("run_sft=false", "run_rm=false")),  # training and the report
    Stage("dpo", ("dpo",), ("sft",), ("method=dpo", "run_sft=false")),  # the reference snapshot and training
]
BY_NAME = {stage.name: stage for stage in STAGES}


def run_pipeline(root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "rlhfkit",
        "pipeline",
        "preset=smoke",
        f"log_root={root}",
        *args,
    ]
    return subprocess.run(cmd, env={**ENV, **(env or {})}, cwd=REPO, capture_output=True, text=True, timeout=900)


def prepare(root: Path, stage: Stage, references: dict[str, Path]) -> None:
    """A log root holding copies of the finished stages `stage` needs (and the tiny model)."""
    root.mkdir(parents=True)
    for need in stage.needs:
        shutil.copytree(references[need] / need, root / need)
        shutil.copytree(references[need] / "tiny_model", root / "tiny_model", dirs_exist_ok=True)


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, Path]:
    """Per stage, an unbroken run of it alone (from the references of the stages before it), traced."""
    done: dict[str, Path] = {}
    for stage in STAGES:
        root = tmp_path_factory.mktemp(f"reference-{stage.name}")
        shutil.rmtree(root)
        prepare(root, stage, done)
        result = run_pipeline(root, *stage.args, env={TRACE_ENV: str(root.parent / f"{root.name}.trace")})
        assert result.returncode == 0, result.stderr[-3000:]
        done[stage.name] = root
    return done


def trace(root: Path) -> list[tuple[int, str, str]]:
    lines = (root.parent / f"{root.name}.trace").read_text().split("\n")
    return [(int(i), phase, label) for i, phase, label in (line.split() for line in lines if line)]


def kill_points(points: list[tuple[int, str, str]], n: int, seed: int) -> list[int]:
    """`n` seeded points: first one of each kind (label) in a seeded order, then any others."""
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for index, _, label in points:
        by_label.setdefault(label, []).append(index)
    labels = sorted(by_label)
    rng.shuffle(labels)
    chosen = [rng.choice(by_label[label]) for label in labels][:n]
    rest = [index for index, _, _ in points if index not in chosen]
    chosen += rng.sample(rest, min(len(rest), n - len(chosen)))
    return chosen


def adapters(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for path in sorted(folder.glob("checkpoints/*/*/adapter_model.safetensors")):
        for key, value in load_file(str(path)).items():
            out[f"{path.parent.relative_to(folder)}:{key}"] = value
    return out


def without_timing(records: list[dict]) -> list[dict]:
    """Metrics records without wall times (time/..., and DPO's batch_time, a spec metric)."""
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "batch_time"} for r in records]


def jsonl(path: Path) -> list[dict]:
    """Every line must be a complete JSON object (no torn or damaged line left behind)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def assert_same_as_reference(root: Path, reference: Path, stage: Stage, redone: bool = False) -> None:
    """`redone`: a checkpoint was saved again after its first copy was damaged (its name is listed twice)."""
    partial = [p for p in root.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert not partial, f"partial files left: {partial}"
    for folder in stage.folders:
        got, expected = root / folder, reference / folder
        records = jsonl(got / "metrics.jsonl")
        assert [r["step"] for r in records] == list(range(len(records))) and records  # one record per step
        assert without_timing(records) == without_timing(jsonl(expected / "metrics.jsonl"))
        names = [c["name"] for c in jsonl(got / "checkpoints.jsonl")]
        assert (list(dict.fromkeys(names)) if redone else names) == [
            c["name"] for c in jsonl(expected / "checkpoints.jsonl")
        ]
        got_weights, expected_weights = adapters(got), adapters(expected)
        assert got_weights.keys() == expected_weights.keys()
        for key in expected_weights:
            np.testing.assert_array_equal(got_weights[key], expected_weights[key], err_msg=key)
    if stage.name == "rm":
        assert json.loads((root / "rm" / "pm_eval.json").read_text()) == json.loads(
            (reference / "rm" / "pm_eval.json").read_text()
        )
    if stage.name == "rl":
        assert (root / "report.md").exists() and (root / "report.html").exists()


def kill_and_resume(tmp_path: Path, references: dict[str, Path], stage: Stage, index: int, label: str) -> None:
    root = tmp_path / f"{stage.name}-{index}"
    prepare(root, stage, references)
    killed = run_pipeline(root, *stage.args, env={KILL_ENV: str(index)})
    assert killed.returncode == -9, f"not killed at point {index} ({label}): {killed.stderr[-2000:]}"
    resumed = run_pipeline(root, *stage.args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_as_reference(root, references[stage.name], stage)


def cases(n: int) -> list:
    """(stage, k-th kill) pairs; the point itself is drawn from the stage's trace inside the test."""
    return [pytest.param(stage.name, k, id=f"{stage.name}-{k}") for stage in STAGES for k in range(n)]


@pytest.mark.parametrize("stage_name,k", cases(1))
def test_killed_stage_resumes_to_the_same_result(stage_name, k, references, tmp_path):
    stage = BY_NAME[stage_name]
    points = trace(references[stage_name])
    index = kill_points(points, 1, SEED + STAGES.index(stage))[k]
    kill_and_resume(tmp_path, references, stage, index, {i: lbl for i, _, lbl in points}[index])


@pytest.mark.faults_full
@pytest.mark.slow
@pytest.mark.parametrize("stage_name,k", cases(FULL_KILLS))
def test_full_sweep_killed_stage_resumes_to_the_same_result(stage_name, k, references, tmp_path):
    stage = BY_NAME[stage_name]
    points = trace(references[stage_name])
    index = kill_points(points, FULL_KILLS, SEED)[k]
    kill_and_resume(tmp_path, references, stage, index, {i: lbl for i, _, lbl in points}[index])


def test_the_traces_cover_checkpoint_writes_metrics_and_the_report(references):
    labels = {stage.name: {label for _, _, label in trace(references[stage.name])} for stage in STAGES}
    for stage in STAGES:
        assert {"directory_written", "checkpoint_record", "append_jsonl", "optim_step"} <= labels[stage.name]
    phases = {phase for _, phase, _ in trace(references["rm"])} | {phase for _, phase, _ in trace(references["rl"])}
    assert {"pm_eval", "report"} <= phases


# --------------------------------------------------------------------------------------------------
# Damaged checkpoints: detected with the file named, the previous good checkpoint used, never garbage


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "bit-flipped adapter": lambda ckpt: flip_byte(ckpt / "state" / "adapter_model.safetensors"),
    "truncated optimizer": lambda ckpt: truncate(ckpt / "state" / "optimizer.pt"),
    "deleted rng file": lambda ckpt: (ckpt / "state" / "rng.pt").unlink(),
    "deleted checkpoint folder": lambda ckpt: shutil.rmtree(ckpt),
    "damaged checksums": lambda ckpt: (ckpt / "state" / "checksums.json").write_text("{garbage"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_damaged_last_checkpoint_is_named_and_skipped(corruption, references, tmp_path, caplog):
    from rlhfkit.checkpoint_utils import get_last_checkpoint
    from rlhfkit.engine import ServiceClient
    from rlhfkit.errors import CheckpointError

    root = tmp_path / "sft"
    shutil.copytree(references["sft"] / "sft", root)
    CORRUPTIONS[corruption](root / "checkpoints" / "final")
    assert get_last_checkpoint(root).name == "000002"  # the one before the damaged one
    assert "not using checkpoint 'final'" in caplog.text and "checkpoints/final" in caplog.text
    with pytest.raises(CheckpointError, match="checkpoints/final"):
        ServiceClient().create_training_client_from_state_with_optimizer(str(root / "checkpoints/final/state"))


def test_a_damaged_final_checkpoint_is_redone_from_the_previous_one(references, tmp_path):
    """The stage is not 'finished' any more: it resumes from 000002 and ends with the reference's weights."""
    root = tmp_path / "run"
    prepare(root, BY_NAME["sft"], references)
    shutil.copytree(references["sft"] / "sft", root / "sft")
    flip_byte(root / "sft" / "checkpoints" / "final" / "sampler" / "adapter_model.safetensors")
    flip_byte(root / "sft" / "checkpoints" / "final" / "state" / "adapter_model.safetensors")
    result = run_pipeline(root, *BY_NAME["sft"].args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not using checkpoint 'final'" in result.stderr and "adapter_model.safetensors" in result.stderr
    assert_same_as_reference(root, references["sft"], BY_NAME["sft"], redone=True)


def test_damaged_log_lines_are_reported_with_file_and_line_and_skipped(tmp_path, caplog):
    from rlhfkit.checkpoint_utils import load_checkpoints_file
    from rlhfkit.utils.atomic import append_jsonl, read_jsonl
    from rlhfkit.utils.ml_log import MetricsLogger

    path = tmp_path / "checkpoints.jsonl"
    append_jsonl(path, {"name": "000002", "batch": 2})
    with open(path, "a") as f:
        f.write("this is not json\n[1, 2]\n")
    append_jsonl(path, {"name": "000004", "batch": 4})
    assert [r.name for r in load_checkpoints_file(tmp_path)] == ["000002", "000004"]
    assert f"{path}, line 2: skipping a damaged line" in caplog.text and f"{path}, line 3" in caplog.text

    metrics = tmp_path / "metrics.jsonl"
    append_jsonl(metrics, {"step": 0, "loss": 1.0})
    with open(metrics, "a") as f:
        f.write('{"step": 1, "lo\n{"step": 2, "loss"')  # a damaged line, then a torn last line
    append_jsonl(metrics, {"step": 1, "loss": 0.5})  # cuts the torn line off first
    assert [r["step"] for r in read_jsonl(metrics)] == [0, 1]
    MetricsLogger(tmp_path, start_step=2, plot_panels=None)  # the resume rewrite repairs the file
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [0, 1]


def test_a_copied_run_folder_uses_its_own_files(references, tmp_path):
    """Checkpoint paths are stored relative to the run folder: the copy works after the original is gone."""
    original = tmp_path / "original"
    shutil.copytree(references["rl"], original)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    result = run_pipeline(copy, "report=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("already finished") == 3
    assert str(original) not in (copy / "rl" / "checkpoints.jsonl").read_text()


def test_a_half_finished_run_moved_elsewhere_resumes_and_reports_like_the_original(tmp_path):
    """Checkpoints name the run's own model relative to themselves: a copy of a run stopped after SFT, with the
    original deleted, finishes every stage and its report with the same weights and metrics as the original."""
    original, copy = tmp_path / "original", tmp_path / "moved" / "copy"
    result = run_pipeline(original, "run_rm=false", "run_rl=false")
    assert result.returncode == 0, result.stderr[-3000:]
    shutil.copytree(original, copy)
    result = run_pipeline(original)  # the original, finished where it started: the reference
    assert result.returncode == 0, result.stderr[-3000:]
    expected = {
        stage: (adapters(original / stage), jsonl(original / stage / "metrics.jsonl")) for stage in ("rm", "rl")
    }
    shutil.rmtree(original)
    result = run_pipeline(copy)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage sft: already finished" in result.stdout and (copy / "report.html").is_file()
    for stage, (weights, metrics) in expected.items():
        got = adapters(copy / stage)
        assert got.keys() == weights.keys() and all(np.array_equal(got[k], weights[k]) for k in weights), stage
        assert without_timing(jsonl(copy / stage / "metrics.jsonl")) == without_timing(metrics), stage
    states = list(copy.rglob("rlhfkit_state.json"))
    relative = [json.loads(p.read_text()).get("base_model_relative") for p in states]
    assert states and all(r and (p.parent / r).resolve() == copy / "tiny_model" for p, r in zip(states, relative))
    assert not [p for p in states if "/sft/" not in str(p) and str(original) in p.read_text()]


# --------------------------------------------------------------------------------------------------
# One run per folder, full disk, non-finite updates


def test_a_second_run_on_a_folder_in_use_is_refused(tmp_path):
    from rlhfkit.errors import RunLockedError
    from rlhfkit.utils.run_lock import RunLock

    with RunLock(tmp_path):
        result = run_pipeline(tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith("rlhfkit: error:") and f"process {os.getpid()}" in line, result.stderr
        with pytest.raises(RunLockedError, match="in use by another run"):
            RunLock(tmp_path).__enter__()
    # a lock left by a killed process is taken over
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from rlhfkit.utils.run_lock import RunLock; "
            f"lock = RunLock({str(tmp_path)!r}); lock.__enter__(); print('locked', flush=True); time.sleep(60)",
        ],
        env=ENV,
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunLockedError, match=f"process {holder.pid}"):
        RunLock(tmp_path).__enter__()
    holder.kill()
    holder.wait()
    with RunLock(tmp_path):
        pass


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    import errno

    from rlhfkit import checkpoint_utils
    from rlhfkit.engine import ServiceClient
    from rlhfkit.engine.model import lora
    from rlhfkit.errors import DiskFullError

    client = ServiceClient().create_lora_training_client(tiny_model_dir, rank=2)
    checkpoint_utils.save_checkpoint(client, "000002", tmp_path, {"batch": 2})

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lora, "save_file", no_space)
    with pytest.raises(DiskFullError, match="no space left") as error:
        checkpoint_utils.save_checkpoint(client, "000004", tmp_path, {"batch": 4})
    assert "\n" not in str(error.value)
    assert not list((tmp_path / "checkpoints" / "000004").iterdir())  # nothing half-written
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    last = checkpoint_utils.get_last_checkpoint(tmp_path)
    assert last.name == "000002"
    ServiceClient().create_training_client_from_state_with_optimizer(last.state_path)


def test_a_nonfinite_loss_skips_the_update_and_leaves_weights_and_optimizer_unchanged(tiny_model_dir):
    import torch

    from rlhfkit.engine import ServiceClient
    from rlhfkit.engine.types import AdamParams, Datum, ModelInput, TensorData

    client = ServiceClient().create_lora_training_client(tiny_model_dir, rank=2, seed=0)

    def datum(weight: float) -> Datum:
        return Datum(
            model_input=ModelInput.from_ints([1, 2, 3, 4]),
            loss_fn_inputs={
                "target_tokens": TensorData.from_numpy(np.array([2, 3, 4, 5])),
                "weights": TensorData.from_numpy(np.array([weight] * 4, dtype=np.float32)),
            },
        )

    adam = AdamParams(learning_rate=1e-2)
    client.forward_backward([datum(1.0)], "cross_entropy").result()
    assert client.optim_step(adam).result().metrics["optim/skipped_nonfinite"] == 0.0
    trainer = client.trainer  # the local backend's trainer: its adapters and optimizer
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    state = {
        k: {n: t.clone() for n, t in v.items() if torch.is_tensor(t)}
        for k, v in trainer.optimizer.state_dict()["state"].items()
    }
    output = client.forward_backward([datum(float("nan"))], "cross_entropy").result()
    assert not np.isfinite(output.metrics["loss:sum"])
    metrics = client.optim_step(adam).result().metrics
    assert metrics["optim/skipped_nonfinite"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    after = trainer.optimizer.state_dict()["state"]
    assert all(torch.equal(state[k][n], after[k][n]) for k in state for n in state[k])
    assert client.optimizer_steps == 1
    assert all(p.grad is None for p in params)
    # the next finite batch trains as usual
    client.forward_backward([datum(1.0)], "cross_entropy").result()
    assert client.optim_step(adam).result().metrics["optim/skipped_nonfinite"] == 0.0


def test_nonfinite_steps_in_a_row_stop_the_run_with_a_clear_error(tmp_path, caplog):
    from rlhfkit.errors import NonFiniteError
    from rlhfkit.utils.nonfinite import NonFiniteGuard

    guard = NonFiniteGuard(3, str(tmp_path))
    guard.check(0, float("nan"), {"optim/skipped_nonfinite": 1.0}, lambda: "  row 0: ...")
    guard.check(1, 1.0, {"optim/skipped_nonfinite": 0.0}, lambda: "")  # a good step resets the count
    guard.check(2, float("inf"), {}, lambda: "  row 0: 'Hello'")
    guard.check(3, 2.0, {"optim/skipped_nonfinite": 1.0}, lambda: "  row 0: 'Hello'")
    assert "step 2: the loss (inf)" in caplog.text and "row 0: 'Hello'" in caplog.text
    with pytest.raises(NonFiniteError, match="step 4: 3 steps in a row"):
        guard.check(4, float("nan"), {"optim/skipped_nonfinite": 1.0}, lambda: "")


class NaNFromBatch:
    """A dataset builder whose batches from `start` on have NaN loss weights (so a NaN loss and gradient)."""

    def __init__(self, inner, start: int):
        self.inner, self.start = inner, start

    def __call__(self):
        import dataclasses

        from rlhfkit.engine.types import TensorData

        train_ds, test_ds = self.inner()
        start = self.start

        class Poisoned:
            def __len__(self):
                return len(train_ds)

            def set_epoch(self, seed=0):
                train_ds.set_epoch(seed)

            def get_batch(self, index):
                batch = train_ds.get_batch(index)
                if index < start:
                    return batch
                nan = lambda d: TensorData.from_numpy(d.loss_fn_inputs["weights"].to_numpy() * np.nan)
                return [dataclasses.replace(d, loss_fn_inputs={**d.loss_fn_inputs, "weights": nan(d)}) for d in batch]

        return Poisoned(), test_ds


def test_an_sft_run_whose_loss_is_nan_stops_and_keeps_its_checkpoints(tmp_path, tiny_model_dir, caplog):
    from safetensors.numpy import load_file

    from rlhfkit.checkpoint_utils import get_last_checkpoint
    from rlhfkit.errors import NonFiniteError
    from rlhfkit.recipes.chat_sl.chat_datasets import JsonlChatBuilder
    from rlhfkit.supervised import train
    from rlhfkit.supervised.types import ChatDatasetBuilderCommonConfig

    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}]}
            )
            + "\n"
            for i in range(24)
        )
    )
    common = ChatDatasetBuilderCommonConfig(tiny_model_dir, "role_colon", max_length=32, batch_size=4)
    config = train.Config(
        log_path=str(tmp_path / "run"),
        model_name=tiny_model_dir,
        recipe_name="nan",
        dataset_builder=NaNFromBatch(JsonlChatBuilder(common, str(data)), start=2),
        learning_rate=1e-2,
        lora_rank=2,
        save_every=1,
        eval_every=0,
        max_steps=6,
        max_nonfinite_in_a_row=2,
    )
    with pytest.raises(NonFiniteError, match="step 3: 2 steps in a row"):
        train.main(config)
    assert "step 2: the loss (nan)" in caplog.text and "row 0:" in caplog.text
    last = get_last_checkpoint(tmp_path / "run")
    assert last.name == "000003"  # saved before step 3's (skipped) update: the weights after step 1
    weights = load_file(str(Path(last.sampler_path) / "adapter_model.safetensors"))
    assert all(np.isfinite(w).all() for w in weights.values())
    step1 = load_file(str(tmp_path / "run" / "checkpoints" / "000002" / "sampler" / "adapter_model.safetensors"))
    assert all(np.array_equal(weights[k], step1[k]) for k in weights)  # the skipped step 2 changed nothing


def test_the_smoke_presets_rl_learns(references):
    """Rewards differ between the replies of a group and every RL step changes the weights, so the kill-and-
    resume comparisons of Stage 3 compare runs in which RL did something."""
    from safetensors.numpy import load_file

    rl = references["rl"] / "rl"
    records = jsonl(rl / "metrics.jsonl")
    assert all(r["optim/grad_norm"] > 0 and r["optim/skipped_nonfinite"] == 0 for r in records)
    rewards = [r["total_reward"] for r in jsonl(rl / "iteration_000000" / "train_rollout_summaries.jsonl")]
    assert len(set(rewards)) > 1, rewards
    start = load_file(str(rl / "init_sampler" / "adapter_model.safetensors"))
    final = load_file(str(rl / "checkpoints" / "final" / "sampler" / "adapter_model.safetensors"))
    assert any(not np.array_equal(start[k], final[k]) for k in start)
