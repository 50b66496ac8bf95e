"""`rlhfkit export CHECKPOINT OUT [--merge]`: a checkpoint as a PEFT adapter folder or a merged model folder."""

from __future__ import annotations

from pathlib import Path

from rlhfkit.cli_errors import ArgumentParser


def export_main(argv: list[str]) -> int:
    parser = ArgumentParser(
        prog="rlhfkit export",
        description="Write a checkpoint as a PEFT adapter folder (peft / vLLM LoRA) or, with --merge, as a merged "
        "Hugging Face model folder (transformers / vLLM).",
    )
    parser.add_argument(
        "checkpoint",
        help="an rlhfkit checkpoint directory (sampler or state), a stage log "
        "directory (its last checkpoint), or a PEFT adapter folder",
    )
    parser.add_argument("out", help="the folder to write (must not exist or be empty)")
    parser.add_argument(
        "--merge", action="store_true", help="merge the adapter into the base weights and write a full model folder"
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="weights' dtype in the merged folder (default float32)",
    )
    parser.add_argument(
        "--base-model",
        default=None,
        help="adapter export: the base model name to record (default: the one the run was given)",
    )
    args = parser.parse_args(argv)
    if args.merge and args.base_model is not None:
        parser.error("--base-model applies to adapter exports only")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        parser.error(f"OUT {str(out)!r} exists and is not an empty folder; choose a new OUT")
    if not Path(args.checkpoint).expanduser().exists():
        parser.error(f"CHECKPOINT {args.checkpoint!r}: no such folder")

    from rlhfkit.engine.model.export import export_adapter, export_merged
    from rlhfkit.sampling_cli import resolve_model

    checkpoint, _, _ = resolve_model(args.checkpoint)  # a stage or run folder without a checkpoint: named
    if checkpoint is None:
        parser.error(
            f"CHECKPOINT {args.checkpoint!r}: not a checkpoint directory, stage log directory or PEFT adapter "
            f"folder (no rlhfkit_state.json, adapter_config.json or checkpoints.jsonl there)"
        )
    if args.merge:
        path = export_merged(checkpoint, out, args.dtype)
        print(f"merged model written to {path} (load with transformers AutoModelForCausalLM or vllm.LLM)")
    else:
        path = export_adapter(checkpoint, out, args.base_model)
        print(f"PEFT adapter written to {path} (load with peft.PeftModel.from_pretrained or vLLM's LoRARequest)")
    return 0
