"""The Ray backend with a vLLM engine on a model whose unembedding vLLM cannot adapt (a tied Qwen2): a training
client whose adapter covers it stops before training, naming the settings to change; without it, the trained
checkpoint is served by the engine under a fresh adapter id with the local backend's logprobs. One vLLM engine."""

import pytest

from rlhfkit.engine import AdamParams, Datum, ModelInput, SamplingParams, ServiceClient
from rlhfkit.engine.testing import build_tiny_architecture

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]' or scripts/setup.sh)")
pytestmark = [pytest.mark.ray, pytest.mark.vllm]


def test_an_adapter_vllm_cannot_apply_stops_before_training(tmp_path):
    from test_ray_vllm import TOLERANCE, ray_service, stop_ray, vllm_or_skip

    from rlhfkit.engine.ray_backend.sampling import UnsupportedLoraTargetsError

    vllm_or_skip()
    model_dir = str(build_tiny_architecture(tmp_path / "qwen2", "qwen2", hidden_size=256))  # tied embeddings
    remote = ray_service(str(tmp_path / "storage"))
    try:
        with pytest.raises(UnsupportedLoraTargetsError, match=r"lm_head.*train_unembed=False.*inference_engine=torch"):
            remote.create_lora_training_client(model_dir, rank=8, seed=1)  # train_unembed=True by default
        trainer = remote.create_lora_training_client(model_dir, rank=8, seed=1, train_unembed=False)
        tokens = trainer.get_tokenizer().encode("The quick brown fox jumps over the lazy dog.")
        datum = Datum(
            ModelInput.from_ints(tokens[:-1]), {"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)}
        )
        prompt = ModelInput.from_ints(tokens[:4])
        params = SamplingParams(max_tokens=8, temperature=1.0, stop=[], seed=3)
        local = ServiceClient(dtype="float32")
        adapter_ids = []
        for _ in range(2):  # two versions: each a fresh adapter id on the engine
            trainer.forward_backward([datum], "cross_entropy").result()
            trainer.optim_step(AdamParams(learning_rate=5e-2)).result()
            sampler = trainer.save_weights_and_get_sampling_client()
            adapter_ids.append(sampler.adapter_id)
            seq = sampler.sample(prompt, 1, params).result().sequences[0]
            expected = (
                local.create_sampling_client(model_path=sampler.adapter_path)
                .compute_logprobs(ModelInput.from_ints(prompt.to_ints() + seq.tokens))
                .result()
            )
            assert seq.logprobs == pytest.approx(expected[prompt.length :], abs=TOLERANCE)
        assert len(set(adapter_ids)) == 2
    finally:
        stop_ray()
