"""The vLLM side of the vLLM sampling backend: a script run by the Python of an environment that has vLLM.

vLLM pins its own transformers, so it usually lives in its own environment (scripts/setup-vllm.sh); this file
therefore imports only vLLM, torch, safetensors and the standard library, never rlhfkit. The rlhfkit process
(rlhfkit/engine/vllm_sampling.py) starts it as

    VLLM_PYTHON vllm_worker.py ADDRESS

listens on ADDRESS (a Unix socket) for one multiprocessing connection, whose authentication key comes on stdin,
and answers requests (plain dicts) on it.

One engine holds one set of weights at a time: the base model with at most one LoRA adapter merged into it.
A request names the adapter it wants; switching adapters merges the new one into the base weights (W + s·BA)
and loads the changed matrices into the running engine, then drops the prefix cache (its keys and values
belong to the old weights). Merged weights make decoding as fast as the base model's.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

PEFT_PREFIX = "base_model.model."


def untied_copy(model_dir: Path, cache_dir: Path) -> Path:
    """vLLM shares one matrix between the input embeddings and the unembedding when the config ties them, so an
    adapter on the unembedding could not be merged. Such models get a copy (in cache_dir) with its own
    `lm_head.weight`; other models are used as they are."""
    config = json.loads((model_dir / "config.json").read_text())
    if not config.get("tie_word_embeddings", False):
        return model_dir
    target = cache_dir / (model_dir.name + "-untied")
    if (target / "config.json").exists():
        return target
    from safetensors.torch import load_file, save_file

    tmp = cache_dir / (target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors: dict = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(tmp / "model.safetensors"))
    for file in model_dir.iterdir():
        if file.suffix != ".safetensors" and file.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(file, tmp / file.name)
    (tmp / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}, indent=2))
    os.replace(tmp, target)
    return target


def replace_weights(model, weights: dict, base: dict) -> None:
    """Put `weights` (Hugging Face names) into a loaded vLLM model. vLLM stacks some projections into one
    matrix (q/k/v into qkv_proj, gate/up into gate_up_proj: the model's packed_modules_mapping), and on the CPU
    it repacks each matrix for oneDNN after loading and drops the original. So each affected vLLM layer gets
    its whole matrix rebuilt (changed parts from `weights`, the others from `base`) and is then processed
    again as after loading."""
    import torch

    packed = {part: (stacked, i) for stacked, parts in getattr(model, "packed_modules_mapping", {}).items()
              for i, part in enumerate(parts)}
    layers: dict[str, list[tuple[int, str]]] = {}
    for name in weights:
        module_path = name.removesuffix(".weight")
        parent, _, leaf = module_path.rpartition(".")
        if leaf in packed:
            stacked, _index = packed[leaf]
            parts = model.packed_modules_mapping[stacked]
            target = f"{parent}.{stacked}" if parent else stacked
            layers[target] = [(i, f"{parent}.{part}.weight" if parent else f"{part}.weight")
                              for i, part in enumerate(parts)]
        else:
            layers[module_path] = [(0, name)]
    modules = dict(model.named_modules())
    for path, parts in layers.items():
        if path not in modules:
            raise ValueError(f"the vLLM model has no layer {path}")
        layer = modules[path]
        full = torch.cat([weights[n] if n in weights else base[n] for _, n in sorted(parts)], dim=0)
        if layer.weight.shape == full.shape:
            layer.weight.data.copy_(full.to(layer.weight.dtype))
        else:  # the weight was dropped after repacking
            layer.weight = torch.nn.Parameter(full.to(layer.weight.device, layer.weight.dtype), requires_grad=False)
        method = getattr(layer, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(layer)


class Worker:
    def __init__(self, model_dir: str, cache_dir: str, dtype: str, max_model_len: int, seed: int,
                 enforce_eager: bool, kv_cache_gb: int):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gb))
        from safetensors.torch import load_file
        from vllm import LLM

        folder = untied_copy(Path(model_dir), Path(cache_dir))
        self.base: dict = {}
        for file in sorted(folder.glob("*.safetensors")):
            self.base.update(load_file(str(file)))
        self.llm = LLM(model=str(folder), tokenizer=str(folder), dtype=dtype, max_model_len=max_model_len, seed=seed,
                       enforce_eager=enforce_eager, logprobs_mode="processed_logprobs", enable_prefix_caching=True)
        self.adapter: str | None = None  # the adapter merged into the engine's weights now
        self.touched: set[str] = set()  # weights that differ from the base model's

    # -- weights ----------------------------------------------------------------------------------

    def use_adapter(self, adapter: str | None, scale: float) -> None:
        if adapter == self.adapter:
            return
        from safetensors.torch import load_file

        merged = {}
        if adapter is not None:
            pairs: dict[str, dict] = {}
            for key, value in load_file(str(Path(adapter) / "adapter_model.safetensors")).items():
                path = key.removeprefix(PEFT_PREFIX)
                for part in ("lora_A", "lora_B"):
                    if f".{part}." in path:
                        pairs.setdefault(path.split(f".{part}.")[0] + ".weight", {})[part] = value
            for name, ab in pairs.items():
                if name not in self.base:
                    raise ValueError(f"adapter {adapter}: no weight {name} in the base model")
                weight = self.base[name]
                delta = (ab["lora_B"].float() @ ab["lora_A"].float()) * scale
                merged[name] = (weight.float() + delta).to(weight.dtype)
        changed = self.touched | set(merged)
        if changed:
            weights = {name: merged.get(name, self.base.get(name)) for name in changed}
            self.llm.apply_model(lambda model: replace_weights(model, weights, self.base))
        self.touched = set(merged)
        self.adapter = adapter
        self.llm.reset_prefix_cache()

    # -- requests ---------------------------------------------------------------------------------

    def sample(self, rows: list[dict]) -> list[dict]:
        """rows: {prompt, max_tokens, temperature, top_p, top_k, stop_strings, stop_ids, seed}; one sequence
        each. `stop_ids` holds the EOS ids too unless the caller asked not to stop at EOS, so vLLM's own EOS
        check is off. Returns {tokens, logprobs, stop_reason} per row; a stop token or string stays in the
        output, as with the local sampler."""
        from vllm import SamplingParams

        params = [SamplingParams(n=1, max_tokens=r["max_tokens"], temperature=r["temperature"], top_p=r["top_p"],
                                 top_k=r["top_k"], seed=r["seed"], stop=r["stop_strings"] or None,
                                 stop_token_ids=r["stop_ids"] or None, ignore_eos=True,
                                 include_stop_str_in_output=True, logprobs=0, skip_special_tokens=False,
                                 detokenize=bool(r["stop_strings"]))
                  for r in rows]
        outputs = self.llm.generate([{"prompt_token_ids": r["prompt"]} for r in rows], params, use_tqdm=False)
        results = []
        for output in outputs:
            seq = output.outputs[0]
            tokens = list(seq.token_ids)
            logprobs = [float(step[t].logprob) for step, t in zip(seq.logprobs or [], tokens)]
            results.append({"tokens": tokens, "logprobs": logprobs,
                            "stop_reason": "length" if seq.finish_reason == "length" else "stop"})
        return results

    def handle(self, request: dict):
        op = request["op"]
        if op == "sample":
            self.use_adapter(request["adapter"], request["scale"])
            return self.sample(request["rows"])
        if op == "ping":
            return "pong"
        raise ValueError(f"unknown request {op!r}")


def main() -> None:
    from multiprocessing.connection import Listener

    address = sys.argv[-1]
    authkey = bytes.fromhex(sys.stdin.readline().strip())
    with Listener(address, authkey=authkey) as listener:
        connection = listener.accept()
    settings = connection.recv()
    started = time.time()
    try:
        worker = Worker(**settings)
    except BaseException as e:  # tell the client why, then stop
        connection.send({"error": f"{type(e).__name__}: {e}"})
        raise
    connection.send({"ready": time.time() - started})
    while True:
        try:
            request = connection.recv()
        except EOFError:
            return
        if request.get("op") == "close":
            return
        try:
            connection.send({"result": worker.handle(request)})
        except Exception as e:
            connection.send({"error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: faster on a few cores
    main()
