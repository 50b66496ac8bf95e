"""The architecture matrix: tiny random models of six architectures with the real Qwen tokenizer (Llama, Qwen2,
Qwen3, Qwen3.5 with Gated DeltaNet linear attention, Gemma 2 with soft-capping and sliding windows, Qwen3-MoE).
For each, on the path the engine picks for it and on the general path forced (RLHFKIT_FAST_PATHS=0): a LoRA
step, then sampled-token logprobs, compute_logprobs and next-token scores (with and without shared prefixes)
equal a plain one-sequence forward of the merged model (fp32, 1e-4); LoRA targets and the unembedding adapter
with tied and untied embeddings. The smoke pipeline runs on the tiny Qwen3.5 model (the tutorial's family)."""

import asyncio
import json

import pytest
import torch

from rlhfkit.engine import AdamParams, Datum, ModelInput, SamplingParams, ServiceClient
from rlhfkit.engine.torch_engine.capabilities import inspect_cache
from rlhfkit.engine.model.lora import adapter_state
from rlhfkit.engine.testing import ARCHITECTURES, build_tiny_architecture

FAST = {"llama", "qwen2", "qwen3", "qwen3_moe"}  # attention-only caches; Qwen3.5 and Gemma 2 take the general path
TIED = {"qwen2", "qwen3", "gemma2"}
LINEAR_ATTENTION_TARGETS = {"in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj"}


@pytest.fixture(scope="module")
def service():
    return ServiceClient()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("architectures")
    return {name: str(build_tiny_architecture(root / name, name)) for name in ARCHITECTURES}


@pytest.fixture(scope="module")
def trained(service, model_dirs):
    """Per architecture: a LoRA training client one step away from zero (so every adapter, the unembedding's
    included, changes the merged weights) and a sampling client on its weights."""
    clients = {}

    def get(name):
        if name not in clients:
            trainer = service.create_lora_training_client(model_dirs[name], rank=4, seed=0)
            tokens = trainer.get_tokenizer().encode("The quick brown fox jumps over the lazy dog, again and again.")
            datum = Datum(
                ModelInput.from_ints(tokens[:-1]), {"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)}
            )
            loss = trainer.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"]
            assert torch.isfinite(torch.tensor(loss))
            trainer.optim_step(AdamParams(learning_rate=1e-2)).result()
            clients[name] = (trainer, trainer.save_weights_and_get_sampling_client())
        return clients[name]

    return get


def plain_logprobs(model, tokens):
    """log p(token_t | tokens_<t) from one unpadded forward of the whole sequence: the reference."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("fast_paths", ["1", "0"], ids=["chosen_path", "general_path"])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_engine_numbers_equal_a_plain_forward(name, fast_paths, trained):
    trainer, sampler = trained(name)
    sampler = sampler.with_settings(fast_paths=fast_paths == "1")
    assert inspect_cache(sampler.model).attention_only == (name in FAST)
    assert sampler._fast_paths == (fast_paths == "1" and name in FAST)  # the path this case is about
    tokenizer = sampler.get_tokenizer()
    # unequal prompt lengths (padding on the fast path), two of equal length (one general-path batch), two
    # samples each (a shared prefill), runs past Gemma 2's 16-token window, rows finishing at different steps
    prompts = [tokenizer.encode(t) for t in ("Once upon a time", "Hi", "Hey", "A much longer prompt than the rest")]
    max_tokens = [20, 6, 12, 20]

    async def sample_all():
        return await asyncio.gather(
            *(
                sampler.sample_async(ModelInput.from_ints(p), 2, SamplingParams(max_tokens=m, stop=[], seed=3))
                for p, m in zip(prompts, max_tokens)
            )
        )

    responses = asyncio.run(sample_all())
    for prompt, m, response in zip(prompts, max_tokens, responses):
        for seq in response.sequences:
            assert len(seq.tokens) == len(seq.logprobs) == m and seq.stop_reason == "length"
            reference = plain_logprobs(sampler.model, prompt + seq.tokens)
            expected = [reference[len(prompt) - 1 + k, t].item() for k, t in enumerate(seq.tokens)]
            assert max(abs(a - b) for a, b in zip(seq.logprobs, expected)) < 1e-4
            trained_lp = (
                trainer.forward(
                    [
                        Datum(
                            ModelInput.from_ints(prompt + seq.tokens[:-1]),
                            {"target_tokens": (prompt + seq.tokens)[1:], "weights": [1.0] * (len(prompt) + m - 1)},
                        )
                    ],
                    "cross_entropy",
                )
                .result()
                .loss_fn_outputs[0]["logprobs"]
                .tolist()
            )
            assert max(abs(a - b) for a, b in zip(seq.logprobs, trained_lp[len(prompt) - 1 :])) < 1e-4
    # seeded: a request again gives the same tokens (batched with others, a near-uniform random model may
    # differ at a near-tie, so this compares like with like); a stop token ends its row there
    params = SamplingParams(max_tokens=20, stop=[], seed=3)
    first = sampler.sample(ModelInput.from_ints(prompts[0]), 2, params).result().sequences[0].tokens
    assert sampler.sample(ModelInput.from_ints(prompts[0]), 2, params).result().sequences[0].tokens == first
    j = next(i for i in range(1, 20) if first[i] not in first[:i])
    stopped = (
        sampler.sample(ModelInput.from_ints(prompts[0]), 1, SamplingParams(max_tokens=20, stop=[first[j]], seed=3))
        .result()
        .sequences[0]
    )
    assert stopped.tokens == first[: j + 1] and stopped.stop_reason == "stop"

    # compute_logprobs, batched over sequences of unequal lengths
    sequences = [prompts[0] + first, prompts[3]]

    async def logprobs_all():
        return await asyncio.gather(*(sampler.compute_logprobs_async(ModelInput.from_ints(s)) for s in sequences))

    for tokens, computed in zip(sequences, asyncio.run(logprobs_all())):
        reference = plain_logprobs(sampler.model, tokens)
        assert computed[0] is None
        assert max(abs(computed[k] - reference[k - 1, tokens[k]].item()) for k in range(1, len(tokens))) < 1e-4

    # next-token scores: comparisons sharing a 40-token prompt (and, per A, A's reply), plus one unrelated
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, 5000, (40,), generator=generator).tolist()
    replies = [torch.randint(10, 5000, (n,), generator=generator).tolist() for n in (7, 19, 3)]
    comparisons = [prompt + a + [11] + b + [12] for a in replies for b in replies if a is not b]
    comparisons.append(torch.randint(10, 5000, (9,), generator=generator).tolist())
    inputs = [ModelInput.from_ints(s) for s in comparisons]
    shared = sampler.score_next_token_batch(inputs, [13, 14])
    plain = sampler.with_settings(share_prefixes=False).score_next_token_batch(inputs, [13, 14])
    for tokens, a, b in zip(comparisons, shared, plain):
        reference = plain_logprobs(sampler.model, tokens)[-1]
        assert a.argmax_token == b.argmax_token == int(reference.argmax())
        for scores in (a, b):
            assert max(abs(x - y) for x, y in zip(scores.candidate_logprobs, reference[[13, 14]].tolist())) < 1e-4


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_lora_targets_and_the_unembedding_adapter(name, trained):
    trainer, _ = trained(name)
    targets = set(trainer.model.peft_config["default"].target_modules)
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "lm_head"} <= targets
    assert (targets >= LINEAR_ATTENTION_TARGETS) == (name == "qwen3_5")  # linear attention adapted on purpose
    assert ("gate_proj" in targets) == (name != "qwen3_moe")  # fused 3-D experts are not linear layers
    base = trainer.model.get_base_model()
    assert (base.get_output_embeddings().weight is base.get_input_embeddings().weight) == (name in TIED)
    state = adapter_state(trainer.model)
    unembed = [v for k, v in state.items() if "lm_head" in k and "lora_B" in k]
    assert unembed and float(unembed[0].abs().sum()) > 0  # trained (the sampler's agreement shows it merged)


def test_smoke_pipeline_on_the_tutorials_model_family(tmp_path, model_dirs):
    """preset=smoke on tiny Qwen3.5 with the default renderer runs SFT, the preference model and RL to the
    report."""
    from test_pipeline import run_pipeline

    run_pipeline(tmp_path, f"base_model={model_dirs['qwen3_5']}")
    assert (tmp_path / "report.md").exists()
    assert json.loads((tmp_path / "rm" / "pm_eval.json").read_text())["pm/n"] > 0  # the step that failed


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_training_logprobs_of_a_padded_batch_equal_each_sequence_alone(name, trained):
    """The trainer pads a batch on the right and runs it causally without a padding mask: every row's logprobs
    (and the summed loss) equal those of the row alone (linear attention, sliding windows and experts included)."""
    trainer, _ = trained(name)
    tokenizer = trainer.get_tokenizer()
    texts = ("Once upon a time there was a fox", "Hi there", "A much longer sequence than the others, by far, it is")
    data = []
    for text in texts:
        tokens = tokenizer.encode(text)
        data.append(
            Datum(
                ModelInput.from_ints(tokens[:-1]), {"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)}
            )
        )
    together = trainer.forward(data, "cross_entropy").result()
    total = 0.0
    for datum, out in zip(data, together.loss_fn_outputs):
        alone = trainer.forward([datum], "cross_entropy").result()
        total += alone.metrics["loss:sum"]
        expected = alone.loss_fn_outputs[0]["logprobs"].tolist()
        assert max(abs(a - b) for a, b in zip(out["logprobs"].tolist(), expected)) < 1e-4
    assert together.metrics["loss:sum"] == pytest.approx(total, rel=1e-5)
