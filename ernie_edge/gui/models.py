"""Models the app can open: converted folders in the models store, what one needs in memory, and
how to name a model on the command line. No Qt."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil

from ..paths import models_dir

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class StoredModel:
    name: str
    path: Path


def list_models(store: Path | None = None) -> list[StoredModel]:
    """Converted model folders (with a manifest) in the models store, by name."""
    store = store or models_dir()
    if not store.is_dir():
        return []
    return [StoredModel(p.name, p) for p in sorted(store.iterdir())
            if p.is_dir() and not p.name.endswith(".partial") and (p / MANIFEST).is_file()]


def resolve_model_arg(text: str) -> str:
    """`--model PATH|NAME`: an existing path as given, else a folder of that name in the store."""
    path = Path(text).expanduser()
    if path.exists():
        return str(path.resolve())
    named = models_dir() / text
    return str(named) if named.is_dir() else text


def memory_estimate(path: str | Path, context: int) -> str:
    """What loading `path` with `context`-token KV caches will take, against this computer's
    memory, in a few lines for the model picker. Raises ErnieEdgeError for a bad folder."""
    from ..manifest import describe, format_size  # the runtime (numba): not needed to show the window
    from .backends import ENGINE_SLOTS, KEPT_CACHES
    info = describe(path)
    mem = info["memory"]
    dense = mem["resident_dense_bytes"]
    experts = mem["expert_bytes_total"]
    caches = ENGINE_SLOTS + KEPT_CACHES  # the engine checks that all of them fit at the full context
    kv = mem["kv_bytes_per_1k_tokens"] * max(context, 1) / 1000 * caches
    vm = psutil.virtual_memory()
    if dense + kv + experts <= vm.available:
        verdict = "Fits in the free memory: all weights stay in RAM."
    elif dense + kv <= vm.available:
        verdict = ("Runs, but not all experts fit in the free memory: they are read from disk as "
                   "needed, which is slower.")
    else:
        verdict = "Likely too large for this computer's free memory."
    n = info["parameters"]
    params = f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"
    return (f"On disk {format_size(info['total_bytes'])} · {params} parameters · "
            f"{info['bits_per_weight']:.2f} bits/weight\n"
            f"Memory: {format_size(dense)} dense weights + {format_size(experts)} experts (mapped, paged "
            f"in as used) + up to {format_size(kv)} KV cache ({caches} caches of {context} tokens, "
            f"filled as used)\n"
            f"This computer: {format_size(vm.total)} RAM, {format_size(vm.available)} free. {verdict}")
