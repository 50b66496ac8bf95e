"""Chat SFT datasets.

* `NoRobotsBuilder`: HuggingFaceH4/no_robots from the Hub (needs `datasets` and a network).
* `LimaBuilder`: LIMA from `shared_data_dir()/lima/lima.json`, the offline stand-in for NoRobots.
* `JsonlChatBuilder`: any JSONL of {"messages": [{"role", "content"}, ...]}.
* `HHChosenBuilder`: the human-preferred ("chosen") transcripts of HH-RLHF .jsonl/.jsonl.gz files.
* `ChatSourceBuilder`: any data source (JSONL, JSON, Parquet, CSV file or Hub name, see rlhfkit.data_sources)
  in the common chat formats (`chat_row_to_messages`).

Every builder returns (train, test): train rows shuffled with seed 0 (and again per epoch by the training
loop's `set_epoch`), batches of `batch_size`; datums truncated to `max_length`, weights from
`train_on_what` (default ALL_ASSISTANT_MESSAGES) with per-sequence mean reduction. Rows with bad data
(missing/empty field, unknown role, nothing left to train on) are skipped, counted and one is logged; a file
that cannot be parsed raises DataFormatError naming the file and line.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

from rlhfkit import environment
from rlhfkit.data_sources import DatasetUnavailableError, parse_columns, parse_sources, read_tables
from rlhfkit.errors import DataError
from rlhfkit.paths import shared_data_dir
from rlhfkit.renderers import Message, TrainOnWhat
from rlhfkit.supervised.data import (
    DataFormatError,
    SkippedRows,
    SupervisedDatasetFromList,
    conversation_to_datum,
    filter_trainable_conversations,
    read_json_file,
    read_jsonl_rows,
    validate_messages,
)
from rlhfkit.supervised.types import ChatDatasetBuilder, SupervisedDataset

logger = logging.getLogger(__name__)

Conversations = list[tuple[str, list[Message]]]  # (row name for error messages, conversation)


def split_train_test(items: Sequence[Any], test_size: int, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """A deterministic split: a seeded permutation, the first `test_size` items are the test set."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    test = sorted(order[:test_size])
    test_set = set(test)
    return [items[i] for i in range(len(items)) if i not in test_set], [items[i] for i in test]


@dataclass(frozen=True)
class _ChatBuilderBase(ChatDatasetBuilder):
    """Turns lists of conversations into (train, test) datasets."""

    @property
    def train_on_what(self) -> TrainOnWhat:
        return TrainOnWhat(self.common_config.train_on_what or TrainOnWhat.ALL_ASSISTANT_MESSAGES)

    def source_name(self) -> str:
        """The data this builder reads, for error messages."""
        return type(self).__name__

    def _keep_trainable(self, conversations: Conversations, skipped: SkippedRows) -> list[list[Message]]:
        return filter_trainable_conversations(
            conversations, self.renderer, self.common_config.max_length, self.train_on_what, skipped
        )

    def _map_fn(self):
        return partial(
            conversation_to_datum,
            renderer=self.renderer,
            max_length=self.common_config.max_length,
            train_on_what=self.train_on_what,
            reduction="mean",
        )

    def _datasets(
        self, train: list[list[Message]], test: list[list[Message]] | None, test_batch_size: int | None = None
    ) -> tuple[SupervisedDataset, SupervisedDataset | None]:
        """Train shuffled with seed 0; test unshuffled, by default one batch holding all test rows."""
        if not train:
            raise DataError(
                f"{self.source_name()}: no usable training conversations (every row was skipped, see the warning "
                f"above; max_length={self.common_config.max_length})"
            )
        train = list(train)
        random.Random(0).shuffle(train)
        map_fn = self._map_fn()
        train_ds = SupervisedDatasetFromList(train, self.common_config.batch_size, map_fn=map_fn)
        if len(train_ds) == 0:
            raise ValueError(
                f"{type(self).__name__}: {len(train)} training conversations do not fill one batch "
                f"of batch_size={self.common_config.batch_size}"
            )
        test_ds = SupervisedDatasetFromList(test, test_batch_size or len(test), map_fn=map_fn) if test else None
        logger.info(
            "%s: %d train conversations (%d batches of %d), %d test conversations",
            type(self).__name__,
            len(train),
            len(train_ds),
            self.common_config.batch_size,
            len(test or []),
        )
        return train_ds, test_ds


def _conversations_from_rows(rows: Sequence[tuple[str, Any]], to_messages, skipped: SkippedRows) -> Conversations:
    result = []
    for row_name, row in rows:
        try:
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            result.append((row_name, validate_messages(to_messages(row))))
        except (ValueError, KeyError, TypeError) as e:
            skipped.skip(row_name, str(e) if not isinstance(e, KeyError) else f"missing field {e}")
    return result


def _required_str(row: dict, field: str) -> str:
    value = row.get(field)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"missing or empty field {field!r}")
    return value


# ---------------------------------------------------------------- NoRobots (Hub only)


@dataclass(frozen=True)
class NoRobotsBuilder(_ChatBuilderBase):
    """HuggingFaceH4/no_robots: train shuffled (seed 0); test unshuffled in batches of batch_size
    (spec 3.1: with batch 256 only its first 256 rows are evaluated)."""

    def __call__(self) -> tuple[SupervisedDataset, SupervisedDataset | None]:
        hint = (
            "Offline, use LimaBuilder (human-written instructions from shared_data_dir()/lima/lima.json) "
            "or JsonlChatBuilder with your own file."
        )
        try:
            import datasets
        except ImportError:
            raise DatasetUnavailableError(
                "NoRobotsBuilder loads HuggingFaceH4/no_robots from the Hugging Face "
                "Hub, which needs the `datasets` package (pip install datasets). " + hint
            ) from None
        if environment.hub_offline(datasets=True):
            raise DatasetUnavailableError(
                f"NoRobotsBuilder needs the Hugging Face Hub, but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set. {hint}"
            )
        try:
            ds = datasets.load_dataset("HuggingFaceH4/no_robots")
        except Exception as e:
            raise DatasetUnavailableError(f"cannot load HuggingFaceH4/no_robots from the Hub ({e}). {hint}") from e
        result = []
        for split in ("train", "test"):
            skipped = SkippedRows(f"HuggingFaceH4/no_robots[{split}]")
            rows = [(f"row {i}", row) for i, row in enumerate(ds[split])]
            conversations = self._keep_trainable(
                _conversations_from_rows(rows, lambda r: r["messages"], skipped), skipped
            )
            skipped.report(len(rows))
            result.append(conversations)
        return self._datasets(result[0], result[1], test_batch_size=self.common_config.batch_size)


# ---------------------------------------------------------------- LIMA (offline)


def lima_row_to_messages(row: dict) -> list[Message]:
    """history ([user, assistant] pairs) + the instruction (with its input, if any) and the output."""
    messages: list[Message] = []
    history = row.get("history") or []
    if not isinstance(history, list):
        raise ValueError("field 'history' is not a list")
    for turn in history:
        if not (isinstance(turn, list) and len(turn) == 2):
            raise ValueError("a 'history' entry is not a [user, assistant] pair")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    prompt = _required_str(row, "instruction")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise ValueError("field 'input' is not a string")
    if extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": _required_str(row, "output")}]
    return messages


@dataclass(frozen=True)
class LimaBuilder(_ChatBuilderBase):
    """LIMA (instruction, input, output, history). `test_size` rows (a seeded split) form a one-batch test set."""

    path: str | None = None
    test_size: int = 64

    def __call__(self) -> tuple[SupervisedDataset, SupervisedDataset | None]:
        path = Path(self.path) if self.path else shared_data_dir() / "lima" / "lima.json"
        data = read_json_file(path)
        if not isinstance(data, list):
            raise DataFormatError(f"{path}, line 1: expected a JSON list of rows, got {type(data).__name__}")
        skipped = SkippedRows(str(path))
        conversations = _conversations_from_rows(
            [(f"row {i}", r) for i, r in enumerate(data)], lima_row_to_messages, skipped
        )
        train, test = split_train_test(conversations, self.test_size)
        train, test = self._keep_trainable(train, skipped), self._keep_trainable(test, skipped)
        skipped.report(len(data))
        return self._datasets(train, test)


# ---------------------------------------------------------------- JSONL of {"messages": [...]}


@dataclass(frozen=True)
class JsonlChatBuilder(_ChatBuilderBase):
    """JSONL files of {"messages": [{"role": ..., "content": ...}, ...]} (plain or .gz). Without a
    test_path there is no test set."""

    train_path: str = ""
    test_path: str | None = None

    def source_name(self) -> str:
        return self.train_path

    def _load(self, path: str) -> list[list[Message]]:
        skipped = SkippedRows(path)
        rows = [(f"line {n}", row) for n, row in read_jsonl_rows(path)]
        conversations = _conversations_from_rows(rows, lambda r: r["messages"], skipped)
        kept = self._keep_trainable(conversations, skipped)
        skipped.report(len(rows))
        return kept

    def __call__(self) -> tuple[SupervisedDataset, SupervisedDataset | None]:
        if not self.train_path:
            raise ValueError("JsonlChatBuilder needs a train_path")
        return self._datasets(self._load(self.train_path), self._load(self.test_path) if self.test_path else None)


# ---------------------------------------------------------------- HH-RLHF chosen transcripts

_HH_MARKER = re.compile(r"(\n\nHuman:|\n\nAssistant:)")


def parse_hh_transcript(text: str) -> list[Message]:
    """ "\\n\\nHuman: ... \\n\\nAssistant: ..." -> messages (texts stripped). ValueError if malformed."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("missing or empty transcript")
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    pieces = _HH_MARKER.split(text)
    if pieces[0].strip():
        raise ValueError("text before the first '\\n\\nHuman:' / '\\n\\nAssistant:' marker")
    return [
        {"role": "user" if marker == "\n\nHuman:" else "assistant", "content": body.strip()}
        for marker, body in zip(pieces[1::2], pieces[2::2])
    ]


def default_hh_paths() -> list[Path]:
    return sorted((shared_data_dir() / "hh-rlhf").glob("*.jsonl.gz"))


@dataclass(frozen=True)
class HHChosenBuilder(_ChatBuilderBase):
    """SFT on HH-RLHF "chosen" transcripts (default: every .jsonl.gz under shared_data_dir()/hh-rlhf).
    `test_size` conversations (a seeded split) form a one-batch test set."""

    paths: tuple[str, ...] | None = None
    test_size: int = 256

    def __post_init__(self) -> None:
        if self.paths is not None:
            object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))

    def __call__(self) -> tuple[SupervisedDataset, SupervisedDataset | None]:
        paths = [Path(p) for p in self.paths] if self.paths else default_hh_paths()
        if not paths:
            raise FileNotFoundError(f"no HH-RLHF files given and none found in {shared_data_dir() / 'hh-rlhf'}")
        conversations: Conversations = []
        for path in paths:
            skipped = SkippedRows(str(path))
            rows = [(f"line {n}", row) for n, row in read_jsonl_rows(path)]
            file_conversations = _conversations_from_rows(rows, lambda r: parse_hh_transcript(r.get("chosen")), skipped)
            skipped.report(len(rows))
            conversations += [(f"{path.name} {name}", c) for name, c in file_conversations]
        train, test = split_train_test(conversations, self.test_size)
        skipped = SkippedRows(", ".join(p.name for p in paths))
        train, test = self._keep_trainable(train, skipped), self._keep_trainable(test, skipped)
        skipped.report(len(conversations))
        return self._datasets(train, test)


# ---------------------------------------------------------------- any source, the common chat formats

CHAT_COLUMNS = ("messages", "prompt", "completion", "instruction", "input", "output", "history")


def _chat_messages(value: Any, field: str, default_role: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, list):
        return value
    raise ValueError(f"field {field!r}: expected a string or a list of messages, got {type(value).__name__}")


def chat_row_to_messages(row: dict) -> list[Message]:
    """A row in a common chat format -> its conversation (checked by the caller), by its fields:
    `messages` (a list of {role, content}); TRL's `prompt` + `completion` (strings: one user and one
    assistant message, or lists of messages); `instruction` + `output` with optional `input` and `history`
    (Alpaca / LIMA, see lima_row_to_messages)."""
    if row.get("messages") is not None:
        return row["messages"]
    if row.get("prompt") is not None or row.get("completion") is not None:
        return _chat_messages(row.get("prompt"), "prompt", "user") + _chat_messages(
            row.get("completion"), "completion", "assistant"
        )
    if row.get("instruction") is not None or row.get("output") is not None:
        return lima_row_to_messages(row)
    raise ValueError(
        f"no chat fields: expected 'messages', 'prompt' + 'completion', or 'instruction' + 'output' "
        f"(the row has {', '.join(map(repr, row)) or 'no fields'})"
    )


@dataclass(frozen=True)
class ChatSourceBuilder(_ChatBuilderBase):
    """Conversations from any data source (`data`: a spec as rlhfkit.data_sources reads it: files, Hub names
    with an optional ":split") in the formats `chat_row_to_messages` reads; `columns` maps the format's field
    names to the source's ("prompt=question,completion=answer"). A seeded split holds out `test_size`
    conversations as a one-batch test set, but never more than a tenth of them."""

    data: str = ""
    columns: str | None = None
    test_size: int = 256

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("ChatSourceBuilder needs data (a file path or a Hub dataset name)")
        if self.test_size < 0:
            raise ValueError(f"test_size must be >= 0, got {self.test_size}")
        parse_columns(self.columns, CHAT_COLUMNS)  # a bad mapping fails here, before any loading

    def source_name(self) -> str:
        return f"sft_data {self.data!r}"

    def load_conversations(self) -> Conversations:
        """Every well-formed conversation, in source order; bad rows are counted and one is logged per table.
        No well-formed conversation at all is a DataError naming each table and why (empty, or a bad row)."""
        tables = read_tables(parse_sources(self.data), parse_columns(self.columns, CHAT_COLUMNS))
        conversations: Conversations = []
        problems = []
        for table in tables:
            skipped = SkippedRows(table.name)
            conversations += [
                (f"{table.name}, {name}", c)
                for name, c in _conversations_from_rows(table.rows, chat_row_to_messages, skipped)
            ]
            skipped.report(len(table.rows))
            if not table.rows:
                problems.append(f"{table.name} is empty (no rows)")
            elif skipped.example is not None:
                row, reason = skipped.example
                problems.append(
                    f"{table.name}: {skipped.count} of {len(table.rows)} rows unusable, e.g. {row}: {reason}"
                )
        if not conversations:
            raise DataError(f"{self.source_name()}: no usable conversation; {'; '.join(problems)}")
        return conversations

    def __call__(self) -> tuple[SupervisedDataset, SupervisedDataset | None]:
        conversations = self.load_conversations()
        train, test = split_train_test(conversations, min(self.test_size, len(conversations) // 10))
        skipped = SkippedRows(self.data)
        train, test = self._keep_trainable(train, skipped), self._keep_trainable(test, skipped)
        skipped.report(len(conversations))
        return self._datasets(train, test)


NAMED_CHAT_DATA = ("lima", "no_robots", "hh_chosen")


def chat_builder(common_config: Any, data: str, columns: str | None = None, test_size: int = 256) -> Any:
    """The builder for a chat-data setting: "lima" (offline LIMA), "no_robots" (HuggingFaceH4/no_robots from
    the Hub, its own train/test splits), "hh_chosen" (the offline HH-RLHF chosen transcripts), or any data
    spec ChatSourceBuilder reads (files, Hub names[:split]) with an optional column mapping."""
    if data in NAMED_CHAT_DATA and columns:
        raise ValueError(f"a column mapping ({columns!r}) applies to files and Hub names, not to {data!r}")
    if data == "lima":
        return LimaBuilder(common_config=common_config, test_size=test_size)
    if data == "no_robots":
        return NoRobotsBuilder(common_config=common_config)
    if data == "hh_chosen":
        return HHChosenBuilder(common_config=common_config, test_size=test_size)
    return ChatSourceBuilder(common_config=common_config, data=data, columns=columns, test_size=test_size)
