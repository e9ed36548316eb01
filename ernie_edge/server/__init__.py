"""The OpenAI-compatible HTTP API over the engine (`ernie-edge serve`): settings.py (what to
serve and how), protocol.py (request/response models), service.py (protocol <-> engine), guard.py
(host, origin, key and size checks), app.py (routes and errors), run.py (running it: `serve` for
`ernie-edge serve`, `serve_engine` for an engine already loaded in this process, as the desktop
app does). docs/API.md describes the API."""

from .settings import ServeError, ServeSettings

__all__ = ["ServeError", "ServeSettings", "create_app", "serve", "serve_engine"]


def __getattr__(name):  # FastAPI and uvicorn are imported only when the server is used
    if name == "create_app":
        from .app import create_app
        return create_app
    if name in ("serve", "serve_engine"):
        from . import run
        return getattr(run, name)
    raise AttributeError(name)
