"""The grouped LoRA ops that replace vLLM's CPU reference ops (rlhfkit/engine/vllm_engine/cpu_ops.py) compute, row by
row, inputs @ weights[adapter of the row].T with the reference ops' writes; a negative adapter adds nothing.
These run without vLLM (torch only); the engine end to end is tests/test_vllm_inference.py."""

import pytest
import torch

from rlhfkit.engine.vllm_engine import cpu_ops as ops


def per_row(inputs, weights, indices, dtype):
    """The definition, one row at a time (a four-dimensional weight stack has a singleton second axis)."""
    weights = weights.squeeze(1) if weights.dim() == 4 else weights
    rows = []
    for row, adapter in zip(inputs, indices.tolist()):
        if adapter < 0:
            rows.append(torch.zeros(weights.shape[1], dtype=dtype))
        else:
            rows.append(row.to(dtype) @ weights[adapter].to(dtype).T)
    return torch.stack(rows)


@pytest.mark.parametrize(
    "indices", [[2, 2, 2, 2, 2], [0, 1, 1, 0, 2], [-1, -1, -1, -1, -1], [1, -1, 0, -1, 1]], ids=str
)
def test_shrink_and_expand_match_the_per_row_definition(indices):
    torch.manual_seed(0)
    indices = torch.tensor(indices)
    x = torch.randn(5, 12)
    a = torch.randn(3, 1, 4, 12, dtype=torch.bfloat16)  # [adapters, 1, rank, in]
    b = torch.randn(3, 1, 9, 4, dtype=torch.bfloat16)  # [adapters, 1, out, rank]

    shrunk = torch.full((5, 4), 7.0)  # overwritten
    ops.bgmv_shrink(x, a, shrunk, indices, 0.5)
    torch.testing.assert_close(shrunk, 0.5 * per_row(x, a, indices, torch.float32))

    y = torch.randn(5, 9)
    expected = y + per_row(shrunk, b, indices, torch.float32)
    ops.bgmv_expand(shrunk, b, y, indices, add_inputs=True)
    torch.testing.assert_close(y, expected)

    wide = torch.randn(5, 20)
    expected = wide.clone()
    expected[:, 6:15] = per_row(shrunk, b, indices, torch.float32)
    ops.bgmv_expand_slice(shrunk, b, wide, indices, 6, 9, add_inputs=False)
    torch.testing.assert_close(wide, expected)


def test_prefill_ops_give_each_sequence_its_adapter():
    torch.manual_seed(1)
    x = torch.randn(6, 8)
    a = torch.randn(2, 3, 8)  # three-dimensional stacks too
    b = torch.randn(2, 10, 3)
    lengths, adapters = torch.tensor([2, 3, 1]), torch.tensor([1, 0, 1])
    per_token = torch.tensor([1, 1, 0, 0, 0, 1])
    meta = (torch.tensor([0, 2, 5]), lengths, adapters, 3, 3, 6)

    shrunk = torch.zeros(6, 3)
    ops.sgmv_shrink(x, a, shrunk, *meta, 2.0)
    torch.testing.assert_close(shrunk, 2.0 * per_row(x, a, per_token, torch.float32))

    y = torch.ones(6, 10)
    ops.sgmv_expand(shrunk, b, y, *meta, add_inputs=True)
    torch.testing.assert_close(y, 1.0 + per_row(shrunk, b, per_token, torch.float32))

    out = torch.zeros(6, 12)
    ops.sgmv_expand_slice(shrunk, b, out, *meta, 2, 10, add_inputs=True)
    torch.testing.assert_close(out[:, 2:], per_row(shrunk, b, per_token, torch.float32))
    assert not out[:, :2].any()


def test_a_single_row_is_broadcast_like_the_reference():
    b = torch.randn(1, 4, 2)
    y = torch.zeros(3, 4)
    ops.bgmv_expand(torch.ones(1, 2), b, y, torch.tensor([0]), add_inputs=False)
    torch.testing.assert_close(y, (torch.ones(1, 2) @ b[0].T).expand(3, 4))


def test_the_eager_token_rank_counts_entries_at_least_the_value():
    x = torch.tensor([[0.1, 0.5, 0.3], [2.0, 1.0, 3.0]])
    assert ops.count_greater_or_equal(x, torch.tensor([[0.3], [3.0]])).tolist() == [2, 1]


def fake_vllm(monkeypatch, punica_names):
    """A stand-in vLLM package on the CPU platform, whose punica_cpu module defines `punica_names`."""
    import sys
    import types

    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(is_cpu=lambda: True)
    punica_cpu = types.ModuleType("vllm.lora.punica_wrapper.punica_cpu")
    for name in punica_names:
        setattr(punica_cpu, name, None)
    sampler = types.ModuleType("vllm.v1.sample.sampler")
    sampler.batched_count_greater_than = None
    modules = {
        "vllm": types.ModuleType("vllm"),
        "vllm.platforms": platforms,
        "vllm.lora": types.ModuleType("vllm.lora"),
        "vllm.lora.punica_wrapper": types.ModuleType("vllm.lora.punica_wrapper"),
        "vllm.lora.punica_wrapper.punica_cpu": punica_cpu,
        "vllm.v1": types.ModuleType("vllm.v1"),
        "vllm.v1.sample": types.ModuleType("vllm.v1.sample"),
        "vllm.v1.sample.sampler": sampler,
    }
    modules["vllm.lora.punica_wrapper"].punica_cpu = punica_cpu
    modules["vllm.v1.sample"].sampler = sampler
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return punica_cpu, sampler


def test_install_replaces_the_named_vllm_functions(monkeypatch):
    punica_cpu, sampler = fake_vllm(monkeypatch, ops.OPS)
    ops.install()
    assert all(getattr(punica_cpu, name) is getattr(ops, name) for name in ops.OPS)
    assert sampler.batched_count_greater_than is ops.count_greater_or_equal


def test_install_refuses_a_vllm_whose_functions_were_renamed(monkeypatch):
    renamed = ops.OPS[0]
    punica_cpu, _ = fake_vllm(monkeypatch, [name for name in ops.OPS if name != renamed])
    with pytest.raises(RuntimeError, match=f"punica_cpu.{renamed}.*RLHFKIT_VLLM_CPU_OPS=vllm"):
        ops.install()
    assert not hasattr(punica_cpu, renamed)
