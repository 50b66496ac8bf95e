"""The local sampling client: batched generation with a KV cache, logprobs, and next-token scoring.

Concurrent `_async` calls (e.g. all rollouts of an RL batch, all matchups judged by a preference model) are
gathered by the client's batchers (sampling_api.py) and served by one batched computation, so recipes can
issue one request per sequence and still get large batches.

Two implementations of each computation, chosen per model by what its cache supports (see capabilities.py):
fast paths for attention-only models (left-padded batches, a preallocated decode cache, prefix keys/values
copied between rows) and a general path for any causal LM (recurrent or linear-attention layers, sliding
windows): decode batches of equal-length prompts in the model's own cache, right-padded scoring.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import weakref
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch

from rlhfkit.engine.futures import on_compute_thread, uses_compute_thread
from rlhfkit.engine.model.allocator import share_one_arena, trim_if_grown, trim_soon
from rlhfkit.engine.torch_engine.batching import (
    microbatch_token_budget,
    pad_left,
    pad_right,
    padded_width,
    plan_microbatches,
    shape_multiple,
    token_logprobs,
)
from rlhfkit.engine.torch_engine.capabilities import cache_capabilities
from rlhfkit.engine.model.lora import LoraSpec, add_lora, load_adapter_state
from rlhfkit.engine.model.base import Precision, load_base_model, load_tokenizer
from rlhfkit.engine.requests import Row, find_eos_ids, make_rows
from rlhfkit.engine.sampling_api import SamplingAPI
from rlhfkit.engine.settings import EngineSettings
from rlhfkit.engine.types import ModelInput, NextTokenScores, SampledSequence, SampleResponse, SamplingParams


MIN_SHARED_PREFIX = 32  # tokens; shorter shared prefixes are not worth a separate pass
LOGITS_BYTES = 128 << 20  # most logits one compute_logprobs pass holds (_scoring_budget)
INITIAL_ROOM = 256  # new tokens the decode cache has room for at first (it grows when rows go on longer)


def shared_prefix_groups(sequences: Sequence[Sequence[int]]) -> list[tuple[int, list[int]]]:
    """Group sequences by long shared prefixes: [(prefix length, indices)], prefix length 0 for a sequence that
    shares nothing worth sharing. Neighbours in sorted order join a group while they keep at least 90% of the
    group's common prefix, so a group gets the longest prefix its members share; every member keeps at least
    its last token outside the prefix (its logits come from the suffix pass)."""
    order = sorted(range(len(sequences)), key=lambda i: sequences[i])
    groups: list[tuple[int, list[int]]] = []
    members: list[int] = []
    common = 0

    def close() -> None:
        if len(members) > 1 and common >= MIN_SHARED_PREFIX:
            groups.append((common, list(members)))
        else:
            groups.extend((0, [i]) for i in members)

    for i in order:
        seq = sequences[i]
        if members:
            first = sequences[members[0]]
            limit = min(common if len(members) > 1 else len(first) - 1, len(seq) - 1)
            shared = 0
            while shared < limit and seq[shared] == first[shared]:
                shared += 1
            if shared >= MIN_SHARED_PREFIX and (len(members) == 1 or shared >= 0.9 * common):
                members.append(i)
                common = shared
                continue
            close()
        members, common = [i], 0
    if members:
        close()
    return groups


@contextlib.contextmanager
def last_positions_only(model: torch.nn.Module, last: torch.Tensor):
    """While active, the decoder hands the head one position per row (`last[row]`) instead of all of them, so
    with right padding the model's own head (soft-capping, logit scaling and all) computes each row's
    last-position logits alone; call the model with logits_to_keep=1."""

    def keep(module, args, output):
        output.last_hidden_state = output.last_hidden_state[torch.arange(len(last)), last][:, None]
        return output

    handle = model.get_decoder().register_forward_hook(keep)
    try:
        yield
    finally:
        handle.remove()


def contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    """A forward pre-hook for the unembedding: its input as one contiguous block. With logits_to_keep=1 the
    model hands the head `hidden[:, -1:]`, a strided view, which torch's matmul cannot fold into one matrix
    product: it multiplies batch-wise with the 49k x 576 weight copied once per row (in a profile of judging,
    a quarter of the time went to that copy). A contiguous input folds into one product; an input that is
    contiguous already is passed on as is."""
    return (args[0].contiguous(), *args[1:])


@functools.cache
def _preallocated_layer_class() -> type:
    """Defined on first use, so that importing the engine does not import transformers."""
    from transformers.cache_utils import DynamicLayer

    class _PreallocatedLayer(DynamicLayer):
        """One layer's KV cache with room allocated ahead: a decode step writes its key/value in place and attention
        reads the filled part (transformers' DynamicLayer concatenates, copying the whole cache at every step).
        Rows are the batch dimension; the first `length` columns are filled."""

        def __init__(self, rows: int, like_keys: torch.Tensor, like_values: torch.Tensor, capacity: int, length: int):
            super().__init__()
            heads, dim, value_dim = like_keys.shape[1], like_keys.shape[-1], like_values.shape[-1]
            self.dtype, self.device = like_keys.dtype, like_keys.device
            self._keys = like_keys.new_zeros((rows, heads, capacity, dim))
            self._values = like_values.new_zeros((rows, heads, capacity, value_dim))
            self.length = length
            self.is_initialized = True
            self._expose()

        def _expose(self) -> None:
            self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]

        def write_rows(self, rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
            """Prefill: keys/values of `rows`, right-aligned at column `length`."""
            self._keys[rows, :, self.length - keys.shape[2] : self.length] = keys
            self._values[rows, :, self.length - values.shape[2] : self.length] = values

        def _reallocate(self, rows: torch.Tensor | None, capacity: int) -> None:
            keys = self._keys.new_empty(
                (
                    self._keys.shape[0] if rows is None else len(rows),
                    *self._keys.shape[1:2],
                    capacity,
                    self._keys.shape[-1],
                )
            )
            values = self._values.new_empty((keys.shape[0], *self._values.shape[1:2], capacity, self._values.shape[-1]))
            source_keys, source_values = self.keys, self.values
            if rows is not None:
                source_keys, source_values = source_keys[rows], source_values[rows]
            keys[:, :, : self.length] = source_keys
            values[:, :, : self.length] = source_values
            self._keys, self._values = keys, values
            self._expose()

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            pass  # allocated in __init__

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            end = self.length + key_states.shape[-2]
            if end > self._keys.shape[2]:
                self._reallocate(None, max(end, 2 * self._keys.shape[2]))
            self._keys[:, :, self.length : end] = key_states
            self._values[:, :, self.length : end] = value_states
            self.length = end
            self._expose()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self._reallocate(indices, self._keys.shape[2])

    return _PreallocatedLayer


Reducer = Callable[[int, torch.Tensor], Any]  # (sequence index, its logits) -> what is kept of them


def _keep(index: int, logits: torch.Tensor) -> torch.Tensor:
    return logits


def adapter_model(spec: LoraSpec, tensors: dict[str, torch.Tensor], precision: Precision) -> torch.nn.Module:
    """The shared base (model/base.py: load_base_model) with the LoRA adapter `tensors` in PEFT's LoRA layers, frozen:
    the transformers model inside the PEFT wrapper (its forward takes every argument the sampler passes).

    Computing in bf16/fp16, the adapter is kept in that dtype: autocast would cast the fp32 adapter to it in every
    forward, two casts per adapted layer and decoded token (the same rounding once here: the same outputs)."""
    peft_model = add_lora(load_base_model(spec.base_model, precision), spec)
    load_adapter_state(peft_model, tensors)
    peft_model.requires_grad_(False)
    if precision.compute_dtype != torch.float32:
        for name, param in peft_model.named_parameters():
            if ".lora_" in name:
                param.data = param.data.to(precision.compute_dtype)
    return peft_model.get_base_model()


def _trimming(method):
    """The sampler's batch primitive, then trim_if_grown (allocator.py): passes over other shapes fragment the
    heap."""

    @functools.wraps(method)
    def run(self, *args):
        try:
            return method(self, *args)
        finally:
            trim_if_grown()

    return run


class SamplingClient(SamplingAPI):
    """Samples from (and scores with) a frozen model in this process: the base model, or the base model with a
    LoRA adapter applied in each forward (adapter_model). Every sampling and training client of one (model,
    device, dtype) shares the process's one copy of the base weights (model/base.py: load_base_model), so a client costs
    its adapter, not a model. The public methods are SamplingAPI's; this class computes its batch primitives
    with torch. `settings`: the engine's tuning fields (sampling_batch, share_prefixes, fast_paths,
    microbatch_tokens)."""

    def __init__(
        self, base_model: str, model: torch.nn.Module, precision: Precision, settings: EngineSettings | None = None
    ):
        share_one_arena()  # one arena for all client threads (allocator.py); a no-op after the first call
        super().__init__("rlhfkit-sampling", shared=uses_compute_thread(precision.device))
        self.base_model = base_model
        self.model = model.eval()
        self.precision = precision
        self.tokenizer = load_tokenizer(base_model)
        self._pad_id = self.tokenizer.pad_token_id or 0
        self._eos_ids = find_eos_ids(
            self.tokenizer, getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        )
        self._context = int(getattr(model.config, "max_position_embeddings", 4096) or 4096)
        self._cache = on_compute_thread(precision.device, cache_capabilities, base_model, self.model)
        self.settings = settings = settings or EngineSettings()
        self._fast_paths = self._cache.attention_only and settings.fast_paths
        self._budget = microbatch_token_budget(precision.device, configured=settings.microbatch_tokens)
        self._multiple = shape_multiple(precision.device, precision.compute_dtype)  # padded widths (batching.py)
        self.model.get_output_embeddings().register_forward_pre_hook(contiguous_input)
        weakref.finalize(self, trim_soon).atexit = False  # its activations' pages go back to the OS

    @classmethod
    def from_base(cls, base_model: str, precision: Precision, settings: EngineSettings | None = None) -> SamplingClient:
        return cls(
            base_model, on_compute_thread(precision.device, load_base_model, base_model, precision), precision, settings
        )

    @classmethod
    def from_adapter(
        cls,
        spec: LoraSpec,
        tensors: dict[str, torch.Tensor],
        precision: Precision,
        settings: EngineSettings | None = None,
    ) -> SamplingClient:
        """A sampler on the shared base with the adapter applied in every forward (lora.py's fused LoRA
        forward, as in training), never merged: the client holds the adapter's tensors, not a copy of the base.
        Freed with the client (nothing else refers to its model)."""
        model = on_compute_thread(precision.device, adapter_model, spec, tensors, precision)
        return cls(spec.base_model, model, precision, settings)

    def with_settings(self, **changes) -> SamplingClient:
        """A client on the same model (and adapter) with other tuning settings, e.g. fast_paths=False to
        measure or check the general path."""
        return SamplingClient(self.base_model, self.model, self.precision, replace(self.settings, **changes))

    # ---------------------------------------------------------------------------------------------
    # Generation

    @_trimming
    def _sample_many(self, requests: list[tuple[ModelInput, int, SamplingParams]]) -> list[SampleResponse]:
        """Serve (prompt, num_samples, params) requests together: rows sorted by prompt length, in batches of at
        most settings.sampling_batch rows (the general path: one batch per prompt length)."""
        per_request = [make_rows(prompt, n, params, self._eos_ids, self._context) for prompt, n, params in requests]
        for row in (row for rows in per_request for row in rows):
            row.generator = torch.Generator().manual_seed(row.seed)
        rows = [row for group in per_request for row in group]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].prompt))
        limit = self.settings.sampling_batch
        if self._fast_paths:
            for start in range(0, len(order), limit):
                self._generate([rows[i] for i in order[start : start + limit]])
        else:  # one batch per prompt length: no padding
            by_length: dict[int, list[Row]] = {}
            for i in order:
                by_length.setdefault(len(rows[i].prompt), []).append(rows[i])
            for group in by_length.values():
                for start in range(0, len(group), limit):
                    self._generate_unpadded(group[start : start + limit])
        return [
            SampleResponse([SampledSequence(r.tokens, r.logprobs, r.stop_reason) for r in group])
            for group in per_request
        ]

    def _choose(self, logits: torch.Tensor, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
        """Next token per row and its logprob under the temperature-scaled distribution (inverse-CDF draws
        from each row's own generator; greedy rows take the argmax)."""
        logits = logits.float()
        temps = torch.tensor([r.temperature if r.temperature > 0 else 1.0 for r in rows], device=logits.device)
        logp = torch.log_softmax(logits / temps[:, None], dim=-1)
        probs = logp.exp()
        if any(r.top_k > 0 or r.top_p < 1.0 for r in rows):
            probs, index = probs.sort(dim=-1, descending=True)
            vocab = probs.shape[-1]
            ks = torch.tensor([r.top_k if r.top_k > 0 else vocab for r in rows], device=probs.device)
            ps = torch.tensor([r.top_p for r in rows], device=probs.device)
            rank = torch.arange(vocab, device=probs.device)[None, :]
            keep = (rank < ks[:, None]) & ((probs.cumsum(-1) - probs) < ps[:, None])
            probs = probs * keep
        else:
            index = None
        cdf = probs.cumsum(-1)
        u = torch.stack([torch.rand((), generator=r.generator) for r in rows]).to(cdf.device) * cdf[:, -1]
        choice = torch.searchsorted(cdf, u[:, None]).clamp(max=cdf.shape[-1] - 1).squeeze(-1)
        tokens = index.gather(-1, choice[:, None]).squeeze(-1) if index is not None else choice
        greedy = torch.tensor([r.temperature <= 0 for r in rows], device=logits.device)
        tokens = torch.where(greedy, logits.argmax(-1), tokens)
        return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)

    def _finished(self, row: Row) -> bool:
        token = row.tokens[-1]
        if token in row.stop_ids:
            row.stop_reason = "stop"
        elif row.stop_strings:
            longest = max(len(s) for s in row.stop_strings)
            tail = self.tokenizer.decode(row.tokens[-(longest + 2) :])
            if any(s in tail for s in row.stop_strings):
                row.stop_reason = "stop"
        if row.stop_reason is None and len(row.tokens) >= row.max_tokens:
            row.stop_reason = "length"
        return row.stop_reason is not None

    def _advance(self, logits: torch.Tensor, batch_rows: list[Row]) -> tuple[torch.Tensor, list[int]]:
        """Choose each row's next token and record it on the rows still running. Returns the chosen tokens and
        the batch slots still running."""
        tokens, logprobs = self._choose(logits, batch_rows)
        for row, token, logprob in zip(batch_rows, tokens.tolist(), logprobs.tolist()):
            if row.stop_reason is None:
                row.tokens.append(token)
                row.logprobs.append(logprob)
                self._finished(row)
        return tokens, [slot for slot, row in enumerate(batch_rows) if row.stop_reason is None]

    def _prefill(self, rows: list[Row]) -> tuple[Any, torch.Tensor, int]:
        """Run the prompts into a KV cache with room to grow. Each distinct prompt is computed once (a group of
        samples of one prompt shares it), in length-sorted microbatches (little padding); its keys/values are
        copied into the rows that use it, right-aligned at column `width` (left padding, masked out).
        Returns (cache, last-position logits per row, width)."""
        from transformers.cache_utils import Cache

        distinct: dict[tuple[int, ...], int] = {}
        prompt_of_row = [distinct.setdefault(tuple(r.prompt), len(distinct)) for r in rows]
        prompts = [list(p) for p in distinct]
        width = padded_width([len(p) for p in prompts], self._multiple)
        rows_of_prompt: list[list[int]] = [[] for _ in prompts]
        for row, k in enumerate(prompt_of_row):
            rows_of_prompt[k].append(row)
        capacity = width + min(max(r.max_tokens for r in rows), INITIAL_ROOM)
        layer_class = _preallocated_layer_class()
        layers: list[Any] = []
        logits = None
        for batch in plan_microbatches([len(p) for p in prompts], self._budget, self._multiple):
            ids, mask, positions = pad_left(
                [prompts[k] for k in batch], self._pad_id, self.precision.device, self._multiple
            )
            with self.precision.autocast:
                out = self.model(
                    input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
                )
            source = torch.tensor([j for j, k in enumerate(batch) for _ in rows_of_prompt[k]], device=ids.device)
            target = torch.tensor([row for k in batch for row in rows_of_prompt[k]], device=ids.device)
            step_logits = out.logits[:, -1]
            if logits is None:
                logits = step_logits.new_empty((len(rows), step_logits.shape[-1]))
            logits[target] = step_logits[source]
            for i, layer in enumerate(out.cache.layers):
                if len(layers) <= i:
                    layers.append(layer_class(len(rows), layer.keys, layer.values, capacity, width))
                layers[i].write_rows(target, layer.keys[source], layer.values[source])
        return Cache(layers=layers), logits, width

    @torch.inference_mode()
    def _generate(self, rows: list[Row]) -> None:
        """Generate all rows together: prefill (see _prefill), then one token per step for every row with a
        preallocated KV cache written in place. Finished rows leave the batch once they are an eighth of it
        (dropping them copies the cache, so it is not done for every single row)."""
        device = self.precision.device
        cache, logits, width = self._prefill(rows)
        mask = torch.zeros((len(rows), width + max(r.max_tokens for r in rows)), dtype=torch.long, device=device)
        for row, r in enumerate(rows):
            mask[row, width - len(r.prompt) : width] = 1
        next_position = torch.tensor([len(r.prompt) for r in rows], device=device)
        active = list(range(len(rows)))  # the row of each batch slot
        length = width
        while True:
            tokens, alive = self._advance(logits, [rows[i] for i in active])
            if not alive:
                return
            if 8 * (len(active) - len(alive)) >= len(active):
                index = torch.tensor(alive, device=device)
                cache.batch_select_indices(index)
                tokens, mask, next_position = tokens[index], mask[index], next_position[index]
                active = [active[slot] for slot in alive]
            mask[:, length] = 1
            length += 1
            with self.precision.autocast:
                out = self.model(
                    input_ids=tokens[:, None],
                    attention_mask=mask[:, :length],
                    position_ids=next_position[:, None],
                    cache=cache,
                    use_cache=True,
                )
            logits = out.logits[:, -1]
            next_position = next_position + 1

    @torch.inference_mode()
    def _generate_unpadded(self, rows: list[Row]) -> None:
        """The general decode loop, for any causal LM: all rows have prompts of one length, so nothing is padded
        (padding would enter a recurrent layer's state). Each distinct prompt is prefilled once into the model's
        own cache, whose rows are then repeated for the samples (reorder_cache); finished rows leave the batch
        once they are an eighth of it. A cache that cannot select rows gets one prefill row per sample and keeps
        finished rows (their tokens are not recorded)."""
        device = self.precision.device
        selects = self._cache.selects_rows
        distinct: dict[tuple[int, ...], int] = {}
        prompt_of_row = [
            distinct.setdefault(tuple(r.prompt), len(distinct)) if selects else i for i, r in enumerate(rows)
        ]
        prompts = list(distinct) if selects else [r.prompt for r in rows]
        with self.precision.autocast:
            out = self.model(input_ids=torch.tensor(prompts, device=device), use_cache=True, logits_to_keep=1)
        cache, index = out.cache, torch.tensor(prompt_of_row, device=device)
        if selects and len(prompts) < len(rows):
            cache.reorder_cache(index)
        logits = out.logits[index, -1]
        position = len(rows[0].prompt)
        active = list(range(len(rows)))  # the row of each batch slot
        while True:
            tokens, alive = self._advance(logits, [rows[i] for i in active])
            if not alive:
                return
            if selects and 8 * (len(active) - len(alive)) >= len(active):
                index = torch.tensor(alive, device=device)
                cache.reorder_cache(index)
                tokens, active = tokens[index], [active[slot] for slot in alive]
            with self.precision.autocast:
                out = self.model(
                    input_ids=tokens[:, None],
                    position_ids=torch.full_like(tokens[:, None], position),
                    cache=cache,
                    use_cache=True,
                )
            logits = out.logits[:, -1]
            position += 1

    # ---------------------------------------------------------------------------------------------
    # Scoring

    def _forward_left_padded(
        self, sequences: Sequence[list[int]], keep_last_only: bool, reduce: Reducer = _keep
    ) -> list[Any]:
        """`reduce(index, logits)` of each sequence's logits, computed in length-sorted microbatches; with
        keep_last_only just the last position's logits (the unembedding runs on one position: much cheaper with a
        large vocabulary). Each microbatch's logits are reduced before the next is computed, so the logits held
        are one microbatch's (the token budget bounds them, not the number of sequences)."""
        results: list[Any] = [None] * len(sequences)
        for batch in plan_microbatches(
            [len(s) for s in sequences], self._scoring_budget(keep_last_only), self._multiple
        ):
            ids, mask, positions = pad_left(
                [sequences[i] for i in batch], self._pad_id, self.precision.device, self._multiple
            )
            with torch.inference_mode(), self.precision.autocast:
                logits = self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=False,
                    logits_to_keep=1 if keep_last_only else 0,
                ).logits
            for row, i in enumerate(batch):
                results[i] = reduce(
                    i, logits[row, -1] if keep_last_only else logits[row, ids.shape[1] - len(sequences[i]) :]
                )
            del logits
        return results

    def _forward_right_padded(
        self, sequences: Sequence[list[int]], keep_last_only: bool, reduce: Reducer = _keep
    ) -> list[Any]:
        """The general path's _forward_left_padded: right padding comes after each row's tokens, so it changes
        none of their logits in any causal model and needs no padding mask (plain causal attention); with
        keep_last_only the head sees each row's last position only (last_positions_only)."""
        results: list[Any] = [None] * len(sequences)
        for batch in plan_microbatches(
            [len(s) for s in sequences], self._scoring_budget(keep_last_only), self._multiple
        ):
            ids, _ = pad_right([sequences[i] for i in batch], self._pad_id, self.precision.device, self._multiple)
            last = torch.tensor([len(sequences[i]) - 1 for i in batch], device=ids.device)
            with (
                torch.inference_mode(),
                self.precision.autocast,
                last_positions_only(self.model, last) if keep_last_only else contextlib.nullcontext(),
            ):
                logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=1 if keep_last_only else 0).logits
            for row, i in enumerate(batch):
                results[i] = reduce(i, logits[row, -1] if keep_last_only else logits[row, : len(sequences[i])])
            del logits
        return results

    def _scoring_budget(self, keep_last_only: bool) -> int:
        """Padded tokens per scoring pass: the token budget, and with every position's logits (compute_logprobs)
        at most as many as keep LOGITS_BYTES of logits in the compute dtype. A 4,096-token pass held 384 MiB of
        bf16 logits for SmolLM2's 49k vocabulary (the RL loop's KL reference: the largest allocation of its
        scoring); passes of 1,365 tokens hold 128 MiB and cost one more fixed per-pass share each."""
        if keep_last_only:
            return self._budget
        head = self.model.get_output_embeddings()
        vocabulary = getattr(head, "out_features", None) or self.model.config.vocab_size
        itemsize = torch.finfo(self.precision.compute_dtype).bits // 8
        return max(1, min(self._budget, LOGITS_BYTES // (vocabulary * itemsize)))

    def _forward(self, sequences: Sequence[list[int]], keep_last_only: bool, reduce: Reducer = _keep) -> list[Any]:
        if self._fast_paths:
            return self._forward_left_padded(sequences, keep_last_only, reduce)
        return self._forward_right_padded(sequences, keep_last_only, reduce)

    @_trimming
    def _logprobs_many(self, prompts: list[ModelInput]) -> list[list[float | None]]:
        sequences = [p.to_ints() for p in prompts]

        def logprobs(i: int, logits: torch.Tensor) -> list[float | None]:
            target = torch.as_tensor(sequences[i][1:], dtype=torch.long, device=logits.device)
            return [None] + token_logprobs(logits[:-1], target).tolist()

        return self._forward(sequences, keep_last_only=False, reduce=logprobs)

    @torch.inference_mode()
    def _last_logits_sharing_prefixes(self, sequences: list[list[int]], reduce: Reducer = _keep) -> list[Any]:
        """Last-position logits, computing each shared prefix once: the matchups a preference model judges
        share the conversation and, for one player as A, everything up to B's reply. Each prefix's keys/values
        are computed once, copied to the sequences that share it, and only their suffixes are run."""
        groups = shared_prefix_groups(sequences)
        results: list[Any] = [None] * len(sequences)
        alone = [g[1][0] for g in groups if g[0] == 0]
        for i, value in zip(
            alone,
            self._forward_left_padded(
                [sequences[i] for i in alone], keep_last_only=True, reduce=lambda k, logits: reduce(alone[k], logits)
            ),
        ):
            results[i] = value
        shared = [g for g in groups if g[0] > 0]
        device = self.precision.device
        for batch in plan_microbatches([g[0] for g in shared], self._budget, self._multiple):
            prefixes = [sequences[shared[k][1][0]][: shared[k][0]] for k in batch]
            ids, mask, positions = pad_left(prefixes, self._pad_id, device, self._multiple)
            with self.precision.autocast:
                prefix_cache = self.model(
                    input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
                ).cache
            members = [(j, i) for j, k in enumerate(batch) for i in shared[k][1]]
            # rows x (prefix width + suffix width) within the token budget bounds the copied cache too
            lengths = [ids.shape[1] + len(sequences[i]) - shared[batch[j]][0] for j, i in members]
            for chunk in plan_microbatches(lengths, self._budget, self._multiple):
                rows = [members[c] for c in chunk]
                cache = copy.copy(prefix_cache)
                cache.layers = [copy.copy(layer) for layer in prefix_cache.layers]
                cache.batch_select_indices(torch.tensor([j for j, _ in rows], device=device))
                suffixes = [sequences[i][shared[batch[j]][0] :] for j, i in rows]
                suffix_ids, suffix_mask, suffix_positions = pad_left(suffixes, self._pad_id, device, self._multiple)
                starts = torch.tensor([shared[batch[j]][0] for j, _ in rows], device=device)
                with self.precision.autocast:
                    logits = self.model(
                        input_ids=suffix_ids,
                        attention_mask=torch.cat([mask[[j for j, _ in rows]], suffix_mask], dim=1),
                        position_ids=suffix_positions + starts[:, None],
                        cache=cache,
                        use_cache=True,
                        logits_to_keep=1,
                    ).logits
                for row, (_, i) in enumerate(rows):
                    results[i] = reduce(i, logits[row, -1])
        return results

    @torch.inference_mode()
    def _last_logits_sharing_prefixes_unpadded(self, sequences: list[list[int]], reduce: Reducer = _keep) -> list[Any]:
        """The general path's _last_logits_sharing_prefixes: each shared prefix is run alone (no padding) into
        the model's own cache, whose row is repeated for the sequences that share it (reorder_cache on a copy);
        their suffixes follow right-padded, and the head reads each row's last real position."""
        groups = shared_prefix_groups(sequences)
        results: list[Any] = [None] * len(sequences)
        alone = [g[1][0] for g in groups if g[0] == 0]
        for i, value in zip(
            alone,
            self._forward_right_padded(
                [sequences[i] for i in alone], keep_last_only=True, reduce=lambda k, logits: reduce(alone[k], logits)
            ),
        ):
            results[i] = value
        device = self.precision.device
        for common, members in (g for g in groups if g[0] > 0):
            with self.precision.autocast:
                prefix_cache = self.model(
                    input_ids=torch.tensor([sequences[members[0]][:common]], device=device),
                    use_cache=True,
                    logits_to_keep=1,
                ).cache
            for chunk in plan_microbatches([len(sequences[i]) for i in members], self._budget):
                rows = [members[c] for c in chunk]
                cache = copy.deepcopy(prefix_cache)
                cache.reorder_cache(torch.zeros(len(rows), dtype=torch.long, device=device))
                ids, mask = pad_right([sequences[i][common:] for i in rows], self._pad_id, device)
                mask = torch.cat([mask.new_ones((len(rows), common)), mask], dim=1)
                positions = torch.arange(common, common + ids.shape[1], device=device).expand(len(rows), -1)
                last = torch.tensor([len(sequences[i]) - common - 1 for i in rows], device=device)
                with self.precision.autocast, last_positions_only(self.model, last):
                    logits = self.model(
                        input_ids=ids,
                        attention_mask=mask,
                        position_ids=positions,
                        cache=cache,
                        use_cache=True,
                        logits_to_keep=1,
                    ).logits
                for row, i in enumerate(rows):
                    results[i] = reduce(i, logits[row, -1])
        return results

    @_trimming
    def _score_many(self, prompts: list[ModelInput], candidates: Sequence[int]) -> list[NextTokenScores]:
        """Each prompt's last-position logits reduced to its greedy token and its candidates' logprobs as soon as
        its microbatch is computed (the full-vocabulary logits of all prompts are never held together)."""
        sequences = [p.to_ints() for p in prompts]
        chosen_ids = list(candidates)

        def score(i: int, last_logits: torch.Tensor) -> NextTokenScores:
            logits = last_logits.float()
            logp = torch.log_softmax(logits, dim=-1)
            chosen = logp[chosen_ids].tolist() if chosen_ids else []
            return NextTokenScores(int(logits.argmax(-1)), chosen)

        if self.settings.share_prefixes and self._fast_paths:
            return self._last_logits_sharing_prefixes(sequences, score)
        if self.settings.share_prefixes and self._cache.selects_rows:
            return self._last_logits_sharing_prefixes_unpadded(sequences, score)
        return self._forward(sequences, keep_last_only=True, reduce=score)
