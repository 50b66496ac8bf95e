"""Data-parallel LoRA training on Ray: a training client is a group of TrainWorker actors.

Each worker holds the frozen base and the same LoRA adapters (same seed), as one `LoraTrainer`
(trainer.py, the code the local client runs). `forward_backward` splits the data across the workers by
token count, in contiguous shards, and returns the outputs in data order; the losses are sums, so the
workers' gradients summed by an all-reduce (torch.distributed: gloo on CPU, NCCL on GPUs) are the whole
batch's gradient, and every worker takes the same Adam step: the weights stay identical on every worker and
equal to the local backend's (up to float summation order). Rank 0 saves states, atomically.

Requests run in submission order: each is submitted at once to the actors, which run the calls of one
caller in order. A dead worker stops the run with an error that says to run the command again (it resumes
from the last checkpoint). Sharding the frozen base across devices would live inside the worker.
"""

from __future__ import annotations

import itertools
import os
import socket
from pathlib import Path
from typing import Any, Callable, Sequence

from rlhfkit.engine.futures import APIFuture
from rlhfkit.engine.model.lora import LoraSpec
from rlhfkit.engine.model.base import load_tokenizer
from rlhfkit.engine.ray_backend.cluster import gather, import_ray
from rlhfkit.engine.clients import TrainingClient
from rlhfkit.engine.settings import EngineSettings
from rlhfkit.engine.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    OptimStepResponse,
    SaveWeightsResponse,
    TensorData,
)


class TrainWorker:
    """One data-parallel rank (a Ray actor): a LoraTrainer plus its torch.distributed process group."""

    def __init__(self, spec: LoraSpec, settings: EngineSettings, rank: int, world_size: int):
        import torch

        from rlhfkit.engine.model.base import pick_precision
        from rlhfkit.engine.torch_engine.trainer import LoraTrainer

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        self.rank, self.world_size = rank, world_size
        self.trainer = LoraTrainer(spec, pick_precision(settings.device, settings.dtype), settings.microbatch_tokens)

    def rendezvous(self) -> str:
        """Rank 0: the init method of the process group (this node's address and a free port)."""
        import ray

        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        return f"tcp://{host}:{port}"

    def join_group(self, init_method: str) -> None:
        import torch.distributed as dist

        if init_method.startswith("tcp://127."):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # a one-machine cluster stays on loopback
        backend = "nccl" if self.trainer.precision.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=self.rank, world_size=self.world_size)

    def _sum_gradients(self, params: list) -> None:
        """All-reduce (SUM) of every adapter gradient, in one flat buffer; a parameter no worker has a
        gradient for keeps None (as on one device, Adam then skips it)."""
        import torch
        import torch.distributed as dist

        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
            + [torch.tensor([0.0 if p.grad is None else 1.0 for p in params], device=params[0].device)]
        )
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype).clone()
            offset += p.numel()
        for p, present in zip(params, flat[offset:].tolist()):
            if present == 0:
                p.grad = None

    def forward_backward(
        self, data: list[Datum], loss_fn: str, loss_fn_config: dict | None, backward: bool
    ) -> ForwardBackwardOutput:
        return self.trainer.forward_backward(data, loss_fn, loss_fn_config, backward)

    def logprobs(self, data: list[Datum]) -> list[TensorData]:
        return [TensorData.from_torch(lp) for lp in self.trainer.logprobs(data)]

    def optim_step(self, params: AdamParams) -> OptimStepResponse:
        return self.trainer.optim_step(params, self._sum_gradients if self.world_size > 1 else None)

    def save(self, path: str, kind: str) -> str:
        return self.trainer.save(Path(path), kind)

    def load(self, path: str, with_optimizer: bool) -> None:
        self.trainer.load(path, with_optimizer)

    def optimizer_steps(self) -> int:
        return self.trainer.optimizer_steps

    def adapted_modules(self) -> list[str]:
        """Module paths (Hugging Face names, e.g. model.layers.0.self_attn.q_proj) that carry a LoRA adapter."""
        from rlhfkit.engine.model.lora import PEFT_PREFIX

        return sorted(
            {
                name.removeprefix(PEFT_PREFIX).split(".lora_")[0]
                for name, _ in self.trainer.model.named_parameters()
                if ".lora_" in name
            }
        )


def split_by_tokens(lengths: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) shards of about equal token counts (some may be empty)."""
    total = sum(lengths)
    bounds, acc, k = [0], 0, 1
    for i, n in enumerate(lengths):
        acc += n
        while k < parts and acc * parts >= total * k:
            bounds.append(i + 1)
            k += 1
    bounds += [len(lengths)] * (parts + 1 - len(bounds))
    return list(itertools.pairwise(bounds))


class TrainingWorkerDied(RuntimeError):
    pass


def _worker_death(error: BaseException) -> BaseException:
    """A dead worker's error, said plainly (the group cannot go on without it)."""
    ray = import_ray()
    if isinstance(error, ray.exceptions.RayActorError):
        return TrainingWorkerDied(
            "a training worker died, so this run stops; run the same command again to "
            f"resume from the last checkpoint ({type(error).__name__}: {error})"
        )
    return error


def start_workers(spec: LoraSpec, settings: EngineSettings, num_workers: int, resources: dict[str, float]) -> list[Any]:
    """The worker actors of one training client (each with `resources`), joined in one process group."""
    ray = import_ray()
    actor = ray.remote(TrainWorker)
    workers = [
        actor.options(**resources, max_restarts=0).remote(spec, settings, rank, num_workers)
        for rank in range(num_workers)
    ]
    if num_workers > 1:
        init_method = ray.get(workers[0].rendezvous.remote())
        ray.get([w.join_group.remote(init_method) for w in workers])
    return workers


class RayTrainingClient(TrainingClient):
    """The training client of the Ray backend (same methods as the local TrainingClient)."""

    def __init__(self, service: Any, spec: LoraSpec, workers: list[Any], storage: Path):
        self.service = service
        self.spec = spec
        self.workers = workers
        self.storage = storage
        self._sampler_versions = 0

    @staticmethod
    def _gather(refs: list[Any], combine: Callable[[list[Any]], Any]) -> APIFuture:
        return gather(refs, combine, _worker_death)

    # ---------------------------------------------------------------------------------------------
    # Requests

    def _shards(self, data: Sequence[Datum]) -> list[list[Datum]]:
        bounds = split_by_tokens([d.model_input.length for d in data], len(self.workers))
        return [list(data[a:b]) for a, b in bounds]

    def _forward(
        self, data: Sequence[Datum], loss_fn: str, loss_fn_config: dict | None, backward: bool
    ) -> APIFuture[ForwardBackwardOutput]:
        from rlhfkit.engine.torch_engine.trainer import LoraTrainer

        LoraTrainer.check(data, loss_fn)
        refs = [
            w.forward_backward.remote(shard, loss_fn, loss_fn_config, backward)
            for w, shard in zip(self.workers, self._shards(data))
        ]

        def combine(outputs: list[ForwardBackwardOutput]) -> ForwardBackwardOutput:
            metrics: dict[str, float] = {}
            for out in outputs:
                for key, value in out.metrics.items():
                    metrics[key] = metrics.get(key, 0.0) + value  # sums (loss:sum) add up over shards
            return ForwardBackwardOutput([o for out in outputs for o in out.loss_fn_outputs], metrics)

        return self._gather(refs, combine)

    def forward_backward(
        self, data: Sequence[Datum], loss_fn: str, loss_fn_config: dict | None = None
    ) -> APIFuture[ForwardBackwardOutput]:
        return self._forward(data, loss_fn, loss_fn_config, backward=True)

    def forward(
        self, data: Sequence[Datum], loss_fn: str, loss_fn_config: dict | None = None
    ) -> APIFuture[ForwardBackwardOutput]:
        return self._forward(data, loss_fn, loss_fn_config, backward=False)

    def forward_backward_custom(self, data: Sequence[Datum], fn: Callable) -> APIFuture[ForwardBackwardOutput]:
        """As on one device: the workers compute the logprobs, `fn` runs here on them, and its gradient with
        respect to each logprob becomes the weight of a linear loss (cross_entropy with weights −∂loss/∂logprob)
        whose backward on the workers gives the parameters' gradient. Blocks until `fn` has run."""

        from rlhfkit.engine.torch_engine.trainer import LoraTrainer

        LoraTrainer.check(data, "custom")
        data = list(data)
        refs = [w.logprobs.remote(shard) for w, shard in zip(self.workers, self._shards(data))]
        logprobs = [
            lp.to_torch().requires_grad_(True) for shard in self._gather(refs, lambda r: r).result() for lp in shard
        ]
        loss, metrics = fn(data, logprobs)
        loss.backward()
        linear = [
            Datum(
                d.model_input,
                {"target_tokens": d.loss_fn_inputs["target_tokens"], "weights": TensorData.from_torch(-lp.grad)},
            )
            for d, lp in zip(data, logprobs)
        ]
        metrics = {"loss:sum": float(loss.detach()), **{k: float(v) for k, v in (metrics or {}).items()}}
        return self.forward_backward(linear, "cross_entropy").then(
            lambda out: ForwardBackwardOutput(
                [{"logprobs": TensorData.from_torch(lp.detach())} for lp in logprobs], metrics
            )
        )

    def optim_step(self, params: AdamParams) -> APIFuture[OptimStepResponse]:
        return self._gather([w.optim_step.remote(params) for w in self.workers], lambda results: results[0])

    def _save(self, name: str, kind: str) -> APIFuture[SaveWeightsResponse]:
        from rlhfkit.engine.local_backend.training import resolve_checkpoint_path

        path = resolve_checkpoint_path(self.storage, name, kind)
        return self._gather(
            [self.workers[0].save.remote(str(path), kind)], lambda results: SaveWeightsResponse(path=results[0])
        )

    def save_state(self, name: str, ttl_seconds: int | None = None) -> APIFuture[SaveWeightsResponse]:
        """Adapter weights + optimizer state + RNG state, written atomically by rank 0."""
        return self._save(name, "state")

    def save_weights_for_sampler(self, name: str, ttl_seconds: int | None = None) -> APIFuture[SaveWeightsResponse]:
        return self._save(name, "sampler")

    def save_weights_and_get_sampling_client(self, name: str | None = None):
        """The current weights saved for the inference engines (which load adapters from disk), and a
        sampling client on them."""
        self._sampler_versions += 1
        path = self._save(name or f"for-sampler-{self._sampler_versions:06d}", "sampler").result().path
        return self.service.create_sampling_client(model_path=path)

    def create_sampling_client(self, model_path: str):
        return self.service.create_sampling_client(model_path=model_path)

    def load_state(self, path: str) -> APIFuture[None]:
        return self._gather([w.load.remote(path, False) for w in self.workers], lambda results: None)

    def load_state_with_optimizer(self, path: str) -> APIFuture[None]:
        return self._gather([w.load.remote(path, True) for w in self.workers], lambda results: None)

    def get_tokenizer(self):
        return load_tokenizer(self.spec.base_model)

    def get_info(self) -> dict:
        return {
            "base_model": self.spec.base_model,
            "lora_rank": self.spec.rank,
            "backend": "ray",
            "num_train_workers": len(self.workers),
        }
