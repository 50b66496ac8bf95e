"""The `rlhfkit` command.

  rlhfkit pipeline [preset=demo|smoke|tutorial] [config=FILE] [key=value ...]   all three stages
  rlhfkit sft|rm|rl [key=value ...]                                                one stage alone
  rlhfkit sample --model PATH_OR_NAME [--base-model NAME] "prompt"                 a quick look at a model
  rlhfkit report RUN_FOLDER                                                       the report of a finished run

`rlhfkit COMMAND --help` explains a command; the settings of pipeline, sft, rm and rl follow.
"""

from __future__ import annotations

import argparse
import sys


def sample_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlhfkit sample", description="Sample replies from a model or checkpoint.")
    parser.add_argument("prompt")
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="a base model (embedded name, folder, .gguf, Hub id), a checkpoint directory "
                             "(sampler or state), or a stage log directory (its last checkpoint is used)")
    parser.add_argument("--base-model", default=None, help="override the checkpoint's base model")
    parser.add_argument("--renderer", default=None, help="renderer name (default: the model's recommended one)")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)

    from rlhfkit.sampling_cli import sample_replies

    for i, reply in enumerate(sample_replies(args.model, args.prompt, base_model=args.base_model,
                                             renderer_name=args.renderer, max_tokens=args.max_tokens,
                                             temperature=args.temperature, num_samples=args.num_samples,
                                             seed=args.seed)):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(reply)
    return 0


def report_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlhfkit report", description="Write report.{html,md} of a finished run "
                                     "from its folder alone (no model is loaded).")
    parser.add_argument("run_folder", help="a pipeline's log_root (holding pipeline_config.json)")
    args = parser.parse_args(argv)
    from pathlib import Path

    from rlhfkit.report import write_report

    if not (Path(args.run_folder) / "pipeline_config.json").is_file():
        print(f"rlhfkit report: run_folder={args.run_folder!r}: no pipeline_config.json there", file=sys.stderr)
        return 2
    paths = write_report(args.run_folder)
    print(f"report: {paths['html']}  and  {paths['markdown']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        from rlhfkit.recipes.preference.rlhf.pipeline_config import help_text

        print(__doc__)
        print(help_text("pipeline", []))
        return 0
    command, rest = argv[0], argv[1:]
    if command == "sample":
        return sample_main(rest)
    if command == "report":
        return report_main(rest)
    if command in ("pipeline", "sft", "rm", "rl"):
        from rlhfkit.recipes.preference.rlhf.pipeline_config import parse_command

        if command != "pipeline":
            rest = [f"run_sft={command == 'sft'}", f"run_rm={command == 'rm'}", f"run_rl={command == 'rl'}", *rest]
        cfg = parse_command(rest, command)  # settings checked before anything heavy is imported
        if isinstance(cfg, int):
            return cfg
        import asyncio

        from rlhfkit.recipes.preference.rlhf import rlhf_pipeline

        asyncio.run(rlhf_pipeline.main_async(cfg))
        return 0
    print(f"rlhfkit: unknown command {command!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
