"""rlhfkit against Hugging Face TRL on the same work, in one process, alternating step by step.

Workloads (the same model, data, batch size, sequence lengths, LoRA rank and targets, learning rate, dtype and
thread count on both sides):
  sft       LoRA SFT steps on LIMA chat data (rlhfkit's LimaBuilder datums) — tokens/s.
            TRL: SFTTrainer on the same token sequences, labels -100 where our weights are 0.
  pm        Preference-model training steps on HH-RLHF comparisons — comparisons/s. Ours: cross_entropy on the
            label token. TRL: SFTTrainer on prompt + label with the loss on the label token only (what
            completion_only_loss builds; closer to our PM than RewardTrainer, which trains a scalar head).
  dpo       DPO steps on HH-RLHF pairs (rlhfkit's DPODatasetBuilderFromComparisons datums) — tokens/s. Ours:
            rlhfkit.preference.train_dpo's step (reference logprobs from a sampler on the initial weights, policy
            logprobs and the sigmoid loss through forward_backward_custom, optim_step). TRL: DPOTrainer on the same
            pairs as text (prompt, chosen, rejected), reference = the base model with the adapter disabled,
            beta 0.1, sigmoid loss; the reference is computed every step on both sides.
  rl        One RL iteration: 8 prompts x a group of 4, max_tokens 128, every pair judged in both orders by the
            same preference model, one policy update — iterations/s. Ours: rlhfkit's RL pieces (preference
            envs, rollouts, advantages, importance_sampling, optim_step, a new sampler on the new weights).
            TRL: GRPOTrainer (beta=0, scale_rewards="none", loss_type="dr_grpo", one generation batch per
            optimizer step) with a reward function running rlhfkit's tournament with the same judge object.
  sampling  Our SamplingClient against transformers' `generate` on the same weights: tokens/s at batch
            1, 8 and 32, 128 new tokens per row (no early stop on either side), temperature 1, no top-k/top-p.

With --sampler vllm our side samples (sampling workload and RL rollouts) through the vLLM backend
(scripts/setup-vllm.sh); training and judging stay local.

Each TRL optimizer step is timed by a callback, which then runs our step on the same batch (so load changes
hit both sides alike); the first step of each side is a warm-up and is not counted.

    python benchmarks/compare_trl.py             # the embedded SmolLM2-135M (run it alone: ~20 minutes)
    python benchmarks/compare_trl.py --reps 4 --rl-reps 3   # tighter medians, ~45 minutes
    python benchmarks/compare_trl.py --tiny      # a small random model, a quick check
    python benchmarks/compare_trl.py --sampler vllm --workloads rl,sampling   # our sampling through vLLM

Needs the benchmark extra: pip install -e '.[bench]' (trl, datasets).
Writes benchmarks/results/compare_trl[-tiny][-vllm].json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

import common
from common import Series, fmt


@dataclass
class Settings:
    lora_rank: int = 16
    max_length: int = 512
    sft_batch: int = 8
    sft_lr: float = 2e-4
    pm_batch: int = 16
    pm_lr: float = 3e-4
    dpo_pairs: int = 8
    dpo_lr: float = 1e-4
    dpo_beta: float = 0.1
    rl_prompts: int = 8
    rl_group: int = 4
    rl_max_tokens: int = 128
    rl_lr: float = 1e-4
    sampling_batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    new_tokens: int = 128
    reps: int = 2
    rl_reps: int = 1


# ------------------------------------------------------------------------------------------------------
# TRL plumbing


class AlternatingTimer:
    """Times each TRL optimizer step, then calls `after_trl_step(k, seconds)`, which runs our side's step k."""

    def __init__(self, after_trl_step: Callable[[int, float], None]):
        self.after_trl_step = after_trl_step
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)
        self.after_trl_step(len(self.seconds) - 1, self.seconds[-1])


def as_trainer_callback(timer: AlternatingTimer):
    from transformers import TrainerCallback

    class Callback(TrainerCallback):
        def on_step_begin(self, *a, **k):
            timer.on_step_begin(*a, **k)

        def on_step_end(self, *a, **k):
            timer.on_step_end(*a, **k)

    return Callback()


def hf_model(base_model: str, dtype: torch.dtype):
    """The base model as TRL gets it: loaded in the engine's compute dtype (frozen base weights in bf16 with
    autocast when the engine uses bf16, fp32 otherwise)."""
    from transformers import AutoModelForCausalLM

    from rlhfkit.engine.model.base import resolve_base_model

    return AutoModelForCausalLM.from_pretrained(resolve_base_model(base_model), dtype=dtype)


def lora_config(model, base_model: str, rank: int):
    """The same adapters as the engine's: the same target modules (attention and MLP projections), alpha 32.
    No adapter on the unembedding: TRL refuses one (it computes logprobs from lm_head.weight directly)."""
    from peft import LoraConfig

    from rlhfkit.engine.model.lora import LoraSpec, target_module_names

    spec = LoraSpec(base_model, rank=rank, train_unembed=False)
    return LoraConfig(
        r=rank,
        lora_alpha=spec.alpha,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=target_module_names(model, spec),
    )


def trl_args(precision, learning_rate: float, steps: int, out_dir: str) -> dict[str, Any]:
    """TrainingArguments shared by every TRL trainer here. TRL's default gradient checkpointing is turned off
    (the engine does not checkpoint; memory is not the limit at these sizes), Adam matches AdamParams."""
    return dict(
        output_dir=out_dir,
        use_cpu=precision.device.type == "cpu",
        bf16=precision.compute_dtype == torch.bfloat16,
        gradient_checkpointing=False,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=0.0,
        max_steps=steps,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        shuffle_dataset=False,
    )


def quiet_trl() -> None:
    warnings.filterwarnings("ignore")
    for name in ("transformers", "trl", "accelerate", "peft", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except ImportError:
        pass


# ------------------------------------------------------------------------------------------------------
# Workloads 1 and 2: supervised steps (SFT tokens/s, preference-model comparisons/s)


def run_supervised(
    name: str, base_model: str, service, batches: list[list], learning_rate: float, rank: int, unit: str, out_dir: str
) -> tuple[Series, Series]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from rlhfkit.engine import AdamParams

    def units(batch):
        return sum(common.datum_tokens(d) for d in batch) if unit == "tokens/s" else len(batch)

    trainer = service.create_lora_training_client(base_model, rank=rank, seed=0, train_unembed=False)
    ours = Series(f"{name} (rlhfkit)", unit, [])

    def our_step(k: int, trl_seconds: float) -> None:
        batch = batches[k]
        t0 = time.perf_counter()
        trainer.forward_backward(batch, "cross_entropy").result()
        trainer.optim_step(AdamParams(learning_rate=learning_rate)).result()
        if k > 0:
            ours.values.append(units(batch) / (time.perf_counter() - t0))
        print(f"  {name} step {k}: TRL {trl_seconds:.1f}s, rlhfkit {time.perf_counter() - t0:.1f}s", flush=True)

    timer = AlternatingTimer(our_step)
    rows = [common.datum_to_labeled_tokens(d) for batch in batches for d in batch]
    model = hf_model(base_model, service.precision.compute_dtype)
    config = SFTConfig(
        per_device_train_batch_size=len(batches[0]),
        max_length=None,
        packing=False,
        padding_free=False,
        **trl_args(service.precision, learning_rate, len(batches), out_dir),
    )
    sft = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=service_tokenizer(base_model),
        peft_config=lora_config(model, base_model, rank),
        callbacks=[as_trainer_callback(timer)],
    )
    sft.train()
    theirs = Series(f"{name} (TRL)", unit, [units(b) / s for b, s in zip(batches[1:], timer.seconds[1:])])
    print(f"  {name}: TRL step seconds {[round(s, 1) for s in timer.seconds]}", flush=True)
    del trainer, sft, model
    gc.collect()
    return ours, theirs


# ------------------------------------------------------------------------------------------------------
# Workload 3: DPO steps (tokens/s)


def run_dpo(base_model: str, service, s: Settings, batches: list[list], out_dir: str) -> tuple[Series, Series]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from rlhfkit.engine import AdamParams
    from rlhfkit.preference.train_dpo import Config as DPOStageConfig, pair_loss_fn, reference_sums

    trainer = service.create_lora_training_client(base_model, rank=s.lora_rank, seed=0, train_unembed=False)
    reference = trainer.save_weights_and_get_sampling_client()  # the initial weights, as train_dpo's reference
    loss_config = DPOStageConfig(log_path=out_dir, model_name=base_model, dataset_builder=None, dpo_beta=s.dpo_beta)
    ours = Series("DPO (rlhfkit)", "tokens/s", [])

    def tokens(batch) -> int:
        return sum(common.datum_tokens(d) for d in batch)

    def our_step(k: int, trl_seconds: float) -> None:
        batch = batches[k]
        t0 = time.perf_counter()
        sums = asyncio.run(reference_sums(batch, reference))
        trainer.forward_backward_custom(batch, pair_loss_fn(sums, loss_config)).result()
        trainer.optim_step(AdamParams(learning_rate=s.dpo_lr)).result()
        if k > 0:
            ours.values.append(tokens(batch) / (time.perf_counter() - t0))
        print(f"  DPO step {k}: TRL {trl_seconds:.1f}s, rlhfkit {time.perf_counter() - t0:.1f}s", flush=True)

    timer = AlternatingTimer(our_step)
    tokenizer = service_tokenizer(base_model)
    rows = [common.datum_pair_to_text(tokenizer, c, r) for batch in batches for c, r in zip(batch[0::2], batch[1::2])]
    model = hf_model(base_model, service.precision.compute_dtype)
    args = trl_args(service.precision, s.dpo_lr, len(batches), out_dir)
    args.pop("shuffle_dataset")  # an SFTConfig setting; DPOTrainer keeps the order with the sequential sampler
    config = DPOConfig(
        per_device_train_batch_size=s.dpo_pairs,
        max_length=None,
        beta=s.dpo_beta,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=False,
        padding_free=False,
        **args,
    )
    dpo = DPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(model, base_model, s.lora_rank),
        callbacks=[as_trainer_callback(timer)],
    )
    dpo.train()
    theirs = Series("DPO (TRL)", "tokens/s", [tokens(b) / t for b, t in zip(batches[1:], timer.seconds[1:])])
    print(f"  DPO: TRL step seconds {[round(t, 1) for t in timer.seconds]}", flush=True)
    del trainer, reference, dpo, model
    gc.collect()
    return ours, theirs


def service_tokenizer(base_model: str):
    from rlhfkit.engine import load_tokenizer

    return load_tokenizer(base_model)


# ------------------------------------------------------------------------------------------------------
# Workload 3: one RL iteration


class CountingJudge:
    """Wraps the judge's sampling client: counts scored prompts and tokens, and time spent judging."""

    def __init__(self, client):
        self.client = client
        self.prompts = self.tokens = 0
        self.seconds = 0.0

    def score_next_token_batch(self, prompts, candidate_tokens):
        t0 = time.perf_counter()
        out = self.client.score_next_token_batch(prompts, candidate_tokens)
        self.seconds += time.perf_counter() - t0
        self.prompts += len(prompts)
        self.tokens += sum(p.length for p in prompts)
        return out

    async def score_next_token_async(self, prompt, candidate_tokens):
        return self.score_next_token_batch([prompt], candidate_tokens)[0]

    def take(self) -> dict[str, float]:
        counts = {"judge_prompts": self.prompts, "judge_tokens": self.tokens, "judge_seconds": self.seconds}
        self.prompts = self.tokens = 0
        self.seconds = 0.0
        return counts


def group_builder(convo, renderer, judge, group: int):
    from rlhfkit.rl.preference_envs import PairwisePreferenceGroupBuilder, TournamentPattern

    return PairwisePreferenceGroupBuilder(convo, renderer, TournamentPattern.ALL_PAIRS_BOTH_WAYS, judge, group)


async def our_rl_iteration(trainer, sampler, prompts, renderer, judge, s: Settings, seed: int) -> tuple[Any, dict]:
    """Sample a group per prompt, run the tournament, centre the rewards, one importance-sampling update,
    then a sampler on the new weights (what rlhfkit.rl.train does each iteration, without its logging)."""
    from rlhfkit.completers import TinkerTokenCompleter
    from rlhfkit.engine import AdamParams
    from rlhfkit.rl import data_processing
    from rlhfkit.rl.rollouts import sample_group, score_group

    times = {}
    builders = [group_builder(convo, renderer, judge, s.rl_group) for convo in prompts]
    t0 = time.perf_counter()
    policy = TinkerTokenCompleter(sampler, s.rl_max_tokens, temperature=1.0, seed=seed)
    sampled = await asyncio.gather(*(sample_group(b, lambda _k: policy) for b in builders))
    times["sample_seconds"] = time.perf_counter() - t0
    groups = list(await asyncio.gather(*(score_group(b, envs, trajs) for b, (envs, trajs) in zip(builders, sampled))))
    t1 = time.perf_counter()
    data, _ = data_processing.assemble_training_data(groups, data_processing.compute_advantages(groups))
    trainer.forward_backward([data_processing.remove_mask(d) for d in data], "importance_sampling").result()
    trainer.optim_step(AdamParams(learning_rate=s.rl_lr)).result()
    new_sampler = trainer.save_weights_and_get_sampling_client()
    times["train_seconds"] = time.perf_counter() - t1
    times["sampled_tokens"] = sum(len(t.transitions[-1].ac.tokens) for _, trajs in sampled for t in trajs)
    times["trained_tokens"] = sum(d.model_input.length for d in data)
    return new_sampler, times


def run_rl(base_model: str, service, s: Settings, out_dir: str) -> tuple[Series, Series, dict]:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rlhfkit.completers import TokensWithLogprobs
    from rlhfkit.engine import ModelInput
    from rlhfkit.preference.types import PreferenceModelFromChatRenderer
    from rlhfkit.rl.types import Trajectory, Transition

    logging.getLogger("rlhfkit.preference.types").setLevel(logging.ERROR)  # an untrained judge answers off-label
    renderer = common.renderer_for(base_model)
    iterations = s.rl_reps + 1
    convos = common.rl_prompts(s.rl_prompts * iterations)
    # The judge: one preference model (the base model; probability rewards so that advantages are not all 0).
    judge_client = CountingJudge(service.create_sampling_client(base_model=base_model))
    judge = PreferenceModelFromChatRenderer(renderer, judge_client, reward_mode="probability")
    details: dict[str, list] = {"rlhfkit": [], "TRL": []}

    trainer = service.create_lora_training_client(base_model, rank=s.lora_rank, seed=0, train_unembed=False)
    state = {"sampler": trainer.save_weights_and_get_sampling_client()}
    ours = Series("RL iteration (rlhfkit)", "iterations/s", [])

    def our_step(k: int) -> None:
        judge_client.take()  # the TRL step's judging was recorded by its reward function
        prompts = convos[k * s.rl_prompts : (k + 1) * s.rl_prompts]
        t0 = time.perf_counter()
        state["sampler"], times = asyncio.run(
            our_rl_iteration(trainer, state["sampler"], prompts, renderer, judge, s, seed=k)
        )
        seconds = time.perf_counter() - t0
        times.update(judge_client.take(), seconds=seconds)
        details["rlhfkit"].append(times)
        if k > 0:
            ours.values.append(1 / seconds)
        print(f"  RL iteration {k}: rlhfkit {seconds:.1f}s {short(times)}", flush=True)

    trl_counts: dict[str, float] = {}

    def tournament_reward(prompts, completions, completion_ids, prompt_index, **_):
        """rlhfkit's tournament (the same group builder and judge as our side) over each group of completions."""
        rewards = []
        for start in range(0, len(completion_ids), s.rl_group):
            builder = group_builder(convos[prompt_index[start]], renderer, judge, s.rl_group)
            trajectories = [
                Trajectory(
                    [Transition(ModelInput.empty(), TokensWithLogprobs(list(ids), None), 0.0, True)], ModelInput.empty()
                )
                for ids in completion_ids[start : start + s.rl_group]
            ]
            rewards += [r for r, _ in asyncio.run(builder.compute_group_rewards(trajectories, []))]
        trl_counts["sampled_tokens"] = trl_counts.get("sampled_tokens", 0) + sum(len(c) for c in completion_ids)
        trl_counts["trained_tokens"] = trl_counts.get("trained_tokens", 0) + sum(
            len(c) + len(tok.encode(p, add_special_tokens=False)) for p, c in zip(prompts, completion_ids)
        )
        return rewards

    tok = service_tokenizer(base_model)
    rows = [
        {"prompt": tok.decode(renderer.build_generation_prompt(c).to_ints()), "prompt_index": i}
        for i, c in enumerate(convos)
    ]
    micro = s.rl_prompts * s.rl_group // 4  # 4 micro-batches of 8 completions: one generation batch per step
    config = GRPOConfig(
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=4,
        num_generations=s.rl_group,
        max_completion_length=s.rl_max_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        loss_type="dr_grpo",
        scale_rewards="none",
        num_iterations=1,
        log_completions=False,
        mask_truncated_completions=False,
        **trl_args(service.precision, s.rl_lr, iterations, out_dir),
    )
    model = hf_model(base_model, service.precision.compute_dtype)

    def after_trl_step(k: int, trl_seconds: float) -> None:
        details["TRL"].append({"seconds": trl_seconds, **trl_counts, **judge_client.take()})
        trl_counts.clear()
        print(f"  RL iteration {k}: TRL {trl_seconds:.1f}s {short(details['TRL'][-1])}", flush=True)
        our_step(k)

    timer = AlternatingTimer(after_trl_step)
    grpo = GRPOTrainer(
        model=model,
        reward_funcs=tournament_reward,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=lora_config(model, base_model, s.lora_rank),
        callbacks=[as_trainer_callback(timer)],
    )
    grpo.train()
    theirs = Series("RL iteration (TRL)", "iterations/s", [1 / x for x in timer.seconds[1:]])
    del trainer, grpo, model, state
    gc.collect()
    return ours, theirs, details


def short(times: dict) -> str:
    return " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in times.items() if k != "seconds")


# ------------------------------------------------------------------------------------------------------
# Workload 4: sampling against transformers' generate


def run_sampling(base_model: str, service, local_service, s: Settings) -> dict[int, tuple[Series, Series]]:
    from rlhfkit.engine import ModelInput, SamplingParams

    sampler = service.create_sampling_client(base_model=base_model)  # local or vLLM (--sampler)
    model = local_service.create_sampling_client(base_model=base_model).model  # for generate
    tok = sampler.get_tokenizer()
    prompts = common.lima_prompts(base_model, max(s.sampling_batches))
    results = {
        b: (
            Series(f"sampling batch {b} (rlhfkit)", "tokens/s", []),
            Series(f"sampling batch {b} (generate)", "tokens/s", []),
        )
        for b in s.sampling_batches
    }

    def ours(batch: int, new_tokens: int, seed: int) -> int:
        async def run():
            params = SamplingParams(max_tokens=new_tokens, temperature=1.0, stop=[], seed=seed)
            return await asyncio.gather(
                *(sampler.sample_async(ModelInput.from_ints(p), 1, params) for p in prompts[:batch])
            )

        return sum(len(seq.tokens) for r in asyncio.run(run()) for seq in r.sequences)

    def generate(batch: int, new_tokens: int, seed: int) -> int:
        torch.manual_seed(seed)
        inputs = tok.pad({"input_ids": prompts[:batch]}, padding=True, padding_side="left", return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=tok.pad_token_id,
            )
        return (out.shape[1] - inputs["input_ids"].shape[1]) * batch

    for rep in range(s.reps + 1):
        for b in s.sampling_batches:
            for series, fn in zip(results[b], (ours, generate)):
                seconds, tokens = common.timed(lambda: fn(b, s.new_tokens if rep else 4, rep))
                if rep:  # rep 0 is a short warm-up
                    series.values.append(tokens / seconds)
            if rep:
                print(
                    f"  sampling batch {b}: rlhfkit {results[b][0].values[-1]:.1f} tok/s, "
                    f"generate {results[b][1].values[-1]:.1f} tok/s",
                    flush=True,
                )
    return results


# ------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a small random model (quick check)")
    parser.add_argument("--workloads", default="sft,pm,dpo,rl,sampling")
    parser.add_argument("--reps", type=int, default=Settings.reps, help="timed steps per workload (plus a warm-up)")
    parser.add_argument("--rl-reps", type=int, default=Settings.rl_reps, help="timed RL iterations (plus a warm-up)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--dtype", default=None, help="compute dtype for both sides (default: the engine's choice)")
    parser.add_argument(
        "--sampler",
        default="local",
        choices=["local", "vllm"],
        help="our side's sampler (vllm: needs scripts/setup-vllm.sh); training is local either way",
    )
    parser.add_argument("--out", default=None, help="results file stem (default compare_trl[-tiny][-vllm])")
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    try:
        import trl
    except ImportError:
        sys.exit("compare_trl.py needs TRL: pip install -e '.[bench]'  (see benchmarks/README.md)")
    quiet_trl()
    common.warn_if_busy()
    info = common.machine_info(args.threads)
    info["trl"] = trl.__version__
    from rlhfkit.engine import ServiceClient

    s = Settings(reps=args.reps, rl_reps=args.rl_reps)
    if args.tiny:
        s.max_length, s.rl_max_tokens, s.new_tokens = 256, 32, 32
    base_model = common.workload_model(args.tiny)
    local_service = ServiceClient(dtype=args.dtype, sampler="local")
    service = ServiceClient(dtype=args.dtype, sampler=args.sampler)
    dtype = str(service.precision.compute_dtype).removeprefix("torch.")
    limits = common.matmul_limits([dtype], args.tiny)
    print(
        f"model {base_model}, dtype {dtype}, {args.threads} threads, load average "
        f"{info['load_at_start']['loadavg_1m']:.2f}; matmul limit {limits[dtype] / 1e9:,.0f} GFLOP/s",
        flush=True,
    )
    probe = local_service.create_sampling_client(base_model=base_model)
    n_params, n_head = common.matmul_params(probe.model), common.unembedding_params(probe.model)
    del probe

    workloads = args.workloads.split(",")
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}

    def add(key: str, ours: Series, theirs: Series, flops_per_unit: list[float] | None, baseline: str = "TRL"):
        rows.append(
            {
                "workload": key,
                "unit": ours.unit,
                "rlhfkit": ours.as_dict(),
                baseline: theirs.as_dict(),
                "baseline": baseline,
                "ratio": ours.median / theirs.median if theirs.values else float("nan"),
                "flops_per_unit": flops_per_unit,
            }
        )
        print(
            f"{key}: rlhfkit {fmt(ours.median, 3)} vs {baseline} {fmt(theirs.median, 3)} {ours.unit} "
            f"-> {rows[-1]['ratio']:.2f}x",
            flush=True,
        )

    with tempfile.TemporaryDirectory(prefix="compare_trl-") as out_dir:
        if "sft" in workloads:
            batches = common.sft_batches(base_model, s.sft_batch, s.max_length, s.reps + 1)
            ours, theirs = run_supervised(
                "SFT", base_model, service, batches, s.sft_lr, s.lora_rank, "tokens/s", out_dir
            )
            add("SFT step", ours, theirs, [4 * n_params])
        if "pm" in workloads:
            batches = common.pm_batches(base_model, s.pm_batch, s.max_length, s.reps + 1)
            ours, theirs = run_supervised(
                "PM", base_model, service, batches, s.pm_lr, s.lora_rank, "comparisons/s", out_dir
            )
            mean_tokens = sum(common.datum_tokens(d) for b in batches for d in b) / sum(len(b) for b in batches)
            add("preference-model step", ours, theirs, [4 * n_params * mean_tokens])
            extra["pm_mean_tokens"] = mean_tokens
        if "dpo" in workloads:
            batches = common.dpo_batches(base_model, s.dpo_pairs, s.max_length, s.reps + 1)
            ours, theirs = run_dpo(base_model, service, s, batches, out_dir)
            add("DPO step", ours, theirs, [6 * n_params])  # per token: 4N policy forward+backward, 2N reference
        if "rl" in workloads:
            ours, theirs, details = run_rl(base_model, service, s, out_dir)
            extra["rl_iterations"] = details

            def iteration_flops(d: dict) -> float:
                return (
                    2 * n_params * d.get("sampled_tokens", 0)
                    + 4 * n_params * d.get("trained_tokens", 0)
                    + 2 * (n_params - n_head) * d.get("judge_tokens", 0)
                    + 2 * n_head * d.get("judge_prompts", 0)
                )

            add("RL iteration", ours, theirs, [iteration_flops(d) for d in details["rlhfkit"][1:]])
            rows[-1]["flops_per_unit_baseline"] = [iteration_flops(d) for d in details["TRL"][1:]]
        if "sampling" in workloads:
            for b, (ours, theirs) in run_sampling(base_model, service, local_service, s).items():
                add(f"sampling batch {b}", ours, theirs, [2 * n_params], baseline="generate")

    load_at_end = common.load_snapshot()
    limits = common.remeasure_limits(limits, [dtype], args.tiny)
    limit = limits[dtype]
    for row in rows:
        for side, flops_key in (("rlhfkit", "flops_per_unit"), (row["baseline"], "flops_per_unit_baseline")):
            flops = row.get(flops_key) or row["flops_per_unit"] or [float("nan")]
            mean_flops = sum(flops) / len(flops)
            row[f"mfu_{side}"] = row[side]["median"] * mean_flops / limit

    payload = {
        "machine": info,
        "load_at_end": load_at_end,
        "model": base_model,
        "dtype": dtype,
        "sampler": args.sampler,
        "matmul_params": n_params,
        "unembedding_params": n_head,
        "matmul_limit_flops": limits,
        "settings": s.__dict__,
        "results": rows,
        **extra,
    }
    table = common.markdown_table(
        ["workload", "unit", "rlhfkit", "TRL / generate", "rlhfkit / baseline", "MFU rlhfkit", "MFU baseline"],
        [
            [
                r["workload"],
                r["unit"],
                fmt(r["rlhfkit"]["median"], 3),
                f"{fmt(r[r['baseline']]['median'], 3)} ({r['baseline']})",
                f"**{r['ratio']:.2f}x**",
                f"{100 * r['mfu_rlhfkit']:.1f}%",
                f"{100 * r['mfu_' + r['baseline']]:.1f}%",
            ]
            for r in rows
        ],
    )
    markdown = "\n\n".join(
        [
            f"# rlhfkit vs TRL {info['trl']}: {Path(base_model).name}, {dtype}, rlhfkit sampler: {args.sampler}",
            common.machine_markdown(info, load_at_end, limits, [dtype]),
            f"Settings: LoRA rank {s.lora_rank} (attention and MLP projections, alpha 32; TRL cannot train an "
            f"adapter on the unembedding), sequences <= "
            f"{s.max_length} tokens; SFT {s.sft_batch} LIMA conversations/step, lr {s.sft_lr}; PM {s.pm_batch} "
            f"HH-RLHF comparisons/step, lr {s.pm_lr}; DPO {s.dpo_pairs} HH-RLHF pairs/step, beta {s.dpo_beta}, "
            f"lr {s.dpo_lr}, sigmoid loss; RL {s.rl_prompts} prompts x {s.rl_group}, max_tokens "
            f"{s.rl_max_tokens}, all pairs both ways, lr {s.rl_lr}; sampling {s.new_tokens} new tokens/row. Medians of "
            f"{s.reps} steps ({s.rl_reps} RL iterations) after one warm-up step, the two sides alternating.",
            table,
            "MFU = achieved FLOP/s over the matmul limit above: 4N FLOPs per trained token (6N per DPO token: "
            "with the reference's forward), 2N per sampled token, "
            "2(N-H) per judged token + 2H per judgement (N = "
            f"{n_params / 1e6:.1f}M matmul parameters, H = {n_head / 1e6:.1f}M in the unembedding).",
        ]
    )
    if extra.get("rl_iterations"):
        rl_rows = []
        for side, items in extra["rl_iterations"].items():
            for k, d in enumerate(items):
                rl_rows.append(
                    [
                        side,
                        str(k) + (" (warm-up)" if k == 0 else ""),
                        f"{d['seconds']:.1f}",
                        f"{d.get('judge_seconds', 0):.1f}",
                        str(d.get("sampled_tokens", "")),
                        str(d.get("trained_tokens", "")),
                        str(d.get("judge_prompts", "")),
                    ]
                )
        markdown += (
            "\n\nRL iterations in detail (judge seconds are inside the iteration time):\n\n"
            + common.markdown_table(
                ["side", "iteration", "seconds", "judge seconds", "sampled tokens", "trained tokens", "judgements"],
                rl_rows,
            )
        )
    stem = args.out or ("compare_trl" + ("-tiny" if args.tiny else "") + ("-vllm" if args.sampler == "vllm" else ""))
    common.write_results(stem, payload, markdown)


if __name__ == "__main__":
    main()
