"""Where training data comes from: a source spec -> tables of raw rows.

A spec is a comma-separated list of items; each item is
  * a local file: .jsonl, .json (a list of rows or JSON lines), .parquet or .csv, each optionally .gz-ed
    except Parquet;
  * an alias the caller knows (e.g. "helpful-base" for an offline HH-RLHF split);
  * a Hugging Face Hub dataset name ("owner/name"), optionally with ":split" ("Anthropic/hh-rlhf:test";
    without a split, every split), loaded only when the Hub is not switched off (HF_HUB_OFFLINE /
    HF_DATASETS_OFFLINE).
A column mapping "prompt=question,chosen=good" renames the source's columns to the names a format expects.

JSON and JSON-lines files are read here line by line, so a malformed line or a truncated .gz names the file
and line (the `datasets` JSON reader cannot say which line failed). Parquet, CSV and Hub datasets go through
Hugging Face `datasets`, with its cache under rlhfkit's cache (never beside the user's files) for local files.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping

from rlhfkit import environment
from rlhfkit.errors import DataError
from rlhfkit.paths import cache_dir
from rlhfkit.supervised.data import DataFormatError, read_json_file, read_jsonl_rows

JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
DATASETS_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".csv.gz": "csv"}
SUPPORTED_SUFFIXES = (*JSON_SUFFIXES, *DATASETS_SUFFIXES)
_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")
_SPLIT = re.compile(r"^[\w.-]+$")


class DatasetUnavailableError(DataError, RuntimeError):
    """A Hub dataset that cannot be loaded here (no `datasets` package, the Hub switched off, no network)."""


@dataclass(frozen=True)
class DataSource:
    """One item of a spec: a local file, or a Hub dataset with an optional split."""

    kind: Literal["file", "hub"]
    location: str
    split: str | None = None

    def __str__(self) -> str:
        return self.location if self.split is None else f"{self.location}:{self.split}"


@dataclass(frozen=True)
class SourceTable:
    """The raw rows of one file or one Hub split: (row name for messages, e.g. "line 5", row)."""

    name: str
    rows: list[tuple[str, Any]]


def _suffix(path: str) -> str:
    lowered = path.lower()
    return next((s for s in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True) if lowered.endswith(s)), "")


def parse_source(item: str, aliases: Mapping[str, Path] | None = None) -> DataSource:
    """One spec item -> a DataSource; raises ValueError/FileNotFoundError saying what was expected."""
    item = item.strip()
    aliases = aliases or {}
    if item in aliases:
        return DataSource("file", str(aliases[item]))
    if Path(item).is_file():
        return _file_source(item)
    location, split = item, None
    if ":" in item:
        head, tail = item.rsplit(":", 1)
        if _SPLIT.match(tail) and not Path(item).exists():
            location, split = head, tail
    if _suffix(location):
        if split is not None:
            raise ValueError(f"{item!r}: a ':split' applies only to Hub dataset names, not to files")
        return _file_source(location)
    if _HUB_NAME.match(location):
        return DataSource("hub", location, split)
    known = f"; or one of {', '.join(aliases)}" if aliases else ""
    raise ValueError(
        f"{item!r} is neither a data file ({', '.join(SUPPORTED_SUFFIXES)}) nor a Hugging Face Hub "
        f"dataset name (owner/name[:split]){known}"
    )


def _file_source(path: str) -> DataSource:
    if not _suffix(path):
        raise ValueError(f"{path}: unsupported file type (supported: {', '.join(SUPPORTED_SUFFIXES)})")
    if not Path(path).is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    return DataSource("file", path)


def parse_sources(spec: str, aliases: Mapping[str, Path] | None = None) -> list[DataSource]:
    sources = [parse_source(item, aliases) for item in spec.split(",") if item.strip()]
    if not sources:
        raise ValueError(f"no data sources in {spec!r}")
    return sources


def parse_columns(text: str | None, allowed: Iterable[str]) -> dict[str, str]:
    """ "prompt=question,chosen=good" -> {"prompt": "question", "chosen": "good"}: the names a format
    expects (which must be in `allowed`) -> the source's column names."""
    if not text:
        return {}
    allowed = tuple(allowed)
    mapping = {}
    for pair in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, column = (s.strip() for s in pair.partition("="))
        if not sep or not name or not column:
            raise ValueError(f"column mapping {pair!r}: expected name=column (e.g. prompt=question)")
        if name not in allowed:
            raise ValueError(f"column mapping {pair!r}: {name!r} is not one of {', '.join(allowed)}")
        mapping[name] = column
    return mapping


# ---------------------------------------------------------------- reading


def read_tables(sources: Iterable[DataSource], columns: Mapping[str, str] | None = None) -> list[SourceTable]:
    """The raw rows of every source, with `columns` applied (a mapped column missing from a whole table is an
    error naming the table and its columns)."""
    tables = []
    for source in sources:
        for table in [_file_table(Path(source.location))] if source.kind == "file" else _hub_tables(source):
            tables.append(_renamed(table, columns) if columns else table)
    return tables


def _renamed(table: SourceTable, columns: Mapping[str, str]) -> SourceTable:
    present = {key for _, row in table.rows if isinstance(row, dict) for key in row}
    missing = sorted(set(columns.values()) - present)
    if missing and table.rows:
        raise DataFormatError(
            f"{table.name}: no column {', '.join(map(repr, missing))} for the column mapping "
            f"{dict(columns)} (columns: {', '.join(sorted(present))})"
        )
    sources = set(columns.values()) | set(columns)

    def rename(row: Any) -> Any:
        if not isinstance(row, dict):
            return row
        kept = {k: v for k, v in row.items() if k not in sources}
        return {**kept, **{name: row[column] for name, column in columns.items() if column in row}}

    return SourceTable(table.name, [(name, rename(row)) for name, row in table.rows])


def _file_table(path: Path) -> SourceTable:
    suffix = _suffix(str(path))
    if suffix in (".jsonl", ".jsonl.gz"):
        return SourceTable(str(path), [(f"line {n}", row) for n, row in read_jsonl_rows(path)])
    if suffix in (".json", ".json.gz"):
        return _json_table(path)
    return _datasets_file_table(path, DATASETS_SUFFIXES[suffix])


def _json_table(path: Path) -> SourceTable:
    """A .json file holding a list of rows, or JSON lines."""
    try:
        data = read_json_file(path)
    except DataFormatError as e:
        if "Extra data" not in str(e):
            raise
        return SourceTable(str(path), [(f"line {n}", row) for n, row in read_jsonl_rows(path)])
    if isinstance(data, dict):
        return SourceTable(str(path), [("line 1", data)])
    if not isinstance(data, list):
        raise DataFormatError(f"{path}, line 1: expected a JSON list of rows or JSON lines, got {type(data).__name__}")
    return SourceTable(str(path), [(f"row {i}", row) for i, row in enumerate(data, start=1)])


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[Any]:
    """`datasets`, with its progress bars and info logs off while loading (the console stays clean)."""
    import datasets

    bars_were_on = not datasets.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL)  # a failed load is raised with its cause, not logged
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars_were_on:
            datasets.enable_progress_bars()


def _datasets_file_table(path: Path, builder: str) -> SourceTable:
    if builder == "csv" and path.name.lower().endswith(".gz"):
        try:
            with gzip.open(path) as f:
                while f.read(1 << 20):
                    pass
        except (OSError, EOFError) as e:
            raise DataFormatError(f"{path}: the .gz file is truncated or corrupt ({e})") from None
    with _quiet_datasets() as datasets:
        try:
            dataset = datasets.load_dataset(
                builder, data_files=str(path.resolve()), split="train", cache_dir=str(cache_dir() / "datasets")
            )
        except Exception as e:
            cause = e.__cause__ or e.__context__ or e
            raise DataFormatError(
                f"{path}: cannot be read as {builder.upper()} ({type(cause).__name__}: {str(cause).strip()})"
            ) from None
    return SourceTable(str(path), [(f"row {i}", row) for i, row in enumerate(dataset, start=1)])


def _hub_tables(source: DataSource) -> list[SourceTable]:
    hint = "download it where the Hub is reachable and pass the local file (.jsonl, .json, .parquet or .csv)"
    try:
        import datasets
    except ImportError:
        raise DatasetUnavailableError(
            f"{source}: loading a Hub dataset needs the `datasets` package (pip install datasets); or {hint}"
        ) from None
    if environment.hub_offline(datasets=True):
        raise DatasetUnavailableError(
            f"{source}: a Hugging Face Hub dataset, but the Hub is switched off here "
            f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); {hint}"
        )
    with _quiet_datasets() as datasets:
        try:
            loaded = datasets.load_dataset(source.location, split=source.split)
        except Exception as e:
            raise DatasetUnavailableError(f"{source}: cannot be loaded from the Hugging Face Hub ({e}); {hint}") from e
    splits = {source.split: loaded} if source.split is not None else dict(loaded)
    return [
        SourceTable(f"{source.location}:{split}", [(f"row {i}", row) for i, row in enumerate(ds, start=1)])
        for split, ds in splits.items()
    ]
