"""The SFT loop with the tiny model: outputs on disk, learning, exact resume after a SIGKILL."""

import json
import runpy
from pathlib import Path

import numpy as np
import pytest

from rlhfkit.engine.types import ModelInput, EncodedTextChunk
from rlhfkit.supervised.common import compute_bpb, compute_mean_nll, datum_from_model_input_weights
from rlhfkit.supervised.data import SupervisedDatasetFromList
from rlhfkit.supervised.testing import kill_at_step_then_resume
from rlhfkit.utils.atomic import read_jsonl
from rlhfkit.utils.lr_scheduling import compute_schedule_lr_multiplier
from rlhfkit.utils.ml_log import setup_logging

# A run's script: make_config() is shared by the in-process reference run and the killed/resumed child runs.
RUN_SCRIPT = """
import sys
from rlhfkit.recipes.chat_sl.chat_datasets import JsonlChatBuilder
from rlhfkit.supervised import train
from rlhfkit.supervised.testing import SlowAtBatch
from rlhfkit.supervised.types import ChatDatasetBuilderCommonConfig


def make_config(log_path, model_dir, data_dir, builder=None):
    common = ChatDatasetBuilderCommonConfig(model_dir, "role_colon", max_length=32, batch_size=4)
    builder = builder or JsonlChatBuilder(common, f"{data_dir}/train.jsonl", f"{data_dir}/test.jsonl")
    return train.Config(log_path=log_path, model_name=model_dir, recipe_name="test_sft", dataset_builder=builder,
                        learning_rate=5e-3, lora_rank=4, save_every=2, eval_every=3, max_steps=6)


if __name__ == "__main__":
    log_path, model_dir, data_dir, slow = sys.argv[1:5]
    config = make_config(log_path, model_dir, data_dir)
    if int(slow) >= 0:
        config.dataset_builder = SlowAtBatch(config.dataset_builder, int(slow))
    train.main(config)
"""


def write_arithmetic_chats(path: Path, n: int, offset: int) -> None:
    with open(path, "w") as f:
        for i in range(offset, offset + n):
            a, b = i % 7, i % 5
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"What is {a} plus {b}?"},
                            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
                        ]
                    }
                )
                + "\n"
            )


@pytest.fixture(scope="module")
def run_setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("sft")
    write_arithmetic_chats(root / "train.jsonl", 24, 0)
    write_arithmetic_chats(root / "test.jsonl", 8, 100)
    script = root / "run_sft.py"
    script.write_text(RUN_SCRIPT)
    return root, tiny_model_dir, script


@pytest.fixture(scope="module")
def reference_run(run_setup):
    """One uninterrupted 6-step run, in this process."""
    from rlhfkit.supervised import train

    root, model_dir, script = run_setup
    make_config = runpy.run_path(str(script))["make_config"]
    log_path = root / "reference"
    train.main(make_config(str(log_path), model_dir, str(root)))
    return log_path


def load_adapter(log_path: Path, name: str = "final") -> dict:
    from safetensors.numpy import load_file

    return load_file(str(log_path / "checkpoints" / name / "sampler" / "adapter_model.safetensors"))


def without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("time/")}


def test_run_writes_logs_and_learns(reference_run, run_setup):
    for name in ("config.json", "metrics.jsonl", "checkpoints.jsonl", "logs.log", "metrics.png"):
        assert (reference_run / name).exists(), name
    assert list(reference_run.glob("events.out.tfevents.*"))
    config = json.loads((reference_run / "config.json").read_text())
    assert config["dataset_builder"]["__class__"].endswith("JsonlChatBuilder") and config["max_steps"] == 6

    records = read_jsonl(reference_run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(6))
    for r in records:
        assert {
            "epoch",
            "progress",
            "learning_rate",
            "num_sequences",
            "num_tokens",
            "num_loss_tokens",
            "train_mean_nll",
            "train_mean_bpb",
            "time/total",
        } <= set(r)
        assert r["num_sequences"] == 4 and r["num_loss_tokens"] == pytest.approx(4.0)  # mean reduction
    assert [r["step"] for r in records if "test/nll" in r] == [0, 3]  # eval_every=3, before the update
    assert all("test/bpb" in r for r in records if "test/nll" in r)
    # linear schedule over 6 steps, progress = (step+1)/6
    assert [r["learning_rate"] for r in records] == pytest.approx([5e-3 * (1 - s / 6) for s in range(6)])
    assert records[-1]["progress"] == 1.0
    assert records[3]["test/nll"] < records[0]["test/nll"]
    assert records[-1]["train_mean_nll"] < records[0]["train_mean_nll"]

    checkpoints = read_jsonl(reference_run / "checkpoints.jsonl")
    assert [c["name"] for c in checkpoints] == ["000002", "000004", "final"]
    assert checkpoints[0]["batch"] == 2 and checkpoints[-1]["epoch"] == 1 and checkpoints[-1]["batch"] == 0
    assert checkpoints[-1]["elapsed_tokens"] == sum(r["num_tokens"] for r in records)
    assert "Training was already complete" not in (reference_run / "logs.log").read_text()


def test_rerun_after_completion_does_nothing(reference_run, run_setup):
    from rlhfkit.supervised import train

    root, model_dir, script = run_setup
    before = (reference_run / "metrics.jsonl").read_text()
    train.main(runpy.run_path(str(script))["make_config"](str(reference_run), model_dir, str(root)))
    assert (reference_run / "metrics.jsonl").read_text() == before
    assert "Training was already complete" in (reference_run / "logs.log").read_text()
    assert [c["name"] for c in read_jsonl(reference_run / "checkpoints.jsonl")] == ["000002", "000004", "final"]


def test_sigkill_then_resume_matches_uninterrupted_run(reference_run, run_setup):
    root, model_dir, script = run_setup
    log_path = root / "killed"
    kill_at_step_then_resume(script, log_path, model_dir, root, step=2)  # batch 3 hangs: step 2 is on disk

    expected, got = load_adapter(reference_run), load_adapter(log_path)
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)

    reference_metrics = [without_timing(r) for r in read_jsonl(reference_run / "metrics.jsonl")]
    resumed_metrics = [without_timing(r) for r in read_jsonl(log_path / "metrics.jsonl")]
    assert [r["step"] for r in resumed_metrics] == list(range(6))  # no gap, no duplicate
    assert resumed_metrics == reference_metrics
    final = read_jsonl(log_path / "checkpoints.jsonl")[-1]
    reference_final = read_jsonl(reference_run / "checkpoints.jsonl")[-1]
    assert final["name"] == "final" and final["elapsed_tokens"] == reference_final["elapsed_tokens"]


# ---------------------------------------------------------------- building blocks


def test_datum_truncation_shift_and_reduction():
    model_input = ModelInput((EncodedTextChunk((1, 2, 3)), EncodedTextChunk(()), EncodedTextChunk((4, 5, 6))))
    weights = [0, 0, 0, 1, 1, 1]
    datum = datum_from_model_input_weights(model_input, weights, max_length=5)
    assert datum.model_input.to_ints() == [1, 2, 3, 4]
    assert [c.tokens for c in datum.model_input.chunks] == [(1, 2, 3), (4,)]  # chunks kept, empty dropped
    assert datum.loss_fn_inputs["target_tokens"].tolist() == [2, 3, 4, 5]
    assert datum.loss_fn_inputs["weights"].tolist() == [0, 0, 1, 1]
    mean = datum_from_model_input_weights(model_input, weights, reduction="mean")
    assert mean.loss_fn_inputs["weights"].tolist() == pytest.approx([0, 0, 1 / 3, 1 / 3, 1 / 3])


def test_mean_nll_and_bpb():
    from transformers import AutoTokenizer

    from rlhfkit.paths import shared_data_dir

    tokenizer = AutoTokenizer.from_pretrained(str(shared_data_dir() / "tokenizers" / "qwen2"))
    targets = tokenizer.encode("hello world", add_special_tokens=False) + [tokenizer.eos_token_id]
    logprobs = [-1.0] * len(targets)
    weights = [0.0] + [1.0] * (len(targets) - 1)
    assert compute_mean_nll([logprobs, [-2.0, -4.0]], [weights, [1.0, 0.0]]) == pytest.approx(
        (len(targets) - 1 + 2) / len(targets)
    )
    # trained, non-special tokens: all but the first and the EOS; bytes of their decoded text
    n_tokens = len(targets) - 2
    n_bytes = len(tokenizer.decode(targets[1:-1]).encode())
    assert compute_bpb([logprobs], [weights], [targets], tokenizer) == pytest.approx(n_tokens / (np.log(2) * n_bytes))


def test_lr_schedules():
    assert compute_schedule_lr_multiplier("linear", 0, 4) == 1.0
    assert compute_schedule_lr_multiplier("linear", 3, 4) == 0.25
    assert compute_schedule_lr_multiplier("cosine", 2, 4) == pytest.approx(0.5)
    assert compute_schedule_lr_multiplier("constant", 3, 4) == 1.0
    with pytest.raises(ValueError):
        compute_schedule_lr_multiplier("linear", 0, 0)


def test_dataset_from_list_batches_and_epochs():
    dataset = SupervisedDatasetFromList(list(range(10)), batch_size=3, map_fn=lambda x: x * 10)
    assert len(dataset) == 3
    assert dataset.get_batch(0) == [0, 10, 20]
    dataset.set_epoch(1)
    epoch1 = [dataset.get_batch(i) for i in range(3)]
    dataset.set_epoch(2)
    assert [dataset.get_batch(i) for i in range(3)] != epoch1
    dataset.set_epoch(1)
    assert [dataset.get_batch(i) for i in range(3)] == epoch1
    with pytest.raises(IndexError):
        dataset.get_batch(3)


def test_metrics_log_resume_drops_later_steps(tmp_path):
    logger = setup_logging(tmp_path, do_configure_logging_module=False)
    for step in range(5):
        logger.log_metrics({"train_mean_nll": 1.0 / (step + 1)}, step=step)
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train_mean_nl')  # a torn line from a killed writer
    logger = setup_logging(tmp_path, do_configure_logging_module=False, start_step=3)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1, 2]
    logger.log_metrics({"train_mean_nll": 0.1}, step=3)
    logger.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]
    assert (tmp_path / "metrics.png").exists()
