"""Small native kernels for the embedded engine, compiled for the running CPU on first use.

`bf16_linear(x, w)`: y = x @ w.T with x fp32 [M, K] and w BF16 [N, K], products and sums in
fp32. For a weight whose values are BF16 numbers (the lm_head of every qatctl checkpoint), this
reads half the bytes of the fp32 matmul and gives the same products; only the summation order
differs (a fixed one). The weight is packed once ([N/16, K, 16]: 16 output columns side by side)
and every output is one fp32 fma chain over k in order, computed by one thread, so a row's result
does not depend on M, on the other rows or on the thread count: the engine stays batch-invariant.

The C source below is compiled with the system C compiler (`cc -O3 -march=native -fopenmp`)
into a cache folder keyed by the source, the compiler and the CPU's flags, so a machine with other
SIMD gets its own build and an older CPU never runs code built for a newer one. Without a
compiler, when the build fails, or with QATCTL_NO_NATIVE=1, `available()` is False and the engine
keeps its pure-torch path (oneDNN fp32 lm_head); `engine.info()` says which ran.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

import torch

log = logging.getLogger("qatctl.kernels")

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* y[m*N + n] = sum_k x[m*K + k] * w[n, k] with w packed as [ceil(N/16)][K][16] BF16 (16 output
   columns side by side). Every output is one fp32 fma chain over k = 0..K-1, in that order, by one
   thread: the same bits whatever M, the other rows or the thread count. */
void qatctl_bf16_linear(const float *x, const uint16_t *wp, float *y, int64_t M, int64_t N, int64_t K,
                        int nthreads) {
    const int64_t NB = (N + 15) / 16;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t nb = 0; nb < NB; nb++) {
        const uint16_t *wb = wp + nb * K * 16;
        const int64_t cols = N - nb * 16 < 16 ? N - nb * 16 : 16;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) {
            float a0[16] = {0}, a1[16] = {0}, a2[16] = {0}, a3[16] = {0};
            const float *x0 = x + m * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
            for (int64_t k = 0; k < K; k++) {
                float wv[16];
                for (int j = 0; j < 16; j++) wv[j] = bf16_to_f32(wb[k * 16 + j]);
                for (int j = 0; j < 16; j++) {
                    a0[j] = fmaf(x0[k], wv[j], a0[j]);
                    a1[j] = fmaf(x1[k], wv[j], a1[j]);
                    a2[j] = fmaf(x2[k], wv[j], a2[j]);
                    a3[j] = fmaf(x3[k], wv[j], a3[j]);
                }
            }
            for (int64_t j = 0; j < cols; j++) {
                y[m * N + nb * 16 + j] = a0[j];
                y[(m + 1) * N + nb * 16 + j] = a1[j];
                y[(m + 2) * N + nb * 16 + j] = a2[j];
                y[(m + 3) * N + nb * 16 + j] = a3[j];
            }
        }
        for (; m < M; m++) {
            float a0[16] = {0};
            const float *x0 = x + m * K;
            for (int64_t k = 0; k < K; k++) {
                float wv[16];
                for (int j = 0; j < 16; j++) wv[j] = bf16_to_f32(wb[k * 16 + j]);
                for (int j = 0; j < 16; j++) a0[j] = fmaf(x0[k], wv[j], a0[j]);
            }
            for (int64_t j = 0; j < cols; j++) y[m * N + nb * 16 + j] = a0[j];
        }
    }
}
"""
_lib = None
_tried = False


def _cpu_flags() -> str:
    try:
        return next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split(":", 1)[1].strip()
    except (OSError, StopIteration):
        import platform

        return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("QATCTL_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                                          "qatctl")
    return Path(root) / "kernels"


def _load():
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("QATCTL_NO_NATIVE") == "1":
        log.info("native kernels off (QATCTL_NO_NATIVE=1)")
        return None
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        log.info("no C compiler: native kernels unavailable")
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\n".join([SOURCE, cc, version, _cpu_flags()]).encode()).hexdigest()[:16]
        so = _cache_dir() / f"qatctl_kernels_{key}.so"
        if not so.is_file():
            so.parent.mkdir(parents=True, exist_ok=True)
            src = so.with_suffix(f".{os.getpid()}.c")  # per process: concurrent first uses never share a file
            src.write_text(SOURCE)
            tmp = so.with_suffix(f".{os.getpid()}.tmp")
            subprocess.run([cc, "-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", str(src),
                            "-o", str(tmp), "-lm"],
                           check=True, capture_output=True, timeout=300)
            os.replace(tmp, so)  # atomic: a concurrent build never loads half a file
            src.unlink(missing_ok=True)
        lib = ctypes.CDLL(str(so))
        fn = lib.qatctl_bf16_linear
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_int64, ctypes.c_int]
        fn.restype = None
        _lib = lib
        log.info("native kernels: %s", so)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("native kernels unavailable (%s); the engine uses its pure-torch path", e)
    return _lib


def available() -> bool:
    return _load() is not None


def pack_bf16(w: torch.Tensor) -> torch.Tensor:
    """BF16 [N, K] -> [ceil(N/16), K, 16]: 16 output columns side by side (zero-padded)."""
    N, K = w.shape
    pad = (-N) % 16
    wb = w.to(torch.bfloat16)
    if pad:
        wb = torch.cat([wb, wb.new_zeros(pad, K)])
    return wb.view(-1, 16, K).transpose(1, 2).contiguous()


def bf16_linear(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """x fp32 [..., K] @ w.T for w packed by pack_bf16 (n output features) -> fp32 [..., n]."""
    lib = _load()
    if lib is None:
        raise RuntimeError("native kernels are unavailable")
    flat = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
    M, K = flat.shape
    if packed.dtype != torch.bfloat16 or packed.shape[1:] != (K, 16) or packed.device.type != "cpu":
        raise ValueError("bf16_linear: the weight must be pack_bf16's CPU [N/16, K, 16] BF16 tensor")
    y = torch.empty(M, n, dtype=torch.float32)
    lib.qatctl_bf16_linear(flat.data_ptr(), packed.data_ptr(), y.data_ptr(), M, n, K, torch.get_num_threads())
    return y.reshape(*x.shape[:-1], n)
