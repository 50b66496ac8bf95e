"""EngineSettings: one value, read from the environment only by from_env, handed down to every client a loop
makes (the trainer's service, the judge, the evaluators)."""

from __future__ import annotations

import pytest

from rlhfkit.engine.settings import EngineSettings, resolve, with_engine


def test_from_env_is_the_only_reader_and_arguments_override_it():
    env = {"RLHFKIT_BACKEND": "ray", "RLHFKIT_NUM_SAMPLERS": "3", "RLHFKIT_DTYPE": "float32", "PATH": "/bin"}
    settings = EngineSettings.from_env(env, num_samplers=2, ray_address=None)
    assert (settings.backend, settings.num_samplers, settings.dtype, settings.ray_address) == (
        "ray",
        2,
        "float32",
        None,
    )
    assert EngineSettings.from_env({}) == EngineSettings()
    assert settings.record()["backend"] == "ray"


@pytest.mark.parametrize(
    "kwargs, named",
    [({"backend": "slurm"}, "backend"), ({"dtype": "fp8"}, "dtype"), ({"num_samplers": 0}, "num_samplers")],
)
def test_bad_settings_name_the_field(kwargs, named):
    with pytest.raises(ValueError, match=named):
        EngineSettings(**kwargs)
    with pytest.raises(ValueError, match="RLHFKIT_NUM_SAMPLERS"):
        EngineSettings.from_env({"RLHFKIT_NUM_SAMPLERS": "many"})


def test_a_loops_flat_fields_override_its_engine_value():
    engine = EngineSettings(backend="ray", num_samplers=4)
    assert resolve(engine, backend=None, num_samplers=2) == EngineSettings(backend="ray", num_samplers=2)


def test_the_service_client_takes_the_value_not_the_environment(monkeypatch):
    from rlhfkit.engine import ServiceClient

    monkeypatch.setenv("RLHFKIT_BACKEND", "ray")  # ignored: the settings value is given
    monkeypatch.setenv("RLHFKIT_SAMPLER", "vllm")
    service = ServiceClient(settings=EngineSettings(backend="local", dtype="float32"))
    assert (service.backend, service.sampler, str(service.precision.compute_dtype)) == (
        "local",
        "local",
        "torch.float32",
    )


def test_builders_left_without_an_engine_get_the_loops(tiny_model_dir):
    from rlhfkit.preference.comparison_policy_evaluator import ComparisonEvaluatorBuilder
    from rlhfkit.preference.types import PreferenceModelBuilderFromChatRenderer
    from rlhfkit.rl.preference_envs import PairwisePreferenceRLDatasetBuilder

    judge = PreferenceModelBuilderFromChatRenderer("role_colon", tiny_model_dir, "/some/pm")
    own = PreferenceModelBuilderFromChatRenderer("role_colon", tiny_model_dir, "/some/pm", engine=EngineSettings())
    dataset = PairwisePreferenceRLDatasetBuilder(
        comparison_builder=None,
        batch_size=2,
        policy_renderer_name="role_colon",
        policy_model_name=tiny_model_dir,
        preference_model_builder=judge,
        group_size=2,
    )
    evaluator = ComparisonEvaluatorBuilder(
        preference_model_builder=own,
        comparison_builder=None,
        renderer_name="role_colon",
        model_name_for_tokenizer=tiny_model_dir,
    )
    ray = EngineSettings(backend="ray", ray_address="auto")
    assert with_engine(dataset, ray).preference_model_builder.engine == ray
    assert with_engine(evaluator, ray).preference_model_builder.engine == EngineSettings()  # its own is kept
    assert with_engine(len, ray) is len  # a plain callable is left as it is
    assert judge.engine is None  # frozen builders are copied, not changed
