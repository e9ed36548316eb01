"""Every numba option of ernie-edge in one place (the stumpy habit).

Import this module before any kernel: it fixes the on-disk cache directory, the threading layer
and the OpenMP wait policy, which must be chosen before numba starts its thread pool.

- `JIT` / `PARALLEL`: the options every `@njit` in kernels/ uses. fastmath keeps `reassoc` and
  `contract` (needed to vectorise reductions and to fuse multiply-adds) but not `nnan` / `ninf`,
  because the attention softmax relies on -inf and exp(-inf) = 0.
- Cache: `cache=True`; compiled kernels go to $NUMBA_CACHE_DIR, by default
  `<platformdirs user cache>/ernie-edge/numba` (site-packages may be read-only).
- Threads: GNU OpenMP; workers spin briefly, then sleep (GOMP_SPINCOUNT=10000, ~100 µs): fully
  spinning workers stall every region when another process holds a core (a descheduled spinner),
  and fully passive ones pay a wake-up per region (~15 ms per token). Kernels are written as few,
  coarse parallel regions. OMP_WAIT_POLICY or GOMP_SPINCOUNT set in the environment before the
  import win (the test suite uses OMP_WAIT_POLICY=passive).
- Code generation, fixed when this module is imported and baked into every compiled kernel:
  `SIMD`, the integer path: "avxvnni" when the CPU has AVX-VNNI or AVX512-VNNI (vpdpwssd,
  vpdpbusd), else "avx2" when it has AVX2+FMA+F16C (x86-64 since 2013), else "generic" (portable
  LLVM vector IR: ARM, old x86). ERNIE_EDGE_SIMD=generic|avx2|avxvnni picks one explicitly (a
  path the CPU lacks falls back to the best it has). `AVX512` (register tiles of 512-bit
  vectors) and `VNNI512` follow from it; `PREFETCH_LOCALITY` is the one software-prefetch policy.
  Compiled kernels are cached per path and per version of the kernel sources (a subfolder of
  the cache dir), since all of them are baked in.
"""

from __future__ import annotations

import hashlib
import os
import platform

import platformdirs

if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"  # spin ~100 µs, then sleep (see above)
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(platformdirs.user_cache_dir("ernie-edge"), "numba"))

import llvmlite.binding as _llvm  # noqa: E402
import numba  # noqa: E402

# numba reads these at import; if numba was imported before us, set them on its config directly.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "omp"

_FASTMATH = {"reassoc", "contract", "nsz", "arcp", "afn"}
JIT = dict(nogil=True, cache=True, fastmath=_FASTMATH, error_model="numpy", boundscheck=False)
PARALLEL = dict(JIT, parallel=True)
_llvm.initialize_native_asmparser()  # inline asm in kernels/dot512.py
_FEATURES = _llvm.get_host_cpu_features()


def _host_paths() -> list[str]:
    """SIMD paths this CPU supports, best first."""
    f = _FEATURES
    paths = []
    if f.get("avx2") and f.get("fma") and f.get("f16c"):
        if f.get("avxvnni") or (f.get("avx512vnni") and f.get("avx512vl")):
            paths.append("avxvnni")
        paths.append("avx2")
    paths.append("generic")
    return paths


def _choose_simd() -> str:
    paths = _host_paths()
    wanted = os.environ.get("ERNIE_EDGE_SIMD", "").strip().lower()
    if wanted in paths:
        return wanted
    if wanted == "avxvnni" and "avx2" in paths:
        return "avx2"
    return paths[0]


def _kernels_digest() -> str:
    """Short hash of every module in kernels/: numba's cache only tracks the file of each cached
    function, not the files of the intrinsics and functions it inlines or calls, so a change there
    would otherwise keep serving stale machine code from the cache."""
    here = os.path.dirname(__file__)
    h = hashlib.sha256()
    for name in sorted(os.listdir(here)):
        if name.endswith(".py"):
            with open(os.path.join(here, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()[:10]


SIMD = _choose_simd()
F16C = SIMD != "generic"  # the x86 paths require F16C (vcvtph2ps), see _host_paths
# Register tiles of 512-bit vectors (AVX-512's 32 registers) only on the host's own best path: a
# path forced below it (ERNIE_EDGE_SIMD=avx2) is tiled as on an AVX2-only CPU.
AVX512 = SIMD != "generic" and SIMD == _host_paths()[0] and bool(_FEATURES.get("avx512f"))
VNNI512 = SIMD == "avxvnni" and AVX512 and bool(_FEATURES.get("avx512vnni"))  # 512-bit vpdpbusd
# llvm.prefetch locality of every software prefetch: 2 = prefetcht1, into L2. Into L1 the lines
# prefetched ahead pushed out the lines being read.
PREFETCH_LOCALITY = 2
IS_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")  # has `pause` (simd.spin_pause)
CACHE_ROOT = os.environ["NUMBA_CACHE_DIR"]  # as this process found it (a helper process is given the same)
numba.config.CACHE_DIR = os.path.join(CACHE_ROOT, f"{SIMD}-{_kernels_digest()}")


def _lock_cache_saves() -> None:
    """numba names a new cache entry's file from the index it has just read, so two processes saving
    new entries of one function at the same instant could pick the same file. The warm-up's helper
    process (kernel_warmup.py) compiles beside this one: each save holds an exclusive lock on its
    cache folder (POSIX; elsewhere the warm-up runs no helper)."""
    try:
        import fcntl
    except ImportError:
        return
    from numba.core import caching

    save = caching.IndexDataCacheFile.save
    if getattr(save, "locked", False):
        return

    def locked_save(self, key, data):
        with open(os.path.join(self._cache_path, ".save-lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return save(self, key, data)  # closing the file releases the lock

    locked_save.locked = True
    caching.IndexDataCacheFile.save = locked_save


_lock_cache_saves()


def njit(**extra):
    """`numba.njit` with the project's options (`JIT`), plus any `extra` (e.g. parallel=True)."""
    return numba.njit(**dict(JIT, **extra))


def pnjit(**extra):
    """`numba.njit` with the project's parallel options (`PARALLEL`)."""
    return numba.njit(**dict(PARALLEL, **extra))


def max_threads() -> int:
    """The number of threads numba started with (NUMBA_NUM_THREADS, default: CPU count)."""
    return int(numba.config.NUMBA_NUM_THREADS)


_threads: list[int] = []  # the value set_threads() last set (numba's own getter costs ~5 µs a call)


def set_threads(n: int) -> int:
    """Use `n` threads in the parallel kernels (clipped to 1..max_threads()); returns the value set.
    Set threads through this function (not numba.set_num_threads): get_threads() remembers it."""
    n = max(1, min(int(n), max_threads()))
    numba.set_num_threads(n)
    _threads[:] = [n]
    return n


def get_threads() -> int:
    """The kernels' thread count (called before every parallel kernel, so it is cached)."""
    if not _threads:
        _threads.append(int(numba.get_num_threads()))
    return _threads[0]


# ---- BLAS threads and the prefill worker pool ----------------------------------------------------
# The prefill matmuls call numpy's OpenBLAS between numba kernels. OpenBLAS worker threads spin for
# a long time after each call, which stalls numba's threads and any other process. So the prefill
# runs OpenBLAS single-threaded inside our own workers, which never spin.

def _openblas_setter():
    """ctypes handle of openblas_set_num_threads in numpy's bundled OpenBLAS, or None."""
    import ctypes
    import glob

    import numpy as np

    libs = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    for path in glob.glob(os.path.join(libs, "*openblas*")):
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads"):
            fn = getattr(lib, name, None)
            if fn is not None:
                return fn
    return None


_blas_state: dict = {}


def single_threaded_blas() -> None:
    """Make numpy's BLAS use one thread from now on (threadpoolctl if installed, else OpenBLAS via
    ctypes; if neither is found, set OPENBLAS_NUM_THREADS=1 before starting Python)."""
    if _blas_state.get("done"):
        return
    _blas_state["done"] = True
    try:
        import threadpoolctl

        _blas_state["limiter"] = threadpoolctl.threadpool_limits(1, user_api="blas")
        return
    except ImportError:
        pass
    setter = _openblas_setter()
    if setter is not None:
        setter(1)


def worker_pool():
    """The prefill thread pool (max_threads() workers, created on first use, never spinning)."""
    if "pool" not in _blas_state:
        from concurrent.futures import ThreadPoolExecutor

        _blas_state["pool"] = ThreadPoolExecutor(max_workers=max_threads(), thread_name_prefix="ernie-prefill")
    return _blas_state["pool"]
