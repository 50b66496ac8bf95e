"""Data in the common formats: every supported preference and chat format, as small files written here in
JSONL, JSON, Parquet and CSV, loads to the same comparisons / conversations; bad rows are counted with one
example; unreadable files name the file and line; the disjoint role split holds for any source."""

import csv
import gzip
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhfkit.data_sources import DatasetUnavailableError, parse_columns, parse_source, read_tables
from rlhfkit.preference.types import Comparison, LabeledComparison
from rlhfkit.recipes.chat_sl.chat_datasets import ChatSourceBuilder, chat_builder, chat_row_to_messages
from rlhfkit.recipes.preference import datasets as pref
from rlhfkit.supervised.data import DataFormatError, validate_messages
from rlhfkit.supervised.types import ChatDatasetBuilderCommonConfig

N = 6


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def expected_comparisons():
    return [
        LabeledComparison(
            Comparison([user(f"Question {i}?")], [assistant(f"Good answer {i}.")], [assistant(f"Bad answer {i}.")]), "A"
        )
        for i in range(N)
    ]


def preference_rows(fmt):
    """The same N comparisons in each preference format."""
    rows = []
    for i in range(N):
        q, good, bad = f"Question {i}?", f"Good answer {i}.", f"Bad answer {i}."
        rows.append(
            {
                "hh": {
                    "chosen": f"\n\nHuman: {q}\n\nAssistant: {good}",
                    "rejected": f"\n\nHuman: {q}\n\nAssistant: {bad}",
                },
                "trl_strings": {"prompt": q, "chosen": good, "rejected": bad},
                "trl_messages": {"prompt": [user(q)], "chosen": [assistant(good)], "rejected": [assistant(bad)]},
                "trl_implicit": {"chosen": [user(q), assistant(good)], "rejected": [user(q), assistant(bad)]},
                "ultrafeedback": {
                    "prompt": q,
                    "prompt_id": f"id{i}",
                    "chosen": [user(q), assistant(good)],
                    "rejected": [user(q), assistant(bad)],
                    "messages": [user(q), assistant(good)],
                    "score_chosen": 8.5,
                    "score_rejected": 4.0,
                },
                "rlhfkit": {
                    "prompt_conversation": [user(q)],
                    "completion_A": [assistant(good)],
                    "completion_B": [assistant(bad)],
                    "label": "A",
                },
            }[fmt]
        )
    return rows


def write(path, rows):
    """rows as the file type of `path`: .jsonl(.gz), .json (a list), .parquet or .csv (string columns only)."""
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "wt") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows, indent=2))
    elif name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif name.endswith(".csv"):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


def comparisons(spec, columns=None):
    return [e.labeled for e in pref.load_comparison_examples(str(spec), columns)]


FORMATS_AND_FILES = [
    (fmt, ext) for fmt in ("hh", "trl_strings") for ext in ("jsonl", "jsonl.gz", "json", "parquet", "csv")
]
FORMATS_AND_FILES += [
    (fmt, ext)
    for fmt in ("trl_messages", "trl_implicit", "ultrafeedback", "rlhfkit")
    for ext in ("jsonl", "json", "parquet")
]


@pytest.mark.parametrize("fmt, ext", FORMATS_AND_FILES, ids=[f"{f}-{e}" for f, e in FORMATS_AND_FILES])
def test_every_preference_format_and_file_type_loads_the_same_comparisons(tmp_path, fmt, ext):
    path = write(tmp_path / f"data.{ext}", preference_rows(fmt))
    assert comparisons(path) == expected_comparisons()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no cache written beside the user's file


def test_column_mapping(tmp_path):
    rows = [
        {"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"], "prompt": "ignored"}
        for r in preference_rows("trl_strings")
    ]
    path = write(tmp_path / "mine.parquet", rows)
    assert comparisons(path, "prompt=question, chosen=good,rejected=bad") == expected_comparisons()
    with pytest.raises(DataFormatError, match=r"mine\.parquet: no column 'answer'.*columns: bad, good, prompt"):
        comparisons(path, "prompt=question,chosen=answer,rejected=bad")
    with pytest.raises(ValueError, match="'reply' is not one of"):
        parse_columns("reply=good", pref.PREFERENCE_COLUMNS)
    chats = write(tmp_path / "chats.csv", [{"q": f"Question {i}?", "a": f"Answer {i}."} for i in range(3)])
    [table] = read_tables([parse_source(str(chats))], parse_columns("prompt=q,completion=a", ["prompt", "completion"]))
    first = table.rows[0][1]
    assert validate_messages(chat_row_to_messages(first)) == [user("Question 0?"), assistant("Answer 0.")]


def test_bad_preference_rows_are_counted_with_one_example(tmp_path, caplog):
    rows = preference_rows("trl_strings")
    rows[1] = {"prompt": "Q", "chosen": "same", "rejected": "same"}
    rows.insert(3, {"prompt": "Q", "chosen": "a"})
    rows.insert(4, {"prompt": "Q", "chosen": [{"role": "robot", "content": "x"}], "rejected": "b"})
    rows.insert(5, {**preference_rows("ultrafeedback")[0], "score_chosen": 4.0})  # no preference
    path = write(tmp_path / "pairs.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        examples = pref.load_comparison_examples(str(path))
    assert len(examples) == N - 1
    assert examples[0].where == f"{path}, line 1"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"{path}: skipped 4 of 9 rows" in warnings[0]
    assert "line 2: fields 'chosen' and 'rejected': the replies are identical" in warnings[0]


def test_unreadable_files_name_the_file_and_line(tmp_path):
    good = preference_rows("hh")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(good[0]) + "\n" + json.dumps(good[1]) + "\n" + '{"chosen": "x", \n')
    with pytest.raises(DataFormatError, match=r"broken\.jsonl, line 3: not valid JSON"):
        pref.load_comparison_examples(str(broken))

    big = write(tmp_path / "big.jsonl.gz", [{**good[i % N], "pad": "x" * 2000 + str(i)} for i in range(400)])
    truncated = tmp_path / "truncated.jsonl.gz"
    truncated.write_bytes(big.read_bytes()[: len(big.read_bytes()) // 2])
    with pytest.raises(DataFormatError, match=r"truncated\.jsonl\.gz, line \d+: .*truncated or corrupt"):
        pref.load_comparison_examples(str(truncated))

    listing = tmp_path / "list.json"
    listing.write_text('[\n  {"chosen": "a",\n   "rejected": }\n]')
    with pytest.raises(DataFormatError, match=r"list\.json, line 3"):
        pref.load_comparison_examples(str(listing))

    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("prompt,chosen,rejected\nq,a,b\nq,a,b,extra\n")
    with pytest.raises(DataFormatError, match=r"bad\.csv: cannot be read as CSV .*line 3"):
        pref.load_comparison_examples(str(bad_csv))
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"PAR1 not really")
    with pytest.raises(DataFormatError, match=r"bad\.parquet: cannot be read as PARQUET"):
        pref.load_comparison_examples(str(bad_parquet))
    with pytest.raises(FileNotFoundError, match=r"missing\.parquet"):
        pref.load_comparison_examples(str(tmp_path / "missing.parquet"))


def test_sources_offline_names_and_hub_names(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert parse_source("HuggingFaceH4/ultrafeedback_binarized:train_prefs").split == "train_prefs"
    with pytest.raises(DatasetUnavailableError, match=r"Anthropic/hh-rlhf:test: a Hugging Face Hub dataset.*local"):
        pref.load_comparison_examples("Anthropic/hh-rlhf:test")
    with pytest.raises(ValueError, match="'helpful' is neither a data file"):
        pref.load_comparison_examples("helpful")
    # the offline split names still work, alone or with files
    helpful = pref.load_comparison_examples("helpful-online")
    assert 1000 < len(helpful) < 1137 and helpful[0].where.endswith("helpful-online-test.jsonl.gz, line 1")


def test_the_disjoint_role_split_holds_for_any_source(tmp_path):
    rows = [{"prompt": f"Prompt number {i}", "chosen": "yes", "rejected": "no"} for i in range(400)]
    rows += [{"prompt": f"Prompt number {i}", "chosen": "sure", "rejected": "nah"} for i in range(0, 400, 7)]
    path = write(tmp_path / "many.parquet", rows)
    pm = pref.ComparisonBuilderFromSource(str(path), test_size=10_000)
    rl = pref.ComparisonBuilderFromSource(str(path), role="rl", test_size=10_000)
    roles = [*pm.get_train_and_test_datasets(), *rl.get_train_and_test_datasets()]
    prompts = [{e.labeled.comparison.prompt_conversation[0]["content"] for e in examples} for examples in roles]
    assert sum(len(examples) for examples in roles) == len(rows)
    assert sum(len(p) for p in prompts) == 400  # a prompt's repeated rows all land in one role
    assert all(len(p) > 5 for p in prompts)
    assert [e.where for e in pm.get_train_and_test_datasets()[0]] == [e.where for e in roles[0]]  # stable
    assert len(pref.ComparisonBuilderFromSource(str(path), test_size=3).get_train_and_test_datasets()[1]) == 3


def test_hh_files_give_the_same_roles_and_order_as_the_hh_builder():
    old = pref.HHHComparisonBuilder(
        role="rl", test_size=50, max_chars=400, data_files=pref.hh_data_files("helpful-online")
    )
    new = pref.ComparisonBuilderFromSource("helpful-online", role="rl", test_size=50, max_chars=400)
    for old_rows, new_examples in zip(old.get_train_and_test_datasets(), new.get_train_and_test_datasets()):
        assert [old.example_to_labeled_comparison(r) for r in old_rows] == [e.labeled for e in new_examples]


# ---------------------------------------------------------------- chat data


def chat_rows(fmt):
    rows = []
    for i in range(20):
        q, a = f"Question {i}?", f"Answer {i}."
        rows.append(
            {
                "messages": {"messages": [user(q), assistant(a)]},
                "prompt_completion": {"prompt": q, "completion": a},
                "prompt_completion_messages": {"prompt": [user(q)], "completion": [assistant(a)]},
                "instruction": {"instruction": q, "input": "", "output": a},
            }[fmt]
        )
    return rows


CHAT_FILES = [(fmt, ext) for fmt in ("prompt_completion", "instruction") for ext in ("jsonl", "json", "parquet", "csv")]
CHAT_FILES += [
    (fmt, ext) for fmt in ("messages", "prompt_completion_messages") for ext in ("jsonl.gz", "json", "parquet")
]


@pytest.fixture(scope="module")
def common(tiny_model_dir):
    return ChatDatasetBuilderCommonConfig(tiny_model_dir, "role_colon", max_length=64, batch_size=4)


@pytest.mark.parametrize("fmt, ext", CHAT_FILES, ids=[f"{f}-{e}" for f, e in CHAT_FILES])
def test_every_chat_format_and_file_type_loads_the_same_conversations(tmp_path, common, fmt, ext):
    path = write(tmp_path / f"chats.{ext}", chat_rows(fmt))
    builder = ChatSourceBuilder(common, data=str(path), test_size=2)
    assert [c for _, c in builder.load_conversations()] == [
        [user(f"Question {i}?"), assistant(f"Answer {i}.")] for i in range(20)
    ]
    train, test = builder()
    assert len(train.rows) == 18 and len(test.get_batch(0)) == 2  # test_size held out, one batch
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_lima_history_and_bad_chat_rows(tmp_path, common, caplog):
    rows = chat_rows("instruction")[:8]
    rows[0] = {"instruction": "Go on.", "input": "", "output": "More.", "history": [["Tell me a story.", "Once..."]]}
    rows.insert(2, {"text": "no chat fields"})
    rows.insert(3, {"prompt": "Q", "completion": ""})
    path = write(tmp_path / "lima.json", rows)
    with caplog.at_level(logging.WARNING):
        conversations = ChatSourceBuilder(common, data=str(path)).load_conversations()
    assert conversations[0] == (
        f"{path}, row 1",
        [user("Tell me a story."), assistant("Once..."), user("Go on."), assistant("More.")],
    )
    assert len(conversations) == 8
    assert f"{path}: skipped 2 of 10 rows with bad data; e.g. row 3: no chat fields" in caplog.text


def test_chat_builder_selects_named_data_or_any_source(tmp_path, common):
    from rlhfkit.recipes.chat_sl.chat_datasets import LimaBuilder

    assert isinstance(chat_builder(common, "lima"), LimaBuilder)
    path = write(tmp_path / "qa.csv", [{"q": f"Q{i}", "a": f"A{i}"} for i in range(12)])
    builder = chat_builder(common, str(path), "prompt=q,completion=a", test_size=256)
    train, test = builder()
    assert len(train.rows) == 11 and len(test.get_batch(0)) == 1  # at most a tenth held out
    with pytest.raises(ValueError, match="column mapping"):
        chat_builder(common, "lima", "prompt=q")
