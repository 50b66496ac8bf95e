"""Comparison data sets: Anthropic HH-RLHF ("HHH") and user JSONL files of labelled comparisons.

HH-RLHF rows are two transcripts, `chosen` and `rejected`, in "\\n\\nHuman: ...\\n\\nAssistant: ..." form that
share everything but the last message (spec 4.2). Offline only the four HH-RLHF test splits exist, so rows
are split by a stable hash of their opening user message into four disjoint roles: preference-model train,
preference-model test, RL prompts and win-rate evaluation prompts.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal, Sequence

from rlhfkit.errors import DataError, DataFileNotFoundError
from rlhfkit.paths import shared_data_dir
from rlhfkit.preference.preference_datasets import ComparisonDatasetBuilder
from rlhfkit.preference.types import Comparison, LabeledComparison
from rlhfkit.supervised.data import DataFormatError, read_jsonl_rows

logger = logging.getLogger(__name__)

HH_RLHF_HUB_NAME = "Anthropic/hh-rlhf"
HH_RLHF_FILES = ("harmless-base-test.jsonl.gz", "helpful-base-test.jsonl.gz", "helpful-online-test.jsonl.gz",
                 "helpful-rejection-sampled-test.jsonl.gz")

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
    return [{"role": "user" if marker == "Human:" else "assistant", "content": body.strip()}
            for marker, body in zip(pieces[0::2], pieces[1::2])]


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


def hh_row_to_labeled_comparison(row: dict[str, Any]) -> LabeledComparison | None:
    chosen, rejected = parse_hh_transcript(row["chosen"]), parse_hh_transcript(row["rejected"])
    if hh_pair_problem(chosen, rejected) is not None:
        return None
    return LabeledComparison(Comparison(chosen[:-1], [chosen[-1]], [rejected[-1]]), "A")


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
            raise DataFileNotFoundError(f"HH-RLHF file not found: {path} (expected .jsonl or .jsonl.gz files of "
                                    f"{{'chosen', 'rejected'}} transcripts, or data_files={HH_RLHF_HUB_NAME!r})")
        file_rows = _read_jsonl_rows(path)
        for row in file_rows:
            for field in ("chosen", "rejected"):
                if not isinstance(row.get(field), str):
                    raise DataFormatError(f"{path}, row {row['_row']}, field {field!r}: expected a transcript string, "
                                     f"got {row.get(field)!r:.100}")
        rows += file_rows
    return rows


def hh_data_files(spec: str | None) -> list[Path] | str | None:
    """A comma-separated list of HH-RLHF files as `load_hh_rlhf_rows` takes it: each item a path or the name
    of an offline split ("helpful-base" -> shared_data_dir()/hh-rlhf/helpful-base-test.jsonl.gz); None stays
    None (all offline splits) and "Anthropic/hh-rlhf" stays the Hub name."""
    if spec is None or spec == HH_RLHF_HUB_NAME:
        return spec
    offline = {name.removesuffix("-test.jsonl.gz"): name for name in HH_RLHF_FILES}
    files = []
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        if item in offline:
            files.append(shared_data_dir() / "hh-rlhf" / offline[item])
        elif Path(item).suffix in (".jsonl", ".gz"):
            files.append(Path(item))
        else:
            raise DataError(f"hh_data: {item!r} is neither an offline split ({', '.join(offline)}) nor a "
                             ".jsonl/.jsonl.gz file path")
    if not files:
        raise DataError(f"hh_data: no files in {spec!r}")
    return files


def _load_hh_rlhf_from_hub() -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise RuntimeError(f"loading {HH_RLHF_HUB_NAME!r} from the Hub needs the `datasets` package "
                           "(pip install datasets); offline, use the local files (data_files=None)") from None
    try:
        dataset = datasets.load_dataset(HH_RLHF_HUB_NAME)
    except Exception as e:
        raise RuntimeError(f"could not load {HH_RLHF_HUB_NAME!r} from the Hugging Face Hub ({e}); offline, use "
                           "the local files (data_files=None)") from e
    return [{"chosen": r["chosen"], "rejected": r["rejected"], "_source": f"{HH_RLHF_HUB_NAME}:{split}",
             "_row": i} for split in ("train", "test") for i, r in enumerate(dataset[split])]


def split_hh_rlhf_rows(rows: Sequence[dict[str, Any]]) -> dict[Role, list[dict[str, Any]]]:
    """Drop malformed pairs (counted, one example logged) and assign every usable row a role."""
    by_role: dict[Role, list[dict[str, Any]]] = {role: [] for role in ROLE_FRACTIONS}  # type: ignore[misc]
    problems: Counter[str] = Counter()
    for row in rows:
        problem = hh_pair_problem(parse_hh_transcript(row["chosen"]), parse_hh_transcript(row["rejected"]))
        if problem is not None:
            if not problems:
                logger.warning("skipping malformed HH-RLHF pair (%s) at %s, row %s",
                               problem, row.get("_source"), row.get("_row"))
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

    def __init__(self, test_size: int = 1024, swap: bool = False,
                 role: Literal["preference_model", "rl"] = "preference_model",
                 data_files: Sequence[str | Path] | str | None = None, max_chars: int | None = None):
        if role not in self.ROLES:
            raise ValueError(f"role must be one of {sorted(self.ROLES)}, got {role!r}")
        super().__init__(swap=swap)
        self.test_size = test_size
        self.role = role
        self.data_files = data_files
        self.max_chars = max_chars
        self._split: dict[Role, list[dict[str, Any]]] | None = None

    def role_rows(self) -> dict[Role, list[dict[str, Any]]]:
        """All four roles' rows (unshuffled, in file order); computed once per builder."""
        if self._split is None:
            self._split = split_hh_rlhf_rows(load_hh_rlhf_rows(self.data_files))
        return self._split

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
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        raise DataFormatError(f"{where}: expected a list of {{'role': str, 'content': str}} messages, got {value!r:.200}")
    return value


def jsonl_row_to_labeled_comparison(row: dict[str, Any]) -> LabeledComparison:
    """A {"prompt_conversation", "completion_A", "completion_B", "label"} row; errors name file/row/field."""
    where = f"{row.get('_source', '<row>')}, row {row.get('_row', '?')}"
    for field in ("prompt_conversation", "completion_A", "completion_B", "label"):
        if field not in row:
            raise DataFormatError(f"{where}: missing field {field!r}")
    messages = {field: _check_messages(row[field], f"{where}, field {field!r}")
                for field in ("prompt_conversation", "completion_A", "completion_B")}
    for field in ("completion_A", "completion_B"):
        if not messages[field]:
            raise DataFormatError(f"{where}, field {field!r}: a completion needs at least one message")
    if row["label"] not in ("A", "B", "Tie"):
        raise DataFormatError(f"{where}, field 'label': expected 'A', 'B' or 'Tie', got {row['label']!r}")
    return LabeledComparison(Comparison(messages["prompt_conversation"], messages["completion_A"],
                                        messages["completion_B"]), row["label"])


class ComparisonBuilderFromJsonl(ComparisonDatasetBuilder):
    """Comparisons from JSONL files of {"prompt_conversation", "completion_A", "completion_B", "label"}."""

    def __init__(self, train_path: str | Path, test_path: str | Path | None = None, swap: bool = False):
        super().__init__(swap=swap)
        self.train_path = train_path
        self.test_path = test_path

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
