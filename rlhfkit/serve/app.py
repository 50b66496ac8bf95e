"""The HTTP face of the Tinker API (FastAPI on uvicorn): routes, bodies, auth, limits. The logic is server.py's.

Bodies are read here (size-limited, zstd-decoded), validated by the official SDK's request models (so a bad
field is named in a 4xx), and handed to `TinkerServer`. Results of futures go back as the SDK 0.38 expects:
protobuf for `ForwardBackwardOutput` and `SampleResponse`, JSON for the rest, `{"error", "category"}` for a
failed request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from typing import Any

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from tinker import types as tt

from rlhfkit.serve import wire
from rlhfkit.serve.errors import NotFound, ServeError, TooLarge, Unauthorized, UserError
from rlhfkit.serve.server import TinkerServer
from rlhfkit.serve.settings import ServerSettings

log = logging.getLogger("rlhfkit.serve")
API = "/api/v1"
PROTOBUF = "application/x-protobuf"


class WeightsInfoRequest(pydantic.BaseModel):
    tinker_path: str


def create_app(settings: ServerSettings | None = None, service: Any | None = None) -> FastAPI:
    """The Tinker API server as an ASGI app (for tests and embedding; `rlhfkit serve` runs it with uvicorn).
    `service`: an engine ServiceClient to use instead of one made from `settings.engine`."""
    settings = settings or ServerSettings()
    server = TinkerServer(settings, service)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async def expire() -> None:
            while True:
                await asyncio.sleep(min(10.0, settings.session_timeout_s / 4))
                server.expire_sessions()

        task = asyncio.create_task(expire())
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(title="rlhfkit Tinker API", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    # ---------------------------------------------------------------------------------------------
    # Errors, auth, body limits

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, error: ServeError) -> JSONResponse:
        return JSONResponse({"error": str(error), "category": error.category, "detail": str(error)}, error.status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if settings.api_key is not None:
            given = request.headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
                error = Unauthorized("the X-API-Key header (TINKER_API_KEY) does not match this server's --api-key")
                return await serve_error(request, error)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return await serve_error(request, TooLarge(_too_large(int(length))))
        try:
            return await call_next(request)
        except ServeError as e:  # raised outside a route (body reading)
            return await serve_error(request, e)

    def _too_large(size: int) -> str:
        return f"request body of {size} bytes exceeds the server's limit of {settings.max_body_bytes} (--max-body-mb)"

    async def body(request: Request) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise TooLarge(_too_large(size))
            chunks.append(chunk)
        data = b"".join(chunks)
        if request.headers.get("content-encoding", "").lower() == "zstd":
            import zstandard

            try:
                reader = zstandard.ZstdDecompressor().stream_reader(data)
                data = reader.read(settings.max_body_bytes + 1)
            except zstandard.ZstdError as e:
                raise UserError(f"the zstd body cannot be decompressed ({e})") from None
            if len(data) > settings.max_body_bytes:
                raise TooLarge(_too_large(len(data)))
        return data

    async def parse(request: Request, model: type[pydantic.BaseModel]) -> Any:
        raw = await body(request)
        try:
            return model.model_validate_json(raw or b"{}")
        except pydantic.ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()[:5]
            )
            raise UserError(f"{request.url.path.removeprefix(API + '/')}: {problems}") from None

    def ordered(model_id: str, seq_id: int | None, submit: Any) -> str:
        """A training request: refused ones still give up their seq_id's turn (server.refuse)."""
        try:
            return submit()
        except ServeError as e:
            server.refuse(model_id, seq_id, e)
            raise

    def future(request_id: str, **extra: Any) -> dict[str, Any]:
        return {"request_id": request_id, **{k: v for k, v in extra.items() if v is not None}}

    # ---------------------------------------------------------------------------------------------
    # Bootstrap, sessions, health

    @app.post(f"{API}/client/config")
    async def client_config(request: Request) -> dict:
        await body(request)
        return {
            "pjwt_auth_enabled": False,
            "credential_default_source": "api_key",
            "use_pyqwest_transport": False,
            "parallel_fwdbwd_chunks": True,
            "proto_compress_fwdbwd": settings.zstd,
            "sample_use_retrieve_futures": False,
            "custom_loss_server_side": False,
            "sample_join_sampling_session": False,
        }

    @app.post(f"{API}/client/dynamic_config")
    async def dynamic_config(request: Request) -> dict:
        await body(request)
        return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}

    @app.get(f"{API}/healthz")
    async def healthz() -> dict:
        return {"status": "ok", **server.status()}

    @app.get(f"{API}/get_server_capabilities")
    async def capabilities() -> dict:
        # any decoder-only causal LM the engine loads: a local folder, a .gguf file, the embedded model
        return {
            "supported_models": [
                {"model_name": "smollm2-135m-instruct", "trainable": True, "sampleable": True},
            ]
        }

    @app.post(f"{API}/telemetry")
    async def telemetry(request: Request) -> dict:
        await body(request)
        return {"status": "accepted"}

    @app.post(f"{API}/create_session")
    async def create_session(request: Request) -> dict:
        req = await parse(request, tt.CreateSessionRequest)
        return {"type": "create_session", "session_id": server.create_session(req.tags, req.user_metadata)}

    @app.post(f"{API}/session_heartbeat")
    async def heartbeat(request: Request) -> dict:
        req = await parse(request, tt.SessionHeartbeatRequest)
        try:
            server.heartbeat(req.session_id)
        except NotFound as e:  # 410 stops the SDK's heartbeat loop
            return JSONResponse({"error": str(e), "category": "user"}, 410)
        return {"type": "session_heartbeat"}

    @app.post(f"{API}/sessions/{{session_id}}/finish")
    async def finish(session_id: str, request: Request) -> dict:
        await body(request)
        server.finish_session(session_id)
        return {}

    # ---------------------------------------------------------------------------------------------
    # Training

    @app.post(f"{API}/create_model")
    async def create_model(request: Request) -> dict:
        req = await parse(request, tt.CreateModelRequest)
        return future(server.create_model(req))

    @app.post(f"{API}/get_info")
    async def get_info(request: Request) -> dict:
        req = await parse(request, tt.GetInfoRequest)
        return server.get_info(req.model_id)

    @app.post(f"{API}/forward_backward")
    async def forward_backward(request: Request) -> dict:
        message = wire.parse_forward_backward(await body(request))
        submit = lambda: server.forward_backward(message, forward_only=message.forward_only)
        return future(ordered(message.model_id, message.seq_id or None, submit), model_id=message.model_id)

    @app.post(f"{API}/forward")
    async def forward(request: Request) -> dict:
        message = wire.parse_forward_backward(await body(request))
        submit = lambda: server.forward_backward(message, forward_only=True)
        return future(ordered(message.model_id, message.seq_id or None, submit), model_id=message.model_id)

    @app.post(f"{API}/optim_step")
    async def optim_step(request: Request) -> dict:
        req = await parse(request, tt.OptimStepRequest)
        return future(ordered(req.model_id, req.seq_id, lambda: server.optim_step(req)), model_id=req.model_id)

    @app.post(f"{API}/save_weights")
    async def save_weights(request: Request) -> dict:
        req = await parse(request, tt.SaveWeightsRequest)
        return future(ordered(req.model_id, req.seq_id, lambda: server.save_weights(req)), model_id=req.model_id)

    @app.post(f"{API}/save_weights_for_sampler")
    async def save_weights_for_sampler(request: Request) -> dict:
        req = await parse(request, tt.SaveWeightsForSamplerRequest)
        submit = lambda: server.save_weights_for_sampler(req)
        return future(ordered(req.model_id, req.seq_id, submit), model_id=req.model_id)

    @app.post(f"{API}/load_weights")
    async def load_weights(request: Request) -> dict:
        req = await parse(request, tt.LoadWeightsRequest)
        if req.model_id is None:
            return future(server.create_via_load(req))
        return future(ordered(req.model_id, req.seq_id, lambda: server.load_weights(req)), model_id=req.model_id)

    @app.post(f"{API}/save_weights_external")
    async def save_weights_external(request: Request) -> dict:
        await body(request)
        raise UserError(
            "save_weights_external is not supported: checkpoints are folders under the server's --storage; "
            "read them there (rlhfkit export STATE_FOLDER OUT)"
        )

    # ---------------------------------------------------------------------------------------------
    # Sampling

    @app.post(f"{API}/create_sampling_session")
    async def create_sampling_session(request: Request) -> dict:
        req = await parse(request, tt.CreateSamplingSessionRequest)
        return {"type": "create_sampling_session", "sampling_session_id": await server.create_sampling_session(req)}

    @app.get(f"{API}/samplers/{{sampler_id}}")
    async def get_sampler(sampler_id: str) -> dict:
        sampler = server.sampler(sampler_id)
        return {"sampler_id": sampler.sampler_id, "base_model": sampler.base_model, "model_path": sampler.model_path}

    @app.post(f"{API}/asample")
    async def asample(request: Request) -> dict:
        req = await parse(request, tt.SampleRequest)
        request_id, sequence_ids = server.sample(req)
        return future(request_id, sample_sequence_ids=sequence_ids)

    # ---------------------------------------------------------------------------------------------
    # Futures

    @app.post(f"{API}/retrieve_future")
    async def retrieve_future(request: Request) -> Response:
        req = await parse(request, tt.FutureRetrieveRequest)
        result = await server.futures.wait(req.request_id, settings.poll_timeout_s)
        if result is None:
            return JSONResponse({"type": "try_again", "request_id": req.request_id, "queue_state": "active"}, 408)
        if result.kind == "proto":
            return Response(result.payload, media_type=PROTOBUF)
        if result.kind == "error":
            category, message = result.payload
            return JSONResponse({"error": message, "category": category})
        return JSONResponse(result.payload)

    # ---------------------------------------------------------------------------------------------
    # Runs and checkpoints

    @app.get(f"{API}/training_runs")
    async def training_runs(limit: int = 20, offset: int = 0) -> dict:
        runs = server.storage.list_runs()
        page = [server.training_run(r) for r in runs[offset : offset + limit]]
        return {"training_runs": page, "cursor": {"offset": offset, "limit": limit, "total_count": len(runs)}}

    @app.get(f"{API}/training_runs/{{run_id}}")
    async def training_run(run_id: str) -> dict:
        return server.training_run(run_id)

    @app.get(f"{API}/training_runs/{{run_id}}/checkpoints")
    async def checkpoints(run_id: str) -> dict:
        server.storage.read_run(run_id)
        return {"checkpoints": server.storage.list_checkpoints(run_id)}

    @app.delete(f"{API}/training_runs/{{run_id}}/checkpoints/{{kind}}/{{name}}")
    async def delete_checkpoint(run_id: str, kind: str, name: str) -> dict:
        server.storage.delete_checkpoint(run_id, kind, name)
        return {}

    @app.put(f"{API}/training_runs/{{run_id}}/checkpoints/{{kind}}/{{name}}/ttl")
    async def checkpoint_ttl(run_id: str, kind: str, name: str, request: Request) -> dict:
        await body(request)
        server.storage.resolve(f"tinker://{run_id}/{kind}/{name}", "checkpoint")
        return {}  # checkpoints are kept until deleted

    @app.post(f"{API}/weights_info")
    async def weights_info(request: Request) -> dict:
        req = await parse(request, WeightsInfoRequest)
        return server.weights_info(req.tinker_path)

    return app
