"""Shared pieces of the benchmarks: the model and data of each workload, timing, the machine's matmul
limit (for model FLOPs utilisation) and the results files.

FLOP counts (stated once, used everywhere): N = parameters of every matrix multiply of one token's forward
pass (all linear layers including the unembedding; the embedding lookup is not a matmul). Attention-score
FLOPs are left out (at 512 tokens they add about 10% for SmolLM2-135M), so utilisation figures are slightly
conservative.
  * forward only (sampling):                      2 * N FLOPs per token
  * scoring the next token only (judging):        2 * (N - H) per prompt token + 2 * H per prompt, where
    H = the unembedding's parameters (logits are computed for the last position only)
  * LoRA training (frozen base + small adapter):   4 * N FLOPs per token (forward 2N + input gradients 2N;
    the frozen base needs no weight gradients, the adapters' own matmuls are < 2% and left out)
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, UTC
from pathlib import Path
from typing import Any, Callable

import torch

from rlhfkit.paths import cache_dir
from rlhfkit.utils.atomic import write_json_atomic, write_text_atomic

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
EMBEDDED_MODEL = "smollm2-135m-instruct"
BUSY_LOAD = 1.5  # load average above this before a run: other processes share the cores
BUSY_CPU = 50.0  # another process using this much CPU (%) at the end of a run shared the cores with it


# ------------------------------------------------------------------------------------------------------
# The machine


def other_processes(top: int = 5) -> list[str]:
    """The busiest other processes right now ("%cpu command"), to record who shared the machine."""
    try:
        out = subprocess.run(
            ["ps", "-eo", "pid=,pcpu=,args=", "--sort=-pcpu"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.splitlines():
        pid, cpu, args = line.strip().split(None, 2)
        if int(pid) != os.getpid() and float(cpu) >= 5.0:
            rows.append(f"{cpu}% {args[:100]}")
    return rows[:top]


def load_snapshot() -> dict[str, Any]:
    one, five, fifteen = os.getloadavg()
    return {"loadavg_1m": one, "loadavg_5m": five, "loadavg_15m": fifteen, "busy_processes": other_processes()}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int) -> dict[str, Any]:
    import peft
    import transformers

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "load_at_start": load_snapshot(),
    }


def warn_if_busy() -> None:
    load = os.getloadavg()[0]
    if load > BUSY_LOAD:
        print(
            f"WARNING: load average {load:.2f} > {BUSY_LOAD}: other processes share the cores; the figures "
            f"will be unreliable (run the benchmark alone)",
            file=sys.stderr,
        )


def matmul_flops(dtype: torch.dtype, size: int = 2048, min_seconds: float = 2.0) -> float:
    """FLOP/s torch reaches here multiplying two size x size matrices in `dtype` (the best of several runs)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    start = time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def bf16_native() -> bool:
    """Whether the engine computes in bf16 here by default (it does when the hardware has native bf16)."""
    from rlhfkit.engine.model.base import pick_precision

    return pick_precision(dtype="auto").compute_dtype == torch.bfloat16


def benchmark_dtypes(requested: str | None) -> list[str]:
    """The engine's own choice, plus fp32 for comparison when that choice is bf16."""
    if requested:
        return requested.split(",")
    return ["bfloat16", "float32"] if bf16_native() else ["float32"]


def matmul_limits(dtypes: list[str], tiny: bool) -> dict[str, float]:
    """The matmul limit of each benchmarked dtype, and of bf16 anyway (small and quick when it is emulated:
    it shows why the engine does not pick it)."""
    seconds = 0.5 if tiny else 3.0
    limits = {d: matmul_flops(getattr(torch, d), min_seconds=seconds) for d in dtypes}
    if "bfloat16" not in limits:
        limits["bfloat16"] = matmul_flops(torch.bfloat16, size=512, min_seconds=0.2)
    return limits


def remeasure_limits(limits: dict[str, float], dtypes: list[str], tiny: bool) -> dict[str, float]:
    """The limits again at the end of a run, keeping the higher of the two: on a shared host one measurement
    can catch a slow moment (one run measured 135 GFLOP/s at its start and 181-187 right after it)."""
    again = matmul_limits(dtypes, tiny)
    return {k: max(v, again.get(k, 0.0)) for k, v in limits.items()}


def unembedding_params(model: torch.nn.Module) -> int:
    return model.get_output_embeddings().weight.numel()


def matmul_params(model: torch.nn.Module) -> int:
    """N of a plain (non-PEFT) model: weights of every linear layer a token passes through (the unembedding
    included, even when tied to the embedding)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


# ------------------------------------------------------------------------------------------------------
# The model of the workload


def workload_model(tiny: bool) -> str:
    """base_model: the embedded SmolLM2-135M, or (with --tiny) a small random Qwen2 model in the cache."""
    if not tiny:
        return EMBEDDED_MODEL
    from rlhfkit.engine.testing import build_tiny_model

    return str(build_tiny_model(cache_dir() / "bench" / "tiny-model", hidden_size=128, num_layers=4))


def renderer_name(base_model: str) -> str:
    """The model's recommended renderer; role_colon for the tiny model (the Qwen chat template it borrows
    cannot render the preference model's system markers inside a conversation)."""
    from rlhfkit.model_info import get_recommended_renderer_name

    return "role_colon" if base_model != EMBEDDED_MODEL else get_recommended_renderer_name(base_model)


def renderer_for(base_model: str):
    from rlhfkit.renderers import get_renderer
    from rlhfkit.tokenizer_utils import get_tokenizer

    return get_renderer(renderer_name(base_model), get_tokenizer(base_model))


# ------------------------------------------------------------------------------------------------------
# Data: the same token sequences go to both sides of a comparison


def sft_batches(base_model: str, batch_size: int, max_length: int, count: int) -> list[list]:
    """`count` batches of LIMA chat datums (weights on the assistant replies), via rlhfkit's chat datasets."""
    from rlhfkit.recipes.chat_sl.chat_datasets import LimaBuilder
    from rlhfkit.supervised.types import ChatDatasetBuilderCommonConfig

    common = ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=base_model,
        renderer_name=renderer_name(base_model),
        max_length=max_length,
        batch_size=batch_size,
    )
    train, _ = LimaBuilder(common_config=common)()
    return [train.get_batch(i) for i in range(count)]


def pm_batches(base_model: str, batch_size: int, max_length: int, count: int) -> list[list]:
    """`count` batches of preference-model datums from HH-RLHF (only the label token is trained)."""
    from rlhfkit.preference.preference_datasets import ChatDatasetBuilderFromComparisons
    from rlhfkit.recipes.preference.datasets import HHHComparisonBuilder
    from rlhfkit.supervised.types import ChatDatasetBuilderCommonConfig

    common = ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=base_model,
        renderer_name=renderer_name(base_model),
        max_length=max_length,
        batch_size=batch_size,
    )
    train, _ = ChatDatasetBuilderFromComparisons(common, HHHComparisonBuilder(role="preference_model"))()
    datums, i = [], 0
    while len(datums) < batch_size * count and i < len(train):  # over-long comparisons are skipped
        datums += train.get_batch(i)
        i += 1
    if len(datums) < batch_size * count:
        raise ValueError(f"only {len(datums)} comparisons of <= {max_length} tokens, wanted {batch_size * count}")
    return [datums[k * batch_size : (k + 1) * batch_size] for k in range(count)]


def dpo_batches(base_model: str, pairs: int, max_length: int, count: int) -> list[list]:
    """`count` batches of `pairs` DPO pairs from HH-RLHF (adjacent chosen, rejected datums), via rlhfkit's
    DPODatasetBuilderFromComparisons."""
    from rlhfkit.preference.dpo_datasets import DPODatasetBuilderFromComparisons
    from rlhfkit.recipes.preference.datasets import HHHComparisonBuilder
    from rlhfkit.supervised.types import ChatDatasetBuilderCommonConfig

    common = ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=base_model,
        renderer_name=renderer_name(base_model),
        max_length=max_length,
        batch_size=pairs,
    )
    train, _ = DPODatasetBuilderFromComparisons(common, HHHComparisonBuilder(role="preference_model"))()
    datums, i = [], 0
    while len(datums) < 2 * pairs * count and i < len(train):  # unusable comparisons give no pair
        datums += train.get_batch(i)
        i += 1
    if len(datums) < 2 * pairs * count:
        raise ValueError(f"only {len(datums) // 2} DPO pairs, wanted {pairs * count}")
    return [datums[2 * k * pairs : 2 * (k + 1) * pairs] for k in range(count)]


def datum_pair_to_text(tokenizer, chosen, rejected) -> dict[str, str]:
    """A DPO pair of datums as TRL's text form {prompt, chosen, rejected}: the prompt is everything before the
    first trained token (the same in both datums), each completion the rest of its sequence."""

    def split(datum) -> tuple[list[int], list[int]]:
        tokens = datum.model_input.to_ints() + [int(datum.loss_fn_inputs["target_tokens"].to_numpy()[-1])]
        start = 1 + int(next(i for i, w in enumerate(datum.loss_fn_inputs["weights"].to_numpy()) if w > 0))
        return tokens[:start], tokens[start:]

    (prompt, chosen_tokens), (_, rejected_tokens) = split(chosen), split(rejected)
    return {
        "prompt": tokenizer.decode(prompt),
        "chosen": tokenizer.decode(chosen_tokens),
        "rejected": tokenizer.decode(rejected_tokens),
    }


def rl_prompts(count: int) -> list[list[dict]]:
    """Conversation prefixes of the RL role of HH-RLHF (the prompts the RL stage trains on)."""
    from rlhfkit.recipes.preference.datasets import HHHComparisonBuilder

    builder = HHHComparisonBuilder(role="rl")
    rows, _ = builder.get_train_and_test_datasets()
    prompts = []
    for row in rows:
        labeled = builder.example_to_labeled_comparison(row)
        if labeled is not None:
            prompts.append(labeled.comparison.prompt_conversation)
        if len(prompts) == count:
            return prompts
    raise ValueError(f"only {len(prompts)} usable RL prompts, wanted {count}")


def lima_prompts(base_model: str, count: int, max_prompt_tokens: int = 256) -> list[list[int]]:
    """Generation prompts (rendered LIMA instructions) of at most `max_prompt_tokens` tokens."""
    from rlhfkit.paths import shared_data_dir

    renderer = renderer_for(base_model)
    rows = json.loads((shared_data_dir() / "lima" / "lima.json").read_text())
    prompts = []
    for row in rows:
        tokens = renderer.build_generation_prompt([{"role": "user", "content": row["instruction"]}]).to_ints()
        if len(tokens) <= max_prompt_tokens:
            prompts.append(tokens)
        if len(prompts) == count:
            return prompts
    raise ValueError(f"only {len(prompts)} LIMA prompts of <= {max_prompt_tokens} tokens")


def datum_tokens(datum) -> int:
    return datum.model_input.length


def datum_to_labeled_tokens(datum) -> dict[str, list[int]]:
    """A datum (input = tokens[:-1], targets = tokens[1:], weights) as Hugging Face input_ids/labels, where
    labels are -100 on every token that carries no loss weight."""
    inputs = datum.model_input.to_ints()
    targets = datum.loss_fn_inputs["target_tokens"].to_numpy().tolist()
    weights = datum.loss_fn_inputs["weights"].to_numpy().tolist()
    return {
        "input_ids": inputs + [int(targets[-1])],
        "labels": [-100] + [int(t) if w > 0 else -100 for t, w in zip(targets, weights)],
    }


# ------------------------------------------------------------------------------------------------------
# Timing and results


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


@dataclass
class Series:
    """Repeated measurements of one quantity (work units per second)."""

    name: str
    unit: str
    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "median": self.median, "values": self.values}


def fmt(x: float, digits: int = 1) -> str:
    if x != x:  # nan
        return "-"
    return f"{x:,.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(stem: str, payload: dict[str, Any], markdown: str) -> None:
    """Write results/<stem>.json (every measurement) and results/<stem>.md (the table), and print the table."""
    json_path, md_path = RESULTS_DIR / f"{stem}.json", RESULTS_DIR / f"{stem}.md"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    write_json_atomic(json_path, payload)
    write_text_atomic(md_path, markdown + "\n")
    print(markdown)
    print(f"\nwrote {json_path} and {md_path}")


def machine_markdown(
    info: dict[str, Any], load_at_end: dict[str, Any], limits: dict[str, float], dtypes: list[str]
) -> str:
    start = info["load_at_start"]
    # at the end the load includes the benchmark's own threads: judge by the other processes then
    busy = start["loadavg_1m"] > BUSY_LOAD or any(
        float(p.split("%")[0]) >= BUSY_CPU for p in start["busy_processes"] + load_at_end["busy_processes"]
    )
    lines = [
        f"- date: {info['date']}; command: `{info['command']}`",
        f"- machine: {info['cpu']}, {info['cores']} cores, torch threads {info['torch_threads']}; "
        f"torch {info['torch']}, transformers {info['transformers']}, peft {info['peft']}"
        + (f", trl {info['trl']}" if "trl" in info else ""),
        f"- load average at start {start['loadavg_1m']:.2f}, at end {load_at_end['loadavg_1m']:.2f}"
        + (" — **the machine was shared: figures are unreliable**" if busy else " (machine otherwise idle)"),
        "- matmul limit (2048x2048, best of runs at the start and at the end): "
        + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in limits.items() if k in dtypes),
    ]
    if not bf16_native():
        lines.append(
            f"- bf16 is not native on this CPU (no avx512_bf16/amx_bf16 flag): the engine computes in fp32 "
            f"here, as bf16 matmuls are emulated ({limits['bfloat16'] / 1e9:,.1f} GFLOP/s at 512x512)"
        )
    if start["busy_processes"]:
        lines.append("- busy processes at start: " + "; ".join(f"`{p}`" for p in start["busy_processes"]))
    return "\n".join(lines)


def machine_lines_without_limit(info: dict, load_at_end: dict, dtypes: list[str]) -> str:
    """machine_markdown's lines without the matmul-limit line (A/B scripts compare two variants, not MFU)."""
    return "\n".join(
        line
        for line in machine_markdown(info, load_at_end, {}, dtypes).splitlines()
        if not line.startswith("- matmul limit")
    )
