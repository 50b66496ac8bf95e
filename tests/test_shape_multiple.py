"""Padded widths on a CPU in bf16 are multiples of SHAPE_MULTIPLE (batching.shape_multiple): oneDNN builds and
keeps kernels for every new matrix-product shape, so widths that follow the data's lengths one by one made the
RL stage's resident memory climb. The rounding must leave every real position's outputs as they were."""

import pytest
import torch

from rlhfkit.engine import Datum, ModelInput, ServiceClient
from rlhfkit.engine.torch_engine.batching import SHAPE_MULTIPLE, pad_left, pad_right, shape_multiple


def test_only_cpu_bf16_and_fp16_round_widths():
    assert shape_multiple(torch.device("cpu"), torch.bfloat16) == SHAPE_MULTIPLE
    assert shape_multiple(torch.device("cpu"), torch.float16) == SHAPE_MULTIPLE
    assert shape_multiple(torch.device("cpu"), torch.float32) == 1
    assert shape_multiple(torch.device("cuda"), torch.bfloat16) == 1
    ids, mask = pad_right([[5, 6, 7], [8]], 0, "cpu", 16)
    assert ids.shape == (2, 16) and mask.sum().item() == 4 and ids[0, :3].tolist() == [5, 6, 7]
    ids, mask, positions = pad_left([[5, 6, 7], [8]], 0, "cpu", 16)
    assert ids.shape == (2, 16) and ids[0, -3:].tolist() == [5, 6, 7] and positions[0, -3:].tolist() == [0, 1, 2]
    assert pad_right([[5, 6, 7]], 0, "cpu")[0].shape == (1, 3)  # multiple 1: as wide as the longest row


def _record_widths(model, widths):
    return model.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: widths.append(tuple(args[0].shape[:-1]))
    )


@pytest.fixture(scope="module")
def bf16_service():
    return ServiceClient(dtype="bfloat16")


def _data(lengths):
    data = []
    for n, length in enumerate(lengths):
        tokens = [(7 * n + 3 * i) % 500 + 10 for i in range(length)]
        data.append(
            Datum(ModelInput.from_ints(tokens[:-1]), {"target_tokens": tokens[1:], "weights": [1.0] * (length - 1)})
        )
    return data


def test_bf16_training_passes_are_rounded_and_give_the_unrounded_logprobs(bf16_service, tiny_model_dir):
    client = bf16_service.create_lora_training_client(tiny_model_dir, rank=4, seed=0)
    trainer = client.trainer
    assert trainer._multiple == SHAPE_MULTIPLE
    data = _data([21, 37, 50])
    widths: list[tuple] = []
    hook = _record_widths(trainer.model.get_base_model(), widths)
    rounded = client.forward_backward(data, "cross_entropy").result()
    hook.remove()
    assert widths and all(shape[0] % SHAPE_MULTIPLE == 0 for shape in widths)  # unembedded rows
    trainer._multiple = 1
    plain = client.forward_backward(data, "cross_entropy").result()
    for a, b in zip(rounded.loss_fn_outputs, plain.loss_fn_outputs):
        a, b = a["logprobs"].to_torch(), b["logprobs"].to_torch()
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=0.05, rtol=0.02)  # bf16: products of other shapes round otherwise


def test_bf16_scoring_widths_are_rounded_and_give_the_unrounded_logprobs(bf16_service, tiny_model_dir):
    sampler = bf16_service.create_sampling_client(base_model=tiny_model_dir)
    assert sampler._multiple == SHAPE_MULTIPLE
    prompts = [
        ModelInput.from_ints([(5 * n + i) % 400 + 10 for i in range(length)]) for n, length in enumerate((19, 33))
    ]
    widths: list[tuple] = []
    hook = sampler.model.get_input_embeddings().register_forward_pre_hook(
        lambda module, args: widths.append(tuple(args[0].shape))
    )
    rounded = [sampler.compute_logprobs(p).result() for p in prompts]
    hook.remove()
    assert widths and all(shape[-1] % SHAPE_MULTIPLE == 0 for shape in widths)
    sampler._multiple = 1
    plain = [sampler.compute_logprobs(p).result() for p in prompts]
    for a, b in zip(rounded, plain):
        assert a[0] is None and b[0] is None and len(a) == len(b)
        torch.testing.assert_close(torch.tensor(a[1:]), torch.tensor(b[1:]), atol=0.05, rtol=0.02)


def test_the_microbatch_plan_bounds_the_rounded_pass():
    """The plan counts each pass as wide as it will be padded: rows x rounded width within the budget."""
    from rlhfkit.engine.torch_engine.batching import padded_width, plan_microbatches

    lengths = [17, 17, 17, 17, 40, 3, 3, 90]
    assert [len(b) for b in plan_microbatches([17] * 3, 51)] == [3]  # 3 x 17 = 51 unrounded
    assert [len(b) for b in plan_microbatches([17] * 3, 51, 16)] == [1, 1, 1]  # 2 x 32 = 64 rounded: over 51
    for multiple in (1, 16):
        plan = plan_microbatches(lengths, 96, multiple)
        assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
        for batch in plan:
            rows, width = len(batch), padded_width([lengths[i] for i in batch], multiple)
            assert rows == 1 or rows * width <= 96, (multiple, batch)
