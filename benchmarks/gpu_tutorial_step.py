"""The tutorial's RL step shapes on a randomly initialised model of the tutorial's 9B shape (transformers' default
Qwen3_5Config text model: vocab 248,320, hidden 4,096, 32 layers, 3 Gated DeltaNet layers to 1 full-attention
layer), through rlhfkit's engine, reporting peak device memory and time of each phase. Run by gpu_check.sh.

    python benchmarks/gpu_tutorial_step.py                 # the 9B shape on CUDA in bf16 (needs ~40 GB)
    python benchmarks/gpu_tutorial_step.py --shape tiny    # a small shape on any device: checks the script

Phases (one client each, as in an RL iteration; peak device memory reset before each):
  sample    one sampling batch: `--sample-prompts` prompts of `--prompt-tokens` tokens x 4 replies of
            `--reply-tokens` tokens (stop=[]: every reply runs to its length) — the KV cache / recurrent states of
            a full batch of the sampler (RLHFKIT_SAMPLING_BATCH rows)
  judge     score_next_token on `--judge-rows` matchups of prompt + 2 replies (the preference model's pass)
  reference compute_logprobs on `--train-rows` sequences of prompt + reply (the KL reference's pass)
  train     forward_backward (importance_sampling) on `--train-rows` datums, then optim_step
Resident before the phases: the base weights (bf16) and the adapters of the clients made (rank 64, fp32).
The tutorial's whole step (256 prompts x 4 replies) is these phases repeated; the script extrapolates linearly
(tokens) and says so. The model is random: replies never stop early, so every sequence has its full length.
Writes $OUT/gpu_tutorial_step.json (or --out) and prints one line per phase.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

GIB = 1 << 30


def tokenizer_files(target: Path) -> None:
    """Tokenizer files for the engine (the ids the model sees are random anyway): the offline Qwen tokenizer
    when the data folder is there, else the embedded SmolLM2's."""
    from rlhfkit.paths import shared_data_dir

    source = shared_data_dir() / "tokenizers" / "qwen2"
    if not source.is_dir():
        from rlhfkit.engine.model.base import resolve_base_model

        source = Path(resolve_base_model("smollm2-135m-instruct"))
    for f in source.iterdir():
        if f.suffix in (".json", ".txt", ".model", ".jinja") and f.name != "config.json":
            shutil.copy(f, target / f.name)


def make_model(shape: str, folder: Path, device: str, dtype: torch.dtype):
    """A random model of the shape, put straight into the engine's base cache (nothing written to disk but the
    config and tokenizer): rlhfkit's clients then share it as they share a loaded base."""
    from transformers import AutoModelForCausalLM, Qwen3_5Config

    from rlhfkit.engine.model import base as models

    config = Qwen3_5Config().text_config
    if shape == "tiny":
        config.update(
            dict(
                hidden_size=128,
                intermediate_size=256,
                num_hidden_layers=4,
                layer_types=["linear_attention"] * 3 + ["full_attention"],
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=32,
                linear_num_key_heads=2,
                linear_num_value_heads=4,
                linear_key_head_dim=32,
                linear_value_head_dim=32,
                vocab_size=4096,
            )
        )
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    tokenizer_files(folder)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.requires_grad_(False)
    model.eval()
    precision = models.pick_precision(device, str(dtype).removeprefix("torch."))
    models._base_cache[(str(folder.resolve()), str(precision.device), precision.compute_dtype)] = model
    return config, precision


def phase(name: str, device: str, fn, results: dict, tokens: int) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    results["phases"][name] = {"seconds": seconds, "tokens": tokens, "peak_device_bytes": peak}
    peak_text = f"{peak / GIB:.1f} GiB peak device memory" if peak is not None else "no CUDA"
    print(f"{name:10s} {seconds:8.1f} s  {tokens:8d} tokens  {peak_text}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("9b", "tiny"), default="9b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--reply-tokens", type=int, default=1024)
    parser.add_argument("--sample-prompts", type=int, default=16, help="x 4 replies = 64 rows, the sampler's batch")
    parser.add_argument("--judge-rows", type=int, default=16)
    parser.add_argument("--train-rows", type=int, default=16)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    if args.shape == "tiny":
        args.prompt_tokens, args.reply_tokens = min(args.prompt_tokens, 32), min(args.reply_tokens, 16)

    from rlhfkit.engine import AdamParams, Datum, ModelInput, SamplingParams, ServiceClient
    from rlhfkit.engine.model import base as models

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    folder = Path(tempfile.mkdtemp(prefix="gpu-tutorial-")) / "model"
    start = time.perf_counter()
    config, precision = make_model(args.shape, folder, args.device, dtype)
    results: dict = {
        "shape": args.shape,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype),
        "settings": vars(args),
        "config": {
            k: getattr(config, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size")
        },
        "init_seconds": time.perf_counter() - start,
        "phases": {},
    }
    try:
        from transformers.utils.import_utils import is_causal_conv1d_available, is_flash_linear_attention_available

        results["fast_linear_attention_kernels"] = {
            "flash_linear_attention": bool(is_flash_linear_attention_available()),
            "causal_conv1d": bool(is_causal_conv1d_available()),
        }
    except ImportError:
        results["fast_linear_attention_kernels"] = "unknown"
    base_bytes = models.tensor_bytes(models.shared_tensors(str(folder), precision))
    results["base_bytes"] = base_bytes
    print(f"base {base_bytes / GIB:.2f} GiB ({args.shape}, {dtype}) on {results['device_name']}", flush=True)

    service = ServiceClient(device=args.device, dtype=str(dtype).removeprefix("torch."))
    trainer = service.create_lora_training_client(str(folder), rank=args.rank, seed=0)
    adapter_bytes = sum(p.numel() * p.element_size() for p in trainer.trainer._params)
    results["adapter_bytes"] = adapter_bytes
    policy = trainer.save_weights_and_get_sampling_client()
    judge = trainer.save_weights_and_get_sampling_client()  # stands in for the preference model (same shape)
    reference = trainer.save_weights_and_get_sampling_client()  # the KL reference / initial policy
    if args.device.startswith("cuda"):
        results["resident_device_bytes"] = torch.cuda.memory_allocated()
        print(
            f"resident with 4 clients: {torch.cuda.memory_allocated() / GIB:.2f} GiB "
            f"(adapter {adapter_bytes / GIB:.2f} GiB each)",
            flush=True,
        )

    vocab = config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(1000, vocab - 1, (n,), generator=gen).tolist()

    prompts = [tokens(args.prompt_tokens) for _ in range(args.sample_prompts)]
    replies: list[list[int]] = []

    def sample() -> None:
        params = SamplingParams(max_tokens=args.reply_tokens, temperature=1.0, stop=[], seed=0)
        responses = policy.sample_batch([(ModelInput.from_ints(p), 4, params) for p in prompts])
        replies.extend(s.tokens for r in responses for s in r.sequences)

    phase("sample", args.device, sample, results, args.sample_prompts * 4 * args.reply_tokens)
    sequences = [prompts[i // 4] + replies[i] for i in range(len(replies))]

    def judge_pass() -> None:
        rows = [
            prompts[i % len(prompts)] + replies[i % len(replies)] + replies[(i + 1) % len(replies)]
            for i in range(args.judge_rows)
        ]
        judge.score_next_token_batch([ModelInput.from_ints(r) for r in rows], [tokens(1)[0], tokens(1)[0]])

    judge_tokens = args.judge_rows * (args.prompt_tokens + 2 * args.reply_tokens)
    phase("judge", args.device, judge_pass, results, judge_tokens)
    train_rows = [sequences[i % len(sequences)] for i in range(args.train_rows)]
    train_tokens = sum(len(s) for s in train_rows)
    phase(
        "reference",
        args.device,
        lambda: reference.compute_logprobs_batch([ModelInput.from_ints(s) for s in train_rows]),
        results,
        train_tokens,
    )

    def train() -> None:
        data = []
        for s in train_rows:
            n = len(s) - 1
            mask = [0.0] * (args.prompt_tokens - 1) + [1.0] * (n - args.prompt_tokens + 1)
            data.append(
                Datum(
                    ModelInput.from_ints(s[:-1]),
                    {
                        "target_tokens": s[1:],
                        "logprobs": [-1.0 * m for m in mask],
                        "advantages": [0.5 * m for m in mask],
                    },
                )
            )
        trainer.forward_backward(data, "importance_sampling").result()
        trainer.optim_step(AdamParams(learning_rate=1e-6)).result()

    phase("train", args.device, train, results, train_tokens)
    # the tutorial's step: 256 prompts x 4 replies; linear in tokens from the phases above (an extrapolation)
    full = {
        "sample": 256 * 4 * args.reply_tokens,
        "judge": 256 * 6 * 2 * (args.prompt_tokens + 2 * args.reply_tokens),
        "reference": 1024 * (args.prompt_tokens + args.reply_tokens),
        "train": 1024 * (args.prompt_tokens + args.reply_tokens),
    }
    results["extrapolated_step_seconds"] = {
        k: results["phases"][k]["seconds"] * full[k] / results["phases"][k]["tokens"] for k in full
    }
    results["extrapolation_note"] = (
        "seconds scaled by tokens from one batch of each phase (judge: 6 pairs x 2 orders per group); "
        "sampling batches of 64 rows run one after another on the torch sampler"
    )
    print(
        "extrapolated to the tutorial's step (256 x 4):",
        {k: f"{v:.0f} s" for k, v in results["extrapolated_step_seconds"].items()},
        flush=True,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_tutorial_step.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'gpu_tutorial_step.json'}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
