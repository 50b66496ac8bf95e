"""Chat SFT datasets: LIMA, JSONL chats, HH-RLHF chosen transcripts, NoRobots offline; bad data handling."""

import gzip
import json
import logging

import pytest

from rlhfkit.recipes.chat_sl.chat_datasets import (
    DatasetUnavailableError,
    HHChosenBuilder,
    JsonlChatBuilder,
    LimaBuilder,
    NoRobotsBuilder,
    lima_row_to_messages,
    parse_hh_transcript,
)
from rlhfkit.supervised.data import DataFormatError
from rlhfkit.supervised.types import ChatDatasetBuilderCommonConfig


@pytest.fixture(scope="module")
def common(tiny_model_dir):
    return ChatDatasetBuilderCommonConfig(tiny_model_dir, "role_colon", max_length=64, batch_size=8)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")


def tokens(batch):
    return [d.model_input.to_ints() for d in batch]


def chat(user, assistant):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def test_lima_rows_to_messages():
    row = {"instruction": "Go on.", "input": "", "output": "More.", "history": [["Tell me a story.", "Once..."]]}
    assert lima_row_to_messages(row) == [
        {"role": "user", "content": "Tell me a story."},
        {"role": "assistant", "content": "Once..."},
        {"role": "user", "content": "Go on."},
        {"role": "assistant", "content": "More."},
    ]
    row = {"instruction": "Sum", "input": "1 2", "output": "3", "history": []}
    assert lima_row_to_messages(row)[0]["content"] == "Sum\n\n1 2"


def test_lima_builder_split_batches_and_truncation(tiny_model_dir):
    common = ChatDatasetBuilderCommonConfig(tiny_model_dir, "role_colon", max_length=512, batch_size=8)
    builder = LimaBuilder(common, test_size=16)
    train, test = builder()
    assert len(test) == 1 and 12 <= len(test.get_batch(0)) <= 16  # the whole test set in one batch
    assert len(train.rows) > 900 and len(train) == len(train.rows) // 8
    batch = train.get_batch(0)
    assert len(batch) == 8
    assert all(d.model_input.length <= 511 for d in batch)  # max_length 512, minus the shift
    assert max(d.model_input.length for d in batch) == 511  # LIMA answers are long: truncated
    assert all(sum(d.loss_fn_inputs["weights"].data) == pytest.approx(1.0) for d in batch)  # mean reduction
    # deterministic: a second build gives the same batches; epochs reshuffle
    train2, test2 = builder()
    train.set_epoch(0), train2.set_epoch(0)
    assert tokens(train.get_batch(3)) == tokens(train2.get_batch(3))
    assert tokens(test.get_batch(0)) == tokens(test2.get_batch(0))
    epoch0 = tokens(train.get_batch(0))
    train.set_epoch(1)
    assert tokens(train.get_batch(0)) != epoch0


def test_jsonl_bad_rows_are_skipped_with_count_and_example(tmp_path, common, caplog):
    good = [chat(f"Question {i}?", f"Answer {i}.") for i in range(8)]
    bad = [
        {"text": "no messages field"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        chat("word " * 200, "The reply is beyond max_length, so nothing is left to train on."),
        {"messages": [{"role": "user", "content": "Only a question"}]},
    ]
    path = tmp_path / "chats.jsonl"
    write_jsonl(path, good[:4] + bad + good[4:])
    with caplog.at_level(logging.WARNING):
        train, test = JsonlChatBuilder(common, str(path))()
    assert test is None
    assert len(train) == 1 and len(train.get_batch(0)) == 8
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(path) in warnings[0] and "skipped 5 of 13 rows" in warnings[0] and "line 5" in warnings[0]


def test_unparseable_files_name_file_and_line(tmp_path, common):
    path = tmp_path / "broken.jsonl"
    write_jsonl(path, [chat("a", "b"), chat("c", "d"), '{"messages": [{"role": "user", "content": "x"}'])
    with pytest.raises(DataFormatError, match=r"broken\.jsonl, line 3"):
        JsonlChatBuilder(common, str(path))()
    lima = tmp_path / "lima.json"
    lima.write_text('[\n  {"instruction": "a", "output": "b", "history": []},\n  {"instruction": \n]')
    with pytest.raises(DataFormatError, match=r"lima\.json, line 4"):
        LimaBuilder(common, path=str(lima))()


def test_hh_transcript_parser():
    text = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant:  Goodbye. "
    assert parse_hh_transcript(text) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    with pytest.raises(ValueError):
        parse_hh_transcript("preamble\n\nHuman: Hi")


def test_hh_chosen_builder(tmp_path, common, caplog):
    path = tmp_path / "hh.jsonl.gz"
    rows = [{"chosen": f"\n\nHuman: Question {i}?\n\nAssistant: Answer {i}.", "rejected": "x"} for i in range(12)]
    rows.insert(3, {"rejected": "only"})
    rows.insert(5, {"chosen": "\n\nHuman: Hi\n\nAssistant:   "})  # empty reply
    with gzip.open(path, "wt") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    with caplog.at_level(logging.WARNING):
        train, test = HHChosenBuilder(common, paths=[str(path)], test_size=4)()
    assert len(train) == 1 and len(test.get_batch(0)) == 4
    assert any("skipped 2 of 14 rows" in r.getMessage() and "line 4" in r.getMessage() for r in caplog.records)


def test_norobots_offline_points_to_lima(common, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetUnavailableError, match="LimaBuilder"):
        NoRobotsBuilder(common)()
