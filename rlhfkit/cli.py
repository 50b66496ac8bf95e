"""The `rlhfkit` command.

  rlhfkit pipeline [preset=demo|smoke|tutorial] [config=FILE] [key=value ...]   all three stages
  rlhfkit sft|rm|rl [key=value ...]                                                one stage alone
  rlhfkit sample --model PATH_OR_NAME [--base-model NAME] "prompt"                 a quick look at a model

A mistake in a data file, model path or checkpoint is reported in one line (exit 2); add --debug anywhere to
see the traceback.
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


def main(argv: list[str] | None = None) -> int:
    """Run a command; a UserError becomes one line on stderr and exit code 2 (unless --debug is given)."""
    from rlhfkit.errors import UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return run_command(argv)
    except UserError as e:
        if debug:
            raise
        print(f"rlhfkit: error: {e}", file=sys.stderr)
        return 2


def run_command(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "sample":
        return sample_main(rest)
    if command in ("pipeline", "sft", "rm", "rl"):
        from rlhfkit.recipes.preference.rlhf import rlhf_pipeline

        if command != "pipeline":
            rest = [f"run_sft={command == 'sft'}", f"run_rm={command == 'rm'}", f"run_rl={command == 'rl'}", *rest]
        return rlhf_pipeline.cli_main(rest)
    print(f"rlhfkit: unknown command {command!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
