"""The engine's contract: logprobs, losses, training, states, sampling stops, model resolution."""

import asyncio
import math

import pytest
import torch

from rlhfkit.engine import AdamParams, Datum, ModelInput, ModelNotFoundError, SamplingParams, ServiceClient
from rlhfkit.engine.torch_engine import losses


@pytest.fixture(scope="module")
def service():
    return ServiceClient()


@pytest.fixture(scope="module")
def tokenizer(service, tiny_model_dir):
    from rlhfkit.engine import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def ce_datum(tokens, weights=None):
    weights = weights if weights is not None else [1.0] * (len(tokens) - 1)
    return Datum(ModelInput.from_ints(tokens[:-1]), {"target_tokens": tokens[1:], "weights": weights})


def forward_logprobs(client, tokens):
    out = client.forward([ce_datum(tokens)], "cross_entropy").result()
    return out.loss_fn_outputs[0]["logprobs"].tolist()


def test_sampled_logprobs_equal_forward_logprobs(service, tiny_model_dir, tokenizer):
    trainer = service.create_lora_training_client(tiny_model_dir, rank=4, seed=1)
    prompts = [tokenizer.encode("The quick brown fox"), tokenizer.encode("Hi")]  # unequal: left padding
    sampler = trainer.save_weights_and_get_sampling_client()

    async def sample_all():
        params = SamplingParams(max_tokens=12, temperature=1.0, seed=3)
        return await asyncio.gather(*(sampler.sample_async(ModelInput.from_ints(p), 2, params) for p in prompts))

    responses = asyncio.run(sample_all())
    for prompt, response in zip(prompts, responses):
        for seq in response.sequences:
            expected = forward_logprobs(trainer, prompt + seq.tokens)[len(prompt) - 1 :]
            assert len(seq.logprobs) == len(seq.tokens) == 12
            assert max(abs(a - b) for a, b in zip(seq.logprobs, expected)) < 1e-4
    # the batched async path gives what the one-request path gives (per-row seeded generators)
    alone = sampler.sample(ModelInput.from_ints(prompts[1]), 2, SamplingParams(max_tokens=12, seed=3)).result()
    assert [s.tokens for s in alone.sequences] == [s.tokens for s in responses[1].sequences]
    # compute_logprobs agrees too
    tokens = prompts[0] + responses[0].sequences[0].tokens
    computed = sampler.compute_logprobs(ModelInput.from_ints(tokens)).result()
    assert computed[0] is None
    assert max(abs(a - b) for a, b in zip(computed[1:], forward_logprobs(trainer, tokens))) < 1e-4


def _loss_case():
    torch.manual_seed(0)
    logprobs = (-torch.rand(5) * 2).requires_grad_()
    inputs = {
        "weights": torch.tensor([0.0, 1.0, 1.0, 0.5, 1.0]),
        "logprobs": logprobs.detach() + torch.tensor([0.0, 0.3, -0.5, 0.1, 1.0]),
        "advantages": torch.tensor([0.0, 1.0, -2.0, 0.5, 1.5]),
    }
    return logprobs, inputs


@pytest.mark.parametrize("name", ["cross_entropy", "importance_sampling", "ppo", "cispo"])
def test_loss_value_and_gradient_match_the_formula(name):
    lp, inp = _loss_case()
    value = losses.get_loss(name)(lp, inp, {})
    value.backward()
    x, w, old, adv = lp.detach(), inp["weights"], inp["logprobs"], inp["advantages"]
    ratio = torch.exp(x - old)
    if name == "cross_entropy":
        expected, grad = -(w * x).sum(), -w
    elif name == "importance_sampling":
        expected, grad = -(ratio * adv).sum(), -ratio * adv
    elif name == "ppo":
        clipped = ratio.clamp(0.8, 1.2)
        use_unclipped = ratio * adv <= clipped * adv
        expected = -torch.minimum(ratio * adv, clipped * adv).sum()
        grad = torch.where(use_unclipped, -ratio * adv, torch.zeros_like(x))  # clipped branch: no gradient
    else:
        coef = ratio.clamp(0.0, 4.0)
        expected, grad = -(coef * adv * x).sum(), -coef * adv
    assert torch.allclose(value.detach(), expected, atol=1e-6)
    assert torch.allclose(lp.grad, grad, atol=1e-6)


def test_forward_backward_reports_the_summed_loss(service, tiny_model_dir, tokenizer):
    trainer = service.create_lora_training_client(tiny_model_dir, rank=4)
    a, b = tokenizer.encode("one two three four"), tokenizer.encode("five six")
    data = [ce_datum(a), ce_datum(b, [0.5])]
    out = trainer.forward_backward(data, "cross_entropy").result()
    lps = [o["logprobs"].tolist() for o in out.loss_fn_outputs]
    expected = -(sum(lps[0]) + 0.5 * lps[1][0])
    assert math.isclose(out.metrics["loss:sum"], expected, rel_tol=1e-5)
    # in a backward pass, positions before the first weighted one skip the unembedding: their logprobs read 0,
    # the rest agree; a forward pass reports every position (the SDK's custom losses read them all)
    masked = trainer.forward_backward([ce_datum(a, [0.0, 0.0, 1.0])], "cross_entropy").result()
    full = trainer.forward([ce_datum(a)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    assert masked.loss_fn_outputs[0]["logprobs"].tolist()[:2] == [0.0, 0.0]
    assert math.isclose(masked.metrics["loss:sum"], -full[2], rel_tol=1e-5)
    unweighted = trainer.forward([ce_datum(a, [0.0, 0.0, 0.0])], "cross_entropy").result()
    assert unweighted.loss_fn_outputs[0]["logprobs"].tolist() == pytest.approx(full, abs=1e-6)
    with pytest.raises(ValueError, match="weights"):
        trainer.forward([Datum(ModelInput.from_ints(a[:-1]), {"target_tokens": a[1:]})], "cross_entropy")


def test_thirty_cross_entropy_steps_drive_the_loss_down(service, tiny_model_dir, tokenizer):
    trainer = service.create_lora_training_client(tiny_model_dir, rank=8, seed=0)
    batch = [ce_datum(tokenizer.encode(t)) for t in ("The cat sat on the mat.", "Dogs bark at night, loudly.")]
    first = last = None
    for _step in range(30):
        loss = trainer.forward_backward(batch, "cross_entropy").result().metrics["loss:sum"]
        trainer.optim_step(AdamParams(learning_rate=1e-2)).result()
        first = loss if first is None else first
        last = loss
    assert last < 0.25 * first  # the loss falls by more than three quarters


def _weights(client):
    return {n: p.detach().clone() for n, p in client.model.named_parameters() if p.requires_grad}


def test_state_round_trip_with_optimizer_is_bit_identical(service, tiny_model_dir, tokenizer, tmp_path):
    batch = [ce_datum(tokenizer.encode("Round trips must not change a single bit."))]
    adam = AdamParams(learning_rate=5e-3)
    trainer = service.create_lora_training_client(tiny_model_dir, rank=4, seed=7)
    for _ in range(2):
        trainer.forward_backward(batch, "cross_entropy")
        trainer.optim_step(adam)
    path = trainer.save_state(str(tmp_path / "state")).result().path
    assert not list(tmp_path.glob(".*tmp"))  # written atomically: no temporary left behind
    trainer.forward_backward(batch, "cross_entropy")
    trainer.optim_step(adam).result()  # the futures are real: wait before reading the weights
    restored = service.create_training_client_from_state_with_optimizer(path)
    restored.forward_backward(batch, "cross_entropy")
    restored.optim_step(adam).result()
    expected, got = _weights(trainer), _weights(restored)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    # weights-only load differs after a step (fresh Adam moments), proving the optimizer state mattered
    fresh = service.create_training_client_from_state(path)
    fresh.forward_backward(batch, "cross_entropy")
    fresh.optim_step(adam).result()
    assert not all(torch.equal(expected[k], v) for k, v in _weights(fresh).items())


def test_sampler_made_after_a_step_sees_the_new_weights(service, tiny_model_dir, tokenizer, tmp_path):
    trainer = service.create_lora_training_client(tiny_model_dir, rank=4)
    tokens = tokenizer.encode("weights change after an update")
    before = trainer.save_weights_and_get_sampling_client().compute_logprobs(ModelInput.from_ints(tokens)).result()
    trainer.forward_backward([ce_datum(tokens)], "cross_entropy")
    trainer.optim_step(AdamParams(learning_rate=1e-2))
    after_mem = trainer.save_weights_and_get_sampling_client().compute_logprobs(ModelInput.from_ints(tokens)).result()
    path = trainer.save_weights_for_sampler(str(tmp_path / "sampler")).result().path
    after_disk = service.create_sampling_client(model_path=path).compute_logprobs(ModelInput.from_ints(tokens)).result()
    assert sum(after_mem[1:]) > sum(before[1:]) + 1.0
    assert max(abs(a - b) for a, b in zip(after_mem[1:], after_disk[1:])) < 1e-5
    assert max(abs(a - b) for a, b in zip(after_mem[1:], forward_logprobs(trainer, tokens))) < 1e-4


def test_stop_conditions(service, tiny_model_dir, tokenizer):
    trainer = service.create_lora_training_client(tiny_model_dir, rank=8, seed=0)
    sampler = trainer.save_weights_and_get_sampling_client()
    prompt = ModelInput.from_ints(tokenizer.encode("Tell me a story"))
    free = sampler.sample(prompt, 1, SamplingParams(max_tokens=10, seed=11, stop=[])).result().sequences[0]
    assert free.stop_reason == "length" and len(free.tokens) == 10

    # a stop string that ends inside a token: the tokens up to and including that token are returned
    pieces = [tokenizer.decode([t]) for t in free.tokens]
    k = next(i for i in range(2, 10) if len(pieces[i]) >= 2)
    stop_string = "".join(pieces[:k]) + pieces[k][:1]
    seq = sampler.sample(prompt, 1, SamplingParams(max_tokens=10, seed=11, stop=[stop_string])).result().sequences[0]
    assert seq.stop_reason == "stop" and seq.tokens == free.tokens[: k + 1]

    # a stop token id
    j = next(i for i in range(1, 10) if free.tokens[i] not in free.tokens[:i])
    seq = sampler.sample(prompt, 1, SamplingParams(max_tokens=10, seed=11, stop=[free.tokens[j]])).result().sequences[0]
    assert seq.stop_reason == "stop" and seq.tokens == free.tokens[: j + 1]

    # EOS: teach the model to answer this prompt with EOS, then sample greedily with stop=None
    eos = tokenizer.eos_token_id
    datum = ce_datum(prompt.to_ints() + [eos], [0.0] * (prompt.length - 1) + [1.0])
    for _ in range(30):
        trainer.forward_backward([datum], "cross_entropy")
        trainer.optim_step(AdamParams(learning_rate=2e-2))
    seq = (
        trainer.save_weights_and_get_sampling_client()
        .sample(prompt, 1, SamplingParams(max_tokens=10, temperature=0.0))
        .result()
        .sequences[0]
    )
    assert seq.tokens == [eos] and seq.stop_reason == "stop"


def test_next_token_scores_batched_equal_one_at_a_time(service, tiny_model_dir, tokenizer):
    sampler = service.create_sampling_client(base_model=tiny_model_dir)
    prompts = [ModelInput.from_ints(tokenizer.encode(t)) for t in ("A or B?", "Which one, A or B, is better here?")]
    candidates = [tokenizer.encode(" A")[0], tokenizer.encode(" B")[0]]
    batched = sampler.score_next_token_batch(prompts, candidates)

    async def concurrently():
        return await asyncio.gather(*(sampler.score_next_token_async(p, candidates) for p in prompts))

    for one, many, gathered in zip(
        [sampler.score_next_token(p, candidates).result() for p in prompts], batched, asyncio.run(concurrently())
    ):
        assert one.argmax_token == many.argmax_token == gathered.argmax_token
        assert max(abs(a - b) for a, b in zip(one.candidate_logprobs, many.candidate_logprobs)) < 1e-4


def test_bad_base_model_errors_name_it_and_list_what_is_accepted(service, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weird = tmp_path / "model.bin"
    weird.write_text("not a model")
    cases = [str(tmp_path / "missing-folder"), str(weird), str(tmp_path / "nope.gguf"), "some-org/some-model"]
    for value in cases:
        with pytest.raises(ModelNotFoundError) as info:
            service.create_lora_training_client(value)
        message = str(info.value)
        assert value in message and ".gguf" in message
        if value == "some-org/some-model":  # the offline Hub id: why it cannot load and how to use a local copy
            assert "Hub cannot be reached" in message and "base_model=DIR" in message
        else:
            assert "accepted base_model values" in message


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_target_logprobs_and_their_gradient_equal_cross_entropys(dtype, monkeypatch):
    """The trainer's chunked log p(target) (batching.token_logprobs) equals -cross_entropy in fp32, values and
    gradient, with the rows split over several chunks; the gradient keeps the logits' dtype."""
    from rlhfkit.engine.torch_engine import batching

    monkeypatch.setattr(batching, "LOGPROB_CHUNK_BYTES", 4 * 1000 * 5)  # 5 rows per chunk, the last one short
    torch.manual_seed(0)
    logits = (torch.randn(2, 19, 1000) * 3).to(dtype)
    targets = torch.randint(0, 1000, (2, 19))
    weights = torch.randn(2, 19)
    reference, chunked = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    expected = -torch.nn.functional.cross_entropy(
        reference.float().flatten(0, 1), targets.flatten(), reduction="none"
    ).view(2, 19)
    (expected * weights).sum().backward()
    got = batching.token_logprobs(chunked, targets)
    (got * weights).sum().backward()
    assert got.dtype == torch.float32 and chunked.grad.dtype == dtype
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.grad.float(), reference.grad.float(), atol=1e-5, rtol=1e-2)


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4)], ids=["grouped", "one_per_head"])
def test_the_trainers_causal_attention_equals_sdpas(heads, kv_heads, monkeypatch):
    """rlhfkit's causal attention (query heads stacked per key/value head, fp32 softmax) gives sdpa's output and
    gradients (fp32); in bf16 the trainer's attention function takes that path, not sdpa's."""
    from transformers.integrations import sdpa_attention

    from rlhfkit.engine.model.attention import causal_attention, grouped_causal_attention

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True
    torch.manual_seed(0)
    q = torch.randn(2, heads, 7, 8, requires_grad=True)
    k = torch.randn(2, kv_heads, 7, 8, requires_grad=True)
    v = torch.randn(2, kv_heads, 7, 8, requires_grad=True)
    grad = torch.randn(2, 7, heads, 8)
    ours = grouped_causal_attention(q, k, v, 0.3)
    reference, _ = sdpa_attention.sdpa_attention_forward(module, q, k, v, None, scaling=0.3)
    for a, b in zip(
        (ours, *torch.autograd.grad(ours, (q, k, v), grad)),
        (reference, *torch.autograd.grad(reference, (q, k, v), grad)),
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

    def refuse(*args, **kwargs):
        raise AssertionError("bf16 plain causal attention went to sdpa")

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", refuse)
    bf16 = [t.detach().bfloat16() for t in (q, k, v)]
    out, _ = causal_attention(module, *bf16, None, scaling=0.3)
    torch.testing.assert_close(out.float(), grouped_causal_attention(*bf16, 0.3).float())
    torch.testing.assert_close(out.float(), reference.detach(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_trainers_causal_attention_recomputes_its_probabilities_to_the_same_bits(dtype):
    """grouped_causal_attention keeps q, k and v for backward and computes the attention probabilities again there:
    its output and gradients equal, bit for bit, those of autograd over the same operations with the
    probabilities saved; and the probabilities are not among the tensors saved for backward."""
    from rlhfkit.engine.model.attention import _grouped_causal_mask, grouped_causal_attention

    def saved_probabilities(query, key, value, scale):
        batch, heads, length, dim = query.shape
        groups = heads // key.shape[1]
        q = query.reshape(-1, groups * length, dim)
        k, v = key.reshape(-1, length, dim), value.reshape(-1, length, dim)
        mask = _grouped_causal_mask(length, groups, q.device, q.dtype).expand(q.shape[0], -1, -1)
        probs = torch.softmax(torch.baddbmm(mask, q, k.transpose(1, 2), alpha=scale), -1, dtype=torch.float32)
        out = torch.matmul(probs.to(v.dtype), v).view(batch, key.shape[1], groups, length, dim)
        return out.permute(0, 3, 1, 2, 4).reshape(batch, length, heads, dim)

    torch.manual_seed(0)
    shapes = [(2, 9, 37, 16), (2, 3, 37, 16), (2, 3, 37, 16)]  # SmolLM2's 9 query heads per 3 key/value heads
    # non-contiguous, as the projections' outputs are after transformers' transpose
    tensors = [torch.randn(s[0], s[2], s[1], s[3]).to(dtype).transpose(1, 2) for s in shapes]
    grad = torch.randn(2, 37, 9, 16).to(dtype)
    results, saved = [], []
    for fn in (saved_probabilities, grouped_causal_attention):
        inputs = [t.clone().requires_grad_() for t in tensors]
        sizes: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: sizes.append(x.numel()) or x, lambda x: x):
            out = fn(*inputs, 0.125)
        out.backward(grad)
        results.append((out, *(t.grad for t in inputs)))
        saved.append(max(sizes))
    for ours, reference in zip(results[1], results[0]):
        assert ours.dtype == reference.dtype and torch.equal(ours, reference)
    assert saved[0] == 2 * 3 * (3 * 37) * 37  # autograd's largest saved tensor: probabilities
    assert saved[1] == 2 * 9 * 37 * 16  # ours: q, k, v only
