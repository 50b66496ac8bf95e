"""The architecture matrix on the vLLM path (issue 14): for each tiny architecture of rlhfkit.engine.testing
(hidden size 256, so a head size of 64, which vLLM's CPU attention kernels take), either vLLM serves it with a
LoRA adapter the local engine trained (on every module vLLM can wrap there) and its sampled-token logprobs and
next-token scores equal the local engine's (fp32, TOLERANCE), or rlhfkit refuses it with a clear error naming the
architecture, the reason and what to change. One engine per architecture, stopped after it (the six: ~100 s)."""

import pytest

from rlhfkit.engine import AdamParams, Datum, ModelInput, SamplingParams, ServiceClient
from rlhfkit.engine.model.lora import LoraSpec
from rlhfkit.engine.testing import ARCHITECTURES, build_tiny_architecture

pytestmark = pytest.mark.vllm
TOLERANCE = 2e-3  # fp32 on both sides; vLLM's CPU kernels sum in another order
UNEMBED_ADAPTED = {"llama", "qwen3", "qwen3_moe"}  # vLLM wraps no LoRA on tied Qwen2's and Gemma 2's unembedding
REFUSED = {  # architecture -> what the error says (vllm_engine.core.check_architecture)
    "qwen3_5": r"cannot load its Qwen3_5ForCausalLM model class \(ModuleNotFoundError.*torchvision.*sampler=local",
    "qwen3_moe": r"cannot run Qwen3MoeForCausalLM with LoRA enabled.*mixture-of-experts.*Triton.*sampler=local",
}


def _vllm_or_skip() -> None:
    from rlhfkit.engine.local_backend.vllm_client import VLLMUnavailableError, vllm_python

    try:
        vllm_python()
    except VLLMUnavailableError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    _vllm_or_skip()
    return ServiceClient(storage_dir=str(tmp_path_factory.mktemp("storage")))


def trained_adapter(service, model_dir, name, train_unembed):
    """A LoRA adapter (attention, MLP where the architecture has linear MLP layers, the unembedding when asked)
    a few steps away from zero."""
    trainer = service.create_lora_training_client(model_dir, rank=8, seed=1, train_unembed=train_unembed)
    tokens = trainer.get_tokenizer().encode("The quick brown fox jumps over the lazy dog, again and again.")
    datum = Datum(
        ModelInput.from_ints(tokens[:-1]), {"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)}
    )
    for _ in range(3):
        trainer.forward_backward([datum], "cross_entropy")
        trainer.optim_step(AdamParams(learning_rate=5e-2))
    return trainer.save_weights_for_sampler(f"{name}-trained").result().path


# served with LoRA on every target (30-50 s each): llama in the default run, the other three in the slow set; the
# refusals (seconds each) in the default run
SLOW = {"qwen2", "qwen3", "gemma2"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in ARCHITECTURES])
def test_vllm_serves_the_architecture_or_says_why_not(name, local, tmp_path_factory):
    from rlhfkit.engine.vllm_engine.core import UnsupportedAdapterError
    from rlhfkit.engine.local_backend.vllm_client import VLLMUnavailableError, check_lora_targets, close_engines

    model_dir = str(build_tiny_architecture(tmp_path_factory.mktemp(name), name, hidden_size=256))
    remote = ServiceClient(storage_dir=str(local.storage_dir), sampler="vllm")
    tokenizer = local.create_sampling_client(base_model=model_dir).get_tokenizer()
    prompt = ModelInput.from_ints(tokenizer.encode("Once upon a time"))
    try:
        if name in REFUSED:  # the engine does not start; the error says why and what to change
            with pytest.raises(VLLMUnavailableError, match=REFUSED[name]):
                remote.create_sampling_client(base_model=model_dir).sample(
                    prompt, 1, SamplingParams(max_tokens=2)
                ).result()
            return
        if name not in UNEMBED_ADAPTED:  # the check before training names the setting to change
            with pytest.raises(UnsupportedAdapterError, match=r"lm_head.*train_unembed=False"):
                check_lora_targets(LoraSpec(model_dir), local.precision)
        path = trained_adapter(local, model_dir, name, train_unembed=name in UNEMBED_ADAPTED)
        check_lora_targets(LoraSpec(model_dir, train_unembed=name in UNEMBED_ADAPTED), local.precision)
        vllm_client = remote.create_sampling_client(model_path=path)
        local_client = local.create_sampling_client(model_path=path)
        base_client = local.create_sampling_client(base_model=model_dir)
        # 24 tokens after a 4-token prompt: past Gemma 2's 16-token sliding window
        response = vllm_client.sample(prompt, 2, SamplingParams(max_tokens=24, temperature=1.0, stop=[], seed=3))
        for seq in response.result().sequences:
            assert len(seq.tokens) == 24
            expected = local_client.compute_logprobs(ModelInput.from_ints(prompt.to_ints() + seq.tokens)).result()
            assert seq.logprobs == pytest.approx(expected[prompt.length :], abs=TOLERANCE)
            base = base_client.compute_logprobs(ModelInput.from_ints(prompt.to_ints() + seq.tokens)).result()
            assert max(abs(a - b) for a, b in zip(base[prompt.length :], expected[prompt.length :])) > 20 * TOLERANCE
        prompts = [prompt, ModelInput.from_ints(tokenizer.encode("A: yes. B: no. The better reply is") * 3)]
        candidates = [tokenizer.encode(" A")[0], tokenizer.encode(" B")[0], 50]
        for remote_scores, local_scores in zip(
            vllm_client.score_next_token_batch(prompts, candidates),
            local_client.score_next_token_batch(prompts, candidates),
        ):
            assert remote_scores.argmax_token == local_scores.argmax_token
            assert remote_scores.candidate_logprobs == pytest.approx(local_scores.candidate_logprobs, abs=TOLERANCE)
    finally:
        close_engines()  # one engine per architecture: its memory and threads are not left to the next
