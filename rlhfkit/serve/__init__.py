"""`rlhfkit serve`: a Tinker API server over the engine, so the real `tinker` SDK and `tinker-cookbook` run
unchanged on this machine (or a Ray cluster). docs/tinker-server.md says how to point tinker code at it.

    from rlhfkit.serve import ServerSettings, create_app
    app = create_app(ServerSettings(storage="runs/serve"))   # an ASGI app (uvicorn, tests)

Needs the `serve` extra (the SDK's wire schema, FastAPI, uvicorn): pip install 'rlhfkit[serve]'.
"""

from rlhfkit.serve.settings import ServerSettings


def create_app(settings: ServerSettings | None = None, service=None):
    from rlhfkit.serve.app import create_app as _create_app

    return _create_app(settings, service)


__all__ = ["ServerSettings", "create_app"]
