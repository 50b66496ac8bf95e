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


_JUDGES: list[str] = []


def _recording_judge_class():
    from dataclasses import dataclass

    from rlhfkit.preference.types import PreferenceModelBuilderFromChatRenderer

    @dataclass(frozen=True)
    class RecordingJudge(PreferenceModelBuilderFromChatRenderer):
        """The chat judge, noting which backend its sampling client runs on."""

        def __call__(self):
            judge = super().__call__()
            _JUDGES.append(type(judge.sampling_client).__name__)
            return judge

    return RecordingJudge


@pytest.mark.ray
def test_an_rl_loop_on_ray_from_python_runs_its_judge_and_evaluator_there(tiny_model_dir, tmp_path):
    """rl_train.Config(backend="ray") made in Python, with a judge and a win-rate evaluator whose builders name no
    engine: both make their sampling clients on the Ray backend (before, they read the environment and ran
    locally)."""
    pytest.importorskip("ray", reason="Ray is not installed")
    from rlhfkit.engine import ServiceClient
    from rlhfkit.preference.comparison_policy_evaluator import ComparisonEvaluatorBuilder
    from rlhfkit.recipes.preference.rlhf.pipeline_config import parse_args
    from rlhfkit.recipes.preference.rlhf.pipeline_data import comparison_builder
    from rlhfkit.rl import train
    from rlhfkit.rl.preference_envs import PairwisePreferenceRLDatasetBuilder

    pm_weights = (
        ServiceClient(dtype="float32", storage_dir=str(tmp_path / "pm"))
        .create_lora_training_client(tiny_model_dir, rank=2)
        .save_weights_for_sampler(str(tmp_path / "pm" / "weights"))
        .result()
        .path
    )
    cfg = parse_args(["preset=smoke", "hh_max_chars=200"])
    judge = _recording_judge_class()("role_colon", tiny_model_dir, pm_weights, reward_mode="probability")
    config = train.Config(
        model_name=tiny_model_dir,
        recipe_name="engine_settings_test",
        renderer_name="role_colon",
        dataset_builder=PairwisePreferenceRLDatasetBuilder(
            comparison_builder(cfg, "rl"), 2, "role_colon", tiny_model_dir, judge, 2
        ),
        evaluator_builders=[
            ComparisonEvaluatorBuilder(judge, comparison_builder(cfg, "rl", 2), "role_colon", tiny_model_dir, 4)
        ],
        learning_rate=1e-3,
        max_tokens=4,
        log_path=str(tmp_path / "rl"),
        lora_rank=2,
        max_steps=1,
        eval_every=1,
        backend="ray",
        engine=EngineSettings(inference_engine="torch", num_train_workers=1, num_samplers=1, dtype="float32"),
    )
    _JUDGES.clear()
    try:
        train.main(config)
    finally:
        import ray

        ray.shutdown()
    assert _JUDGES and set(_JUDGES) == {"RaySamplingClient"}, _JUDGES
