"""`Model`: the public face of a loaded ERNIE model, whatever its storage or backend.

    model = ernie_edge.load(path)
    model.logits(ids)                      # [T, V] float32, full prefill from position 0, no state
    cache = model.new_cache()
    last = model.prefill(prompt_ids, cache)  # [V] logits after the prompt
    nxt = model.decode(token_id, cache)      # [V] logits after one more token
    rows = model.decode_batch([t1, t2], [cache1, cache2])  # [2, V]: one step of two sequences
"""

from __future__ import annotations

import os

import numpy as np

from .config import ErnieConfig
from .errors import ContextLengthError, ErnieEdgeError
from .model_dir import ModelLocation, resolve
from .reference import ReferenceModel, RoutingTrace


class Model:
    """A loaded model. Not thread-safe: one generation at a time per cache (the engine serialises)."""

    def __init__(self, location: ModelLocation, weights, backend):
        self.location = location
        self.path = location.path
        self.weights = weights
        self.config: ErnieConfig = weights.config
        self.backend = backend  # ReferenceModel (numpy spec), CpuModel (numba kernels) or CudaModel (numba.cuda)
        self.backend_name = "reference" if isinstance(backend, ReferenceModel) else getattr(backend, "backend_name",
                                                                                              "cpu")
        self.placement = getattr(backend, "plan", None)  # placement.Plan of a CUDA model
        self._tokenizer = None
        self._chat_template = None

    # ---- tokens in, logits out -----------------------------------------------------------------

    def new_cache(self, start_position: int = 0):
        """An empty KV cache for prefill/decode. start_position > 0 makes the first token sit at
        that position with nothing before it (for tests of long-range positions)."""
        if not 0 <= start_position < self.config.max_position_embeddings:
            raise ErnieEdgeError(f"start_position {start_position} is outside the context "
                                 f"[0, {self.config.max_position_embeddings})")
        return self.backend.new_cache(start_position)

    def forward(self, token_ids, cache, trace: RoutingTrace | None = None) -> np.ndarray:
        """Run new tokens after what the cache holds; returns final-normed hidden states [T, H]."""
        ids = self._check_ids(token_ids, cache.length)
        return self.backend.forward(ids, cache, trace)

    def prefill(self, token_ids, cache, trace: RoutingTrace | None = None) -> np.ndarray:
        """Feed a prompt (or the next chunk of one); returns the logits of its last token [V]."""
        hidden = self.forward(token_ids, cache, trace)
        return self.backend.logits(hidden[-1:])[0]

    def decode(self, token_id: int, cache, trace: RoutingTrace | None = None) -> np.ndarray:
        """Feed one token; returns the next-token logits [V]."""
        return self.prefill([token_id], cache, trace)

    def decode_batch(self, token_ids, caches) -> np.ndarray:
        """Feed one token to each of B sequences, token_ids[b] after what caches[b] holds; returns
        the next-token logits [B, V]. The weights are read once for all B. Row b does not depend on
        the other sequences in the batch: it has the same bits as decode_batch([t], [cache])."""
        caches = list(caches)
        if len(caches) != len(token_ids) or not caches:
            raise ErnieEdgeError(f"decode_batch: {len(token_ids)} tokens for {len(caches)} caches; "
                                 "give one token per cache (at least one)")
        ids = [int(self._check_ids([t], c.length)[0]) for t, c in zip(token_ids, caches)]
        if hasattr(self.backend, "decode_batch"):
            return self.backend.decode_batch(ids, caches)
        return np.stack([self.decode(t, c) for t, c in zip(ids, caches)])

    def logits(self, token_ids, trace: RoutingTrace | None = None) -> np.ndarray:
        """Full prefill from position 0 with a fresh cache: float32 [T, vocab]. Keeps no state."""
        hidden = self.forward(token_ids, self.new_cache(), trace)
        return self.backend.logits(hidden).astype(np.float32, copy=False)

    def warmup(self, progress=None) -> float:
        """Compile (first run) or load (from numba's on-disk cache) every kernel the model's
        requests use, through a throwaway pass; returns the seconds it took. progress: called with
        a kernel_warmup.WarmupProgress as each kernel starts compiling."""
        from .kernel_warmup import warm_up
        return warm_up(self, progress)

    # ---- text ----------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        """The model's tokenizer (loaded on first use from the model folder)."""
        if self._tokenizer is None:
            from .tokenizer import Tokenizer
            self._tokenizer = Tokenizer.from_dir(self.path)
        return self._tokenizer

    @property
    def chat_template(self):
        """The model's chat template (its own, sandboxed; the built-in ERNIE one if it has none)."""
        if self._chat_template is None:
            from .chat_template import ChatTemplate
            self._chat_template = ChatTemplate.from_model_dir(self.path)
        return self._chat_template

    # ---- checks --------------------------------------------------------------------------------

    def _check_ids(self, token_ids, start: int) -> np.ndarray:
        try:
            ids = np.asarray(token_ids)
        except (TypeError, ValueError):
            raise ErnieEdgeError("token_ids: expected a sequence of integers") from None
        if ids.ndim != 1 or ids.size == 0:
            raise ErnieEdgeError(f"token_ids: expected a non-empty 1-D sequence, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ErnieEdgeError(f"token_ids: expected integers, got dtype {ids.dtype}")
        bad = (ids < 0) | (ids >= self.config.vocab_size)
        if bad.any():
            j = int(np.argmax(bad))
            raise ErnieEdgeError(f"token_ids[{j}] = {int(ids[j])} is outside the vocabulary "
                                 f"[0, {self.config.vocab_size})")
        end = start + ids.size
        if end > self.config.max_position_embeddings:
            raise ContextLengthError(f"{end} tokens (cache {start} + {ids.size} new) exceed the model's "
                                     f"context of {self.config.max_position_embeddings}")
        return ids.astype(np.int64)


BACKENDS = ("auto", "cpu", "reference")
KV_DTYPES = ("f16", "i8")  # kernels/attention.py's cache formats (not imported here: no numba for the reference)
PREFILL_ACTS = ("i8", "i16")  # cpu_model.PREFILL_ACTS (the rounding choices of decode_acts too)


def load(path: str | os.PathLike, *, backend: str = "auto", use_correction_bias: bool = True,
         threads: int | None = None, max_context: int | None = None, prefetch: bool = True,
         kv_dtype: str = "f16", device: str = "cpu", gpu_experts: str | int | None = None,
         prefill_acts: str = "i8", decode_acts: str = "i8", log=None) -> Model:
    """Load a model from a converted edge folder, an HF checkpoint folder, or an HF repo id in the
    local cache. Validates everything it maps; raises ErnieEdgeError with the file and reason.

    backend: "cpu" (numba kernels; converted folders only), "reference" (the numpy fp32 spec; any
    folder, slow), or "auto" (cpu for converted folders, reference for HF checkpoints).
    threads: kernel threads (default: all cores). max_context: cap the KV cache (default: the
    model's 131072). prefetch: map a converted model's weights up front when they fit in free
    memory (otherwise they are paged in as used). kv_dtype: "f16" (default) or "i8" KV cache
    for the cpu backend: int8 takes half the memory of fp16 and decodes faster at long contexts, at
    some accuracy (KLD vs f16 in benchmarks/results/attention.json), so opt-in. prefill_acts: how
    the cpu backend's prefill rounds activations: "i8" (default: int8 per block of 32, the fast
    kernels/qbatch8.py) or "i16" (int16 and exact float32: about half the prompt speed, closer to
    the float model; cpu_model.PREFILL_ACTS). decode_acts: the same choice for the cpu backend's
    decode (one token, and the engine's batched step): "i8" (default: int8 per block of 32,
    kernels/dot8.py, ~20 % faster matvecs; each token's row the same bits as the prefill tiles give it)
    or "i16" (int16: KLD ~2e-5 against the float model instead of ~1e-3).
    device: "cpu" (default), "cuda" (an NVIDIA GPU through numba.cuda) or "auto" (the GPU when there
    is a usable one). gpu_experts: with a GPU, the MoE layers whose routed experts go on it: "all",
    "none", N (the first N), or None (as many as fit in free GPU memory). The placement and its
    memory estimate are printed (to `log`, default stderr) before loading; with no usable GPU the
    reason is printed and the model runs on the CPU (ernie_edge/placement.py)."""
    if backend not in BACKENDS:
        raise ErnieEdgeError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    from .placement import check_device, parse_gpu_experts
    check_device(device)
    gpu_experts = parse_gpu_experts(gpu_experts)
    if device != "cpu" and backend != "auto":
        raise ErnieEdgeError(f"device {device!r} needs backend 'auto' (backend {backend!r} runs on the CPU)")
    location = resolve(path)
    if location.kind == "hf" and device == "cuda":
        raise ErnieEdgeError(f"{location.path}: the CUDA backend runs converted models; run `ernie-edge convert` first")
    if location.kind == "hf":
        if backend == "cpu":
            raise ErnieEdgeError(f"{location.path}: the cpu backend runs converted models; run "
                                 "`ernie-edge convert` first (or use backend='reference')")
        from .hf_checkpoint import HFCheckpoint
        weights = HFCheckpoint(location.path)
    else:
        from .edge_checkpoint import EdgeCheckpoint
        weights = EdgeCheckpoint(location.path)
    if kv_dtype not in KV_DTYPES:
        raise ErnieEdgeError(f"kv_dtype {kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
    for name, acts in (("prefill_acts", prefill_acts), ("decode_acts", decode_acts)):
        if acts not in PREFILL_ACTS:
            raise ErnieEdgeError(f"{name} {acts!r} is not one of {', '.join(PREFILL_ACTS)}")
    plan = _plan(weights, device, gpu_experts, max_context, log) if location.kind == "edge" and device != "cpu" else None
    if plan is not None and plan.device == "cuda":
        if kv_dtype != "f16":
            raise ErnieEdgeError(f"kv_dtype {kv_dtype!r}: the CUDA backend keeps an f16 KV cache")
        from .cuda_model import CudaModel
        from .kernels._jit import set_threads
        if threads:
            set_threads(threads)  # the CPU kernels of routed experts placed on the CPU
        impl = CudaModel(weights, plan, use_correction_bias=use_correction_bias, max_context=max_context)
        if plan.cpu_expert_layers and prefetch:
            weights.prefetch()
    elif location.kind == "edge" and backend in ("auto", "cpu"):
        from .cpu_model import CpuModel
        from .kernels._jit import set_threads
        if threads:
            set_threads(threads)
        impl = CpuModel(weights, use_correction_bias=use_correction_bias, max_context=max_context,
                        kv_dtype=kv_dtype, prefill_acts=prefill_acts, decode_acts=decode_acts)
        if prefetch:
            weights.prefetch()
    else:
        if kv_dtype != "f16":
            raise ErnieEdgeError(f"kv_dtype {kv_dtype!r} needs the cpu backend (a converted model)")
        impl = ReferenceModel(weights, use_correction_bias=use_correction_bias)
    return Model(location, weights, impl)


def _plan(weights, device: str, gpu_experts, max_context: int | None, log):
    """The placement of a converted model on this machine, printed before anything is uploaded."""
    import sys

    from .placement import DEFAULT_CONTEXT, model_sizes, plan_placement, probe_gpu
    gpu, why = probe_gpu()
    plan = plan_placement(model_sizes(weights), device, gpu_experts, gpu, why, context=max_context or DEFAULT_CONTEXT)
    (log or (lambda text: print(text, file=sys.stderr, flush=True)))(plan.describe())
    return plan
