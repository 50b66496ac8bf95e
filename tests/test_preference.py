"""Stage 2: comparison rendering, the HH-RLHF parser and role split, and the preference model."""

import asyncio
import gzip
import hashlib
import json
import logging

import numpy as np
import pytest

from rlhfkit.paths import shared_data_dir
from rlhfkit.preference.types import (Comparison, ComparisonRendererFromChatRenderer, LabeledComparison,
                                      PreferenceModelFromChatRenderer)
from rlhfkit.recipes.preference import datasets as hh
from rlhfkit.renderers import get_renderer

QWEN_TOKENIZER = shared_data_dir() / "tokenizers" / "qwen2"
HH_DIR = shared_data_dir() / "hh-rlhf"


@pytest.fixture(scope="module")
def renderer():
    from rlhfkit.tokenizer_utils import get_tokenizer

    return get_renderer("role_colon", get_tokenizer(str(QWEN_TOKENIZER)))


def two_turn_comparison() -> Comparison:
    return Comparison(
        prompt_conversation=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                             {"role": "user", "content": "Name a colour."}],
        completion_A=[{"role": "assistant", "content": "Blue."}],
        completion_B=[{"role": "assistant", "content": "I won't."}])


# --- types and rendering ---------------------------------------------------------------------------------

def test_swap():
    c = two_turn_comparison()
    assert c.swap().completion_A == c.completion_B and c.swap().completion_B == c.completion_A
    labeled = LabeledComparison(c, "A")
    assert labeled.swap().label == "B" and labeled.swap().swap() == labeled
    assert LabeledComparison(c, "Tie").swap().label == "Tie"
    with pytest.raises(ValueError):
        LabeledComparison(c, "C")


def test_rendered_prompt_is_the_spec_text(renderer):
    comparison_renderer = ComparisonRendererFromChatRenderer(renderer)
    prompt = comparison_renderer.build_generation_prompt(two_turn_comparison())
    assert renderer.tokenizer.decode(prompt.to_ints()) == (
        "User: Hi\n\nAssistant: Hello!\n\nUser: Name a colour.\n\n"
        "System: ==== Completion A ====\n\nAssistant: Blue.\n\n"
        "System: ==== Completion B ====\n\nAssistant: I won't.\n\n"
        "System: ==== Preference ====\n\nAssistant:")


@pytest.mark.parametrize("label", ["A", "B"])
def test_training_datum_has_one_weighted_position_on_the_label(renderer, label):
    from rlhfkit.supervised.common import datum_from_model_input_weights

    comparison_renderer = ComparisonRendererFromChatRenderer(renderer)
    labeled = LabeledComparison(two_turn_comparison(), label)
    model_input, weights = comparison_renderer.to_model_input_weights(labeled)
    prompt = comparison_renderer.build_generation_prompt(labeled.comparison).to_ints()
    label_token = renderer.tokenizer.encode(" " + label, add_special_tokens=False)
    assert len(label_token) == 1
    assert model_input.to_ints() == prompt + label_token  # truncated right after the label's first token
    assert list(weights) == [0] * len(prompt) + [1]

    datum = datum_from_model_input_weights(model_input, weights, max_length=None, reduction="none")
    datum_weights = datum.loss_fn_inputs["weights"].to_numpy()
    targets = datum.loss_fn_inputs["target_tokens"].to_numpy()
    assert np.flatnonzero(datum_weights).tolist() == [len(datum_weights) - 1]
    assert datum_weights[-1] == 1.0 and targets[-1] == label_token[0]
    assert comparison_renderer.label_token(label) == label_token[0]


# --- HH-RLHF parsing ------------------------------------------------------------------------------------

def test_parser_on_a_real_row():
    with gzip.open(HH_DIR / "helpful-base-test.jsonl.gz", "rt") as f:
        f.readline()
        row = json.loads(f.readline())  # row 2: a three-turn butterfly conversation
    labeled = hh.hh_row_to_labeled_comparison(row)
    assert labeled.label == "A"
    c = labeled.comparison
    assert [m["role"] for m in c.prompt_conversation] == ["user", "assistant", "user", "assistant", "user"]
    assert c.prompt_conversation[0]["content"] == "How can I find out what types of butterflies are in my area?"
    assert c.prompt_conversation[1]["content"] == "Which location are you in?"
    assert c.prompt_conversation[2]["content"] == "I am in Oregon."
    assert c.prompt_conversation[3]["content"].endswith("some of the common butterflies in Oregon")
    assert c.prompt_conversation[4]["content"] == "Great. What are some common species then?"
    assert c.completion_A == [{"role": "assistant", "content": (
        "About 150 species of butterflies live in Oregon, with about 100 species are moths, and about 20 "
        "species are common here year-round, and another 10 species are seen here year-round.  I suggest you "
        "keep an eye out for skippers, gossamer wings, and red admirals.")}]
    assert c.completion_B[0]["role"] == "assistant"
    assert c.completion_B[0]["content"].startswith("Are you interested in just the common butterflies?")
    assert c.completion_B[0]["content"].endswith("because you have children?")


@pytest.mark.parametrize("chosen, rejected", [
    ("\n\nHuman: Hi\n\nAssistant: Hello", "\n\nHuman: Hi\n\nAssistant: Yo\n\nHuman: ok\n\nAssistant: bye"),
    ("\n\nHuman: Hi\n\nAssistant: Hello", "\n\nHuman: Hey\n\nAssistant: Yo"),
    ("\n\nHuman: Hi\n\nAssistant: Hello", "\n\nHuman: Hi\n\nAssistant:  Hello  "),
    ("\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye", "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: See ya"),
    ("Preamble\n\nHuman: Hi\n\nAssistant: Hello", "Preamble\n\nHuman: Hi\n\nAssistant: Yo"),
], ids=["different-lengths", "prefixes-disagree", "identical-last", "last-not-assistant", "text-before-marker"])
def test_parser_rejects_malformed_pairs(chosen, rejected):
    assert hh.hh_row_to_labeled_comparison({"chosen": chosen, "rejected": rejected}) is None


def test_malformed_pairs_are_counted_and_one_is_logged_with_file_and_row(tmp_path, caplog):
    path = tmp_path / "pairs.jsonl"
    rows = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Yo"},
            {"chosen": "\n\nHuman: Hi\n\nAssistant: Same", "rejected": "\n\nHuman: Hi\n\nAssistant: Same"},
            {"chosen": "\n\nHuman: A\n\nAssistant: B", "rejected": "\n\nHuman: C\n\nAssistant: D"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        split = hh.split_hh_rlhf_rows(hh.load_hh_rlhf_rows([path]))
    assert sum(len(v) for v in split.values()) == 1
    assert f"{path}, row 2" in caplog.text and "skipped 2 of 3" in caplog.text


def test_bad_file_errors_name_file_row_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, row 1, field 'rejected'"):
        hh.load_hh_rlhf_rows([path])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        hh.load_hh_rlhf_rows([tmp_path / "missing.jsonl"])


def test_hub_name_without_datasets_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(RuntimeError, match="datasets"):
        hh.HHHComparisonBuilder(data_files="Anthropic/hh-rlhf").get_train_and_test_datasets()


# --- the four-role split of the offline HH-RLHF rows -----------------------------------------------------

def prompt_hashes(builder: hh.HHHComparisonBuilder, rows) -> set[str]:
    hashes = set()
    for row in rows:
        prompt = builder.example_to_labeled_comparison(row).comparison.prompt_conversation
        hashes.add(hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest())
    return hashes


def test_split_roles_are_disjoint_and_stable():
    pm = hh.HHHComparisonBuilder()
    rl = hh.HHHComparisonBuilder(role="rl", test_size=10_000)
    pm_train, pm_test = pm.get_train_and_test_datasets()
    rl_prompts, eval_prompts = rl.get_train_and_test_datasets()
    roles = {name: prompt_hashes(pm, rows) for name, rows in
             [("pm_train", pm_train), ("pm_test", pm_test), ("rl", rl_prompts), ("eval", eval_prompts)]}
    names = list(roles)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not roles[a] & roles[b], f"{a} and {b} share prompts"
    opening = {name: {hh.split_key(r) for r in rows} for name, rows in
               [("pm_train", pm_train), ("pm_test", pm_test), ("rl", rl_prompts), ("eval", eval_prompts)]}
    assert sum(len(s) for s in opening.values()) == len(set().union(*opening.values()))

    total = sum(len(rows) for rows in (pm_train, pm_test, rl_prompts, eval_prompts))
    assert 8300 < total < 8552  # a few dozen malformed pairs are dropped
    assert 300 < len(pm_test) < 800 and 200 < len(eval_prompts) < 600 and 1700 < len(rl_prompts) < 2600
    assert len(pm_train) > 5000

    # a fresh builder gives the same rows in the same (seed-0 shuffled) order; test_size cuts the test rows
    again_train, again_test = hh.HHHComparisonBuilder(test_size=100).get_train_and_test_datasets()
    assert [r["chosen"] for r in again_train] == [r["chosen"] for r in pm_train]
    assert [r["chosen"] for r in again_test] == [r["chosen"] for r in pm_test[:100]]
    assert pm_train[:5] != sorted(pm_train, key=lambda r: (r["_source"], r["_row"]))[:5]  # shuffled


def test_role_of_uses_a_stable_hash():
    # fixed by sha256, not by Python's per-process hash(): these keys always land in the same roles
    roles = [hh.role_of(k) for k in ("What is the capital of France?", "hello", "How do I bake bread?")]
    assert roles == [hh.role_of(k) for k in ("What is the capital of France?", "hello", "How do I bake bread?")]
    u = int.from_bytes(hashlib.sha256(b"hello").digest()[:8], "big") / 2**64
    expected = "pm_test" if u < 0.06 else "winrate_eval" if u < 0.10 else "rl" if u < 0.35 else "pm_train"
    assert hh.role_of("hello") == expected


# --- user JSONL comparisons ------------------------------------------------------------------------------

def test_comparison_builder_from_jsonl(tmp_path):
    good = {"prompt_conversation": [{"role": "user", "content": "Q"}],
            "completion_A": [{"role": "assistant", "content": "a"}],
            "completion_B": [{"role": "assistant", "content": "b"}], "label": "B"}
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps(good) + "\n" + json.dumps({**good, "label": "A"}) + "\n")
    builder = hh.ComparisonBuilderFromJsonl(train)
    rows, test = builder.get_train_and_test_datasets()
    assert test is None and sorted(builder.example_to_labeled_comparison(r).label for r in rows) == ["A", "B"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, "label": "C"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, row 2, field 'label'"):
        hh.ComparisonBuilderFromJsonl(train, bad).get_train_and_test_datasets()
    bad.write_text(json.dumps({**good, "completion_A": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, row 1, field 'completion_A'"):
        hh.ComparisonBuilderFromJsonl(bad).get_train_and_test_datasets()
