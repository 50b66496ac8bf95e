"""Plain data types of the training/sampling service (names and semantics of the reference service).

Nothing here touches torch models; tensors appear only as the payload of `TensorData`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np

LossFnType = Literal["cross_entropy", "importance_sampling", "ppo", "cispo"]
StopReason = Literal["stop", "length"]


@dataclass(frozen=True)
class EncodedTextChunk:
    tokens: tuple[int, ...]

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class ModelInput:
    """A token sequence, kept as a list of chunks (only text chunks exist locally)."""

    chunks: tuple[EncodedTextChunk, ...] = ()

    @staticmethod
    def from_ints(tokens: Sequence[int]) -> ModelInput:
        return ModelInput((EncodedTextChunk(tuple(int(t) for t in tokens)),))

    @staticmethod
    def empty() -> ModelInput:
        return ModelInput(())

    def to_ints(self) -> list[int]:
        return [t for chunk in self.chunks for t in chunk.tokens]

    @property
    def length(self) -> int:
        return sum(chunk.length for chunk in self.chunks)

    def append(self, chunk: EncodedTextChunk) -> ModelInput:
        return ModelInput(self.chunks + (chunk,))

    def append_int(self, token: int) -> ModelInput:
        return self.append(EncodedTextChunk((int(token),)))


_DTYPES = {"int64": np.int64, "float32": np.float32}


@dataclass
class TensorData:
    """A flat array with a dtype name and shape, convertible to and from numpy/torch."""

    data: list[int] | list[float]
    dtype: Literal["int64", "float32"]
    shape: tuple[int, ...] | None = None

    @staticmethod
    def from_numpy(array: np.ndarray) -> TensorData:
        dtype = "int64" if np.issubdtype(array.dtype, np.integer) else "float32"
        return TensorData(array.reshape(-1).tolist(), dtype, tuple(array.shape))

    @staticmethod
    def from_torch(tensor: Any) -> TensorData:
        return TensorData.from_numpy(
            tensor.detach().cpu().float().numpy() if tensor.is_floating_point() else tensor.detach().cpu().numpy()
        )

    @staticmethod
    def from_list(values: Sequence[float] | Sequence[int], dtype: Literal["int64", "float32"]) -> TensorData:
        return TensorData(list(values), dtype, (len(values),))

    def to_numpy(self) -> np.ndarray:
        array = np.asarray(self.data, dtype=_DTYPES[self.dtype])
        return array.reshape(self.shape) if self.shape is not None else array

    def to_torch(self) -> Any:
        import torch  # local import: recipes may use TensorData without touching torch

        return torch.from_numpy(self.to_numpy())

    def tolist(self) -> list:
        return self.to_numpy().tolist()

    def __len__(self) -> int:
        return len(self.data)


def _as_tensor_data(value: Any) -> TensorData:
    if isinstance(value, TensorData):
        return value
    if isinstance(value, np.ndarray):
        return TensorData.from_numpy(value)
    if hasattr(value, "detach"):
        return TensorData.from_torch(value)
    array = np.asarray(value)
    return TensorData.from_numpy(array)


@dataclass
class Datum:
    """One training example: the model input and the per-position inputs of the loss."""

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.loss_fn_inputs = {k: _as_tensor_data(v) for k, v in self.loss_fn_inputs.items()}


@dataclass
class SamplingParams:
    """`stop`: None = stop at EOS only; [] = never stop early (not even EOS); list of strings or token ids."""

    max_tokens: int | None = None
    seed: int | None = None
    stop: list[str] | list[int] | str | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0


@dataclass
class AdamParams:
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclass
class SampledSequence:
    tokens: list[int]
    logprobs: list[float] | None
    stop_reason: StopReason


@dataclass
class SampleResponse:
    sequences: list[SampledSequence]


@dataclass
class ForwardBackwardOutput:
    """`loss_fn_outputs[i]["logprobs"]`: target-token logprobs of datum i under the pre-update weights."""

    loss_fn_outputs: list[dict[str, TensorData]]
    metrics: dict[str, float]


@dataclass
class OptimStepResponse:
    metrics: dict[str, float] | None = None


@dataclass
class SaveWeightsResponse:
    path: str


@dataclass
class NextTokenScores:
    """Scores of the next token after a prompt: the greedy (argmax) token and logprobs of candidates."""

    argmax_token: int
    candidate_logprobs: list[float]
