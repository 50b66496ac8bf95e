"""DPO (spec §12): the loss against hand-computed values, the pair data, learning on a tiny model, and an
exact resume after a SIGKILL."""

import json
import math
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhfkit.preference.train_dpo import Config, dpo_loss
from rlhfkit.supervised.testing import kill_at_step_then_resume
from rlhfkit.utils.atomic import read_jsonl

# A run's script: make_config() is shared by the in-process reference run and the killed/resumed child runs.
RUN_SCRIPT = """
import sys
from rlhfkit.preference import train_dpo
from rlhfkit.preference.dpo_datasets import DPODatasetBuilderFromComparisons
from rlhfkit.recipes.preference.datasets import ComparisonBuilderFromJsonl
from rlhfkit.supervised.testing import SlowAtBatch
from rlhfkit.supervised.types import ChatDatasetBuilderCommonConfig


def make_config(log_path, model_dir, data_dir, **overrides):
    common = ChatDatasetBuilderCommonConfig(model_dir, "role_colon", max_length=48, batch_size=2)
    comparisons = ComparisonBuilderFromJsonl(f"{data_dir}/train.jsonl", f"{data_dir}/test.jsonl")
    settings = dict(log_path=log_path, model_name=model_dir, renderer_name="role_colon",
                    dataset_builder=DPODatasetBuilderFromComparisons(common, comparisons),
                    learning_rate=1e-2, dpo_beta=0.5, lora_rank=4, save_every=2, eval_every=3, num_epochs=2,
                    max_steps=6)
    return train_dpo.Config(**{**settings, **overrides})


if __name__ == "__main__":
    log_path, model_dir, data_dir, slow = sys.argv[1:5]
    config = make_config(log_path, model_dir, data_dir)
    if int(slow) >= 0:
        config.dataset_builder = SlowAtBatch(config.dataset_builder, int(slow))
    train_dpo.main(config)
"""


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# ---------------------------------------------------------------- the loss, by hand

# Two pairs: Δ_chosen = (1.0, -0.5), Δ_rejected = (0.0, 0.5), so x = Δc − Δr = (1, −1); β = 0.5.
CHOSEN, REJECTED, BETA = [1.0, -0.5], [0.0, 0.5], 0.5


def loss_and_grads(**kwargs):
    chosen = torch.tensor(CHOSEN, dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor(REJECTED, dtype=torch.float64, requires_grad=True)
    loss, metrics = dpo_loss(chosen, rejected, BETA, **kwargs)
    loss.backward()
    return float(loss.detach()), chosen.grad.tolist(), rejected.grad.tolist(), metrics


def test_sigmoid_loss_value_gradient_and_metrics():
    loss, d_chosen, d_rejected, metrics = loss_and_grads()
    # −log σ(0.5) = 0.474077, −log σ(−0.5) = 0.974077
    assert loss == pytest.approx((0.4740770 + 0.9740770) / 2, abs=1e-6)
    # d/dΔc of −log σ(βx), averaged over 2 pairs: −β(1 − σ(βx)) / 2
    expected = [-BETA * (1 - sigmoid(BETA * x)) / 2 for x in (1.0, -1.0)]
    assert d_chosen == pytest.approx(expected, abs=1e-12)
    assert d_rejected == pytest.approx([-g for g in expected], abs=1e-12)
    assert expected[0] == pytest.approx(-0.0943852, abs=1e-6)
    assert metrics["accuracy"] == 0.5 and metrics["num_pairs"] == 2
    assert metrics["margin"] == pytest.approx(0.0)  # β·mean(1, −1)
    assert metrics["chosen_reward"] == pytest.approx(BETA * 0.25)
    assert metrics["rejected_reward"] == pytest.approx(BETA * 0.25)
    assert metrics["dpo_loss"] == pytest.approx(loss)


def test_label_smoothing_is_conservative_dpo():
    eps = 0.2
    loss, d_chosen, d_rejected, _ = loss_and_grads(label_smoothing=eps)
    # per pair: −(1−ε)·log σ(βx) − ε·log σ(−βx)
    expected_loss = ((0.8 * 0.4740770 + 0.2 * 0.9740770) + (0.8 * 0.9740770 + 0.2 * 0.4740770)) / 2
    assert loss == pytest.approx(expected_loss, abs=1e-6)
    expected = [BETA * (-(1 - eps) * (1 - sigmoid(BETA * x)) + eps * sigmoid(BETA * x)) / 2 for x in (1.0, -1.0)]
    assert d_chosen == pytest.approx(expected, abs=1e-12)
    assert d_rejected == pytest.approx([-g for g in expected], abs=1e-12)


def test_ipo_loss():
    loss, d_chosen, d_rejected, metrics = loss_and_grads(loss_type="ipo")
    # (x − 1/(2β))² with 1/(2β) = 1: x = 1 → 0, x = −1 → 4; mean 2. d/dΔc = 2(x − 1)/2 = (0, −2)
    assert loss == pytest.approx(2.0)
    assert d_chosen == pytest.approx([0.0, -2.0]) and d_rejected == pytest.approx([0.0, 2.0])
    assert metrics["dpo_loss"] == pytest.approx(2.0)


def test_config_checks():
    with pytest.raises(ValueError, match="dpo_beta"):
        Config(log_path="x", model_name="m", dataset_builder=None, dpo_beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        Config(log_path="x", model_name="m", dataset_builder=None, label_smoothing=0.5)
    with pytest.raises(ValueError, match="sigmoid"):
        Config(log_path="x", model_name="m", dataset_builder=None, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        Config(log_path="x", model_name="m", dataset_builder=None, loss_type="hinge")


# ---------------------------------------------------------------- data and training on a tiny model


def write_comparisons(path: Path, n: int, offset: int) -> None:
    """Arithmetic questions; the chosen reply (label alternately A and B) is the correct sum."""
    with open(path, "w") as f:
        for i in range(offset, offset + n):
            a, b = i % 7, i % 5
            good = {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}
            bad = {"role": "assistant", "content": f"I do not know, maybe {a * b + 3}."}
            completions = ([good], [bad]) if i % 2 == 0 else ([bad], [good])
            f.write(
                json.dumps(
                    {
                        "prompt_conversation": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                        "completion_A": completions[0],
                        "completion_B": completions[1],
                        "label": "A" if i % 2 == 0 else "B",
                    }
                )
                + "\n"
            )


@pytest.fixture(scope="module")
def run_setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("dpo")
    write_comparisons(root / "train.jsonl", 8, 0)
    write_comparisons(root / "test.jsonl", 8, 0)  # evaluation on the same fixed set of pairs
    script = root / "run_dpo.py"
    script.write_text(RUN_SCRIPT)
    return root, tiny_model_dir, script


def test_pairs_are_adjacent_chosen_then_rejected(run_setup):
    root, model_dir, script = run_setup
    config = runpy.run_path(str(script))["make_config"](str(root / "unused"), model_dir, str(root))
    train, test = config.dataset_builder()
    assert len(train) == 4 and len(test) == 1
    from rlhfkit.tokenizer_utils import get_tokenizer

    tokenizer = get_tokenizer(model_dir)
    batch = test.get_batch(0)
    assert len(batch) == 16  # the whole test split: 8 pairs
    for chosen, rejected in zip(batch[0::2], batch[1::2]):
        texts = []
        for datum in (chosen, rejected):
            weights = datum.loss_fn_inputs["weights"].to_numpy()
            targets = datum.loss_fn_inputs["target_tokens"].to_numpy()
            assert set(weights.tolist()) == {0.0, 1.0}  # reduction "none"
            texts.append(tokenizer.decode(targets[weights > 0].tolist()))
        assert " plus " in texts[0] and "I do not know" in texts[1]
        assert chosen.model_input.to_ints()[:5] == rejected.model_input.to_ints()[:5]  # same prompt


@pytest.fixture(scope="module")
def reference_run(run_setup):
    """One uninterrupted 6-step run (batches of 2 pairs, 4 batches per epoch), in this process."""
    from rlhfkit.preference import train_dpo

    root, model_dir, script = run_setup
    log_path = root / "reference"
    train_dpo.main(runpy.run_path(str(script))["make_config"](str(log_path), model_dir, str(root)))
    return log_path


def test_dpo_steps_raise_accuracy_and_margin(reference_run):
    for name in ("config.json", "metrics.jsonl", "checkpoints.jsonl", "metrics.png", "reference_sampler"):
        assert (reference_run / name).exists(), name
    records = read_jsonl(reference_run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(6))
    for r in records:
        assert {
            "dpo_loss",
            "accuracy",
            "margin",
            "chosen_reward",
            "rejected_reward",
            "num_pairs",
            "num_tokens",
            "learning_rate",
            "progress",
            "epoch",
            "loss:sum",
            "batch_time",
        } <= set(r)
        assert r["num_pairs"] == 2
    # step 0: the policy is the reference, so every log-ratio is ~0
    assert abs(records[0]["margin"]) < 1e-4 and records[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert records[-1]["dpo_loss"] < math.log(2)
    # evaluation at eval_every=3 and at the final step, on the fixed set of 8 training pairs
    evals = [r for r in records if "test/nll" in r]
    assert [r["step"] for r in evals] == [0, 3, 5]
    assert abs(evals[0]["test/margin"]) < 1e-4
    assert evals[0]["test/accuracy"] < evals[1]["test/accuracy"] <= evals[2]["test/accuracy"]
    assert evals[0]["test/margin"] < evals[1]["test/margin"] < evals[2]["test/margin"]
    assert all({"test/dpo_loss", "test/accuracy", "test/margin"} <= set(r) for r in records if "test/nll" in r)
    assert [c["name"] for c in read_jsonl(reference_run / "checkpoints.jsonl")] == ["000002", "000004", "final"]


def load_adapter(log_path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(log_path / "checkpoints" / "final" / "sampler" / "adapter_model.safetensors"))


def test_sigkill_then_resume_gives_identical_weights_and_one_record_per_step(reference_run, run_setup):
    root, model_dir, script = run_setup
    log_path = root / "killed"
    kill_at_step_then_resume(script, log_path, model_dir, root, step=2)  # batch 3 hangs: step 2 is on disk

    expected, got = load_adapter(reference_run), load_adapter(log_path)
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("time/") and k != "batch_time"}
    records = [strip(r) for r in read_jsonl(log_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(6))  # one record per step: no gap, no duplicate
    assert records == [strip(r) for r in read_jsonl(reference_run / "metrics.jsonl")]
