"""Small native kernels for the embedded engine (native.c), compiled for the running CPU on first use.

`int4_linear(x, w)`: the W4A16 linear. y = bf16(x) @ (q * scale).T rounded to BF16, the weight
kept 4-bit ([N/16, K/2, 16] nibbles + fp32 scales). On AVX512-BF16 CPUs it runs vdpbf16ps on
nibbles expanded to BF16 by one permute; on AVX2 fp32 FMAs; else plain C. All three compute each
output as the same chain of fused multiply-adds (native.c says which), so they agree bit for bit.

`bf16_linear(x, w)`: y = x @ w.T with x fp32 [M, K] and w BF16 [N, K], products and sums in
fp32. For a weight whose values are BF16 numbers (the lm_head of every qatctl checkpoint), this
reads half the bytes of the fp32 matmul and gives the same products; only the summation order
differs (a fixed one).

`w16a16_linear(x, w)`: the dense BF16 linear of an exact BF16 engine: int4_linear's arithmetic
(BF16 activations, the same fp32 chain per output, BF16 out) on a dense BF16 weight read as it is
([N/16, K/2, 16, 2]), so that engine is batch-invariant and exact as the INT4 one is.

`DecodePlan`: a decode step of a dense Llama / Qwen3 model whose linears all run int4_linear (or all
w16a16_linear), as one
native call (`qatctl_decode`): every layer (norms, RoPE, KV write, attention over each row's own
positions, residuals) and then the final norm and the BF16-read lm_head, instead of ~40 torch ops
per layer. The engine's prefill is the same call over a prompt's tokens (its exact prefill); MoE models
and the fallback keep the torch forward (qatctl/engines/embedded.py).

Every output of each kernel is one fixed fp32 chain computed by one thread, so a row's result does
not depend on M, on the other rows or on the thread count: the engine stays batch-invariant.

native.c is compiled with the system C compiler (`cc -O3 -march=native -fopenmp`) into a cache
folder keyed by the source, the compiler, the CPU's flags and any extra flags, so a machine with
other SIMD gets its own build and an older CPU never runs code built for a newer one. Without a
compiler, when the build fails, or with QATCTL_NO_NATIVE=1, `available()` is False and the engine
keeps its pure-torch path (torch's int4 kernel, oneDNN fp32 lm_head); `engine.info()` says which ran.
`library(extra_flags)` builds a variant (e.g. "-mno-avx512f" for the AVX2 path) for tests and benches.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("qatctl.kernels")

SOURCE = (Path(__file__).parent / "native.c").read_text()
_libs: dict[tuple[str, ...], ctypes.CDLL | None] = {}


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
    return library()


def library(extra_flags: tuple[str, ...] = ()):
    """The compiled native.c for this CPU (plus extra compiler flags), or None where it cannot be built."""
    if extra_flags in _libs:
        return _libs[extra_flags]
    _libs[extra_flags] = None
    if os.environ.get("QATCTL_NO_NATIVE") == "1":
        log.info("native kernels off (QATCTL_NO_NATIVE=1)")
        return None
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        log.info("no C compiler: native kernels unavailable")
        return None
    flags = ["-O3", "-march=native", *extra_flags, "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\n".join([SOURCE, cc, version, _cpu_flags(), *flags]).encode()).hexdigest()[:16]
        so = _cache_dir() / f"qatctl_kernels_{key}.so"
        if not so.is_file():
            so.parent.mkdir(parents=True, exist_ok=True)
            src = so.with_suffix(f".{os.getpid()}.c")  # per process: concurrent first uses never share a file
            src.write_text(SOURCE)
            tmp = so.with_suffix(f".{os.getpid()}.tmp")
            subprocess.run([cc, *flags, str(src), "-o", str(tmp), "-lm"], check=True, capture_output=True, timeout=300)
            os.replace(tmp, so)  # atomic: a concurrent build never loads half a file
            src.unlink(missing_ok=True)
        lib = ctypes.CDLL(str(so))
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.qatctl_bf16_linear.argtypes = [p, p, p, i64, i64, i64, ctypes.c_int]
        lib.qatctl_bf16_linear.restype = None
        lib.qatctl_int4_linear.argtypes = [p, p, p, p, i64, i64, i64, i64, i64, ctypes.c_int]
        lib.qatctl_int4_linear.restype = ctypes.c_int
        lib.qatctl_w16a16_linear.argtypes = [p, p, p, i64, i64, i64, i64, ctypes.c_int]
        lib.qatctl_w16a16_linear.restype = ctypes.c_int
        lib.qatctl_int4_isa.restype = ctypes.c_char_p
        lib.qatctl_int4_layout.restype = ctypes.c_int
        lib.qatctl_decode.argtypes = [p, p, p, p, p, p, p, i64, ctypes.c_int]
        lib.qatctl_decode.restype = ctypes.c_int
        _libs[extra_flags] = lib
        log.info("native kernels: %s (int4: %s)", so, lib.qatctl_int4_isa().decode())
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("native kernels unavailable (%s); the engine uses its pure-torch path", e)
    return _libs[extra_flags]


def available() -> bool:
    return _load() is not None


def require(flag: str) -> None:
    """Refuse `flag` (one line, exit 2) where the native kernels are unavailable: the exact forward
    that modes such as --true-on-policy rest on exists only there, and they never approximate."""
    if not available():
        from qatctl.errors import QatctlError

        raise QatctlError(f"{flag}: the native kernels are unavailable here (no C compiler, a failed build, or "
                          "QATCTL_NO_NATIVE=1); without them no forward is exact, and the mode never approximates")


def pack_bf16(w: torch.Tensor) -> torch.Tensor:
    """BF16 [N, K] -> [ceil(N/16), K, 16]: 16 output columns side by side (zero-padded)."""
    N, K = w.shape
    pad = (-N) % 16
    wb = w.to(torch.bfloat16)
    if pad:
        wb = torch.cat([wb, wb.new_zeros(pad, K)])
    return wb.view(-1, 16, K).transpose(1, 2).contiguous()


def bf16_linear(x: torch.Tensor, packed: torch.Tensor, n: int, lib=None) -> torch.Tensor:
    """x fp32 [..., K] @ w.T for w packed by pack_bf16 (n output features) -> fp32 [..., n]."""
    lib = lib or _load()
    if lib is None:
        raise RuntimeError("native kernels are unavailable")
    flat = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
    M, K = flat.shape
    if packed.dtype != torch.bfloat16 or packed.shape[1:] != (K, 16) or packed.device.type != "cpu":
        raise ValueError("bf16_linear: the weight must be pack_bf16's CPU [N/16, K, 16] BF16 tensor")
    y = torch.empty(M, n, dtype=torch.float32)
    lib.qatctl_bf16_linear(flat.data_ptr(), packed.data_ptr(), y.data_ptr(), M, n, K, torch.get_num_threads())
    return y.reshape(*x.shape[:-1], n)


def isa(lib=None) -> str | None:
    """Which int4 path the build runs (avx512bf16, avx2+fma, portable C), or None without one."""
    lib = lib or _load()
    return None if lib is None else lib.qatctl_int4_isa().decode()


@dataclass(frozen=True)
class Int4Packed:
    """A W4A16 weight as int4_linear reads it: nibbles [NB, K/2, 16] uint8 (NB a multiple of 4) and
    scales [NB, K/group, 16] BF16; n and k are the real output and input features."""
    w: torch.Tensor
    s: torch.Tensor
    n: int
    k: int
    group: int

    @property
    def nbytes(self) -> int:
        return self.w.numel() + self.s.numel() * self.s.element_size()


def pack_int4(q: torch.Tensor, scale: torch.Tensor, group: int, lib=None) -> Int4Packed:
    """q int [N, K] in [-8, 7] and its scales [N, K/group] (BF16 values) -> Int4Packed, in the nibble
    layout the build reads (native.c: 0, or 1 on the AVX512-BF16 path)."""
    N, K = q.shape
    if K % 2 or group % 2 or K % group or scale.shape != (N, K // group):
        raise ValueError(f"pack_int4: a [{N}, {K}] weight with group {group} and scales {tuple(scale.shape)}")
    pad = (-N) % 64
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    sc = scale.to(torch.bfloat16)
    if not torch.equal(sc.float(), scale.float()):
        raise ValueError("pack_int4: the scales must be BF16 numbers (as the quantizer writes them)")
    if pad:
        u = torch.cat([u, u.new_full((pad, K), 8)])  # q = 0
        sc = torch.cat([sc, sc.new_zeros(pad, K // group)])
    lib = lib or _load()
    if lib is not None and lib.qatctl_int4_layout() == 1:
        # [NB, 16 columns, K/2 pairs, 2] -> per pair 16 bytes: (column i/2, k parity i%2) low, column 8 + i/2 high
        blocks = u.view(-1, 16, K // 2, 2).permute(0, 2, 1, 3)  # [NB, K/2, 16, 2]
        w = (blocks[:, :, :8].reshape(-1, K // 2, 16) | (blocks[:, :, 8:].reshape(-1, K // 2, 16) << 4)).contiguous()
    else:
        pairs = u[:, 0::2] | (u[:, 1::2] << 4)  # [N', K/2]: even k low nibble
        w = pairs.view(-1, 16, K // 2).transpose(1, 2).contiguous()
    s = sc.view(-1, 16, K // group).transpose(1, 2).contiguous()
    return Int4Packed(w, s, N, K, group)


def _linear(name: str, x: torch.Tensor, packed, run, lib) -> torch.Tensor:
    """x [..., K] through one native linear: run(lib, flat fp32 [M, K], y fp32 [M, N], M, K) fills y
    and returns nonzero when the kernel could not allocate its BF16 copy of x."""
    lib = lib or _load()
    if lib is None:
        raise RuntimeError("native kernels are unavailable")
    flat = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
    M, K = flat.shape
    if K != packed.k:
        raise ValueError(f"{name}: input has {K} features, the weight {packed.k}")
    y = torch.empty(M, packed.n, dtype=torch.float32)
    if M and run(lib, flat, y, M, K):
        raise MemoryError(f"{name}: no memory for a [{M}, {K}] BF16 input")
    return y.reshape(*x.shape[:-1], packed.n)


def int4_linear(x: torch.Tensor, packed: Int4Packed, lib=None) -> torch.Tensor:
    """bf16(x) [..., K] @ (q * scale).T -> fp32 [..., N] holding BF16 values."""
    return _linear("int4_linear", x, packed, lambda lib, flat, y, M, K: lib.qatctl_int4_linear(
        flat.data_ptr(), packed.w.data_ptr(), packed.s.data_ptr(), y.data_ptr(), M, packed.n, packed.w.shape[0], K,
        packed.group, torch.get_num_threads()), lib)


@dataclass(frozen=True)
class DensePacked:
    """A dense BF16 weight as w16a16_linear reads it: [NB, K/2, 16, 2] BF16 (pair p of column 16 nb + j
    at [nb, p, j], even k first; NB a multiple of 4, zero columns pad N); n and k the real features."""
    wd: torch.Tensor
    n: int
    k: int

    @property
    def nbytes(self) -> int:
        return self.wd.numel() * self.wd.element_size()


def pack_dense_bf16(w: torch.Tensor) -> DensePacked:
    """A [N, K] weight holding BF16 values (K even) -> DensePacked, the same layout on every build."""
    N, K = w.shape
    wb = w.to(torch.bfloat16)
    if K % 2 or not torch.equal(wb.float(), w.float()):
        raise ValueError(f"pack_dense_bf16: a [{N}, {K}] weight must have an even K and BF16 values")
    pad = (-N) % 64
    if pad:
        wb = torch.cat([wb, wb.new_zeros(pad, K)])
    return DensePacked(wb.view(-1, 16, K // 2, 2).permute(0, 2, 1, 3).contiguous(), N, K)


def w16a16_linear(x: torch.Tensor, packed: DensePacked, lib=None) -> torch.Tensor:
    """bf16(x) [..., K] @ w.T, fp32 chains as int4_linear's, rounded to BF16 -> fp32 [..., N]."""
    return _linear("w16a16_linear", x, packed, lambda lib, flat, y, M, K: lib.qatctl_w16a16_linear(
        flat.data_ptr(), packed.wd.data_ptr(), y.data_ptr(), M, packed.n, packed.wd.shape[0], K,
        torch.get_num_threads()), lib)


class _DecLayer(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p * 4), ("s", ctypes.c_void_p * 4), ("wd", ctypes.c_void_p * 4),
                ("nb", ctypes.c_int64 * 4),
                ("in_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("q_norm", ctypes.c_void_p),
                ("k_norm", ctypes.c_void_p)]


class _DecDims(ctypes.Structure):
    _fields_ = [(k, ctypes.c_int64) for k in ("L", "H", "nh", "nkv", "hd", "I", "G", "len_alloc")] + \
               [("eps", ctypes.c_float), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p),
                ("final_norm", ctypes.c_void_p), ("head", ctypes.c_void_p), ("vocab", ctypes.c_int64)]


class DecodePlan:
    """The engine's decode step as one native call (native.c qatctl_decode): every layer of a dense
    Llama / Qwen3 decoder whose linears are all native W4A16 (or native W16A16: the dense BF16 path)
    on the CPU. `plan(engine)` returns None
    where that does not hold (MoE, another kernel, a head_dim the C code does not take)."""

    KEYS = ("qkv", "o", "gate_up", "down")

    def __init__(self, engine, lib):
        self.lib, self.engine = lib, engine
        layers = engine.layers
        self.layers = (_DecLayer * len(layers))()
        for dst, layer in zip(self.layers, layers, strict=True):
            for i, key in enumerate(self.KEYS):
                p = layer[key].native
                if isinstance(p, DensePacked):
                    dst.wd[i], dst.nb[i] = p.wd.data_ptr(), p.wd.shape[0]
                else:
                    dst.w[i], dst.s[i], dst.nb[i] = p.w.data_ptr(), p.s.data_ptr(), p.w.shape[0]
            dst.in_norm, dst.post_norm = layer["in_norm"].data_ptr(), layer["post_norm"].data_ptr()
            dst.q_norm = layer["q_norm"].data_ptr() if "q_norm" in layer else None
            dst.k_norm = layer["k_norm"].data_ptr() if "k_norm" in layer else None
        first = layers[0]
        head = engine.lm_head.bf16  # the native BF16-read lm_head: then the step returns logits
        self.vocab = engine.lm_head.out_features if head is not None else None
        self.dims = _DecDims(L=len(layers), H=engine.hidden, nh=engine.n_heads, nkv=engine.n_kv, hd=engine.head_dim,
                             I=first["down"].in_features, G=getattr(first["qkv"], "group_size", 2), len_alloc=0,
                             eps=engine.eps,
                             cos=engine.cos.data_ptr(), sin=engine.sin_signed.data_ptr(),
                             final_norm=engine.final_norm.data_ptr(), head=None if head is None else head.data_ptr(),
                             vocab=self.vocab or 0)

    @classmethod
    def plan(cls, engine):
        lib = _load()
        if lib is None or engine.device.type != "cpu" or engine.head_dim % 16 or engine.head_dim > 512 \
                or engine.n_heads % engine.n_kv:
            return None
        for layer in engine.layers:
            if any(key not in layer or getattr(layer[key], "native", None) is None for key in cls.KEYS):
                return None
        if not (engine.cos.is_contiguous() and engine.sin_signed.is_contiguous()):
            return None
        return cls(engine, lib)

    def pool(self, cache: list):
        """The KV pool's pointers and this step's dims (a DecodeBatch keeps them until its pool grows)."""
        K0 = cache[0][0]
        if len(cache) != self.dims.L or any(
                not (k.is_contiguous() and v.is_contiguous() and k.shape == K0.shape == v.shape
                     and k.dtype == v.dtype == torch.float32) for k, v in cache):
            raise ValueError("decode: the KV pool must be one contiguous fp32 tensor of one shape per layer and kind")
        dims = _DecDims.from_buffer_copy(self.dims)
        dims.len_alloc = K0.shape[2]
        return (ctypes.c_void_p * (2 * len(cache)))(*[t.data_ptr() for kv in cache for t in kv]), dims, K0.shape[0]

    def __call__(self, x: torch.Tensor, pool, rows: list[int], positions: list[int], head: bool = True,
                 layers: int | None = None) -> torch.Tensor:
        """x [M, hidden] fp32 (the new tokens' embeddings) -> the logits [M, vocab] when the plan
        holds the lm_head (`self.vocab`) and `head`, else the last layer's output [M, hidden] (before
        the final norm); row m's k, v are written to the pool at [rows[m], :, positions[m]] of every
        layer. Token m attends over the pool's positions 0..positions[m] of its row, written before
        any attention of its layer runs: so a row's prompt can be M tokens of one call (the engine's
        exact prefill), and each token's result is the same bits as when it is decoded alone.
        `layers`: run only the first that many layers (no head): the residual stream after them."""
        ptrs, dims, n_rows = pool
        if layers is not None:
            if not 0 < layers <= dims.L:
                raise ValueError(f"decode: layers={layers}; the model has {dims.L}")
            head = False
        if (not head and self.vocab) or layers is not None:
            dims = _DecDims.from_buffer_copy(dims)
            dims.head, dims.vocab = None, 0
            dims.L = dims.L if layers is None else layers
        want_logits = head and self.vocab
        x = x.to(torch.float32).contiguous().clone()
        M = x.shape[0]
        if len(rows) != M or len(positions) != M or not all(0 <= r < n_rows for r in rows) \
                or not all(0 <= p < dims.len_alloc for p in positions):
            raise ValueError("decode: rows or positions outside the KV pool")
        rows_t = torch.tensor(rows, dtype=torch.int64)
        pos_t = torch.tensor(positions, dtype=torch.int64)
        logits = torch.empty(M, self.vocab) if want_logits else None
        if self.lib.qatctl_decode(ctypes.addressof(self.layers), ptrs, ctypes.addressof(dims), x.data_ptr(),
                                  None if logits is None else logits.data_ptr(), rows_t.data_ptr(), pos_t.data_ptr(),
                                  M, torch.get_num_threads()):
            raise MemoryError("decode: no memory for the step's buffers")
        return x if logits is None else logits
