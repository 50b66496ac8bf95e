"""Memory of the engine: peak resident memory of each stage of a preset (and peak device memory where CUDA
exists) against the floor (the base weights + the adapters + the optimizer states the stage holds), and the
memory held after 1, 8 and 32 sampling clients made from one training client.

    python benchmarks/bench_memory.py                        # the demo's stages, shortened (see STAGE_OVERRIDES)
    python benchmarks/bench_memory.py --full                 # the demo's stages as the preset has them
    python benchmarks/bench_memory.py --parts clients        # only the sampling-client measurement
    python benchmarks/bench_memory.py --tiny                 # a small random model: a quick check of the script

Every measurement runs in a fresh process (python benchmarks/bench_memory.py --child ...), so each peak is its
own: a stage is `rlhfkit <stage> preset=...` on one log_root (each stage reads the one before), its peak the
process's ru_maxrss. Resident memory includes the Python, torch and transformers runtime (measured alone:
`runtime` below), the allocator's free-but-kept pages, and the tokenizer; the floor counts tensors only.
Writes benchmarks/results/memory[-tiny].json and .md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

# Shortened stages (a few steps each; evaluation sizes as the preset has them except the final PM evaluation):
# every kind of work a stage does runs at least once, in a few minutes on 2 cores.
STAGE_OVERRIDES = {
    "sft": ["sft_max_steps=3"],
    "rm": ["rm_max_steps=4", "pm_eval_size=100"],
    "rl": ["rl_max_steps=4", "rl_eval_every=4"],
}
CLIENT_COUNTS = (1, 8, 32)
GIB = 1 << 30


def rss_bytes() -> int:
    """This process's resident memory now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cuda_peak() -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


# ------------------------------------------------------------------------------------------------------
# Children (one measurement per process)


def child_runtime() -> dict:
    """Resident memory of the runtime alone: Python + torch + transformers + peft + rlhfkit imported."""
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import rlhfkit.engine  # noqa: F401

    return {"rss": rss_bytes(), "peak_rss": peak_rss_bytes()}


def child_stage(stage: str, preset: str, log_root: str, overrides: list[str]) -> dict:
    from rlhfkit.cli import main

    start = time.perf_counter()
    code = main([stage, f"preset={preset}", f"log_root={log_root}", "report=false", *overrides])
    if code != 0:
        raise SystemExit(f"rlhfkit {stage} exited with {code}")
    return {
        "exit_code": code,
        "seconds": time.perf_counter() - start,
        "peak_rss": peak_rss_bytes(),
        "cuda_peak": cuda_peak(),
    }


def child_clients(base_model: str, rank: int, counts: list[int]) -> dict:
    """One training client; after each count in `counts`, that many sampling clients held (each made after a
    step, so each has its own weights): resident memory, tensor bytes held by all clients (distinct storages),
    and the floor. Then all dropped: what comes back."""
    import torch

    from rlhfkit.engine import AdamParams, Datum, ModelInput, ServiceClient, load_tokenizer
    from rlhfkit.engine.model import base as models

    service = ServiceClient()
    tokens = load_tokenizer(base_model).encode("Memory is spent on adapters, not on copies of the model.")
    datum = Datum(
        ModelInput.from_ints(tokens[:-1]), {"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)}
    )
    trainer = service.create_lora_training_client(base_model, rank=rank, seed=0)
    trainer.forward_backward([datum], "cross_entropy")
    trainer.optim_step(AdamParams(learning_rate=1e-4)).result()
    precision = service.precision
    base = models.tensor_bytes(models.shared_tensors(base_model, precision))
    adapter = sum(t.numel() * t.element_size() for t in trainer.trainer._params)
    # a sampler keeps its adapter in the compute dtype (bf16: half the trainer's fp32 copy)
    sampler_adapter = sum(t.numel() for t in trainer.trainer._params) * precision.compute_dtype.itemsize
    optimizer = sum(
        v.numel() * v.element_size()
        for state in trainer.trainer.optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )
    rows = []
    samplers = []
    gc.collect()
    rows.append({"clients": 0, "rss": rss_bytes(), "tensors": _held(models, trainer, samplers)})
    for count in counts:
        while len(samplers) < count:
            trainer.forward_backward([datum], "cross_entropy")
            trainer.optim_step(AdamParams(learning_rate=1e-4))
            sampler = trainer.save_weights_and_get_sampling_client()
            sampler.compute_logprobs(ModelInput.from_ints(tokens)).result()  # used once, as RL does
            samplers.append(sampler)
        gc.collect()
        held = _held(models, trainer, samplers)
        floor = base + adapter + sampler_adapter * count + optimizer
        rows.append({"clients": count, "rss": rss_bytes(), "tensors": held, "floor": floor})
    samplers.clear()
    sampler = None
    gc.collect()
    time.sleep(2.5)  # the allocator's trim runs on a background thread a second after clients are freed
    rows.append({"clients": "0 (all dropped)", "rss": rss_bytes(), "tensors": _held(models, trainer, samplers)})
    return {
        "base_bytes": base,
        "adapter_bytes": adapter,
        "sampler_adapter_bytes": sampler_adapter,
        "optimizer_bytes": optimizer,
        "dtype": str(precision.compute_dtype),
        "rows": rows,
        "peak_rss": peak_rss_bytes(),
        "cuda_peak": cuda_peak(),
    }


def _held(models, trainer, samplers) -> int:
    """Bytes of the distinct tensor storages the clients hold: models (shared base included once), gradients,
    Adam state."""
    tensors = models.model_tensors(trainer.model)
    tensors += [p.grad for p in trainer.trainer._params if p.grad is not None]
    for state in trainer.trainer.optimizer.state.values():
        tensors += [v for v in state.values() if hasattr(v, "untyped_storage") and v.dim() > 0]
    for s in samplers:
        tensors += models.model_tensors(s.model)
    return models.tensor_bytes(tensors)


def child_mixing(base_model: str, reps: int) -> dict:
    """What running two adapters' requests in one batch could save at most: the base model's forward for 2k rows
    at once against two forwards of k rows (the adapters' own low-rank products run per adapter either way), for
    scoring passes (rows of 256 tokens) and decode steps (one token per row over a 256-token KV cache). Medians
    of `reps` alternating repetitions."""
    import statistics

    import torch

    from rlhfkit.engine import ServiceClient
    from rlhfkit.engine.model import base as models

    precision = ServiceClient().precision
    model = models.load_base_model(base_model, precision)
    rows: list[dict] = []

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    with torch.inference_mode(), precision.autocast:
        for k in (1, 4, 16):
            ids = torch.randint(100, 1000, (2 * k, 256))
            apart, together = [], []
            for _ in range(reps):
                apart.append(
                    timed(
                        lambda: [model(input_ids=ids[:k], use_cache=False), model(input_ids=ids[k:], use_cache=False)]
                    )
                )
                together.append(timed(lambda: model(input_ids=ids, use_cache=False)))
            rows.append(
                {
                    "kind": "scoring 256 tokens",
                    "rows_per_adapter": k,
                    "apart": statistics.median(apart),
                    "together": statistics.median(together),
                }
            )
        for k in (1, 8, 32):
            ids = torch.randint(100, 1000, (2 * k, 256))
            cache = model(input_ids=ids, use_cache=True).cache
            step = torch.randint(100, 1000, (2 * k, 1))

            def decode(lo: int, hi: int) -> None:
                import copy

                part = copy.deepcopy(cache)
                part.batch_select_indices(torch.arange(lo, hi))
                return part

            half_a, half_b, full = decode(0, k), decode(k, 2 * k), decode(0, 2 * k)
            apart, together = [], []
            for rep in range(reps):
                if rep:  # back to the 256-token cache: each timed step appended one token
                    for c in (half_a, half_b, full):
                        c.crop(-1)
                apart.append(
                    timed(
                        lambda: [
                            model(input_ids=step[:k], cache=half_a, use_cache=True),
                            model(input_ids=step[k:], cache=half_b, use_cache=True),
                        ]
                    )
                )
                together.append(timed(lambda: model(input_ids=step, cache=full, use_cache=True)))
            rows.append(
                {
                    "kind": "decode step, 256-token cache",
                    "rows_per_adapter": k,
                    "apart": statistics.median(apart),
                    "together": statistics.median(together),
                }
            )
    return {"rows": rows, "dtype": str(precision.compute_dtype)}


def run_child(args: list[str], threads: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, __file__, "--child-out", out, *args], check=True, env=env)
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    return result


# ------------------------------------------------------------------------------------------------------
# Floors


def stage_floor(base_model: str, rank: int, stage: str) -> tuple[int, str]:
    """(bytes, what) the stage must hold: the base weights, its adapters (the trained one in fp32, samplers' in
    the compute dtype), Adam's two moments and the gradients of the trained one."""
    from rlhfkit.engine import ServiceClient
    from rlhfkit.engine.model import base as models
    from rlhfkit.engine.model.lora import LoraSpec, add_lora

    precision = ServiceClient().precision
    base = models.tensor_bytes(models.shared_tensors(base_model, precision))
    model = add_lora(models.load_base_model(base_model, precision), LoraSpec(base_model, rank=rank))
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapter, sampled = params * 4, params * precision.compute_dtype.itemsize
    # SFT and the preference model: one trained adapter (+ its gradient and 2 Adam moments); RL: the trained
    # policy, and as samplers the current policy, the initial (KL reference) policy and the preference model
    samplers = {"sft": 0, "rm": 0, "rl": 3}[stage]
    what = f"base {base / GIB:.3f} GiB + trained adapter {adapter / GIB:.3f} GiB + grad and Adam 3 x it"
    if samplers:
        what += f" + {samplers} sampler adapters x {sampled / GIB:.3f} GiB"
    return base + 4 * adapter + samplers * sampled, what


# ------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--full", action="store_true", help="the preset's stages as they are (no STAGE_OVERRIDES)")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--parts", default="runtime,stages,clients,mixing")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of the clients measurement (demo: 16)")
    parser.add_argument("--stem", help="results file name (default memory, memory-tiny with --tiny)")
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        kind, *rest = args.child
        if kind == "runtime":
            result = child_runtime()
        elif kind == "mixing":
            result = child_mixing(rest[0], int(rest[1]))
        elif kind == "stage":
            result = child_stage(rest[0], rest[1], rest[2], rest[3:])
        else:
            result = child_clients(rest[0], int(rest[1]), [int(c) for c in rest[2:]])
        Path(args.child_out).write_text(json.dumps(result))
        return

    parts = args.parts.split(",")
    info = common.machine_info(args.threads)
    common.warn_if_busy()
    base_model = common.workload_model(args.tiny)
    preset = "smoke" if args.tiny else args.preset
    results: dict = {"machine": info, "preset": preset, "full": args.full, "base_model": base_model}
    lines = [f"# Memory: {preset} stages{'' if args.full else ' (shortened)'} and sampling clients", ""]

    def save() -> None:  # after every part: a part that fails leaves the ones before it written
        tail = [common.machine_lines_without_limit(info, common.load_snapshot(), [])]
        common.write_results(
            args.stem or ("memory-tiny" if args.tiny else "memory"), results, "\n".join(lines + ["", *tail])
        )

    if "runtime" in parts:
        results["runtime"] = run_child(["--child", "runtime"], args.threads)
    save()
    if "stages" in parts:
        log_root = tempfile.mkdtemp(prefix="bench-memory-")
        stages = []
        lines += [
            "| stage | peak RSS (GiB) | peak CUDA (GiB) | floor (GiB) | floor: what | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for stage in ("sft", "rm", "rl"):
            # every stage gets every shortened setting: a stage refuses settings that differ from its run's record
            overrides = (
                [] if args.full else [o for stage_overrides in STAGE_OVERRIDES.values() for o in stage_overrides]
            )
            result = run_child(["--child", "stage", stage, preset, log_root, *overrides], args.threads)
            stage_model = str(Path(log_root) / "tiny_model") if _preset_model(preset) == "tiny" else base_model
            floor, what = stage_floor(stage_model, _preset_rank(preset), stage)
            stages.append({"stage": stage, "overrides": overrides, **result, "floor": floor, "floor_what": what})
            cuda = f"{result['cuda_peak'] / GIB:.2f}" if result["cuda_peak"] is not None else "-"
            lines.append(
                f"| {stage} | {result['peak_rss'] / GIB:.2f} | {cuda} | {floor / GIB:.3f} | {what} | "
                f"{result['seconds']:.0f} |"
            )
        results["stages"] = stages
        lines.append("")
        lines.append(
            f"Stage settings beyond `preset={preset}`: "
            + "; ".join(f"{s['stage']}: {' '.join(s['overrides']) or '(none)'}" for s in stages)
        )
        lines.append("")
    save()
    if "clients" in parts:
        counts = [str(c) for c in CLIENT_COUNTS]
        result = run_child(["--child", "clients", base_model, str(args.rank), *counts], args.threads)
        results["clients"] = result
        lines += [
            f"Sampling clients from one training client (rank {args.rank}, {result['dtype']}): base "
            f"{result['base_bytes'] / GIB:.3f} GiB, adapter {result['adapter_bytes'] / (1 << 20):.1f} MiB (a sampler's: "
            f"{result['sampler_adapter_bytes'] / (1 << 20):.1f} MiB), Adam "
            f"state {result['optimizer_bytes'] / (1 << 20):.1f} MiB",
            "",
            "| sampling clients held | RSS (GiB) | tensors held (GiB) | floor (GiB) |",
            "|---|---|---|---|",
        ]
        for row in result["rows"]:
            floor = f"{row['floor'] / GIB:.3f}" if "floor" in row else "-"
            lines.append(f"| {row['clients']} | {row['rss'] / GIB:.3f} | {row['tensors'] / GIB:.3f} | {floor} |")
        lines.append("")
    save()
    if "mixing" in parts:
        result = run_child(["--child", "mixing", base_model, "7"], args.threads)
        results["mixing"] = result
        lines += [
            f"Mixing two adapters' requests in one batch, the most it could save ({result['dtype']}, the base "
            "model's forward: two batches of k rows apart against one of 2k rows; medians of 7):",
            "",
            "| pass | k rows per adapter | apart (ms) | together (ms) | together / apart |",
            "|---|---|---|---|---|",
        ]
        for row in result["rows"]:
            lines.append(
                f"| {row['kind']} | {row['rows_per_adapter']} | {row['apart'] * 1e3:.1f} | "
                f"{row['together'] * 1e3:.1f} | {row['together'] / row['apart']:.2f} |"
            )
        lines.append("")
    if "runtime" in results:
        lines.append(
            f"Runtime alone (Python, torch, transformers, peft, rlhfkit imported): "
            f"{results['runtime']['rss'] / GIB:.2f} GiB resident."
        )
    lines.append("")
    lines.append(common.machine_lines_without_limit(info, common.load_snapshot(), []))
    common.write_results(args.stem or ("memory-tiny" if args.tiny else "memory"), results, "\n".join(lines))


def _preset_model(preset: str) -> str:
    from rlhfkit.recipes.preference.rlhf.pipeline_config import PRESETS

    return PRESETS[preset]["base_model"]


def _preset_rank(preset: str) -> int:
    from rlhfkit.recipes.preference.rlhf.pipeline_config import PRESETS, PipelineConfig

    return PRESETS[preset].get("lora_rank", PipelineConfig.__dataclass_fields__["lora_rank"].default)


if __name__ == "__main__":
    main()
