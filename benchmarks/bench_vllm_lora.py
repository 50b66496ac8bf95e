"""vLLM with native LoRA (rlhfkit/engine/vllm_engine/core.py) against the base model and a merged copy of the adapter.

Measures, on one vLLM engine in the vLLM environment (scripts/setup-vllm.sh):
  * sampling tokens/s: the base model (served as a zero adapter), the policy adapter (native LoRA, attention +
    MLP + unembedding), and the same adapter merged into a copy of the weights served without LoRA (what the
    earlier merging path ran at);
  * judging: next-token scores (argmax + two label tokens' logprobs) per second with the adapter;
  * each LoRA figure with vLLM's own CPU LoRA ops and with rlhfkit's grouped ones (vllm_engine/cpu_ops.py), in
    alternating child processes (`--reps`).
The model, adapter and merged copy are made here (rlhfkit's environment); each engine runs in a child process
in the vLLM environment. Run it alone (other processes on the cores make the figures meaningless):

    PYTHONPATH=$PWD python benchmarks/bench_vllm_lora.py            # the embedded SmolLM2-135M
    PYTHONPATH=$PWD python benchmarks/bench_vllm_lora.py --tiny     # a tiny random Llama, to check it runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from statistics import median
from pathlib import Path

SAMPLE_SEED = 0


def child(settings: dict) -> dict:
    """Runs in the vLLM environment: time one engine (LoRA or merged) on the given prompts."""
    from rlhfkit.engine.vllm_engine.core import VLLMCore

    rows = [
        {
            "prompt": p,
            "max_tokens": settings["new_tokens"],
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "seed": SAMPLE_SEED + i,
            "stop_strings": [],
            "stop_ids": [],
        }
        for i, p in enumerate(settings["prompts"])
    ]
    results: dict = {}
    if settings["mode"] == "merged":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # as VLLMCore does (else vLLM reserves most RAM)
        from vllm import LLM, SamplingParams

        started = time.time()
        llm = LLM(
            model=settings["merged"],
            dtype=settings["dtype"],
            max_model_len=settings["context"],
            enforce_eager=True,
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,
        )
        results["start_seconds"] = time.time() - started
        params = [SamplingParams(max_tokens=r["max_tokens"], seed=r["seed"], ignore_eos=True, logprobs=0) for r in rows]
        llm.generate([{"prompt_token_ids": r["prompt"]} for r in rows[:2]], params[:2], use_tqdm=False)  # warm-up
        started = time.time()
        outputs = llm.generate([{"prompt_token_ids": r["prompt"]} for r in rows], params, use_tqdm=False)
        results["merged_tokens_per_s"] = sum(len(o.outputs[0].token_ids) for o in outputs) / (time.time() - started)
        return results
    os.environ["RLHFKIT_VLLM_CPU_OPS"] = settings["lora_ops"]
    core = VLLMCore(
        settings["model"],
        settings["work_dir"],
        dtype=settings["dtype"],
        max_model_len=settings["context"],
        max_lora_rank=settings["max_lora_rank"],
    )
    results["start_seconds"] = core.start_seconds
    core.load_adapter("policy", settings["adapter"])
    for name, adapter_id in (("base", None), ("adapter", "policy")):
        core.sample(adapter_id, rows[:2])  # warm-up
        started = time.time()
        outputs = core.sample(adapter_id, rows)
        results[f"{name}_tokens_per_s"] = sum(len(o["tokens"]) for o in outputs) / (time.time() - started)
    judged = [p + r for p, r in zip(settings["prompts"], settings["prompts"][::-1])]
    core.score_next_token("policy", judged[:2], settings["labels"])
    started = time.time()
    core.score_next_token("policy", judged, settings["labels"])
    results["judge_per_s"] = len(judged) / (time.time() - started)
    results["judge_prompt_tokens"] = sum(map(len, judged))
    return results


def run_child(settings: dict) -> dict:
    from rlhfkit.engine.vllm_engine.launch import package_path, vllm_environment
    from rlhfkit.engine.local_backend.vllm_client import vllm_python

    env = {**os.environ, **vllm_environment(), "PYTHONPATH": package_path()}
    done = subprocess.run(
        [vllm_python(), __file__, "--child"],
        input=json.dumps(settings),
        env=env,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def build_workload(tiny: bool, dtype: str, rank: int) -> tuple[str, str, str]:
    """(base model folder, adapter folder, merged folder): an adapter one optimiser step from zero on
    attention, MLP and unembedding, and a copy of the base with it merged in."""
    from common import EMBEDDED_MODEL
    from rlhfkit.engine import AdamParams, Datum, ModelInput, ServiceClient, resolve_base_model
    from rlhfkit.engine.model.lora import load_adapter_tensors, merge_adapter
    from rlhfkit.engine.model.base import load_base_model, load_tokenizer, pick_precision
    from rlhfkit.engine.testing import build_tiny_architecture
    from rlhfkit.paths import cache_dir

    folder = cache_dir() / "bench" / "vllm-lora" / ("tiny" if tiny else "smollm2")
    model = (
        str(
            build_tiny_architecture(
                folder / "model", "llama", hidden_size=256, num_layers=4, overrides={"tie_word_embeddings": True}
            )
        )
        if tiny
        else resolve_base_model(EMBEDDED_MODEL)
    )
    service = ServiceClient(storage_dir=str(folder / "runs"), dtype=dtype)
    trainer = service.create_lora_training_client(model, rank=rank, seed=0)
    tokens = load_tokenizer(model).encode("The quick brown fox jumps over the lazy dog. " * 4)
    trainer.forward_backward(
        [Datum(ModelInput.from_ints(tokens[:-1]), {"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})],
        "cross_entropy",
    )
    trainer.optim_step(AdamParams(learning_rate=1e-3))
    adapter = trainer.save_weights_for_sampler("policy").result().path
    merged = folder / "merged"
    base = load_base_model(model, pick_precision(None, dtype))
    merge_adapter(base, load_adapter_tensors(adapter), trainer.spec.scale)
    base.config.tie_word_embeddings = False  # the merged unembedding differs from the embeddings
    base.save_pretrained(merged)
    load_tokenizer(model).save_pretrained(merged)
    return model, adapter, str(merged)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama (checks that the script runs)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts sampled at once (default 32; tiny 4)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per reply (default 64; tiny 8)")
    parser.add_argument("--dtype", default="bfloat16", help="engine dtype (bfloat16 or float32)")
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank of the adapter")
    parser.add_argument("--reps", type=int, default=1, help="alternating runs of each LoRA ops variant")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # settings on stdin
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(sys.stdin.read()))))
        return
    from common import lima_prompts, machine_info, markdown_table, warn_if_busy, write_results
    from rlhfkit.engine.model.base import load_tokenizer
    from rlhfkit.paths import cache_dir

    warn_if_busy()
    folder = cache_dir() / "bench" / "vllm-lora"
    folder.mkdir(parents=True, exist_ok=True)
    count = args.prompts if args.prompts is not None else (4 if args.tiny else 32)
    new_tokens = args.new_tokens if args.new_tokens is not None else (8 if args.tiny else 64)
    model, adapter, merged = build_workload(args.tiny, args.dtype, args.rank)
    tokenizer = load_tokenizer(model)
    settings = {
        "model": model,
        "adapter": adapter,
        "merged": merged,
        "dtype": args.dtype,
        "context": 2048,
        "prompts": lima_prompts(model, count, max_prompt_tokens=256),
        "new_tokens": new_tokens,
        "labels": [tokenizer.encode("A")[0], tokenizer.encode("B")[0]],
        "max_lora_rank": max(64, args.rank),
        "work_dir": tempfile.mkdtemp(prefix="engine-", dir=folder),
    }
    # vLLM's reference LoRA ops and rlhfkit's grouped ones (vllm_engine/cpu_ops.py), alternating, then the merged copy
    runs: dict[str, list[dict]] = {"vllm": [], "rlhfkit": []}
    for _ in range(args.reps):
        for ops in runs:
            runs[ops].append(run_child({**settings, "mode": "lora", "lora_ops": ops}))
    lora = {ops: {key: median([r[key] for r in results]) for key in results[0]} for ops, results in runs.items()}
    plain = run_child({**settings, "mode": "merged"})

    def pair(key: str) -> list[str]:
        ref, grouped = lora["vllm"][key], lora["rlhfkit"][key]
        return [f"{ref:.2f}", f"{grouped:.2f}", f"{grouped / ref:.1f}x"]

    rows = [
        ["sampling, base model (zero adapter), tokens/s", *pair("base_tokens_per_s")],
        ["sampling, policy adapter, tokens/s", *pair("adapter_tokens_per_s")],
        ["judging with the adapter, comparisons/s", *pair("judge_per_s")],
        ["sampling, policy merged into a copy (no LoRA), tokens/s", f"{plain['merged_tokens_per_s']:.2f}", "", ""],
    ]
    markdown = (
        f"Sampling {count} prompts x {new_tokens} tokens and judging {count} comparisons "
        f"({lora['rlhfkit']['judge_prompt_tokens'] // count} tokens each), vLLM {args.dtype}, rank {args.rank} "
        f"({'tiny Llama' if args.tiny else 'SmolLM2-135M'}); medians of {args.reps} alternating runs per LoRA "
        f"ops:\n\n"
        + markdown_table(["workload", "vLLM's reference ops", "rlhfkit grouped ops", "ratio"], rows)
        + f"\n\nEngine start: LoRA {lora['rlhfkit']['start_seconds']:.0f} s, merged {plain['start_seconds']:.0f} s."
    )
    info = machine_info(int(os.environ.get("OMP_NUM_THREADS", "0") or 0))
    markdown = f"{info['cpu']}, {info['date']}, alone on the machine\n\n{markdown}"
    write_results(
        "vllm_lora" + ("_tiny" if args.tiny else ""),
        {
            "machine": info,
            "settings": {k: v for k, v in settings.items() if k != "prompts"},
            "lora": lora,
            "merged": plain,
        },
        markdown,
    )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
