"""Renderers (spec 2.3-2.9) with the real Qwen tokenizer."""

import pytest

from rlhfkit.paths import shared_data_dir
from rlhfkit.renderers import ParseTermination, RendererError, TrainOnWhat, get_renderer, get_text_content

CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Goodbye."},
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shared_data_dir() / "tokenizers" / "qwen2"))


@pytest.fixture(scope="module")
def role_colon(tokenizer):
    return get_renderer("role_colon", tokenizer)


def trained_text(tokenizer, model_input, weights):
    """The text of the weight-1 tokens, one string per contiguous run."""
    runs, current = [], None
    for token, w in zip(model_input.to_ints(), weights):
        if w and current is None:
            current = []
            runs.append(current)
        if not w:
            current = None
        else:
            current.append(token)
    return [tokenizer.decode(r) for r in runs]


def test_worked_example_tokens_and_weights(tokenizer, role_colon):
    # The spec's table (2.5): each piece is tokenised on its own, with its weight.
    pieces = [
        ("System:", 0),
        (" Be brief.\n\n", 0),
        ("User:", 0),
        (" Hi\n\n", 0),
        ("Assistant:", 0),
        (" Hello!\n\n", 1),
        ("User:", 0),
        (" Bye\n\n", 0),
        ("Assistant:", 0),
        (" Goodbye.\n\n", 1),
        ("User:", 1),
    ]
    expected_tokens, expected_weights = [], []
    for text, w in pieces:
        ids = tokenizer.encode(text, add_special_tokens=False)
        expected_tokens += ids
        expected_weights += [w] * len(ids)
    model_input, weights = role_colon.build_supervised_example(CONVO, TrainOnWhat.ALL_ASSISTANT_MESSAGES)
    assert model_input.to_ints() == expected_tokens
    assert list(weights) == expected_weights
    assert tokenizer.decode(model_input.to_ints()) == (
        "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\n\nUser: Bye\n\nAssistant: Goodbye.\n\nUser:"
    )


@pytest.mark.parametrize(
    "mode, expected",
    [
        (TrainOnWhat.LAST_ASSISTANT_MESSAGE, [" Goodbye.\n\nUser:"]),
        (TrainOnWhat.LAST_ASSISTANT_TURN, [" Goodbye.\n\nUser:"]),
        (TrainOnWhat.ALL_ASSISTANT_MESSAGES, [" Hello!\n\n", " Goodbye.\n\nUser:"]),
        (TrainOnWhat.ALL_MESSAGES, [" Be brief.\n\n", " Hi\n\n", " Hello!\n\n", " Bye\n\n", " Goodbye.\n\nUser:"]),
        (
            TrainOnWhat.ALL_TOKENS,
            ["System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\n\nUser: Bye\n\nAssistant: Goodbye.\n\nUser:"],
        ),
        (TrainOnWhat.ALL_USER_AND_SYSTEM_MESSAGES, [" Be brief.\n\n", " Hi\n\n", " Bye\n\n"]),
    ],
)
def test_train_on_what_modes(tokenizer, role_colon, mode, expected):
    model_input, weights = role_colon.build_supervised_example(CONVO, mode)
    assert trained_text(tokenizer, model_input, weights) == expected
    assert model_input.length == len(weights)


def test_last_assistant_turn_trains_consecutive_assistant_messages(tokenizer, role_colon):
    convo = CONVO[:4] + [{"role": "assistant", "content": "One."}, {"role": "assistant", "content": "Two."}]
    model_input, weights = role_colon.build_supervised_example(convo, "last_assistant_turn")
    assert trained_text(tokenizer, model_input, weights) == [" One.\n\n", " Two.\n\nUser:"]


def test_customized_and_trainable_checks(tokenizer, role_colon):
    convo = [dict(m, trainable=(i == 1)) for i, m in enumerate(CONVO)]
    model_input, weights = role_colon.build_supervised_example(convo, TrainOnWhat.CUSTOMIZED)
    assert trained_text(tokenizer, model_input, weights) == [" Hi\n\n"]
    with pytest.raises(AssertionError):
        role_colon.build_supervised_example(convo, TrainOnWhat.ALL_ASSISTANT_MESSAGES)


def test_generation_prompt(tokenizer, role_colon):
    prompt = role_colon.build_generation_prompt([{"role": "user", "content": "Hi"}])
    assert tokenizer.decode(prompt.to_ints()) == "User: Hi\n\nAssistant:"
    prompt = role_colon.build_generation_prompt(CONVO[:2], prefill=" Sure")
    assert tokenizer.decode(prompt.to_ints()) == "System: Be brief.\n\nUser: Hi\n\nAssistant: Sure"
    assert role_colon.get_stop_sequences() == ["\n\nUser:"]


def test_bos_prepended_only_when_defined(tokenizer):
    class WithBos:  # the real tokenizer, but declaring a BOS token
        bos_token = "<|endoftext|>"

        def __getattr__(self, name):
            return getattr(tokenizer, name)

    renderer = get_renderer("role_colon", WithBos())
    bos = tokenizer.encode("<|endoftext|>", add_special_tokens=False)
    prompt = renderer.build_generation_prompt([{"role": "user", "content": "Hi"}]).to_ints()
    model_input, weights = renderer.build_supervised_example(CONVO, "all_tokens")
    assert prompt[: len(bos)] == bos and model_input.to_ints()[: len(bos)] == bos
    assert list(weights[: len(bos)]) == [0] * len(bos)


@pytest.mark.parametrize(
    "text, eos, content, termination",
    [
        (" Some answer.\n\nUser:", False, "Some answer.", ParseTermination.STOP_SEQUENCE),
        ("Answer", True, "Answer", ParseTermination.EOS),
        (" Cut off mid", False, "Cut off mid", ParseTermination.MALFORMED),
        (" Answer\n\nUser:", True, "Answer", ParseTermination.MALFORMED),
        (" One\n\nUser: more\n\nUser:", False, "One", ParseTermination.MALFORMED),
    ],
)
def test_parse_response(tokenizer, role_colon, text, eos, content, termination):
    tokens = tokenizer.encode(text, add_special_tokens=False) + ([tokenizer.eos_token_id] if eos else [])
    message, got = role_colon.parse_response(tokens)
    assert (message["role"], message["content"], got) == ("assistant", content, termination)
    assert got.is_clean == (termination != ParseTermination.MALFORMED)
    assert got.is_stop_sequence == (termination == ParseTermination.STOP_SEQUENCE)


def test_non_text_content_rejected(role_colon):
    with pytest.raises(RendererError):
        role_colon.build_generation_prompt([{"role": "user", "content": [{"type": "image", "image": "x"}]}])
    prompt = role_colon.build_generation_prompt([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    assert prompt.to_ints() == role_colon.build_generation_prompt([{"role": "user", "content": "Hi"}]).to_ints()
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert get_text_content({"role": "user", "content": parts}) == "ab"


def test_chat_template_renderer(tokenizer):
    renderer = get_renderer("chat_template", tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert renderer.get_stop_sequences() == [im_end]
    model_input, weights = renderer.build_supervised_example(CONVO, TrainOnWhat.ALL_ASSISTANT_MESSAGES)
    text = tokenizer.decode(model_input.to_ints())
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\nGoodbye.<|im_end|>"
    )
    assert trained_text(tokenizer, model_input, weights) == ["Hello!<|im_end|>", "Goodbye.<|im_end|>"]
    # the generation prompt is exactly the prefix that precedes the trained reply
    prompt = renderer.build_generation_prompt(CONVO[:4]).to_ints()
    assert model_input.to_ints()[: len(prompt)] == prompt
    assert tokenizer.decode(prompt).endswith("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    reply = tokenizer.encode("Goodbye.", add_special_tokens=False)
    assert renderer.parse_response(reply + [im_end]) == (
        {"role": "assistant", "content": "Goodbye."},
        ParseTermination.STOP_SEQUENCE,
    )
    assert renderer.parse_response(reply)[1] == ParseTermination.MALFORMED


def test_recommended_renderer_names(tmp_path):
    from rlhfkit.model_info import ConfigurationError, get_recommended_renderer_name

    assert get_recommended_renderer_name("Qwen/Qwen3.5-9B-Base") == "role_colon"
    assert get_recommended_renderer_name("meta-llama/Llama-3.2-1B:peft:123") == "role_colon"
    assert get_recommended_renderer_name("deepseek-ai/DeepSeek-V3.1-Base") == "role_colon"
    assert get_recommended_renderer_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "chat_template"
    assert get_recommended_renderer_name("smollm2-135m-instruct") == "chat_template"
    assert get_recommended_renderer_name(str(tmp_path)) == "role_colon"  # a folder without a chat template
    with pytest.raises(ConfigurationError):
        get_recommended_renderer_name("nobody/model")
    with pytest.raises(KeyError):
        get_recommended_renderer_name("Qwen/NoSuchModel")


QWEN3_STYLE_TEMPLATE = (  # ChatML that refuses a system message anywhere but first (as Qwen3.5's template does)
    "{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('System message must be at the beginning.') }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.mark.parametrize("template", ["qwen2", "qwen3_style"])
def test_chat_template_renders_the_comparison_separators_as_user_text(tokenizer, template):
    """Templates that drop (Qwen2's) or refuse (Qwen3.5's) a system message after the first message still render
    the preference model's comparison prompt: the separators become user messages; the label is the one trained
    token."""
    import copy

    from rlhfkit.preference.types import Comparison, ComparisonRendererFromChatRenderer, LabeledComparison

    tok = copy.deepcopy(tokenizer)
    if template == "qwen3_style":
        tok.chat_template = QWEN3_STYLE_TEMPLATE
    renderer = get_renderer("chat_template", tok)
    assert renderer.later_system_role == "user"
    comparison = Comparison(
        [{"role": "user", "content": "Q"}],
        [{"role": "assistant", "content": "a"}],
        [{"role": "assistant", "content": "b"}],
    )
    comparisons = ComparisonRendererFromChatRenderer(renderer)
    prompt = tok.decode(comparisons.build_generation_prompt(comparison).to_ints())
    for separator in ("==== Completion A ====", "==== Completion B ====", "==== Preference ===="):
        assert f"<|im_start|>user\n{separator}<|im_end|>" in prompt
    assert (
        prompt.index("Completion A")
        < prompt.index("\na<|im_end|>")
        < prompt.index("Completion B")
        < prompt.index("\nb<|im_end|>")
        < prompt.index("Preference")
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    model_input, weights = comparisons.to_model_input_weights(LabeledComparison(comparison, "B"))
    assert list(weights).count(1) == 1 and weights[-1] == 1
    assert tok.decode(model_input.to_ints()[-1:]) == "B"
    # a first system message keeps its role
    first = renderer.build_generation_prompt([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}])
    assert tok.decode(first.to_ints()).startswith("<|im_start|>system\nS<|im_end|>")


def test_recommended_renderer_for_a_local_qwen3_5_folder_is_the_tutorials(tmp_path):
    import json

    from rlhfkit.model_info import get_recommended_renderer_name

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5_text"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert get_recommended_renderer_name(str(tmp_path)) == "role_colon"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    assert get_recommended_renderer_name(str(tmp_path)) == "chat_template"
