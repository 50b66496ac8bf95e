"""EngineSettings: one value, read from the environment only by from_env, handed down to every client a loop
makes (the trainer's service, the judge, the evaluators)."""

from __future__ import annotations

import json

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
def test_rl_and_dpo_loops_on_ray_from_python_run_judge_reference_and_evaluator_there(
    tiny_model_dir, tmp_path, monkeypatch
):
    """rl_train.Config(backend="ray") made in Python, with a judge and a win-rate evaluator whose builders name no
    engine and a KL penalty: the judge, the evaluator and the KL reference make their sampling clients on the Ray
    backend (before, the builders read the environment and ran locally); train_dpo.Config(backend="ray"): its
    frozen reference is a Ray sampling client too."""
    pytest.importorskip("ray", reason="Ray is not installed")
    import runpy

    from test_dpo import RUN_SCRIPT, write_comparisons

    from rlhfkit.preference import train_dpo
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
    engine = EngineSettings(inference_engine="torch", num_train_workers=1, num_samplers=1, dtype="float32")
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
        kl_penalty_coef=0.01,
        kl_reference_config=train.KLReferenceConfig(base_model=tiny_model_dir),
        backend="ray",
        engine=engine,
    )
    made: dict[str, str] = {}

    def recording(name, make):
        def wrapped(*args, **kwargs):
            client = make(*args, **kwargs)
            made[name] = type(client).__name__
            return client

        return wrapped

    monkeypatch.setattr(train, "_kl_reference_client", recording("kl", train._kl_reference_client))
    monkeypatch.setattr(train_dpo, "reference_sampler", recording("dpo", train_dpo.reference_sampler))
    write_comparisons(tmp_path / "train.jsonl", 4, 0)
    write_comparisons(tmp_path / "test.jsonl", 4, 0)
    (tmp_path / "run_dpo.py").write_text(RUN_SCRIPT)
    dpo_config = runpy.run_path(str(tmp_path / "run_dpo.py"))["make_config"](
        str(tmp_path / "dpo"), tiny_model_dir, str(tmp_path), max_steps=1, engine=engine.merged(backend="ray")
    )
    _JUDGES.clear()
    try:
        train.main(config)
        train_dpo.main(dpo_config)
    finally:
        import ray

        ray.shutdown()
    assert _JUDGES and set(_JUDGES) == {"RaySamplingClient"}, _JUDGES
    assert made == {"kl": "RaySamplingClient", "dpo": "RaySamplingClient"}
    recorded = json.loads((tmp_path / "rl" / "config.json").read_text())
    assert recorded["engine"]["backend"] == "ray"  # config.json says where the loop and its builders ran
    assert recorded["dataset_builder"]["preference_model_builder"]["engine"]["backend"] == "ray"
