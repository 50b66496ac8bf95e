"""`rlhfkit sample`: replies from a base model, a checkpoint directory, a PEFT adapter folder, or a stage's log
directory, to one prompt or to a file of prompts."""

from __future__ import annotations

import json
from pathlib import Path

from rlhfkit.engine import EngineSettings, ServiceClient, types
from rlhfkit.engine.model.lora import is_adapter_folder, read_spec
from rlhfkit.errors import CheckpointError
from rlhfkit.run_files import CHECKPOINTS_FILE, LOG_FILE, METRICS_FILE, PIPELINE_CONFIG_FILE, STAGE_CONFIG_FILE


def resolve_model(model: str, base_model: str | None = None) -> tuple[str | None, str, str | None]:
    """(checkpoint path or None, base model, renderer recorded by the run or None)."""
    from rlhfkit import checkpoint_utils

    path = Path(model).expanduser()
    renderer = None
    if path.is_dir() and not (path / CHECKPOINTS_FILE).exists() and not is_adapter_folder(path):
        describe_folder_without_checkpoint(path)
    if path.is_dir() and (path / CHECKPOINTS_FILE).exists():  # a stage's log directory
        record = checkpoint_utils.get_last_checkpoint(str(path), required_key="sampler_path")
        if record is None:
            raise CheckpointError(
                f"{path}: checkpoints.jsonl lists no intact sampler checkpoint (none saved yet, "
                f"or all damaged: see the warnings above)"
            )
        config_file = path / STAGE_CONFIG_FILE
        if config_file.exists():
            renderer = json.loads(config_file.read_text()).get("renderer_name")
        path = Path(record.sampler_path)
    if is_adapter_folder(path):  # an rlhfkit checkpoint or a PEFT adapter folder
        return str(path), base_model or read_spec(path).base_model, renderer
    return None, base_model or model, renderer


def describe_folder_without_checkpoint(path: Path) -> None:
    """A run folder or a stage log folder that has no checkpoint yet: a CheckpointError saying which (any other
    folder is left to the model checks)."""
    if (path / PIPELINE_CONFIG_FILE).exists():
        stages = [p.name for p in sorted(path.iterdir()) if (p / CHECKPOINTS_FILE).exists()]
        raise CheckpointError(
            f"{path}: a run folder, not a stage; name one of its stages"
            + (f" ({', '.join(str(path / s) for s in stages)})" if stages else " (it has no checkpoint yet)")
        )
    if (path / METRICS_FILE).exists() or (path / LOG_FILE).exists():
        raise CheckpointError(
            f"{path}: a stage log folder without a checkpoint yet (no checkpoints.jsonl: the stage saves its "
            f"first one after save_every steps, and its last when it ends); wait for one, or resume the stage"
        )


def check_model_argument(flag: str, model: str, base_model: str | None = None) -> None:
    """Check a command's model argument (and its --base-model) before anything loads: a checkpoint, stage log
    folder or PEFT adapter folder (intact), or a base model (see model_files.check_base_model_name)."""
    from rlhfkit.model_files import check_base_model_name

    checkpoint, _, _ = resolve_model(model, base_model)
    if checkpoint is None:
        check_base_model_name(model, flag)
    if base_model is not None:
        check_base_model_name(base_model, "--base-model")


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: JSONL rows with a "prompt" field (a .jsonl file, or a file whose first line is a JSON
    object), else one prompt per non-empty line. A missing, binary or empty file is a DataError naming it."""
    from rlhfkit.errors import DataFileNotFoundError
    from rlhfkit.supervised.data import DataFormatError as DataError  # a DataError and a ValueError

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataFileNotFoundError(f"--prompts-file {str(path)!r}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"--prompts-file {str(path)!r}: a folder, not a file of prompts") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}, line {line}: not UTF-8 text (byte {data[e.start : e.start + 1]!r}); --prompts-file takes "
            f'a text file with one prompt per line, or JSONL rows with a "prompt" field'
        ) from None
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    if path.suffix == ".jsonl" or first.lstrip().startswith("{"):
        prompts = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise DataError(f'{path}, line {number}: expected an object with a text field "prompt"')
            prompts.append(row["prompt"])
    else:
        prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise DataError(f"{path}: no prompts (the file is empty)")
    return prompts


def sample_replies(
    model: str,
    prompts: str | list[str],
    base_model: str | None = None,
    renderer_name: str | None = None,
    max_tokens: int = 200,
    temperature: float = 0.7,
    num_samples: int = 1,
    seed: int | None = None,
) -> list[str] | list[list[str]]:
    """`num_samples` replies to a prompt (a list of texts), or to each of a list of prompts (a list of lists;
    all prompts are sampled in one batch)."""
    import asyncio

    from rlhfkit import model_info, renderers

    checkpoint, base, recorded_renderer = resolve_model(model, base_model)
    service = ServiceClient(settings=EngineSettings.from_env())  # the command line's engine: RLHFKIT_*
    sampler = (
        service.create_sampling_client(model_path=checkpoint, base_model=base)
        if checkpoint
        else service.create_sampling_client(base_model=base)
    )
    name = renderer_name or recorded_renderer or model_info.get_recommended_renderer_name(base)
    renderer = renderers.get_renderer(name, sampler.get_tokenizer())
    params = types.SamplingParams(
        max_tokens=max_tokens, temperature=temperature, stop=renderer.get_stop_sequences(), seed=seed
    )
    many = [prompts] if isinstance(prompts, str) else list(prompts)

    async def sample_all():
        return await asyncio.gather(
            *(
                sampler.sample_async(
                    renderer.build_generation_prompt([{"role": "user", "content": prompt}]), num_samples, params
                )
                for prompt in many
            )
        )

    replies = [
        [renderers.get_text_content(renderer.parse_response(seq.tokens)[0]) for seq in response.sequences]
        for response in asyncio.run(sample_all())
    ]
    return replies[0] if isinstance(prompts, str) else replies
