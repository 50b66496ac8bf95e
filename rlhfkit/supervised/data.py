"""Chat conversations -> datums, list-backed datasets, and careful reading of data files."""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from rlhfkit.engine.types import Datum
from rlhfkit.errors import DataError, DataFileNotFoundError
from rlhfkit.renderers import Message, Renderer, RendererError, TrainOnWhat
from rlhfkit.supervised.common import datum_from_model_input_weights
from rlhfkit.supervised.types import SupervisedDataset

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


class DataFormatError(DataError, ValueError):
    """A data file that cannot be parsed; the message names the file and line."""


def conversation_to_datum(
    conversation: list[Message],
    renderer: Renderer,
    max_length: int | None,
    train_on_what: TrainOnWhat = TrainOnWhat.ALL_ASSISTANT_MESSAGES,
    reduction: str = "mean",
) -> Datum:
    model_input, weights = renderer.build_supervised_example(conversation, train_on_what)
    return datum_from_model_input_weights(model_input, weights, max_length, reduction)


class SupervisedDatasetFromList(SupervisedDataset):
    """Batches of `batch_size` rows of a list (the remainder is dropped), mapped to datums lazily per batch
    by `map_fn` (one datum per row) or `flatmap_fn` (any number). `set_epoch(seed)` shuffles the base list
    with `random.Random(seed)`; before any set_epoch the base order is used."""

    def __init__(
        self,
        rows: Sequence[Any],
        batch_size: int,
        map_fn: Callable[[Any], Datum] | None = None,
        flatmap_fn: Callable[[Any], list[Datum]] | None = None,
    ):
        if (map_fn is None) == (flatmap_fn is None):
            raise ValueError("give exactly one of map_fn and flatmap_fn")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.rows = list(rows)
        self.batch_size = batch_size
        self.map_fn, self.flatmap_fn = map_fn, flatmap_fn
        self._order = list(range(len(self.rows)))

    def set_epoch(self, seed: int = 0) -> None:
        self._order = list(range(len(self.rows)))
        random.Random(seed).shuffle(self._order)

    def __len__(self) -> int:
        return len(self.rows) // self.batch_size

    def get_batch(self, index: int) -> list[Datum]:
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range (dataset has {len(self)} batches)")
        rows = [self.rows[i] for i in self._order[index * self.batch_size : (index + 1) * self.batch_size]]
        if self.map_fn is not None:
            return [self.map_fn(row) for row in rows]
        return [datum for row in rows for datum in self.flatmap_fn(row)]


# ---------------------------------------------------------------- reading files


def read_jsonl_rows(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line of a .jsonl or .jsonl.gz file; a line that is
    not JSON or not UTF-8 raises DataFormatError naming the file and that line (lines are decoded one by one,
    so a bad byte is reported on its own line, not where the decoder's read buffer began)."""
    path = Path(path)
    if not path.exists():
        raise DataFileNotFoundError(f"data file not found: {path}")
    line_no = 0
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataFormatError(
                        f"{path}, line {line_no}: not UTF-8 text (byte {raw[e.start : e.start + 1]!r} at "
                        f"column {e.start + 1}); is it a binary file?"
                    ) from None
                if not line.strip():
                    continue
                try:
                    yield line_no, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataFormatError(f"{path}, line {line_no}: not valid JSON ({e.msg})") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataFormatError(
            f"{path}, line {line_no + 1}: cannot be read, the .gz file is truncated or corrupt after line "
            f"{line_no} ({e})"
        ) from None


def read_json_file(path: str | os.PathLike) -> Any:
    """The JSON value of a .json or .json.gz file; a bad byte or bad JSON names the file and line."""
    path = Path(path)
    if not path.exists():
        raise DataFileNotFoundError(f"data file not found: {path}")
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataFormatError(f"{path}: cannot be read, the .gz file is truncated or corrupt ({e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataFormatError(
            f"{path}, line {line}: not UTF-8 text (byte {data[e.start : e.start + 1]!r}); is it a binary file?"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}, line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from None


def validate_messages(messages: Any) -> list[Message]:
    """The conversation as a list of {role, content} messages, or ValueError saying what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' is missing, not a list, or empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} is not an object")
        if m.get("role") not in ROLES:
            raise ValueError(f"message {i} has unknown role {m.get('role')!r} (expected one of {ROLES})")
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"message {i} ({m['role']}) has a missing or empty 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


class SkippedRows:
    """Counts rows skipped for bad data and logs one example (file, row, reason) with the count."""

    def __init__(self, source: str):
        self.source = source
        self.count = 0
        self.example: tuple[str, str] | None = None

    def skip(self, row: str, reason: str) -> None:
        """`row` names the row, e.g. "line 12" or "row 3"."""
        self.count += 1
        if self.example is None:
            self.example = (row, reason)

    def report(self, total: int) -> None:
        if self.example is not None:
            row, reason = self.example
            logger.warning(
                "%s: skipped %d of %d rows with bad data; e.g. %s: %s", self.source, self.count, total, row, reason
            )


def filter_trainable_conversations(
    conversations: Sequence[tuple[str, list[Message]]],
    renderer: Renderer,
    max_length: int | None,
    train_on_what: TrainOnWhat,
    skipped: SkippedRows,
) -> list[list[Message]]:
    """Keep the (row id, conversation) pairs that render and keep at least one trained token after
    truncation to max_length; the others are counted in `skipped`."""
    kept = []
    for row_id, conversation in conversations:
        try:
            datum = conversation_to_datum(conversation, renderer, max_length, train_on_what, reduction="none")
        except (RendererError, ValueError) as e:
            skipped.skip(row_id, f"cannot be rendered: {e}")
            continue
        if sum(datum.loss_fn_inputs["weights"].data) <= 0:
            skipped.skip(
                row_id,
                f"no trainable token (train_on_what={TrainOnWhat(train_on_what).value}, max_length={max_length})",
            )
            continue
        kept.append(conversation)
    return kept


# The reference's name: any sized, iterable row collection (a list, or a Hugging Face Dataset) works.
SupervisedDatasetFromHFDataset = SupervisedDatasetFromList
