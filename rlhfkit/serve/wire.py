"""Wire formats of the Tinker API <-> the engine's types.

The schema is the official SDK's (`tinker.proto.tinker_public_pb2`, `tinker.types`), imported, not retyped: a new
SDK release is a version bump and a test run. Protobuf carries `forward_backward` requests and the
`ForwardBackwardOutput` / `SampleResponse` results (SDK 0.38 accepts only protobuf for those two); every other
body is JSON validated by the SDK's pydantic request models.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from tinker.proto import tinker_public_pb2 as pb

from rlhfkit.engine import types as et
from rlhfkit.serve.errors import UserError

_NUMPY = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}
_NAMES = {pb.DTYPE_FLOAT32: "float32", pb.DTYPE_INT64: "int64", pb.DTYPE_INT32: "int64"}


# --------------------------------------------------------------------------------------------------
# Requests


def parse_forward_backward(body: bytes) -> pb.ForwardBackwardRequest:
    message = pb.ForwardBackwardRequest()
    try:
        message.ParseFromString(body)
    except DecodeError as e:
        raise UserError(f"forward_backward: the body is not a ForwardBackwardRequest protobuf ({e})") from None
    if not message.model_id:
        raise UserError("forward_backward: model_id is missing")
    return message


def loss_config(message: pb.ForwardBackwardRequest) -> dict[str, Any] | None:
    """loss_fn_config: the v2 map (numbers and strings) when set, else the legacy float map."""
    if message.loss_fn_config_v2:
        return {
            k: (v.text if v.WhichOneof("value") == "text" else v.number) for k, v in message.loss_fn_config_v2.items()
        }
    return dict(message.loss_fn_config) or None


def _tensor(message: pb.Tensor, where: str) -> et.TensorData:
    if message.dtype not in _NUMPY:
        raise UserError(f"{where}: tensor dtype {pb.DType.Name(message.dtype)} is not supported (float32, int64)")
    dtype = _NUMPY[message.dtype]
    shape = tuple(int(s) for s in message.shape)
    if message.WhichOneof("encoding") == "sparse_csr":
        csr = message.sparse_csr
        values = np.frombuffer(csr.values, dtype=dtype)
        crow = np.frombuffer(csr.crow_indices, dtype=np.int64)
        col = np.frombuffer(csr.col_indices, dtype=np.int64)
        if len(shape) != 2 or len(crow) != shape[0] + 1 or len(col) != len(values):
            raise UserError(f"{where}: a sparse CSR tensor whose indices do not fit its shape {list(shape)}")
        dense = np.zeros(shape, dtype=dtype)
        for row in range(shape[0]):
            lo, hi = int(crow[row]), int(crow[row + 1])
            dense[row, col[lo:hi]] = values[lo:hi]
        array = dense
    else:
        raw = message.dense
        if len(raw) % np.dtype(dtype).itemsize:
            raise UserError(f"{where}: {len(raw)} bytes is not a whole number of {np.dtype(dtype).name} values")
        array = np.frombuffer(raw, dtype=dtype)
        if shape:
            if int(np.prod(shape)) != array.size:
                raise UserError(f"{where}: shape {list(shape)} does not fit its {array.size} values")
            array = array.reshape(shape)
    if array.ndim != 1:
        raise UserError(f"{where}: loss inputs are one value per token (1-D); got shape {list(array.shape)}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise UserError(f"{where}: holds NaN or infinite values")
    return et.TensorData(array.tolist(), _NAMES[message.dtype], tuple(array.shape))


def model_input_from_chunks(chunks: Any, where: str) -> et.ModelInput:
    out: list[et.EncodedTextChunk] = []
    for c, chunk in enumerate(chunks):
        kind = chunk.WhichOneof("chunk") if hasattr(chunk, "WhichOneof") else None
        if kind != "encoded_text":
            raise UserError(
                f"{where}.model_input[{c}]: {kind or 'unknown'} chunks are not supported (text tokens only)"
            )
        tokens = chunk.encoded_text.tokens
        if len(tokens) % 4:
            raise UserError(f"{where}.model_input[{c}]: tokens are not int32 bytes")
        out.append(et.EncodedTextChunk(tuple(int(t) for t in np.frombuffer(tokens, dtype=np.int32))))
    return et.ModelInput(tuple(out))


def data_from_proto(message: pb.ForwardBackwardRequest) -> list[et.Datum]:
    data = []
    for i, datum in enumerate(message.data):
        where = f"data[{i}]"
        model_input = model_input_from_chunks(datum.model_input, where)
        inputs = {name: _tensor(t, f"{where}.loss_fn_inputs[{name!r}]") for name, t in datum.loss_fn_inputs.items()}
        data.append(et.Datum(model_input, inputs))
    if not data:
        raise UserError("forward_backward: data is empty")
    return data


def model_input_from_json(model_input: Any, where: str = "prompt") -> et.ModelInput:
    """A tinker.types.ModelInput (pydantic) -> the engine's ModelInput (text chunks only)."""
    chunks = []
    for c, chunk in enumerate(model_input.chunks):
        if getattr(chunk, "type", None) != "encoded_text":
            raise UserError(f"{where}.chunks[{c}]: {chunk.type} chunks are not supported (text tokens only)")
        chunks.append(et.EncodedTextChunk(tuple(int(t) for t in chunk.tokens)))
    return et.ModelInput(tuple(chunks))


def sampling_params(params: Any) -> et.SamplingParams:
    stop = params.stop
    if isinstance(stop, str):
        stop = [stop]
    return et.SamplingParams(
        max_tokens=params.max_tokens,
        seed=params.seed,
        stop=list(stop) if stop is not None else None,
        temperature=float(params.temperature),
        top_k=int(params.top_k),
        top_p=float(params.top_p),
    )


# --------------------------------------------------------------------------------------------------
# Results


def forward_backward_output(output: et.ForwardBackwardOutput) -> bytes:
    """One ArrayRecord holding every datum's `logprobs` (and any other per-datum field), byte offsets per datum."""
    message = pb.ForwardBackwardOutput()
    message.loss_fn_output_type = "ArrayRecord"
    for key, value in output.metrics.items():
        message.metrics[key if ":" in key else f"{key}:mean"] = float(value)
    record = message.loss_fn_outputs.add()
    record.type_tag = "ArrayRecord"
    record.num_datums = len(output.loss_fn_outputs)
    names = sorted({name for out in output.loss_fn_outputs for name in out})
    for name in names:
        arrays = [np.asarray(out[name].to_numpy()) for out in output.loss_fn_outputs]
        floating = any(np.issubdtype(a.dtype, np.floating) for a in arrays)
        dtype = np.float32 if floating else np.int64
        arrays = [a.astype(dtype).reshape(-1) for a in arrays]
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([a.nbytes for a in arrays])
        field = record.fields[name]
        field.data = b"".join(a.tobytes() for a in arrays)
        field.offsets = offsets.tobytes()
        field.dtype = pb.DTYPE_FLOAT32 if floating else pb.DTYPE_INT64
    return message.SerializeToString()


def sample_response(response: et.SampleResponse, prompt_logprobs: list[float | None] | None) -> bytes:
    message = pb.SampleResponse()
    for sequence in response.sequences:
        out = message.sequences.add()
        out.stop_reason = pb.STOP_REASON_STOP if sequence.stop_reason == "stop" else pb.STOP_REASON_LENGTH
        out.tokens = np.asarray(sequence.tokens, dtype=np.int32).tobytes()
        if sequence.logprobs is not None:
            out.logprobs = np.asarray(sequence.logprobs, dtype=np.float32).tobytes()
    if prompt_logprobs is not None:
        values = [math.nan if v is None else float(v) for v in prompt_logprobs]
        message.prompt_logprobs = np.asarray(values, dtype=np.float32).tobytes()
    return message.SerializeToString()
