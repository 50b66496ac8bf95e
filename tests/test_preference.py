"""Stage 2: comparison rendering, the HH-RLHF parser and role split, and the preference model."""

import asyncio
import gzip
import hashlib
import json
import logging

import numpy as np
import pytest

from rlhfkit.paths import shared_data_dir
from rlhfkit.preference.types import (
    Comparison,
    ComparisonRendererFromChatRenderer,
    LabeledComparison,
    PreferenceModelFromChatRenderer,
)
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
        prompt_conversation=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Name a colour."},
        ],
        completion_A=[{"role": "assistant", "content": "Blue."}],
        completion_B=[{"role": "assistant", "content": "I won't."}],
    )


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
        "System: ==== Preference ====\n\nAssistant:"
    )


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
    assert c.completion_A == [
        {
            "role": "assistant",
            "content": (
                "About 150 species of butterflies live in Oregon, with about 100 species are moths, and about 20 "
                "species are common here year-round, and another 10 species are seen here year-round.  I suggest you "
                "keep an eye out for skippers, gossamer wings, and red admirals."
            ),
        }
    ]
    assert c.completion_B[0]["role"] == "assistant"
    assert c.completion_B[0]["content"].startswith("Are you interested in just the common butterflies?")
    assert c.completion_B[0]["content"].endswith("because you have children?")


@pytest.mark.parametrize(
    "chosen, rejected",
    [
        ("\n\nHuman: Hi\n\nAssistant: Hello", "\n\nHuman: Hi\n\nAssistant: Yo\n\nHuman: ok\n\nAssistant: bye"),
        ("\n\nHuman: Hi\n\nAssistant: Hello", "\n\nHuman: Hey\n\nAssistant: Yo"),
        ("\n\nHuman: Hi\n\nAssistant: Hello", "\n\nHuman: Hi\n\nAssistant:  Hello  "),
        ("\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye", "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: See ya"),
        ("Preamble\n\nHuman: Hi\n\nAssistant: Hello", "Preamble\n\nHuman: Hi\n\nAssistant: Yo"),
    ],
    ids=["different-lengths", "prefixes-disagree", "identical-last", "last-not-assistant", "text-before-marker"],
)
def test_parser_rejects_malformed_pairs(chosen, rejected):
    assert hh.hh_row_to_labeled_comparison({"chosen": chosen, "rejected": rejected}) is None


def test_malformed_pairs_are_counted_and_one_is_logged_with_file_and_row(tmp_path, caplog):
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Yo"},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Same", "rejected": "\n\nHuman: Hi\n\nAssistant: Same"},
        {"chosen": "\n\nHuman: A\n\nAssistant: B", "rejected": "\n\nHuman: C\n\nAssistant: D"},
    ]
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
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        hh.load_hh_rlhf_rows([tmp_path / "missing.jsonl"])


def test_hh_data_names_offline_splits_or_files(tmp_path):
    assert hh.hh_data_files(None) is None and hh.hh_data_files("Anthropic/hh-rlhf") == "Anthropic/hh-rlhf"
    files = hh.hh_data_files("helpful-base, helpful-online," + str(tmp_path / "mine.jsonl"))
    assert files == [
        shared_data_dir() / "hh-rlhf" / "helpful-base-test.jsonl.gz",
        shared_data_dir() / "hh-rlhf" / "helpful-online-test.jsonl.gz",
        tmp_path / "mine.jsonl",
    ]
    with pytest.raises(ValueError, match="'helpful' is neither an offline split"):
        hh.hh_data_files("helpful")
    helpful = hh.HHHComparisonBuilder(data_files=hh.hh_data_files("helpful-base"), test_size=10_000)
    train, test = helpful.get_train_and_test_datasets()
    assert {row["_source"] for row in train + test} == {str(files[0])}


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
    roles = {
        name: prompt_hashes(pm, rows)
        for name, rows in [("pm_train", pm_train), ("pm_test", pm_test), ("rl", rl_prompts), ("eval", eval_prompts)]
    }
    names = list(roles)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not roles[a] & roles[b], f"{a} and {b} share prompts"
    opening = {
        name: {hh.split_key(r) for r in rows}
        for name, rows in [("pm_train", pm_train), ("pm_test", pm_test), ("rl", rl_prompts), ("eval", eval_prompts)]
    }
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
    good = {
        "prompt_conversation": [{"role": "user", "content": "Q"}],
        "completion_A": [{"role": "assistant", "content": "a"}],
        "completion_B": [{"role": "assistant", "content": "b"}],
        "label": "B",
    }
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


# --- the preference-model training data -----------------------------------------------------------------


def polite_comparisons_file(tmp_path, n_rows=12):
    """A JSONL file of comparisons where the polite reply is preferred (the label names its side)."""
    polite = ["Thank you, happy to help.", "Sure, here is a kind answer.", "Of course, my pleasure."]
    rude = ["Go away.", "No. Figure it out.", "Stop asking me."]
    rows = []
    for i in range(n_rows):
        a, b, label = (polite[i % 3], rude[i % 3], "A") if i % 2 else (rude[i % 3], polite[i % 3], "B")
        rows.append(
            {
                "prompt_conversation": [{"role": "user", "content": f"Question number {i}?"}],
                "completion_A": [{"role": "assistant", "content": a}],
                "completion_B": [{"role": "assistant", "content": b}],
                "label": label,
            }
        )
    path = tmp_path / "comparisons.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chat_dataset_builder_from_comparisons(tmp_path, renderer, caplog):
    from rlhfkit.preference.preference_datasets import ChatDatasetBuilderFromComparisons
    from rlhfkit.supervised.types import ChatDatasetBuilderCommonConfig

    path = polite_comparisons_file(tmp_path, n_rows=40)
    config = ChatDatasetBuilderCommonConfig(str(QWEN_TOKENIZER), "role_colon", max_length=512, batch_size=16)
    builder = ChatDatasetBuilderFromComparisons(config, hh.ComparisonBuilderFromJsonl(path, path))
    train, test = builder()
    assert len(train) == 2 and len(test) == 1  # 40 // 16 train batches; the whole test split in one batch
    label_token = {renderer.tokenizer.encode(" " + x, add_special_tokens=False)[0]: x for x in "AB"}

    def labels(datums):
        for d in datums:
            weights = d.loss_fn_inputs["weights"].to_numpy()
            assert np.flatnonzero(weights).tolist() == [len(weights) - 1] and weights[-1] == 1.0
        return [label_token[int(d.loss_fn_inputs["target_tokens"].to_numpy()[-1])] for d in datums]

    test_labels = labels(test.get_batch(0))
    assert len(test_labels) == 40 and 10 <= test_labels.count("B") <= 30  # ~half swapped by Random(0)
    train_labels = labels(train.get_batch(0)) + labels(train.get_batch(1))
    assert len(train_labels) == 32 and 6 <= train_labels.count("B") <= 26

    # deterministic: a fresh builder gives the same datums
    again_test = ChatDatasetBuilderFromComparisons(config, hh.ComparisonBuilderFromJsonl(path, path))()[1]
    assert [d.model_input.to_ints() for d in again_test.get_batch(0)] == [
        d.model_input.to_ints() for d in test.get_batch(0)
    ]

    # swap=True: both orders of every comparison, with opposite labels
    both = ChatDatasetBuilderFromComparisons(config, hh.ComparisonBuilderFromJsonl(path, path), swap=True)()[1]
    both_labels = labels(both.get_batch(0))
    assert len(both_labels) == 80 and both_labels[0::2] == ["B" if i % 2 == 0 else "A" for i in range(40)]
    assert all(a != b for a, b in zip(both_labels[0::2], both_labels[1::2]))

    # comparisons whose label token would be truncated away are skipped, not trained with zero weight
    short = ChatDatasetBuilderCommonConfig(str(QWEN_TOKENIZER), "role_colon", max_length=20, batch_size=16)
    with caplog.at_level(logging.WARNING):
        assert ChatDatasetBuilderFromComparisons(short, hh.ComparisonBuilderFromJsonl(path))()[0].get_batch(0) == []
    assert "longer than max_length=20" in caplog.text


# --- a trained tiny preference model ---------------------------------------------------------------------


def filler_comparison(word: str, label: str, i: int) -> LabeledComparison:
    """The label follows the prompt's filler word ("yes" -> B, "no" -> A): easy for a tiny model to learn."""
    return LabeledComparison(
        Comparison(
            [{"role": "user", "content": " ".join([word] * 8)}],
            [{"role": "assistant", "content": f"Reply {i}."}],
            [{"role": "assistant", "content": f"Answer {i}."}],
        ),
        label,
    )


@pytest.fixture(scope="module")
def trained_pm(tiny_model_dir, tmp_path_factory):
    """The tiny model with a LoRA adapter trained for 20 cross-entropy steps on two labelled comparisons:
    (renderer, sampling client, four comparisons (the two trained ones and two with unseen replies),
    (label NLL before, after), saved sampler weights path)."""
    from rlhfkit.engine import ServiceClient, types
    from rlhfkit.supervised.common import datum_from_model_input_weights
    from rlhfkit.tokenizer_utils import get_tokenizer

    renderer = get_renderer("role_colon", get_tokenizer(tiny_model_dir))
    comparison_renderer = ComparisonRendererFromChatRenderer(renderer)
    labeled = [
        filler_comparison("yes", "B", 0),
        filler_comparison("no", "A", 1),
        filler_comparison("yes", "B", 2),
        filler_comparison("no", "A", 3),
    ]
    data = [
        datum_from_model_input_weights(*comparison_renderer.to_model_input_weights(c), reduction="none")
        for c in labeled[:2]
    ]
    training_client = ServiceClient().create_lora_training_client(tiny_model_dir, rank=8, seed=0)

    def label_nll() -> float:
        out = training_client.forward(data, "cross_entropy").result()
        return -float(np.mean([o["logprobs"].to_numpy()[-1] for o in out.loss_fn_outputs]))

    nll_start = label_nll()
    steps = 20
    for step in range(steps):
        training_client.forward_backward(data, "cross_entropy").result()
        training_client.optim_step(
            types.AdamParams(learning_rate=1e-2 * (1 - step / steps), grad_clip_norm=1.0)
        ).result()
    nll_end = label_nll()
    sampling_client = training_client.save_weights_and_get_sampling_client()
    sampler_dir = tmp_path_factory.mktemp("pm") / "sampler"
    sampler_path = training_client.save_weights_for_sampler(str(sampler_dir)).result().path
    return renderer, sampling_client, labeled, (nll_start, nll_end), sampler_path


def test_training_lowers_the_label_nll(trained_pm):
    _, _, _, (nll_start, nll_end), _ = trained_pm
    assert nll_start > 5  # untrained: the label token is one of ~150k
    assert nll_end < 0.693  # better than a coin flip between the two labels


def test_verdicts_and_probabilities_agree_and_batching_matches_single_calls(trained_pm):
    renderer, sampling_client, labeled, _, _ = trained_pm
    pm = PreferenceModelFromChatRenderer(renderer, sampling_client)
    comparisons = [c.comparison for c in labeled] + [c.swap().comparison for c in labeled]

    batched = asyncio.run(pm.judge_many(comparisons))

    async def one_at_a_time():
        return [await pm.judge(c) for c in comparisons]

    single = asyncio.run(one_at_a_time())
    assert [j.verdict for j in batched] == [j.verdict for j in single]
    assert [j.greedy_text for j in batched] == [j.greedy_text for j in single]
    np.testing.assert_allclose([j.p_b for j in batched], [j.p_b for j in single], atol=1e-4)

    assert all(j.greedy_text in ("A", "B") for j in batched)  # trained: the argmax is a label token
    assert [j.verdict for j in batched[:4]] == [1.0, -1.0, 1.0, -1.0]  # it learned the filler rule
    for j in batched:
        assert (j.verdict == 1.0) == (j.p_b > 0.5)

    # the float interfaces: verdicts, probability rewards (2 P(B) - 1), and probability_b
    assert asyncio.run(pm.judge_batch(comparisons)) == [j.verdict for j in batched]
    assert asyncio.run(pm(comparisons[1])) == -1.0
    prob_pm = PreferenceModelFromChatRenderer(renderer, sampling_client, reward_mode="probability")
    np.testing.assert_allclose(
        asyncio.run(prob_pm.judge_batch(comparisons)), [2 * j.p_b - 1 for j in batched], atol=1e-6
    )
    np.testing.assert_allclose(asyncio.run(pm.probability_b(comparisons)), [j.p_b for j in batched], atol=1e-6)

    # concurrent single calls are gathered into one batch by the engine and give the same verdicts
    async def concurrently():
        return await asyncio.gather(*(pm(c) for c in comparisons))

    assert list(asyncio.run(concurrently())) == [j.verdict for j in batched]


def test_pm_evaluator_metrics(trained_pm, tiny_model_dir):
    from rlhfkit.preference.pm_eval import (
        PreferenceModelEvaluator,
        evaluate_preference_model,
        format_pm_eval,
        wilson_interval,
    )

    renderer, sampling_client, labeled, _, _ = trained_pm
    # the filler rule ignores the A/B order, so each comparison is right in exactly one order
    metrics = asyncio.run(PreferenceModelEvaluator(labeled, "role_colon", tiny_model_dir)(sampling_client))
    assert metrics["pm/n"] == 4
    assert metrics["pm/accuracy_original"] == 1.0 and metrics["pm/accuracy_swapped"] == 0.0
    assert metrics["pm/accuracy"] == 0.5
    assert metrics["pm/accuracy_ci_low"] == metrics["pm/accuracy_ci_high"] == 0.5  # every comparison scores 0.5
    assert metrics["pm/frac_A"] == 0.5 and metrics["pm/order_agreement"] == 0.0 and metrics["pm/frac_other"] == 0
    pm = PreferenceModelFromChatRenderer(renderer, sampling_client)
    both_orders = labeled + [c.swap() for c in labeled]
    p_b = asyncio.run(pm.probability_b([c.comparison for c in both_orders]))
    p_correct = [p if c.label == "B" else 1 - p for p, c in zip(p_b, both_orders)]
    assert metrics["pm/mean_p_correct"] == pytest.approx(np.mean(p_correct), abs=1e-5)

    summary = format_pm_eval(asyncio.run(evaluate_preference_model(pm, labeled)))
    assert "accuracy           50.0%" in summary and "verdicts 'A'       50.0%" in summary

    low, high = wilson_interval(40, 50)
    assert low == pytest.approx(0.6696, abs=1e-3) and high == pytest.approx(0.8876, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0


def test_symmetric_judge_combines_both_orders_and_ignores_position(trained_pm):
    from rlhfkit.preference.pm_eval import evaluate_preference_model
    from rlhfkit.preference.types import symmetric_p_b

    renderer, sampling_client, labeled, _, _ = trained_pm
    pm = PreferenceModelFromChatRenderer(renderer, sampling_client)
    symmetric = PreferenceModelFromChatRenderer(renderer, sampling_client, reward_mode="symmetric")
    comparisons = [c.comparison for c in labeled]
    given, swapped = (
        asyncio.run(pm.judge_many(comparisons)),
        asyncio.run(pm.judge_many([c.swap() for c in comparisons])),
    )
    expected = [2 * symmetric_p_b(a, b) - 1 for a, b in zip(given, swapped)]
    rewards = asyncio.run(symmetric.judge_batch(comparisons))
    np.testing.assert_allclose(rewards, expected, atol=1e-6)
    np.testing.assert_allclose(
        asyncio.run(symmetric.judge_batch([c.swap() for c in comparisons])), [-r for r in rewards], atol=1e-6
    )  # order-free: swapping flips the sign only
    assert asyncio.run(symmetric(comparisons[0])) == pytest.approx(rewards[0], abs=1e-5)
    # the filler rule picks a side by the prompt, not the reply, so in both orders it names the same position
    # (high P(B) for "yes" prompts): the combined probability stays near 0.5, well below the one-order one
    assert all(abs(r) < abs(2 * a.p_b - 1) for r, a in zip(rewards, given))

    result = asyncio.run(evaluate_preference_model(pm, labeled))
    # "Answer i." is longer than "Reply i.": people (the labels B, A, B, A) preferred the longer reply half of
    # the time; the judge says B for "yes" prompts in both orders, so it picks the longer one half of the time
    assert result.frac_longer_preferred == 0.5 and result.frac_longer_picked == 0.5
    assert 0 <= result.accuracy_symmetric <= 1 and result.accuracy_symmetric_ci[0] <= result.accuracy_symmetric


def test_untrained_model_answers_are_scored_zero_and_logged_once(tiny_model_dir, caplog):
    from rlhfkit.engine import ServiceClient
    from rlhfkit.tokenizer_utils import get_tokenizer

    base = ServiceClient().create_sampling_client(base_model=tiny_model_dir)
    pm = PreferenceModelFromChatRenderer(get_renderer("role_colon", get_tokenizer(tiny_model_dir)), base)
    comparisons = [filler_comparison(w, "A", i).comparison for i, w in enumerate(["yes", "no"] * 3)]
    with caplog.at_level(logging.WARNING):
        judgements = asyncio.run(pm.judge_many(comparisons))
    assert all(j.greedy_text not in ("A", "B", "Tie") for j in judgements)  # a random model
    assert asyncio.run(pm.judge_batch(comparisons)) == [0.0] * 6
    assert sum(pm.other_answers.values()) == 12
    assert caplog.text.count("preference model answered") == len(pm.other_answers)


def test_preference_model_builder_loads_saved_sampler_weights(trained_pm, tiny_model_dir):
    from rlhfkit.preference.types import PreferenceModelBuilderFromChatRenderer

    renderer, sampling_client, labeled, _, sampler_path = trained_pm
    comparisons = [c.comparison for c in labeled]
    expected = asyncio.run(PreferenceModelFromChatRenderer(renderer, sampling_client).judge_many(comparisons))
    pm = PreferenceModelBuilderFromChatRenderer("role_colon", tiny_model_dir, sampler_path, reward_mode="probability")()
    np.testing.assert_allclose(asyncio.run(pm.judge_batch(comparisons)), [2 * j.p_b - 1 for j in expected], atol=1e-5)
