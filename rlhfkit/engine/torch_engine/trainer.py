"""The per-process LoRA trainer: forward/backward of a batch (or a data-parallel shard) with named losses,
Adam steps, states on disk. The local TrainingClient runs one in its own process; each Ray training worker
runs one (ray_backend/training.py), with `optim_step` given the all-reduce of the workers' gradients."""

from __future__ import annotations

import math
import weakref
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from rlhfkit.engine.torch_engine import losses
from rlhfkit.engine.model.allocator import share_one_arena, trim_if_grown, trim_soon
from rlhfkit.engine.model.attention import use_causal_attention
from rlhfkit.engine.torch_engine.batching import (
    microbatch_token_budget,
    pad_right,
    plan_microbatches,
    shape_multiple,
    token_logprobs,
)
from rlhfkit.engine.model.integrity import write_manifest
from rlhfkit.engine.model.lora import (
    LoraSpec,
    add_lora,
    adapter_state,
    load_adapter_state,
    load_adapter_tensors,
    read_meta,
    save_adapter,
)
from rlhfkit.engine.model.base import Precision, load_base_model, load_tokenizer
from rlhfkit.engine.types import AdamParams, Datum, ForwardBackwardOutput, OptimStepResponse, TensorData
from rlhfkit.errors import CheckpointError
from rlhfkit.utils.atomic import atomic_directory
from rlhfkit.utils.faults import fault_point

OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"

GradientReducer = Callable[[list[torch.nn.Parameter]], None]  # sums the gradients of all workers, in place


class LoraTrainer:
    """A frozen base with trainable LoRA adapters, its Adam optimizer and its step count."""

    def __init__(self, spec: LoraSpec, precision: Precision, microbatch_tokens: int | None = None):
        share_one_arena()  # one arena for all client threads (allocator.py); a no-op after the first call
        self.spec = spec
        self.precision = precision
        self.microbatch_budget = microbatch_token_budget(precision.device, training=True, configured=microbatch_tokens)
        self._multiple = shape_multiple(precision.device, precision.compute_dtype)  # widths and unembedded rows
        base = load_base_model(spec.base_model, precision)
        use_causal_attention(base)  # the batches below need no padding mask: plain causal attention
        self.model = add_lora(base, spec)
        self.optimizer: torch.optim.Optimizer | None = None
        self.optimizer_steps = 0
        self._nonfinite_loss = False  # set by a backward pass whose loss was NaN/inf; the next optim_step skips
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self._pad_id = load_tokenizer(spec.base_model).pad_token_id or 0
        weakref.finalize(self, trim_soon).atexit = False  # its activations' pages go back to the OS

    # ---------------------------------------------------------------------------------------------
    # Forward and backward

    @staticmethod
    def check(data: Sequence[Datum], loss_fn: str) -> None:
        """A clear error for an unknown loss or loss inputs that do not fit the data."""
        if loss_fn != "custom":
            losses.get_loss(loss_fn)
        for index, datum in enumerate(data):
            n = datum.model_input.length
            for key in losses.REQUIRED_INPUTS.get(loss_fn, ("target_tokens",)):
                if key not in datum.loss_fn_inputs:
                    raise ValueError(f"datum {index}: loss {loss_fn!r} needs loss_fn_inputs[{key!r}]")
            for key, value in datum.loss_fn_inputs.items():
                if len(value) != n:
                    raise ValueError(
                        f"datum {index}: loss_fn_inputs[{key!r}] has {len(value)} entries but the "
                        f"model input has {n} tokens"
                    )

    @staticmethod
    def _first_active_position(datum: Datum) -> int:
        """The first target position that any loss input (weights, advantages, sampler logprobs) touches.
        Positions before it (a prompt no loss looks at) need the decoder but not the unembedding, which is
        the costliest layer with a large vocabulary; their logprobs are reported as 0."""
        start = datum.model_input.length
        for key, value in datum.loss_fn_inputs.items():
            if key != "target_tokens":
                nonzero = np.flatnonzero(value.to_numpy())
                if nonzero.size:
                    start = min(start, int(nonzero[0]))
        return start

    def _run_batches(
        self, data: Sequence[Datum], per_microbatch: Callable[[list[int], list[torch.Tensor]], None], grad: bool
    ) -> list[torch.Tensor]:
        """Forward the data in length-sorted microbatches; hand each microbatch's per-datum target logprobs
        to `per_microbatch` (which may call backward). Returns detached logprobs in data order."""
        sequences = [d.model_input.to_ints() for d in data]
        targets = [d.loss_fn_inputs["target_tokens"].to_numpy().astype("int64").tolist() for d in data]
        # a forward pass reports every position's logprob (the reference's semantics: the SDK's custom losses
        # read them all); a backward pass skips the unembedding of positions no loss input touches
        starts = [self._first_active_position(d) for d in data] if grad else [0] * len(data)
        results: list[torch.Tensor | None] = [None] * len(data)
        base = self.model.get_base_model()
        decoder, unembedding = base.get_decoder(), base.get_output_embeddings()
        softcap = getattr(base.config, "final_logit_softcapping", None)
        device = self.precision.device
        self.model.train(grad)
        for batch in plan_microbatches([len(s) for s in sequences], self.microbatch_budget, self._multiple):
            # Right padding comes after each row's tokens, so in a causal model it changes none of their outputs:
            # no padding mask is needed, and without one attention runs as plain causal attention (attention.py in
            # bf16, else sdpa's causal kernel on the key/value heads as they are) instead of a masked kernel over
            # every position pair with the key/value heads repeated per query head.
            ids, _ = pad_right([sequences[i] for i in batch], self._pad_id, device, self._multiple)
            with torch.set_grad_enabled(grad):
                with self.precision.autocast:
                    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
                    active = torch.cat([hidden[row, starts[i] : len(sequences[i])] for row, i in enumerate(batch)])
                    count = active.shape[0]
                    extra = -count % self._multiple  # the unembedding's row count rounded too (shape_multiple)
                    if extra:
                        active = torch.cat([active, active.new_zeros((extra, active.shape[1]))])
                    logits = unembedding(active)[:count]
                if softcap:
                    logits = torch.tanh(logits.float() / softcap) * softcap
                active_targets = torch.tensor([t for i in batch for t in targets[i][starts[i] :]], device=device)
                logprobs = token_logprobs(logits, active_targets).split([len(sequences[i]) - starts[i] for i in batch])
                rows = [torch.cat([logprobs[row].new_zeros(starts[i]), logprobs[row]]) for row, i in enumerate(batch)]
                per_microbatch(batch, rows)
            for row, i in zip(rows, batch):
                results[i] = row.detach().float().cpu()
        return results  # type: ignore[return-value]

    def forward_backward(
        self, data: Sequence[Datum], loss_fn: str, loss_fn_config: dict | None, backward: bool
    ) -> ForwardBackwardOutput:
        """The named loss (a sum over the data) and its gradient, accumulated into the adapters' `.grad`."""
        self.check(data, loss_fn)
        loss = losses.get_loss(loss_fn)
        config = loss_fn_config or {}
        device = self.precision.device
        total = 0.0

        def per_microbatch(batch: list[int], rows: list[torch.Tensor]) -> None:
            nonlocal total
            value = torch.zeros((), device=device)
            for i, logprobs in zip(batch, rows):
                inputs = {
                    k: v.to_torch().to(device).float()
                    for k, v in data[i].loss_fn_inputs.items()
                    if k != "target_tokens"
                }
                value = value + loss(logprobs, inputs, config)
            if backward:
                value.backward()
            total += float(value.detach())

        logprobs = self._run_batches(data, per_microbatch, grad=backward)
        trim_if_grown()  # the heap's fragments of passes over other lengths go back to the OS (allocator.py)
        self._nonfinite_loss |= backward and not math.isfinite(total)
        return ForwardBackwardOutput(
            loss_fn_outputs=[{"logprobs": TensorData.from_torch(lp)} for lp in logprobs],
            metrics={"loss:sum": total},
        )

    def logprobs(self, data: Sequence[Datum]) -> list[torch.Tensor]:
        """Target-token logprobs of every datum, without gradient."""
        return self._run_batches(data, lambda batch, rows: None, grad=False)

    def forward_backward_custom(self, data: Sequence[Datum], fn: Callable) -> ForwardBackwardOutput:
        """`fn(data, logprobs_list) -> (loss, metrics)` over the whole batch's target logprobs (with grad)."""
        self.check(data, "custom")
        collected: dict[int, torch.Tensor] = {}

        def keep(batch: list[int], rows: list[torch.Tensor]) -> None:
            collected.update(zip(batch, rows))

        self._run_batches(data, keep, grad=True)
        logprobs = [collected[i] for i in range(len(data))]
        loss, metrics = fn(list(data), logprobs)
        loss.backward()
        trim_if_grown()
        self._nonfinite_loss |= not math.isfinite(float(loss.detach()))
        metrics = {"loss:sum": float(loss.detach()), **{k: float(v) for k, v in (metrics or {}).items()}}
        return ForwardBackwardOutput(
            loss_fn_outputs=[{"logprobs": TensorData.from_torch(lp.detach().float().cpu())} for lp in logprobs],
            metrics=metrics,
        )

    # ---------------------------------------------------------------------------------------------
    # Optimizer

    def _make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self._params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)

    def optim_step(self, params: AdamParams, reduce_gradients: GradientReducer | None = None) -> OptimStepResponse:
        """One AdamW step on the accumulated gradients (first summed over the workers by `reduce_gradients`),
        which are then cleared. A NaN/inf loss or gradient skips the step (weights, Adam state and step count
        unchanged) and reports optim/skipped_nonfinite = 1; summed gradients make every worker skip alike."""
        if self.optimizer is None:
            self.optimizer = self._make_optimizer()
        for group in self.optimizer.param_groups:
            group.update(
                lr=params.learning_rate,
                betas=(params.beta1, params.beta2),
                eps=params.eps,
                weight_decay=params.weight_decay,
            )
        if reduce_gradients is not None:
            reduce_gradients(self._params)
        grads = [p.grad for p in self._params if p.grad is not None]
        grad_norm = (
            float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
        )
        fault_point("optim_step")
        if self._nonfinite_loss or not math.isfinite(grad_norm):
            self._nonfinite_loss = False
            self.optimizer.zero_grad(set_to_none=True)
            return OptimStepResponse(metrics={"optim/grad_norm": grad_norm, "optim/skipped_nonfinite": 1.0})
        if params.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self._params, params.grad_clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        return OptimStepResponse(metrics={"optim/grad_norm": grad_norm, "optim/skipped_nonfinite": 0.0})

    # ---------------------------------------------------------------------------------------------
    # States and sampler weights on disk

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return adapter_state(self.model)

    def save(self, path: Path, kind: str) -> str:
        """Adapter weights (+ optimizer and RNG state for kind "state") in a directory written atomically."""
        peft_config = self.model.peft_config["default"].to_dict()
        with atomic_directory(path) as tmp:
            save_adapter(
                tmp,
                adapter_state(self.model),
                self.spec,
                peft_config,
                kind,
                extra={"optimizer_steps": self.optimizer_steps},
            )
            if kind == "state":
                optimizer = self.optimizer.state_dict() if self.optimizer is not None else None
                torch.save(optimizer, tmp / OPTIMIZER_FILE)
                torch.save({"torch": torch.get_rng_state()}, tmp / RNG_FILE)
            write_manifest(tmp)  # last: its presence means every file above was written
        return str(path.resolve())

    def load(self, path: str, with_optimizer: bool) -> None:
        """Adapter weights; with_optimizer: also Adam's state, the step count and the RNG state (else the
        optimizer starts fresh)."""
        load_adapter_state(self.model, load_adapter_tensors(path))
        if not with_optimizer:
            self.optimizer, self.optimizer_steps = None, 0
            return
        optimizer_path = Path(path) / OPTIMIZER_FILE
        if not optimizer_path.exists():
            raise CheckpointError(
                f"{path} has no optimizer state ({OPTIMIZER_FILE}): it is a sampler checkpoint; "
                f"use a path written by save_state"
            )
        try:
            state = torch.load(optimizer_path, weights_only=False)
        except Exception as e:  # a damaged file of an older checkpoint without checksums
            raise CheckpointError(f"checkpoint file {optimizer_path} cannot be read ({e})") from None
        self.optimizer = self._make_optimizer() if state is not None else None
        if state is not None:
            self.optimizer.load_state_dict(state)
        rng_path = Path(path) / RNG_FILE
        if rng_path.exists():
            torch.set_rng_state(torch.load(rng_path, weights_only=False)["torch"])
        self.optimizer_steps = read_meta(path).get("optimizer_steps", 0)
