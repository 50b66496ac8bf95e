"""The `rlhfkit` command.

  rlhfkit pipeline [preset=demo|quality|shorter|smoke|tutorial] [config=FILE] [key=value ...]   the whole pipeline
  rlhfkit sft|rm|rl|dpo [key=value ...]                 one stage alone (dpo: from the SFT policy in log_root/sft)
  rlhfkit sample --model PATH_OR_NAME "prompt" | --prompts-file FILE               replies of a model
  rlhfkit export CHECKPOINT OUT [--merge]                                          a PEFT adapter / merged model
  rlhfkit eval pm|winrate ...                                                      evaluate a judge / a policy
  rlhfkit report RUN_FOLDER                                                        the report of a finished run
  rlhfkit serve [--port 8000] [--storage DIR] [backend=ray ...]                   a Tinker API server (tinker SDK)
  rlhfkit --version

`rlhfkit COMMAND --help` explains a command; the settings of pipeline, sft, rm, rl and dpo follow.

A mistake in a setting, argument, data file, model path or checkpoint, and a failed write (a full or read-only
disk), is reported in one line (exit 2); add --debug anywhere to see the traceback.
"""

from __future__ import annotations

import sys


def sample_main(argv: list[str]) -> int:
    from rlhfkit.cli_errors import ArgumentParser, non_negative_float, positive_int
    from rlhfkit.renderers import RENDERERS

    parser = ArgumentParser(prog="rlhfkit sample", description="Sample replies from a model or checkpoint.")
    parser.add_argument("prompt", nargs="?", default=None)
    parser.add_argument(
        "--prompts-file", default=None, help='a file of prompts: one per line, or JSONL rows with a "prompt" field'
    )
    parser.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="a base model (embedded name, folder, .gguf, Hub id), a checkpoint directory "
        "(sampler or state), a PEFT adapter folder, or a stage log directory (its last "
        "checkpoint is used)",
    )
    parser.add_argument("--base-model", default=None, help="override the checkpoint's base model")
    parser.add_argument(
        "--renderer",
        default=None,
        choices=sorted(RENDERERS),
        help="renderer name (default: the model's recommended one)",
    )
    parser.add_argument("--max-tokens", type=positive_int, default=200)
    parser.add_argument("--temperature", type=non_negative_float, default=0.7)
    parser.add_argument("--num-samples", type=positive_int, default=1)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if (args.prompt is None) == (args.prompts_file is None):
        parser.error("give one prompt or --prompts-file FILE")

    from rlhfkit.sampling_cli import check_model_argument, read_prompts, sample_replies

    # every argument is checked before a model loads: the prompts file, the model, the base model
    prompts = [args.prompt] if args.prompts_file is None else read_prompts(args.prompts_file)
    check_model_argument("--model", args.model, args.base_model)
    replies = sample_replies(
        args.model,
        prompts,
        base_model=args.base_model,
        renderer_name=args.renderer,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        num_samples=args.num_samples,
        seed=args.seed,
    )
    for prompt, samples in zip(prompts, replies):
        if len(prompts) > 1:
            print(f"=== prompt: {prompt}")
        for i, reply in enumerate(samples):
            if args.num_samples > 1:
                print(f"--- sample {i + 1} ---")
            print(reply)
    return 0


def report_main(argv: list[str]) -> int:
    from rlhfkit.cli_errors import ArgumentParser

    parser = ArgumentParser(
        prog="rlhfkit report",
        description="Write report.{html,md} of a finished run from its folder alone (no model is loaded).",
    )
    parser.add_argument("run_folder", help="a pipeline's log_root (holding pipeline_config.json)")
    args = parser.parse_args(argv)
    from pathlib import Path

    from rlhfkit.report import write_report
    from rlhfkit.run_files import PIPELINE_CONFIG_FILE

    if not (Path(args.run_folder) / PIPELINE_CONFIG_FILE).is_file():
        parser.error(f"run_folder={args.run_folder!r}: no pipeline_config.json there (give a pipeline's log_root)")
    paths = write_report(args.run_folder)
    print(f"report: {paths['html']}  and  {paths['markdown']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run a command; a UserError or a failed write becomes one line on stderr and exit code 2 (unless --debug is
    given), a closed output pipe a quiet exit (rlhfkit.cli_errors.run_cli)."""
    from rlhfkit.cli_errors import run_cli

    return run_cli(run_command, argv, prog="rlhfkit")


def run_command(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        from rlhfkit.recipes.preference.rlhf.pipeline_config import help_text

        print(__doc__)
        print(help_text("pipeline", []))
        return 0
    if argv[0] == "--version":
        from rlhfkit import __version__

        print(f"rlhfkit {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "sample":
        return sample_main(rest)
    if command == "export":
        from rlhfkit.export import export_main

        return export_main(rest)
    if command == "eval":
        from rlhfkit.eval_cli import eval_main

        return eval_main(rest)
    if command == "report":
        return report_main(rest)
    if command == "serve":
        from rlhfkit.serve.cli import serve_main

        return serve_main(rest)
    if command in ("pipeline", "sft", "rm", "rl", "dpo"):
        from rlhfkit.recipes.preference.rlhf.pipeline_config import parse_command

        if command != "pipeline":
            rest = [
                f"run_sft={command == 'sft'}",
                f"run_rm={command == 'rm'}",
                f"run_rl={command == 'rl'}",
                f"run_dpo={command == 'dpo'}",
                *(["method=dpo"] if command == "dpo" else []),
                *rest,
            ]
        cfg = parse_command(rest, command)  # settings checked before anything heavy is imported
        if isinstance(cfg, int):
            return cfg
        import asyncio

        from rlhfkit.recipes.preference.rlhf import rlhf_pipeline

        asyncio.run(rlhf_pipeline.main_async(cfg))  # bad data, models, checkpoints: UserError (one line)
        return 0
    from rlhfkit.cli_errors import fail

    commands = "pipeline, sft, rm, rl, dpo, sample, export, eval, report"
    fail(f"unknown command {command!r}; the commands: {commands} (see rlhfkit --help)")


if __name__ == "__main__":
    sys.exit(main())
