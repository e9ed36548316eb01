"""Routed-expert decode kernels reading DRAM-resident, randomly chosen experts: the committed
(git HEAD) kernels against the working tree's, interleaved in one process.

    .venv/bin/python benchmarks/experts_dram.py [--layers 9] [--rounds 10] [--rev HEAD] [--mmap]

Banks have the real shapes (64 experts, gate/up [64, 1536, 1280] u8, down [64, 2560, 768] u8,
fp16 scales, G = 32) and hold random int4 codes; `--layers` layers of gate + up + down banks
(9 layers = 27 banks = 3.8 GB, far above the 480 MB L3) are visited in turn with a fresh random
set of 6 experts per layer, as a decode step does. Prints GB/s of weight + scale bytes for
gate_up and down separately, for "dram" (random experts, rotating over all banks) and "cached"
(the same 6 experts of one layer over and over), old vs new: median (and best) per-call figures
over --rounds sweeps. HEAD against itself reads within +-8 % on the shared VM: treat smaller
differences as noise. Each call includes its fixed cost (~95 us of it waking the passive OpenMP
worker, see kernels/_jit.py), which is 8-15 % of a DRAM-resident call.
"""

from __future__ import annotations

import argparse
import importlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from _machine import machine_load  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
E, K_ROUTED, H, I_EXP, G = 64, 6, 2560, 1536, 32


def load_old_q8(rev: str):
    """ernie_edge.kernels.q8 as of git `rev` (that commit's whole kernels/ package, extracted to a
    temporary folder and imported as `oldkern`)."""
    tar = subprocess.run(["git", "archive", rev, "ernie_edge/kernels"], cwd=ROOT, capture_output=True,
                         check=True).stdout
    tmp = Path(tempfile.mkdtemp(prefix="oldkern_"))
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(tmp)
    (tmp / "ernie_edge" / "kernels").rename(tmp / "oldkern")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("oldkern.q8"), tmp


def make_layer(rng):
    """One layer's (gate, gate scales, up, up scales, down, down scales) banks of random int4."""
    def bank(o, k):
        w = rng.integers(0, 256, size=(E, o, k // 2), dtype=np.uint8)
        s = (rng.random((E, o, k // G), dtype=np.float32) * 0.01 + 0.001).astype(np.float16)
        return w, s
    return (*bank(I_EXP, H), *bank(I_EXP, H), *bank(H, I_EXP))


def to_mmap(layers, folder: Path):
    """The banks written to files in `folder` and memory-mapped read-only (4 KiB page-cache pages,
    as the model's safetensors banks are), instead of anonymous (transparent huge page) memory."""
    mapped = []
    for i, layer in enumerate(layers):
        views = []
        for k, a in enumerate(layer):
            path = folder / f"bank_{i}_{k}.bin"
            a.tofile(path)
            views.append(np.memmap(path, dtype=a.dtype, mode="r", shape=a.shape))
        mapped.append(tuple(views))
    for layer in mapped:  # read once, so the page cache holds them (warm mmap)
        for v in layer:
            np.bitwise_xor.reduce(v.reshape(-1).view(np.uint64))
    return mapped


def layer_bytes(layer):
    gw, gs, uw, us, dw, ds = layer
    per = lambda a: a[0].nbytes * K_ROUTED  # noqa: E731
    return per(gw) + per(gs) + per(uw) + per(us), per(dw) + per(ds)


def sweep(q8mod, layers, ids_list, x, h, weights, out_h, out, act_x, act_h):
    """One pass over all layers; returns (per-call seconds of gate_up, of down)."""
    t_gu, t_dn = [], []
    for layer, (ids_g, ids_d) in zip(layers, ids_list):
        gw, gs, uw, us, dw, ds = layer
        t0 = time.perf_counter()
        q8mod.experts_gate_up_silu(x, gw, gs, uw, us, ids_g, out_h, act_x, 4)
        t1 = time.perf_counter()
        q8mod.experts_down_weighted(h, dw, ds, ids_d, weights, out, act_h, 4)
        t2 = time.perf_counter()
        t_gu.append(t1 - t0)
        t_dn.append(t2 - t1)
    return t_gu, t_dn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=9)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--mmap", action="store_true", help="read the banks from warm memory-mapped files")
    args = ap.parse_args()

    from ernie_edge.kernels import q8 as new_q8
    old_q8, tmp = load_old_q8(args.rev)
    try:
        rng = np.random.default_rng(0)
        print(f"making {args.layers} layers of banks ...", flush=True)
        layers = [make_layer(rng) for _ in range(args.layers)]
        if args.mmap:
            layers = to_mmap(layers, tmp)
        total = sum(a.nbytes for L in layers for a in L)
        gu_bytes, dn_bytes = layer_bytes(layers[0])
        print(f"{3 * args.layers} banks, {total / 1e9:.2f} GB; per call gate_up {gu_bytes / 1e6:.1f} MB, "
              f"down {dn_bytes / 1e6:.1f} MB; load {machine_load()}", flush=True)

        x = rng.standard_normal(H).astype(np.float32)
        h = rng.standard_normal((K_ROUTED, I_EXP)).astype(np.float32)
        weights = rng.random(K_ROUTED).astype(np.float32)
        out_h = np.empty((K_ROUTED, I_EXP), np.float32)
        out = np.empty(H, np.float32)
        act_x = new_q8.ActScratch(H)
        act_h = new_q8.ActScratch(I_EXP, rows=K_ROUTED)
        act_x_old = old_q8.ActScratch(H)
        act_h_old = old_q8.ActScratch(I_EXP, rows=K_ROUTED)
        impls = {"old": (old_q8, act_x_old, act_h_old), "new": (new_q8, act_x, act_h)}

        # same results (both compile here too)
        ids = rng.choice(E, K_ROUTED, replace=False)
        res = {}
        for name, (mod, ax, ah) in impls.items():
            a = mod.experts_gate_up_silu(x, *layers[0][:4], ids, np.empty_like(out_h), ax, 4)
            b = mod.experts_down_weighted(h, *layers[0][4:], ids, weights, np.empty_like(out), ah, 4)
            res[name] = (a, b)
        print("results identical:", all(np.array_equal(p, q) for p, q in zip(res["old"], res["new"])), flush=True)

        times = {(n, c, k): [] for n in impls for c in ("dram", "cached") for k in ("gu", "dn")}
        for _ in range(args.rounds):
            for name, (mod, ax, ah) in impls.items():
                ids_list = [(rng.choice(E, K_ROUTED, replace=False), rng.choice(E, K_ROUTED, replace=False))
                            for _ in layers]
                t_gu, t_dn = sweep(mod, layers, ids_list, x, h, weights, out_h, out, ax, ah)
                times[name, "dram", "gu"] += t_gu
                times[name, "dram", "dn"] += t_dn
                same = [layers[0]] * 4
                fixed = [(ids, ids)] * 4
                sweep(mod, same, fixed, x, h, weights, out_h, out, ax, ah)  # warm the cache
                t_gu, t_dn = sweep(mod, same, fixed, x, h, weights, out_h, out, ax, ah)
                times[name, "cached", "gu"] += t_gu
                times[name, "cached", "dn"] += t_dn

        print(f"load after: {machine_load()}")
        print(f"GB/s of weight + scale bytes per call, median (best) over {args.rounds} rounds")
        print(f"{'case':16s} {'old':>14s} {'new':>14s} {'median ratio':>12s}")
        for case in ("dram", "cached"):
            for k, nbytes in (("gu", gu_bytes), ("dn", dn_bytes)):
                o, n = (nbytes / np.median(times[v, case, k]) / 1e9 for v in ("old", "new"))
                ob, nbst = (nbytes / np.min(times[v, case, k]) / 1e9 for v in ("old", "new"))
                label = f"{case} {'gate_up' if k == 'gu' else 'down'}"
                print(f"{label:16s} {o:6.2f} ({ob:5.2f}) {n:6.2f} ({nbst:5.2f}) {n / o:12.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
