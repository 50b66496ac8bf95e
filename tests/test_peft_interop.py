"""Adapters other tools read: saved folders are PEFT adapters, PEFT adapters trained elsewhere load, exports
(adapter and merged model) give rlhfkit's logits under peft/transformers, Hub ids fall back offline."""

import json
import logging
from pathlib import Path

import pytest
import torch

from rlhfkit.engine import AdamParams, Datum, ModelInput, ServiceClient

# These tests use PEFT directly, as a user's own code would; its notices about tied embeddings and transformers'
# deprecation of is_gradient_checkpointing (raised inside PEFT) are the libraries' own, not rlhfkit's.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

TEXT = "A short sentence to compare logits on, with a few more words."


@pytest.fixture(scope="module")
def service():
    return ServiceClient()


@pytest.fixture(scope="module")
def tokens(tiny_model_dir):
    from rlhfkit.engine import load_tokenizer

    return load_tokenizer(tiny_model_dir).encode(TEXT)


@pytest.fixture(scope="module")
def trained_sampler_dir(service, tiny_model_dir, tokens, tmp_path_factory):
    """An rlhfkit sampler checkpoint whose adapter moved away from zero (a few large steps)."""
    trainer = service.create_lora_training_client(tiny_model_dir, rank=4, seed=3)
    datum = Datum(
        ModelInput.from_ints(tokens[:-1]), {"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)}
    )
    for _ in range(3):
        trainer.forward_backward([datum], "cross_entropy")
        trainer.optim_step(AdamParams(learning_rate=5e-2))
    return trainer.save_weights_for_sampler(str(tmp_path_factory.mktemp("ckpt") / "sampler")).result().path


def base_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def token_logprobs_of(model, tokens):
    """log p(token_i | tokens_<i) for i >= 1, from a transformers/peft model's logits."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]


def rlhfkit_logprobs(service, folder, tokens):
    sampler = service.create_sampling_client(model_path=folder)
    return torch.tensor(sampler.compute_logprobs(ModelInput.from_ints(tokens)).result()[1:])


def test_saved_adapter_is_a_peft_adapter_with_rlhfkits_logits(service, tiny_model_dir, tokens, trained_sampler_dir):
    from peft import AutoPeftModelForCausalLM, PeftModel

    config = json.loads((Path(trained_sampler_dir) / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == sorted(config["target_modules"]) and "lm_head" in config["target_modules"]
    assert config["base_model_name_or_path"] == tiny_model_dir  # the name given, not a resolved cache folder
    peft_model = PeftModel.from_pretrained(base_model(tiny_model_dir), trained_sampler_dir).eval()
    theirs = token_logprobs_of(peft_model, tokens)
    ours = rlhfkit_logprobs(service, trained_sampler_dir, tokens)
    plain = token_logprobs_of(base_model(tiny_model_dir), tokens)
    assert (ours - plain).abs().max() > 1e-2  # the adapter matters
    assert (ours - theirs).abs().max() < 1e-4
    auto = AutoPeftModelForCausalLM.from_pretrained(trained_sampler_dir, dtype=torch.float32).eval()
    assert (token_logprobs_of(auto, tokens) - ours).abs().max() < 1e-4


def test_a_peft_adapter_trained_elsewhere_samples_and_trains(service, tiny_model_dir, tokens, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        base_model(tiny_model_dir),
        LoraConfig(
            r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False
        ),
    )
    model.save_pretrained(tmp_path / "foreign")
    theirs = token_logprobs_of(model.eval(), tokens)
    ours = rlhfkit_logprobs(service, str(tmp_path / "foreign"), tokens)
    assert (ours - theirs).abs().max() < 1e-4
    trainer = service.create_training_client_from_state(str(tmp_path / "foreign"))
    assert trainer.spec.alpha == 8 and trainer.spec.rank == 2
    datum = Datum(
        ModelInput.from_ints(tokens[:-1]), {"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)}
    )
    forward = torch.tensor(trainer.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist())
    assert (forward - theirs).abs().max() < 1e-4


def test_export_adapter_and_merged_model_give_rlhfkits_logits(
    service, tiny_model_dir, tokens, trained_sampler_dir, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.cli import main

    ours = rlhfkit_logprobs(service, trained_sampler_dir, tokens)
    assert main(["export", trained_sampler_dir, str(tmp_path / "adapter")]) == 0
    adapter = PeftModel.from_pretrained(base_model(tiny_model_dir), str(tmp_path / "adapter")).eval()
    assert (token_logprobs_of(adapter, tokens) - ours).abs().max() < 1e-4

    assert main(["export", trained_sampler_dir, str(tmp_path / "merged"), "--merge"]) == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # the unembedding was adapted: it has its own matrix now
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    assert (token_logprobs_of(merged, tokens) - ours).abs().max() < 1e-4
    base = base_model(tiny_model_dir)
    assert torch.equal(merged.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert AutoTokenizer.from_pretrained(str(tmp_path / "merged")).encode(TEXT) == tokens
    assert main(["export", trained_sampler_dir, str(tmp_path / "merged")]) == 2  # never over a folder with files


def test_a_hub_id_falls_back_to_its_offline_copy_with_one_warning(tiny_model_dir, monkeypatch, caplog):
    from rlhfkit.engine.model import base as models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(models.OFFLINE_COPIES, "some-org/tiny-model", (tiny_model_dir, "a 4-bit-derived test copy"))
    models.resolve_base_model.cache_clear()
    with caplog.at_level(logging.WARNING, logger=models.__name__):
        for _ in range(2):
            assert models.resolve_base_model("some-org/tiny-model") == str(Path(tiny_model_dir).resolve())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0] and "4-bit-derived test copy" in warnings[0]
    with pytest.raises(models.ModelNotFoundError):  # a Hub id without an offline copy still fails clearly
        models.resolve_base_model("some-org/no-copy")
    models.resolve_base_model.cache_clear()


def test_sample_reads_a_prompts_file_and_a_peft_folder_and_version_prints(trained_sampler_dir, tmp_path, capsys):
    from rlhfkit import __version__
    from rlhfkit.cli import main
    from rlhfkit.sampling_cli import read_prompts

    (tmp_path / "p.txt").write_text("First prompt\n\nSecond prompt\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "First prompt"}\n{"prompt": "Second prompt", "id": 2}\n')
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    assert read_prompts(tmp_path / "p.txt") == read_prompts(tmp_path / "p.jsonl") == ["First prompt", "Second prompt"]
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: .*prompt"):
        read_prompts(tmp_path / "bad.jsonl")
    peft_only = tmp_path / "peft_only"  # a PEFT adapter folder: no rlhfkit_state.json
    peft_only.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (peft_only / name).write_bytes((Path(trained_sampler_dir) / name).read_bytes())
    capsys.readouterr()
    assert (
        main(
            [
                "sample",
                "--model",
                str(peft_only),
                "--prompts-file",
                str(tmp_path / "p.jsonl"),
                "--max-tokens",
                "4",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.count("=== prompt: ") == 2
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"rlhfkit {__version__}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_lora_forward_matches_peft_forward_and_gradients(tiny_model_dir, dtype):
    """The trainer's adapted layers (lora.fused_lora_forward) give PEFT's own LoRA forward's logits and adapter
    gradients: equal in fp32 (to rounding), within bf16 rounding under bf16 autocast."""
    from rlhfkit.engine.model.lora import LoraSpec, add_lora
    from rlhfkit.engine.model.base import load_base_model, pick_precision

    precision = pick_precision(dtype=dtype)
    model = add_lora(load_base_model(tiny_model_dir, precision), LoraSpec(tiny_model_dir, rank=4, seed=0))
    fused = [m for m in model.modules() if "forward" in m.__dict__]
    assert fused, "add_lora installs the fused forward on the adapted layers"
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(param.numel()))
    ids = torch.randint(0, 100, (3, 11), generator=torch.Generator().manual_seed(0))

    def logits_and_grads():
        model.zero_grad()
        with precision.autocast:
            logits = model(input_ids=ids).logits.float()
        logits.logsumexp(-1).sum().backward()
        return logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    fused_logits, fused_grads = logits_and_grads()
    for module in fused:
        del module.forward  # PEFT's own forward
    peft_logits, peft_grads = logits_and_grads()
    tolerance = 1e-5 if dtype == "float32" else 3e-2
    assert (fused_logits - peft_logits).abs().max() <= tolerance * peft_logits.abs().max()
    assert (fused_grads - peft_grads).norm() <= tolerance * peft_grads.norm()


def test_adapters_of_the_embedded_model_name_its_hub_id_for_other_tools(service, tmp_path):
    """adapter_config.json (read by PEFT, vLLM, the Hub) names HuggingFaceTB/SmolLM2-135M-Instruct; the
    embedded name stays only in rlhfkit_state.json, which rlhfkit resolves, and an export names the Hub id too
    (or the --base-model given)."""
    from rlhfkit.engine.model.export import export_adapter
    from rlhfkit.engine.model.lora import read_spec

    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    trainer = service.create_lora_training_client("smollm2-135m-instruct", rank=2, train_unembed=False)
    checkpoint = Path(trainer.save_state(str(tmp_path / "state")).result().path)
    assert json.loads((checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"] == hub_id
    assert json.loads((checkpoint / "rlhfkit_state.json").read_text())["lora"]["base_model"] == "smollm2-135m-instruct"
    assert read_spec(checkpoint).base_model == "smollm2-135m-instruct"  # rlhfkit loads the embedded copy
    exported = export_adapter(checkpoint, tmp_path / "adapter")
    assert json.loads((exported / "adapter_config.json").read_text())["base_model_name_or_path"] == hub_id
    named = export_adapter(checkpoint, tmp_path / "named", base_model="me/my-copy")
    assert json.loads((named / "adapter_config.json").read_text())["base_model_name_or_path"] == "me/my-copy"
