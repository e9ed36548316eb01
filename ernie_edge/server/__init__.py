"""The OpenAI-compatible HTTP API over the engine (`ernie-edge serve`): settings.py (what to
serve and how), protocol.py (request/response models), service.py (protocol <-> engine), guard.py
(host, origin, key and size checks), app.py (routes and errors), run.py (the server process).
docs/API.md describes the API."""

from .settings import ServeError, ServeSettings

__all__ = ["ServeError", "ServeSettings", "create_app", "serve"]


def __getattr__(name):  # FastAPI and uvicorn are imported only when the server is used
    if name == "create_app":
        from .app import create_app
        return create_app
    if name == "serve":
        from .run import serve
        return serve
    raise AttributeError(name)
