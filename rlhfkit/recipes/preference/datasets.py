"""Comparison data sets: Anthropic HH-RLHF ("HHH") and user JSONL files of labelled comparisons.

HH-RLHF rows are two transcripts, `chosen` and `rejected`, in "\\n\\nHuman: ...\\n\\nAssistant: ..." form that
share everything but the last message (spec 4.2). Offline only the four HH-RLHF test splits exist, so rows
are split by a stable hash of their opening user message into four disjoint roles: preference-model train,
preference-model test, RL prompts and win-rate evaluation prompts.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Sequence

from rlhfkit.data_sources import DataSource, parse_columns, parse_sources, read_tables
from rlhfkit.errors import DataError, DataFileNotFoundError
from rlhfkit.paths import shared_data_dir
from rlhfkit.recipes.preference.hh_files import HH_RLHF_FILES, HH_RLHF_HUB_NAME
from rlhfkit.recipes.preference.hh_files import hh_data_files as hh_data_files
from rlhfkit.preference.preference_datasets import ComparisonDatasetBuilder
from rlhfkit.preference.types import Comparison, LabeledComparison
from rlhfkit.supervised.data import DataFormatError, SkippedRows, read_jsonl_rows, validate_messages

logger = logging.getLogger(__name__)


# Fractions of the rows in each role (by hash of the opening user message). With the 8,423 usable offline
# rows: PM test ~505, win-rate eval ~337, RL prompts ~2,100, PM train ~5,480.
ROLE_FRACTIONS = {"pm_test": 0.06, "winrate_eval": 0.04, "rl": 0.25, "pm_train": 0.65}
Role = Literal["pm_train", "pm_test", "rl", "winrate_eval"]


# ---------------------------------------------------------------------------------------------------------
# HH-RLHF transcripts


def parse_hh_transcript(text: str) -> list[dict[str, str]] | None:
    """Split a transcript on the literal "Human:" / "Assistant:" markers into stripped user/assistant
    messages; None if text precedes the first marker."""
    pieces = re.split(r"(Human:|Assistant:)", text)
    if pieces[0].strip():
        return None
    pieces = pieces[1:]
    return [
        {"role": "user" if marker == "Human:" else "assistant", "content": body.strip()}
        for marker, body in zip(pieces[0::2], pieces[1::2])
    ]


def hh_pair_problem(chosen: list[dict] | None, rejected: list[dict] | None) -> str | None:
    """Why a parsed (chosen, rejected) pair is not a usable comparison, or None if it is."""
    if not chosen or not rejected:
        return "a transcript is empty or has text before the first marker"
    if len(chosen) != len(rejected):
        return "the transcripts have different numbers of messages"
    if chosen[:-1] != rejected[:-1]:
        return "the transcripts disagree before the last message"
    if chosen[-1] == rejected[-1]:
        return "the last messages are identical"
    if chosen[-1]["role"] != "assistant":  # [local choice] the compared completions must be assistant replies
        return "the last message is not from the assistant"
    return None


def pair_to_labeled_comparison(chosen: list[dict] | None, rejected: list[dict] | None) -> LabeledComparison:
    """Two whole conversations that differ only in the last (assistant) message -> the comparison of those
    messages after the shared prompt, label "A" (the chosen one); ValueError saying why not."""
    problem = hh_pair_problem(chosen, rejected)
    if problem is not None:
        raise ValueError(problem)
    return LabeledComparison(Comparison(chosen[:-1], [chosen[-1]], [rejected[-1]]), "A")


def hh_row_to_labeled_comparison(row: dict[str, Any]) -> LabeledComparison | None:
    try:
        return pair_to_labeled_comparison(parse_hh_transcript(row["chosen"]), parse_hh_transcript(row["rejected"]))
    except ValueError:
        return None


def split_key(row: dict[str, Any]) -> str:
    """The text whose hash decides a row's role: its opening user message (so conversations that start
    the same way never land in two roles)."""
    return parse_hh_transcript(row["chosen"])[0]["content"]


def role_of(key: str) -> Role:
    """A stable role for a split key: sha256 of the text mapped to [0, 1), cut at ROLE_FRACTIONS."""
    u = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
    upper = 0.0
    for role, fraction in ROLE_FRACTIONS.items():
        upper += fraction
        if u < upper:
            return role  # type: ignore[return-value]
    return "pm_train"


def _read_jsonl_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line_no, row in read_jsonl_rows(path):
        if not isinstance(row, dict):
            raise DataFormatError(f"{path}, row {line_no}: expected a JSON object, got {type(row).__name__}")
        rows.append({**row, "_source": str(path), "_row": line_no})
    return rows


def load_hh_rlhf_rows(data_files: Sequence[str | Path] | str | None = None) -> list[dict[str, Any]]:
    """All raw HH-RLHF rows: from local .jsonl/.jsonl.gz files (default: the four offline test splits), or
    from the Hub when `data_files` is "Anthropic/hh-rlhf" (needs `datasets` and a network)."""
    if data_files == HH_RLHF_HUB_NAME:
        return _load_hh_rlhf_from_hub()
    if data_files is None:
        folder = shared_data_dir() / "hh-rlhf"
        data_files = [folder / name for name in HH_RLHF_FILES]
    elif isinstance(data_files, (str, Path)):
        data_files = [data_files]
    rows = []
    for path in map(Path, data_files):
        if not path.is_file():
            raise DataFileNotFoundError(
                f"HH-RLHF file not found: {path} (expected .jsonl or .jsonl.gz files of "
                f"{{'chosen', 'rejected'}} transcripts, or data_files={HH_RLHF_HUB_NAME!r})"
            )
        file_rows = _read_jsonl_rows(path)
        for row in file_rows:
            for field in ("chosen", "rejected"):
                if not isinstance(row.get(field), str):
                    raise DataFormatError(
                        f"{path}, row {row['_row']}, field {field!r}: expected a transcript string, "
                        f"got {row.get(field)!r:.100}"
                    )
        rows += file_rows
    return rows


def _load_hh_rlhf_from_hub() -> list[dict[str, Any]]:
    tables = read_tables([DataSource("hub", HH_RLHF_HUB_NAME)])
    return [
        {"chosen": r["chosen"], "rejected": r["rejected"], "_source": table.name, "_row": name}
        for table in tables
        for name, r in table.rows
    ]


def split_hh_rlhf_rows(rows: Sequence[dict[str, Any]]) -> dict[Role, list[dict[str, Any]]]:
    """Drop malformed pairs (counted, one example logged) and assign every usable row a role."""
    by_role: dict[Role, list[dict[str, Any]]] = {role: [] for role in ROLE_FRACTIONS}  # type: ignore[misc]
    problems: Counter[str] = Counter()
    for row in rows:
        problem = hh_pair_problem(parse_hh_transcript(row["chosen"]), parse_hh_transcript(row["rejected"]))
        if problem is not None:
            if not problems:
                logger.warning(
                    "skipping malformed HH-RLHF pair (%s) at %s, row %s", problem, row.get("_source"), row.get("_row")
                )
            problems[problem] += 1
            continue
        by_role[role_of(split_key(row))].append(row)
    if problems:
        logger.warning("skipped %d of %d HH-RLHF pairs: %s", sum(problems.values()), len(rows), dict(problems))
    return by_role


def _shuffled(rows: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


@dataclass(frozen=True)
class HHHComparisonBuilder(ComparisonDatasetBuilder):
    """Anthropic HH-RLHF comparisons (label always "A" = the human-chosen reply, before any swapping).

    role="preference_model": get_train_and_test_datasets() -> (PM train rows, PM test rows[:test_size]);
    role="rl": -> (RL prompt rows, win-rate evaluation rows[:test_size]). Both lists are shuffled with seed 0.
    data_files: local .jsonl/.jsonl.gz files (default: the offline test splits in shared_data_dir()/hh-rlhf)
    or "Anthropic/hh-rlhf" to load both Hub splits (the same role split is then applied to all rows).
    max_chars: keep only rows whose chosen transcript has at most this many characters (short conversations
    make a small CPU run affordable); the role of a row never changes, only which rows are kept.
    """

    ROLES = {"preference_model": ("pm_train", "pm_test"), "rl": ("rl", "winrate_eval")}

    test_size: int = 1024
    swap: bool = False
    role: Literal["preference_model", "rl"] = "preference_model"
    data_files: tuple[str, ...] | str | None = None
    max_chars: int | None = None

    def __post_init__(self) -> None:
        if self.role not in self.ROLES:
            raise ValueError(f"role must be one of {sorted(self.ROLES)}, got {self.role!r}")
        if self.data_files is not None and not isinstance(self.data_files, str):
            object.__setattr__(self, "data_files", tuple(str(p) for p in self.data_files))

    @cached_property
    def _role_split(self) -> dict[Role, list[dict[str, Any]]]:
        return split_hh_rlhf_rows(load_hh_rlhf_rows(self.data_files))

    def role_rows(self) -> dict[Role, list[dict[str, Any]]]:
        """All four roles' rows (unshuffled, in file order); computed once per builder."""
        return self._role_split

    def get_train_and_test_datasets(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        train_role, test_role = self.ROLES[self.role]
        split = self.role_rows()
        if self.max_chars is not None:
            split = {role: [r for r in rows if len(r["chosen"]) <= self.max_chars] for role, rows in split.items()}
        return _shuffled(split[train_role]), _shuffled(split[test_role])[: self.test_size]

    def example_to_labeled_comparison(self, example: dict[str, Any]) -> LabeledComparison | None:
        return hh_row_to_labeled_comparison(example)


# ---------------------------------------------------------------------------------------------------------
# User JSONL files of labelled comparisons


def _check_messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        raise DataFormatError(
            f"{where}: expected a list of {{'role': str, 'content': str}} messages, got {value!r:.200}"
        )
    return value


COMPARISON_FIELDS = ("prompt_conversation", "completion_A", "completion_B", "label")


def comparison_fields_to_labeled_comparison(row: dict[str, Any], where: str = "") -> LabeledComparison:
    """A {"prompt_conversation", "completion_A", "completion_B", "label"} row; ValueError naming the field
    (prefixed with `where` and ", ")."""
    prefix = f"{where}, " if where else ""
    for field in COMPARISON_FIELDS:
        if field not in row:
            raise DataFormatError(f"{where or 'row'}: missing field {field!r}")
    messages = {
        field: _check_messages(row[field], f"{prefix}field {field!r}")
        for field in ("prompt_conversation", "completion_A", "completion_B")
    }
    for field in ("completion_A", "completion_B"):
        if not messages[field]:
            raise DataFormatError(f"{prefix}field {field!r}: a completion needs at least one message")
    if row["label"] not in ("A", "B", "Tie"):
        raise DataFormatError(f"{prefix}field 'label': expected 'A', 'B' or 'Tie', got {row['label']!r}")
    return LabeledComparison(
        Comparison(messages["prompt_conversation"], messages["completion_A"], messages["completion_B"]), row["label"]
    )


def jsonl_row_to_labeled_comparison(row: dict[str, Any]) -> LabeledComparison:
    """A {"prompt_conversation", "completion_A", "completion_B", "label"} row; errors name file/row/field."""
    return comparison_fields_to_labeled_comparison(row, f"{row.get('_source', '<row>')}, row {row.get('_row', '?')}")


@dataclass(frozen=True)
class ComparisonBuilderFromJsonl(ComparisonDatasetBuilder):
    """Comparisons from JSONL files of {"prompt_conversation", "completion_A", "completion_B", "label"}."""

    train_path: str | Path
    test_path: str | Path | None = None
    swap: bool = False

    @staticmethod
    def _load(path: str | Path) -> list[dict[str, Any]]:
        path = Path(path)
        if not path.is_file():
            raise DataFileNotFoundError(f"comparison file not found: {path}")
        rows = _read_jsonl_rows(path)
        for row in rows:
            jsonl_row_to_labeled_comparison(row)  # validate up front: fail before any training
        return rows

    def get_train_and_test_datasets(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        train = _shuffled(self._load(self.train_path))
        test = self._load(self.test_path) if self.test_path is not None else None
        return train, test

    def example_to_labeled_comparison(self, example: dict[str, Any]) -> LabeledComparison | None:
        return jsonl_row_to_labeled_comparison(example)


def load_labeled_comparisons(path: str | Path) -> list[LabeledComparison]:
    """Every row of a {"prompt_conversation", "completion_A", "completion_B", "label"} JSONL file, in file order."""
    return [jsonl_row_to_labeled_comparison(row) for row in ComparisonBuilderFromJsonl._load(path)]


def held_out_comparisons(
    data: str | None,
    role: Literal["preference_model", "rl"],
    count: int,
    max_chars: int | None = None,
    columns: str | None = None,
) -> list[LabeledComparison]:
    """The first `count` held-out labelled comparisons of a data spec (as ComparisonBuilderFromSource takes it;
    None: the offline HH-RLHF splits) for a role ("preference_model": the PM test rows, "rl": the win-rate rows);
    a larger count extends the list."""
    return ComparisonBuilderFromSource(
        data=data, columns=columns, role=role, test_size=count, max_chars=max_chars
    ).held_out_comparisons()


def read_eval_comparisons(
    data: str | None, role: Literal["preference_model", "rl"], count: int, max_chars: int | None = None
) -> list[LabeledComparison]:
    """Comparisons to evaluate on: a JSONL file of labelled comparisons (its first `count` rows), else HH-RLHF
    data as the pipeline takes it (split names, files, "Anthropic/hh-rlhf"; None: the offline splits), of which
    the held-out rows of `role` are used, as the pipeline's own evaluations use them."""
    if data is not None and "," not in data and Path(data).is_file():
        first = next((row for row in _read_jsonl_rows(Path(data))), {})
        if "prompt_conversation" in first:
            return load_labeled_comparisons(data)[:count]
    return held_out_comparisons(data, role, count, max_chars)


# ---------------------------------------------------------------------------------------------------------
# Comparisons in the common formats, from any data source

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected", "score_chosen", "score_rejected", *COMPARISON_FIELDS)


def _messages(value: Any, field: str, default_role: str) -> list[dict[str, str]]:
    """A string (one message of `default_role`) or a list of {role, content} messages."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"field {field!r} is empty")
        return [{"role": default_role, "content": value}]
    try:
        return validate_messages(value)
    except ValueError as e:
        raise ValueError(f"field {field!r}: expected a string or a list of {{role, content}} messages ({e})") from None


def _completion(value: Any, field: str, prompt: list[dict[str, str]]) -> list[dict[str, str]]:
    """A reply: a string, or messages that may repeat the prompt first (UltraFeedback-binarized)."""
    messages = _messages(value, field, "assistant")
    if messages[: len(prompt)] == prompt:
        messages = messages[len(prompt) :]
    if not messages or messages[0]["role"] != "assistant":
        raise ValueError(f"field {field!r}: expected the assistant's reply after the prompt")
    return messages


def _check_scores(row: dict[str, Any]) -> None:
    chosen, rejected = row.get("score_chosen"), row.get("score_rejected")
    if isinstance(chosen, (int, float)) and isinstance(rejected, (int, float)) and chosen <= rejected:
        raise ValueError(
            f"fields 'score_chosen' and 'score_rejected': {chosen} <= {rejected} (no preference for the chosen reply)"
        )


def preference_row_to_comparison(row: Any) -> tuple[LabeledComparison, int]:
    """A row in any supported preference format -> (labelled comparison, length of the chosen conversation in
    characters); ValueError naming the field if the row is not usable. Formats, by their fields:
      * chosen/rejected transcript strings: HH-RLHF "\\n\\nHuman: ... \\n\\nAssistant: ..." (length: the
        chosen transcript's);
      * chosen/rejected message lists without a prompt: TRL's conversational implicit-prompt format (two
        whole conversations that differ in the last assistant message);
      * prompt + chosen + rejected: TRL's standard format (strings) or conversational format (message
        lists); UltraFeedback-binarized (a prompt string, message lists that repeat it, score_chosen/
        score_rejected: a row whose chosen score is not higher is skipped);
      * prompt_conversation/completion_A/completion_B/label: rlhfkit's own comparison rows.
    Other than the last format, the label is "A" (the chosen reply)."""
    if not isinstance(row, dict):
        raise ValueError(f"expected an object with named fields, got {type(row).__name__}")
    if all(field in row for field in COMPARISON_FIELDS):
        labeled = comparison_fields_to_labeled_comparison(row)
        conversation = labeled.comparison.prompt_conversation + labeled.comparison.completion_A
        return labeled, sum(len(m["content"]) for m in conversation)
    missing = [field for field in ("chosen", "rejected") if row.get(field) is None]
    if missing:
        raise ValueError(
            f"missing field {missing[0]!r} (a comparison needs 'chosen' and 'rejected', with or "
            f"without 'prompt'; the row has {', '.join(map(repr, row)) or 'no fields'})"
        )
    _check_scores(row)
    chars = None
    if row.get("prompt") is None and isinstance(row["chosen"], str) and isinstance(row["rejected"], str):
        labeled = pair_to_labeled_comparison(parse_hh_transcript(row["chosen"]), parse_hh_transcript(row["rejected"]))
        chars = len(row["chosen"])
    elif row.get("prompt") is None:
        chosen, rejected = (
            _messages(row["chosen"], "chosen", "assistant"),
            _messages(row["rejected"], "rejected", "assistant"),
        )
        labeled = pair_to_labeled_comparison(chosen, rejected)
    else:
        prompt = _messages(row["prompt"], "prompt", "user")
        chosen, rejected = (
            _completion(row["chosen"], "chosen", prompt),
            _completion(row["rejected"], "rejected", prompt),
        )
        if chosen == rejected:
            raise ValueError("fields 'chosen' and 'rejected': the replies are identical")
        labeled = LabeledComparison(Comparison(prompt, chosen, rejected), "A")
    if not labeled.comparison.prompt_conversation:
        raise ValueError("no prompt before the compared replies")
    if chars is None:
        chars = sum(len(m["content"]) for m in labeled.comparison.prompt_conversation + labeled.comparison.completion_A)
    return labeled, chars


@dataclass(frozen=True)
class ComparisonExample:
    """A usable comparison row: the comparison, where it came from, and its chosen conversation's length."""

    labeled: LabeledComparison
    where: str
    chars: int


def offline_hh_splits() -> dict[str, Path]:
    """The offline HH-RLHF test splits by name ("helpful-base" -> .../hh-rlhf/helpful-base-test.jsonl.gz)."""
    return {name.removesuffix("-test.jsonl.gz"): shared_data_dir() / "hh-rlhf" / name for name in HH_RLHF_FILES}


def load_comparison_examples(data: str | None = None, columns: str | None = None) -> tuple[ComparisonExample, ...]:
    """Every usable comparison of a data spec (see rlhfkit.data_sources; items may also name the offline
    HH-RLHF splits; None: all four), in source order. Unusable rows are skipped: per file, counted and one
    example logged. Read once per process while the files are unchanged (the pipeline's roles and evaluations
    ask for the same data several times)."""
    spec = data if data is not None else ",".join(offline_hh_splits())
    sources = parse_sources(spec, offline_hh_splits())
    stamps = tuple((str(s), *_file_stamp(s)) for s in sources)
    return _read_comparison_examples(spec, columns, stamps)


def _file_stamp(source: DataSource) -> tuple[int, int]:
    if source.kind != "file":
        return (0, 0)
    stat = Path(source.location).stat()
    return (stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read_comparison_examples(spec: str, columns: str | None, stamps: tuple) -> tuple[ComparisonExample, ...]:
    tables = read_tables(parse_sources(spec, offline_hh_splits()), parse_columns(columns, PREFERENCE_COLUMNS))
    examples = []
    problems = []  # per table: empty, or its first bad row
    for table in tables:
        skipped = SkippedRows(table.name)
        for row_name, row in table.rows:
            try:
                labeled, chars = preference_row_to_comparison(row)
            except ValueError as e:
                skipped.skip(row_name, str(e))
                continue
            examples.append(ComparisonExample(labeled, f"{table.name}, {row_name}", chars))
        skipped.report(len(table.rows))
        if not table.rows:
            problems.append(f"{table.name} is empty (no rows)")
        elif skipped.example is not None:
            problems.append(
                f"{table.name}: {skipped.count} of {len(table.rows)} rows unusable, e.g. {': '.join(skipped.example)}"
            )
    if not examples:
        raise DataError(f"no usable comparisons in {spec!r}: {'; '.join(problems)}")
    return tuple(examples)


def comparison_split_key(example: ComparisonExample) -> str:
    """The text whose hash decides a comparison's role: its opening message (for HH-RLHF rows the same key
    as `split_key`, so both builders give every HH-RLHF row the same role)."""
    return example.labeled.comparison.prompt_conversation[0]["content"]


@dataclass(frozen=True)
class ComparisonBuilderFromSource(ComparisonDatasetBuilder):
    """Labelled comparisons from any data source and format (`load_comparison_examples`), split by a stable
    hash of the opening message into the four disjoint roles (ROLE_FRACTIONS), whatever the source.

    role="preference_model": get_train_and_test_datasets() -> (PM train, PM test[:test_size]);
    role="rl": -> (RL prompts, win-rate evaluation prompts[:test_size]); both shuffled with seed 0. On the
    HH-RLHF files this gives the same comparisons in the same order as HHHComparisonBuilder.
    data: the spec (None: the four offline HH-RLHF splits); columns: a column mapping such as
    "prompt=question,chosen=good,rejected=bad"; max_chars: keep only comparisons whose chosen conversation
    has at most this many characters (it never changes a row's role).
    """

    data: str | None = None
    columns: str | None = None
    role: Literal["preference_model", "rl"] = "preference_model"
    test_size: int = 1024
    max_chars: int | None = None
    swap: bool = False

    def __post_init__(self) -> None:
        if self.role not in HHHComparisonBuilder.ROLES:
            raise ValueError(f"role must be one of {sorted(HHHComparisonBuilder.ROLES)}, got {self.role!r}")
        if self.test_size < 0:
            raise ValueError(f"test_size must be >= 0, got {self.test_size}")
        if self.max_chars is not None and self.max_chars <= 0:
            raise ValueError(f"max_chars must be positive, got {self.max_chars}")
        parse_columns(self.columns, PREFERENCE_COLUMNS)  # a bad mapping fails here, before any loading

    def role_examples(self) -> dict[Role, list[ComparisonExample]]:
        """All four roles' comparisons in source order (before the max_chars filter)."""
        by_role: dict[Role, list[ComparisonExample]] = {role: [] for role in ROLE_FRACTIONS}  # type: ignore[misc]
        for example in load_comparison_examples(self.data, self.columns):
            by_role[role_of(comparison_split_key(example))].append(example)
        return by_role

    def get_train_and_test_datasets(self) -> tuple[list[ComparisonExample], list[ComparisonExample] | None]:
        train_role, test_role = HHHComparisonBuilder.ROLES[self.role]
        split = self.role_examples()
        if self.max_chars is not None:
            split = {role: [e for e in examples if e.chars <= self.max_chars] for role, examples in split.items()}
        return _shuffled(split[train_role]), _shuffled(split[test_role])[: self.test_size]

    def example_to_labeled_comparison(self, example: ComparisonExample) -> LabeledComparison:
        return example.labeled
