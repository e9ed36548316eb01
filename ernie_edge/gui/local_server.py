"""The "Local API server" toggle: serve the app's own engine over the OpenAI-compatible HTTP API
(docs/API.md) on 127.0.0.1, so other programs on this computer can use the loaded model while
the app runs. No Qt.

The server runs in this process, on the engine the chat uses (`LocalBackend.engine`): the model
is loaded once, and the app's turns and the API's requests share its slots. Stopping the server
leaves the engine running.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ErnieEdgeError

if TYPE_CHECKING:  # FastAPI and uvicorn are imported when the server starts, not with the window
    from ..engine import Engine
    from ..server.run import RunningServer

GRACE_S = 5  # on stop, API requests still running get this long to finish, then are cancelled


def start_server(engine: "Engine", port: int) -> "RunningServer":
    """Serve `engine` at http://127.0.0.1:PORT/v1 (port 0: a free one); returns once it listens
    (blocking for a moment: call it off the UI thread). Raises ErnieEdgeError with a message for
    the window, e.g. when the port is taken."""
    from ..server.run import serve_engine
    from ..server.settings import ServeSettings
    settings = ServeSettings(model=str(engine.model.path), host="127.0.0.1", port=port,
                             graceful_shutdown_s=GRACE_S, log_level="warning")
    try:
        return serve_engine(engine, settings)
    except ErnieEdgeError as e:
        raise ErnieEdgeError(f"The local API server could not start: {e} (Settings → API server port).") from None


def api_url(server: "RunningServer") -> str:
    """The base URL an OpenAI client needs."""
    return server.url + "/v1"
