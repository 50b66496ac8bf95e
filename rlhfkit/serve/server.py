"""The Tinker API over the engine: sessions, training models, sampling sessions, futures, checkpoints.

One `TinkerServer` holds one engine `ServiceClient` (so one frozen base per model, shared by every session's
adapters) and maps the SDK's requests onto it:

- training: `create_model` / create-via-load `load_weights` make an engine TrainingClient; the requests of one
  model (`forward_backward`, `optim_step`, saves, loads) enter the engine in `seq_id` order, whatever order
  their POSTs arrive in (the SDK sends a call's chunks concurrently); a POST that repeats a (model, seq_id)
  already seen answers the same future and is not applied again.
- sampling: a sampling session is an engine SamplingClient (one per checkpoint folder or base model, shared by
  every session that names it, so concurrent `asample`s of all sessions meet in its request batcher); the
  unnamed `save_weights_for_sampler` makes one on the current weights in memory.
- sessions: a session whose heartbeats stop for `session_timeout_s` is released: its models and samplers are
  dropped (memory freed), its checkpoints stay on disk.

Deviations from the hosted service (docs/tinker-server.md): LoRA models only; losses are the engine's
(cross_entropy, importance_sampling, ppo, cispo; custom losses as the SDK computes them client-side); no top-k
or target prompt logprobs, no stability records; futures live in memory only; `ttl_seconds` is ignored.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from rlhfkit.engine import types as et
from rlhfkit.engine.clients import SamplingClient, TrainingClient
from rlhfkit.serve import wire
from rlhfkit.serve.errors import NotFound, UserError
from rlhfkit.serve.futures import FutureStore, Result
from rlhfkit.serve.settings import ServerSettings
from rlhfkit.serve.storage import Storage, check_name

log = logging.getLogger("rlhfkit.serve")

Op = Callable[[], Awaitable[Awaitable[Result]]]  # submit to the engine (ordered), then await the result


@dataclass
class Session:
    session_id: str
    tags: list[str]
    user_metadata: dict[str, Any]
    last_seen: float = field(default_factory=time.monotonic)
    models: set[str] = field(default_factory=set)
    samplers: set[str] = field(default_factory=set)


@dataclass
class Model:
    """A training model: an engine TrainingClient and the ordering of its requests."""

    model_id: str
    session_id: str
    client: TrainingClient  # local or Ray
    base_model: str
    lora: dict[str, Any]
    tokenizer_id: str | None = None
    next_seq: int = 1
    pending: dict[int, tuple[str, Op]] = field(default_factory=dict)
    seen: dict[int, str] = field(default_factory=dict)  # seq_id -> request_id (retries answer the same future)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    draining: bool = False


@dataclass
class Sampler:
    sampler_id: str
    session_id: str
    client: SamplingClient
    base_model: str
    model_path: str | None
    seen: dict[int, tuple[str, list[str]]] = field(default_factory=dict)


class TinkerServer:
    def __init__(self, settings: ServerSettings, service: Any | None = None):
        self.settings = settings
        self.storage = Storage(settings.storage)
        self.futures = FutureStore()
        self.sessions: dict[str, Session] = {}
        self.models: dict[str, Model] = {}
        self.samplers: dict[str, Sampler] = {}
        self._creations: dict[tuple[str, int], str] = {}  # (session, model_seq_id) -> request_id
        self._sampler_creations: dict[tuple[str, int], str] = {}  # (session, sampling seq) -> sampler id
        self._engine_samplers: dict[tuple, Any] = {}  # (kind, folder or base model) -> shared engine client
        self._service = service
        self._service_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self.started = time.time()

    # ------------------------------------------------------------------------------------------------
    # The engine

    async def service(self) -> Any:
        """The engine's ServiceClient, made on first use (starting Ray, say, takes a while)."""
        async with self._service_lock:
            if self._service is None:
                from rlhfkit.engine.service import ServiceClient

                self._service = await asyncio.to_thread(
                    ServiceClient,
                    settings=self.settings.engine,
                    storage_dir=str(self.storage.root / "engine"),
                )
            return self._service

    # ------------------------------------------------------------------------------------------------
    # Sessions

    def create_session(self, tags: list[str], user_metadata: dict[str, Any]) -> str:
        session_id = f"session-{uuid.uuid4().hex[:12]}"
        self.sessions[session_id] = Session(session_id, list(tags or []), dict(user_metadata or {}))
        return session_id

    def session(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise NotFound(f"session_id {session_id!r} is unknown (ended, timed out, or from before a restart)")
        session.last_seen = time.monotonic()
        return session

    def heartbeat(self, session_id: str) -> None:
        self.session(session_id)

    def finish_session(self, session_id: str) -> None:
        self.release(self.session(session_id))

    def release(self, session: Session) -> None:
        """Drop a session's models and samplers (their memory is freed once no request holds them)."""
        self.sessions.pop(session.session_id, None)
        for model_id in session.models:
            self.models.pop(model_id, None)
        for sampler_id in session.samplers:
            self.samplers.pop(sampler_id, None)
        held = {id(s.client) for s in self.samplers.values()}
        for key in [k for k, c in self._engine_samplers.items() if id(c) not in held]:
            del self._engine_samplers[key]

    def expire_sessions(self) -> list[str]:
        now = time.monotonic()
        gone = [s for s in self.sessions.values() if now - s.last_seen > self.settings.session_timeout_s]
        for session in gone:
            log.info("session %s: no heartbeat for %.0f s, released", session.session_id, now - session.last_seen)
            self.release(session)
        return [s.session_id for s in gone]

    # ------------------------------------------------------------------------------------------------
    # Training models

    def model(self, model_id: str) -> Model:
        model = self.models.get(model_id)
        if model is None:
            raise NotFound(
                f"model_id {model_id!r} is unknown (its session ended or timed out, or the server restarted; "
                f"its checkpoints are still loadable by their tinker:// paths)"
            )
        self.sessions.get(model.session_id) and self.session(model.session_id)
        return model

    def create_model(self, request: Any) -> str:
        """create_model: a LoRA training client on `base_model` (future of {model_id})."""
        session = self.session(request.session_id)
        key = (session.session_id, int(request.model_seq_id))
        if key in self._creations:
            return self._creations[key]
        if request.optimizer_config is not None and request.optimizer_config.type != "adamw":
            raise UserError(f"optimizer_config.type {request.optimizer_config.type!r}: only 'adamw' is supported")
        lora = request.lora_config
        if lora is None:
            raise UserError("lora_config: required (this server trains LoRA adapters only)")
        if lora.rank < 1:
            raise UserError(f"lora_config.rank {lora.rank}: expected at least 1")
        model_id = f"{session.session_id}:train:{request.model_seq_id}"
        lora_dict = {
            "rank": lora.rank,
            "seed": lora.seed,
            "train_mlp": lora.train_mlp,
            "train_attn": lora.train_attn,
            "train_unembed": lora.train_unembed,
        }
        request_id = self.futures.create("CreateModel")
        self._creations[key] = request_id

        async def create() -> Result:
            service = await self.service()
            client = await asyncio.to_thread(
                service.create_lora_training_client,
                request.base_model,
                rank=lora.rank,
                seed=lora.seed,
                train_mlp=lora.train_mlp,
                train_attn=lora.train_attn,
                train_unembed=lora.train_unembed,
            )
            model = self._add_model(session, model_id, client, request.base_model, lora_dict, request.user_metadata, 1)
            model.tokenizer_id = await asyncio.to_thread(self.tokenizer_id, request.base_model)
            return Result("json", {"model_id": model_id, "type": "create_model"})

        self._spawn(self.futures.track(request_id, create(), lambda r: r))
        return request_id

    def _add_model(self, session, model_id, client, base_model, lora, user_metadata, next_seq) -> Model:
        if self.sessions.get(session.session_id) is not session:
            raise NotFound(f"session {session.session_id!r} was released while its model was being made")
        session.last_seen = time.monotonic()
        model = Model(model_id, session.session_id, client, base_model, lora, next_seq=next_seq)
        self.models[model_id] = model
        session.models.add(model_id)
        now = time.time()
        self.storage.write_run(
            model_id,
            {
                "training_run_id": model_id,
                "base_model": base_model,
                "model_owner": "local",
                "is_lora": True,
                "lora_rank": lora["rank"],
                "lora": lora,
                "user_metadata": {str(k): str(v) for k, v in (user_metadata or {}).items()},
                "created": now,
                "last_request_time": now,
            },
        )
        return model

    def create_via_load(self, request: Any) -> str:
        """load_weights without model_id: a new model from a saved state (the SDK names it
        "{session_id}:train:{model_seq_id}")."""
        session = self.session(request.session_id)
        if request.model_seq_id is None:
            raise UserError("load_weights: model_seq_id is required with session_id")
        key = (session.session_id, int(request.model_seq_id))
        if key in self._creations:
            return self._creations[key]
        _, folder = self.storage.resolve(request.path, "path")
        model_id = f"{session.session_id}:train:{request.model_seq_id}"
        request_id = self.futures.create("LoadWeights")
        self._creations[key] = request_id

        async def create() -> Result:
            from rlhfkit.engine.model.lora import read_spec

            service = await self.service()
            make = (
                service.create_training_client_from_state_with_optimizer
                if request.optimizer
                else service.create_training_client_from_state
            )
            client = await asyncio.to_thread(make, str(folder))
            spec = read_spec(folder)
            base_model = self._base_model_of(folder, spec.base_model)
            lora = {
                "rank": spec.rank,
                "seed": spec.seed,
                "train_mlp": spec.train_mlp,
                "train_attn": spec.train_attn,
                "train_unembed": spec.train_unembed,
            }
            model = self._add_model(session, model_id, client, base_model, lora, request.user_metadata, 1)
            model.tokenizer_id = await asyncio.to_thread(self.tokenizer_id, base_model)
            return Result("json", {"model_id": model_id, "path": request.path, "type": "load_weights"})

        self._spawn(self.futures.track(request_id, create(), lambda r: r))
        return request_id

    def _base_model_of(self, folder: Path, engine_name: str) -> str:
        """The base model name the run was created with (as the client gave it), from the run record."""
        try:
            return self.storage.read_run(folder.parent.parent.name)["base_model"]
        except (NotFound, KeyError):
            return engine_name

    def enqueue(self, model: Model, seq_id: int | None, kind: str, op: Op) -> str:
        """Queue a request of `model` in seq_id order; a repeated seq_id answers the first one's future."""
        if seq_id is not None and seq_id in model.seen:
            return model.seen[seq_id]
        request_id = self.futures.create(kind)
        if seq_id is None or seq_id < model.next_seq:
            # no order given, or one that arrives after its turn was given up: it runs now, after those queued
            seq_id = max([model.next_seq - 1, *model.pending]) + 1 if model.pending else model.next_seq
            if seq_id < model.next_seq:
                seq_id = model.next_seq
        model.seen[seq_id] = request_id
        model.pending[seq_id] = (request_id, op)
        model.arrived.set()
        if not model.draining:
            model.draining = True
            self._spawn(asyncio.get_running_loop().create_task(self._drain(model)))
        return request_id

    def refuse(self, model_id: str, seq_id: int | None, error: Exception) -> None:
        """A request refused before it was queued (its POST answers 4xx) still takes its seq_id's turn, so the
        model's next request does not wait for it."""
        model = self.models.get(model_id)
        if model is None or seq_id is None or seq_id in model.seen or seq_id < model.next_seq:
            return

        async def refused() -> Awaitable[Result]:
            raise error

        self.enqueue(model, seq_id, "Refused", refused)

    async def _drain(self, model: Model) -> None:
        """Submit the model's queued requests to the engine in seq_id order. A missing seq_id is waited for
        `gap_timeout_s` (the SDK sends one call's chunks concurrently), then skipped with a warning."""
        try:
            while model.pending:
                if model.next_seq not in model.pending:
                    model.arrived.clear()
                    try:
                        await asyncio.wait_for(model.arrived.wait(), self.settings.gap_timeout_s)
                        continue
                    except TimeoutError:
                        if model.next_seq in model.pending:
                            continue
                        log.warning(
                            "model %s: seq_id %d never arrived; running seq_id %d",
                            model.model_id,
                            model.next_seq,
                            min(model.pending),
                        )
                        model.next_seq = min(model.pending)
                seq = model.next_seq
                request_id, op = model.pending.pop(seq)
                model.next_seq = seq + 1
                try:
                    waiter = await op()
                except Exception as e:  # a request the engine refused at submission
                    self.futures.fail(request_id, e)
                    continue
                self._spawn(self.futures.track(request_id, waiter, lambda r: r))
        finally:
            model.draining = False
            if model.pending:  # arrived while finishing
                model.draining = True
                self._spawn(asyncio.get_running_loop().create_task(self._drain(model)))

    # Training requests: each returns a request_id; the op runs in the model's turn.
    def forward_backward(self, message: Any, forward_only: bool) -> str:
        model = self.model(message.model_id)
        if message.seq_id and message.seq_id in model.seen:
            return model.seen[message.seq_id]
        data = wire.data_from_proto(message)
        loss_fn, config = message.loss_fn, wire.loss_config(message)
        if loss_fn not in self.settings.losses:
            raise UserError(
                f"loss_fn {loss_fn!r} is not supported by this server; supported: {', '.join(self.settings.losses)} "
                f"(a Python loss runs client-side through forward_backward_custom)"
            )

        async def op() -> Awaitable[Result]:
            call = model.client.forward if forward_only else model.client.forward_backward
            future = call(data, loss_fn, config)

            async def result() -> Result:
                return Result("proto", wire.forward_backward_output(await future.result_async()))

            return result()

        return self.enqueue(model, message.seq_id or None, "Forward" if forward_only else "ForwardBackward", op)

    def optim_step(self, request: Any) -> str:
        model = self.model(request.model_id)
        params = request.optim_params
        if not hasattr(params, "beta1"):
            raise UserError(f"optim_params type {getattr(params, 'type', '?')!r}: only Adam (adam_params) is supported")
        adam = et.AdamParams(
            learning_rate=params.learning_rate,
            beta1=params.beta1,
            beta2=params.beta2,
            eps=params.eps,
            weight_decay=params.weight_decay,
            grad_clip_norm=params.grad_clip_norm,
        )

        async def op() -> Awaitable[Result]:
            future = model.client.optim_step(adam)

            async def result() -> Result:
                out = await future.result_async()
                return Result("json", {"metrics": dict(out.metrics or {})})

            return result()

        return self.enqueue(model, request.seq_id, "OptimStep", op)

    def save_weights(self, request: Any) -> str:
        model = self.model(request.model_id)
        name = check_name(request.path or f"state-{uuid.uuid4().hex[:8]}", "path")
        path, folder = self.storage.new_checkpoint(model.model_id, "weights", name, overwrite=request.overwrite)

        async def op() -> Awaitable[Result]:
            future = model.client.save_state(str(folder))

            async def result() -> Result:
                await future.result_async()
                self.storage.touch_run(model.model_id)
                return Result("json", {"path": str(path), "type": "save_weights"})

            return result()

        return self.enqueue(model, request.seq_id, "SaveWeights", op)

    def save_weights_for_sampler(self, request: Any) -> str:
        model = self.model(request.model_id)
        if request.kind == "inflight":
            raise UserError("kind 'inflight' (mutable weights shared by samplers) is not supported; use 'snapshot'")
        if request.path is not None:
            name = check_name(request.path, "path")
            path, folder = self.storage.new_checkpoint(model.model_id, "sampler_weights", name)

            async def op() -> Awaitable[Result]:
                future = model.client.save_weights_for_sampler(str(folder))

                async def result() -> Result:
                    await future.result_async()
                    self.storage.touch_run(model.model_id)
                    return Result("json", {"path": str(path), "type": "save_weights_for_sampler"})

                return result()

            return self.enqueue(model, request.seq_id, "SaveWeightsForSampler", op)

        session = self.sessions.get(model.session_id)
        seq = request.sampling_session_seq_id

        async def op_unnamed() -> Awaitable[Result]:
            # blocks until the requests before it have run (its weights are theirs), so it is awaited in turn
            client = await asyncio.to_thread(model.client.save_weights_and_get_sampling_client)
            sampler_id = f"{model.session_id}:sample:{seq if seq is not None else uuid.uuid4().hex[:8]}"
            self.samplers[sampler_id] = Sampler(sampler_id, model.session_id, client, model.base_model, None)
            if session is not None:
                session.samplers.add(sampler_id)

            async def result() -> Result:
                return Result("json", {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"})

            return result()

        return self.enqueue(model, request.seq_id, "SaveWeightsForSampler", op_unnamed)

    def load_weights(self, request: Any) -> str:
        """load_weights into an existing model (the SDK's deprecated load_state*)."""
        model = self.model(request.model_id)
        _, folder = self.storage.resolve(request.path, "path", kinds=("weights",))

        async def op() -> Awaitable[Result]:
            call = model.client.load_state_with_optimizer if request.optimizer else model.client.load_state
            future = call(str(folder))

            async def result() -> Result:
                await future.result_async()
                return Result("json", {"path": request.path, "type": "load_weights"})

            return result()

        return self.enqueue(model, request.seq_id, "LoadWeights", op)

    def get_info(self, model_id: str) -> dict[str, Any]:
        model = self.model(model_id)
        return {
            "type": "get_info",
            "model_id": model.model_id,
            "model_data": {
                "model_name": model.base_model,
                "tokenizer_id": model.tokenizer_id or model.base_model,
                "arch": None,
            },
            "is_lora": True,
            "lora_rank": model.lora["rank"],
            "model_name": model.base_model,
        }

    @staticmethod
    def tokenizer_id(base_model: str) -> str:
        """Where the client's `get_tokenizer()` finds the tokenizer: the model's local folder when rlhfkit
        resolves the name to one (the embedded model, a .gguf file), else the name as given."""
        if Path(base_model).expanduser().is_dir():
            return base_model
        try:
            from rlhfkit.engine.model.base import resolve_base_model

            return resolve_base_model(base_model)
        except Exception:  # a Hub id without a network: the client resolves it itself
            return base_model

    # ------------------------------------------------------------------------------------------------
    # Sampling

    async def create_sampling_session(self, request: Any) -> str:
        session = self.session(request.session_id)
        key = (session.session_id, int(request.sampling_session_seq_id))
        if key in self._sampler_creations and self._sampler_creations[key] in self.samplers:
            return self._sampler_creations[key]
        if request.model_path is None and request.base_model is None:
            raise UserError("create_sampling_session: give model_path or base_model")
        folder = None
        if request.model_path is not None:
            _, folder = self.storage.resolve(request.model_path, "model_path")
            engine_key: tuple = ("adapter", str(folder))
            base_model = request.base_model or self._base_model_of(folder, "")
            if not base_model:
                from rlhfkit.engine.model.lora import read_spec

                base_model = read_spec(folder).base_model
        else:
            engine_key = ("base", request.base_model)
            base_model = request.base_model
        client = self._engine_samplers.get(engine_key)
        if client is None:
            service = await self.service()
            # a base_model given beside a model_path is the name the client knows (the tutorial's form); the
            # checkpoint records the one the engine loads, so the folder alone decides
            client = await asyncio.to_thread(
                service.create_sampling_client,
                model_path=str(folder) if folder is not None else None,
                base_model=None if folder is not None else request.base_model,
            )
            self._engine_samplers[engine_key] = client
        sampler_id = f"{session.session_id}:sample:{request.sampling_session_seq_id}"
        self.samplers[sampler_id] = Sampler(sampler_id, session.session_id, client, base_model, request.model_path)
        session.samplers.add(sampler_id)
        self._sampler_creations[key] = sampler_id
        return sampler_id

    def sampler(self, sampler_id: str) -> Sampler:
        sampler = self.samplers.get(sampler_id)
        if sampler is None:
            raise NotFound(f"sampling_session_id {sampler_id!r} is unknown (its session ended or timed out)")
        if sampler.session_id in self.sessions:
            self.session(sampler.session_id)
        return sampler

    def sample(self, request: Any) -> tuple[str, list[str]]:
        if request.sampling_session_id is None:
            raise UserError("asample: sampling_session_id is required (create a sampling session first)")
        sampler = self.sampler(request.sampling_session_id)
        if request.seq_id is not None and request.seq_id in sampler.seen:
            return sampler.seen[request.seq_id]
        unsupported = [
            name
            for name, value in (
                ("topk_prompt_logprobs", request.topk_prompt_logprobs),
                ("topk_sample_logprobs", request.topk_sample_logprobs),
                ("target_prompt_logprobs", request.target_prompt_logprobs),
                ("prompt_alt_tokens_k", request.prompt_alt_tokens_k),
                ("record_stability_info", request.record_stability_info),
            )
            if value
        ]
        if unsupported:
            raise UserError(
                f"asample: {', '.join(unsupported)} not supported by this server (supported: sampled-token "
                f"logprobs, prompt_logprobs, prompt_logprobs_last_n, stop strings/tokens, seed, temperature, top_k, top_p)"
            )
        if request.num_samples < 1:
            raise UserError(f"asample: num_samples {request.num_samples}: expected at least 1")
        prompt = wire.model_input_from_json(request.prompt)
        if prompt.length == 0:
            raise UserError("asample: prompt is empty")
        params = wire.sampling_params(request.sampling_params)
        if params.max_tokens is not None and params.max_tokens < 1:
            raise UserError(f"sampling_params.max_tokens {params.max_tokens}: expected at least 1")
        last_n = request.prompt_logprobs_last_n
        if last_n is not None and not (1 <= last_n <= prompt.length - 1):
            raise UserError(f"prompt_logprobs_last_n {last_n}: expected 1 to {prompt.length - 1}")
        request_id = self.futures.create("Sample")
        sequence_ids = [f"{request_id}:{k}" for k in range(request.num_samples)]
        if request.seq_id is not None:
            sampler.seen[request.seq_id] = (request_id, sequence_ids)
        client = sampler.client

        async def run() -> Result:
            jobs = [client.sample_async(prompt, request.num_samples, params)]
            if request.prompt_logprobs:
                jobs.append(client.compute_logprobs_async(prompt))
            results = await asyncio.gather(*jobs)
            logprobs = results[1] if request.prompt_logprobs else None
            if logprobs is not None and last_n is not None:
                logprobs = [None] * (len(logprobs) - last_n) + list(logprobs[-last_n:])
            return Result("proto", wire.sample_response(results[0], logprobs))

        self._spawn(self.futures.track(request_id, run(), lambda r: r))
        return request_id, sequence_ids

    # ------------------------------------------------------------------------------------------------
    # Runs and checkpoints (REST)

    def training_run(self, run_id: str) -> dict[str, Any]:
        record = self.storage.read_run(run_id)
        checkpoints = self.storage.list_checkpoints(run_id)
        last = [c for c in checkpoints if c["checkpoint_type"] == "training"]
        last_sampler = [c for c in checkpoints if c["checkpoint_type"] == "sampler"]
        return {
            "training_run_id": run_id,
            "base_model": record["base_model"],
            "model_owner": record.get("model_owner", "local"),
            "is_lora": True,
            "corrupted": False,
            "lora_rank": record.get("lora_rank"),
            "last_request_time": _iso(record.get("last_request_time", record.get("created", 0))),
            "last_checkpoint": max(last, key=lambda c: c["time"]) if last else None,
            "last_sampler_checkpoint": max(last_sampler, key=lambda c: c["time"]) if last_sampler else None,
            "user_metadata": record.get("user_metadata") or None,
        }

    def weights_info(self, tinker_path: str) -> dict[str, Any]:
        from rlhfkit.engine.model.lora import read_spec

        _, folder = self.storage.resolve(tinker_path, "tinker_path")
        spec = read_spec(folder)
        return {
            "base_model": self._base_model_of(folder, spec.base_model),
            "is_lora": True,
            "lora_rank": spec.rank,
            "train_unembed": spec.train_unembed,
            "train_mlp": spec.train_mlp,
            "train_attn": spec.train_attn,
        }

    def _spawn(self, task: asyncio.Task) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def status(self) -> dict[str, Any]:
        return {
            "sessions": len(self.sessions),
            "models": len(self.models),
            "sampling_sessions": len(self.samplers),
            "engine_samplers": len(self._engine_samplers),
            "pending_futures": self.futures.pending(),
            "uptime_s": round(time.time() - self.started, 1),
        }


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
