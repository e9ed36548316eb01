"""Errors a user can hit. Each says what went wrong, where (file / field / tensor), and what to do.

The CLI turns any `ErnieEdgeError` into a one-paragraph message and exit code 2 ("bad input");
everything else is a bug and keeps its traceback.
"""


class ErnieEdgeError(Exception):
    """Base class for every error caused by input the user gave us (files, settings, requests)."""


class ConfigError(ErnieEdgeError):
    """config.json is missing, unreadable, for another architecture, or inconsistent."""


class CheckpointError(ErnieEdgeError):
    """A checkpoint file (safetensors shard, index, manifest) is missing, corrupt or unexpected."""


class ModelNotFoundError(ErnieEdgeError):
    """A model path or repo id could not be resolved to a folder on this machine."""


class ContextLengthError(ErnieEdgeError):
    """A prompt plus the requested generation does not fit the context."""


def one_line(error: BaseException) -> str:
    """An error as one line for the user: "FILE: reason" for OS errors, else its message."""
    if isinstance(error, OSError) and error.strerror:
        text = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())
