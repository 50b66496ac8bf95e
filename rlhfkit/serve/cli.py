"""`rlhfkit serve`: the Tinker API server's command line. Arguments are checked before anything is loaded."""

from __future__ import annotations

import argparse
import sys

from rlhfkit.engine.settings import EngineSettings

DESCRIPTION = """Serve the Tinker API over rlhfkit's engine, so tinker code (the tinker SDK, tinker-cookbook)
runs on this machine: TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=tml-local python your_script.py
Engine settings as key=value, as in the other commands: backend=local|ray sampler=local|vllm
inference_engine=torch|vllm device=cpu|cuda dtype=auto|float32|bfloat16 ray_address=... num_train_workers=N
num_samplers=N. docs/tinker-server.md has the details."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the usage first)
        print(f"rlhfkit serve: error: {message} (rlhfkit serve --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str]):
    from rlhfkit.serve.settings import ServerSettings

    parser = _Parser(prog="rlhfkit serve", description=DESCRIPTION)
    parser.add_argument("engine", nargs="*", metavar="key=value", help="engine settings (see above)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--storage", default="~/.cache/rlhfkit/serve", help="folder of training runs and checkpoints (tinker:// paths)"
    )
    parser.add_argument("--api-key", default=None, help="require this key on every request (needed off loopback)")
    parser.add_argument("--session-timeout", type=float, default=120.0, help="seconds without heartbeat (120)")
    parser.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body in MiB (64)")
    parser.add_argument("--zstd", action="store_true", help="ask clients to zstd-compress forward_backward bodies")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.engine:
        key, sep, value = item.partition("=")
        if not sep or key not in EngineSettings.names():
            parser.error(f"{item!r}: expected key=value with key one of {', '.join(EngineSettings.names())}")
        try:
            overrides[key] = EngineSettings.parse(key, value)
        except ValueError as e:
            parser.error(str(e))
    try:
        engine = EngineSettings.from_env(**overrides)
        settings = ServerSettings(
            storage=args.storage,
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            engine=engine,
            session_timeout_s=args.session_timeout,
            max_body_mb=args.max_body_mb,
            zstd=args.zstd,
        )
    except ValueError as e:
        parser.error(str(e))
    return settings, args


def serve_main(argv: list[str]) -> int:
    settings, args = parse_args(argv)
    try:
        import uvicorn

        from rlhfkit.serve.app import create_app
    except ImportError as e:
        print(
            f"rlhfkit serve: {e.name} is missing; install the serve extra: pip install -e '.[serve]'", file=sys.stderr
        )
        return 2
    import logging

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(settings)
    print(
        f"rlhfkit serve: Tinker API on http://{settings.host}:{settings.port} (storage {settings.storage}); "
        f"export TINKER_BASE_URL=http://{settings.host}:{settings.port} TINKER_API_KEY=tml-local",
        flush=True,
    )
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level, access_log=False)
    return 0
