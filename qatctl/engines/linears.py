"""The engine's linear layers: W4A16 (Int4Linear), the native dense BF16 linear (Bf16Linear), the
torch dense baselines (DenseLinear), and the row-invariant dense linear of the lm_head and MoE
router (RowInvariantLinear). Each says which kernel runs (`.kernel`) and how many bytes it reads
(`.nbytes`)."""

from __future__ import annotations

import logging

import torch

from qatctl.errors import QatctlError
from qatctl.quant import dequant

log = logging.getLogger("qatctl.engine")
CHUNK_ROWS = 8  # rows per fixed chunk of the fallback fp32 matmul (MKL's row result depends on M)
CPU = torch.device("cpu")


class Int4Linear:
    """y = x @ (q * scale).T on a 4-bit kernel (BF16 in, BF16 out), the weight never dense.

    CPU: the native W4A16 kernel (kernels.int4_linear: vdpbf16ps on AVX512-BF16, FMAs on AVX2,
    plain C elsewhere; the same bits on each) when it can be built, else
    aten._weight_int4pack_mm_for_cpu. CUDA: aten._weight_int4pack_mm (tinygemm), packed from
    [N, K/2] bytes (even column in the high nibble) with the largest inner k-tiles that divide K.
    The aten kernels dequantize (u - 8) * scale + zero: symmetric q maps exactly as u = q + 8,
    zero 0. `check=True` compares the kernel with the dense dequantized matmul on probe rows and
    refuses to run on a mismatch (a packing layout that differs on this build).
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, group_size: int, device: torch.device = CPU,
                 check: bool = False, native: bool = True):
        from qatctl.engines import kernels

        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        self.native = None
        if native and device.type == "cpu" and kernels.available() and self.in_features % group_size == 0 \
                and group_size % 2 == 0 and torch.equal(scale.to(torch.bfloat16).float(), scale.float()):
            self.native = kernels.pack_int4(q, scale, group_size)
            self.kernel = f"native W4A16, {kernels.isa()} (qatctl/engines/native.c)"
            self._mm = None
        else:
            u = q.to(torch.int32) + 8
            scale_t = scale.to(torch.bfloat16).t().contiguous()  # [in/group, out]
            self.scales_and_zeros = torch.stack([scale_t, torch.zeros_like(scale_t)], dim=-1).contiguous().to(device)
            if device.type == "cuda":
                tiles = next((t for t in (8, 4, 2) if self.in_features % (t * 16) == 0), None)
                if tiles is None or self.out_features % 8 or group_size not in (32, 64, 128, 256):
                    raise QatctlError(f"int4 on CUDA: a [{self.out_features}, {self.in_features}] weight with group "
                                      f"size {group_size} does not fit the tinygemm kernel (in % 32, out % 8, "
                                      "group 32-256)")
                pairs = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8).to(device)
                self.packed = torch.ops.aten._convert_weight_to_int4pack(pairs, tiles)
                self._mm, self.kernel = torch.ops.aten._weight_int4pack_mm, "aten._weight_int4pack_mm (CUDA tinygemm)"
            else:
                self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
                self._mm, self.kernel = torch.ops.aten._weight_int4pack_mm_for_cpu, "aten._weight_int4pack_mm_for_cpu"
        if check:
            self._check(q, scale)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            from qatctl.engines import kernels

            return kernels.int4_linear(x, self.native)
        y = self._mm(x.reshape(-1, self.in_features).to(torch.bfloat16), self.packed, self.group_size,
                     self.scales_and_zeros)
        return y.reshape(*x.shape[:-1], self.out_features).float()

    @property
    def parts(self) -> tuple[torch.Tensor, ...]:
        """The tensors the kernel reads (what two equal weights have equal)."""
        if self.native is not None:
            return self.native.w, self.native.s
        return self.packed, self.scales_and_zeros

    def _check(self, q, scale):
        w = dequant(q.cpu(), scale.cpu(), self.group_size).float()  # q may come from CUDA masters (in-memory sync)
        x = torch.randn(4, self.in_features, generator=torch.Generator().manual_seed(0)).bfloat16()
        got = self(x.to(self.parts[0].device)).cpu()
        ref = x.float() @ w.t()
        bound = 2**-7 * (x.float().abs() @ w.abs().t()) + 1e-5
        if not ((got - ref).abs() <= bound).all():
            raise QatctlError(f"{self.kernel}: output differs from the dense dequantized matmul "
                              f"(max error {(got - ref).abs().max():.3g}); the int4 packing does not match this build")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts)


class Bf16Linear:
    """The dense BF16 linear of an exact BF16 engine on the native kernels: y = bf16(bf16(x) @ w.T)
    with each output one fixed fp32 chain (kernels.w16a16_linear: the W4A16 kernel's arithmetic on
    BF16 weights read as they are). Row-invariant in M and thread-invariant, as Int4Linear is, so
    a BF16 engine is batch-invariant and its prefill is its decode step (the fused native step
    takes these layers too). `w` must hold BF16 values (a BF16 checkpoint's, or rounded to them)."""

    def __init__(self, w: torch.Tensor):
        from qatctl.engines import kernels

        self.out_features, self.in_features = w.shape
        self.native = kernels.pack_dense_bf16(w.to(torch.bfloat16))
        self.kernel = f"native W16A16 (dense BF16), {kernels.isa()} (qatctl/engines/native.c)"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from qatctl.engines import kernels

        return kernels.w16a16_linear(x, self.native)

    @property
    def parts(self) -> tuple[torch.Tensor, ...]:
        return (self.native.wd,)

    @property
    def nbytes(self) -> int:
        return self.native.nbytes


class DenseLinear:
    """Baseline: a dense weight in fp32 or BF16 (torch's matmul)."""

    def __init__(self, w: torch.Tensor, dtype: torch.dtype, device: torch.device = CPU):
        self.weight = w.to(device=device, dtype=dtype).contiguous()
        self.out_features, self.in_features = w.shape
        self.kernel = f"dense {str(dtype).removeprefix('torch.')} matmul"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.weight.dtype) @ self.weight.t()).float()

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class RowInvariantLinear:
    """x @ w.T for a dense fp32 weight (lm_head, MoE router), each row's result independent of
    how many rows are computed with it.

    The fast path is oneDNN with the weight prepacked once (mkldnn._linear_pointwise): on this
    AVX2 CPU, MKL's sgemm repacks the 113 MB SmolLM2 lm_head at every call and takes ~9.7 ms at
    M=8 against ~2.7 ms here. Row invariance is checked at load on probe rows (each alone vs all
    together); where it does not hold, or oneDNN is missing, the weight runs as a plain matmul in
    fixed chunks of CHUNK_ROWS rows (MKL's row result depends on M, not on the other rows).
    """

    PROBE_ROWS = 33  # covers decode batches up to 32 plus one

    def __init__(self, w: torch.Tensor, device: torch.device = CPU, native: bool = True):
        self.weight = w.to(device=device, dtype=torch.float32).contiguous()
        self.out_features = self.weight.shape[0]
        self.bf16 = self._native_bf16(device) if native else None  # packed BF16 weight for the native kernel, or None
        self.packed = None if self.bf16 is not None or device.type != "cpu" else self._pack()  # cuBLAS: fixed chunks
        if self.bf16 is not None:
            self.kernel = "native BF16-read linear, fp32 accumulate (qatctl/engines/kernels.py)"
            self.weight = None  # the fp32 copy is not read any more
        else:
            self.kernel = "mkldnn prepacked fp32 linear" if self.packed is not None else \
                f"fp32 matmul in chunks of {CHUNK_ROWS} rows"

    def _native_bf16(self, device):
        """The weight packed for kernels.bf16_linear when it runs here and the weight's values are
        BF16 numbers (then reading BF16 gives exactly the fp32 matmul's products)."""
        from qatctl.engines import kernels

        if device.type != "cpu" or not kernels.available():
            return None
        w16 = self.weight.to(torch.bfloat16)
        if not torch.equal(w16.float(), self.weight):
            return None
        return kernels.pack_bf16(w16)

    def _pack(self):
        if not torch.backends.mkldnn.is_available():
            return None
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 16)
            probe = torch.randn(self.PROBE_ROWS, self.weight.shape[1], generator=torch.Generator().manual_seed(0))
            with torch.inference_mode():
                together = torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
                alone = torch.cat([torch.ops.mkldnn._linear_pointwise(r, packed, None, "none", [], "")
                                   for r in probe.split(1)])
        except RuntimeError as e:  # an op this build lacks
            log.info("oneDNN prepacked linear unavailable (%s); chunked matmul", e)
            return None
        if not torch.equal(together, alone):
            log.info("oneDNN linear is not row-invariant on this CPU; chunked matmul")
            return None
        return packed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.bf16 is not None:
            from qatctl.engines import kernels

            return kernels.bf16_linear(x, self.bf16, self.out_features)
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        if self.packed is not None:
            out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, None, "none", [], "")
        else:
            n = flat.shape[0]
            pad = (-n) % CHUNK_ROWS
            if pad:
                flat = torch.cat([flat, flat.new_zeros(pad, flat.shape[1])])
            out = torch.cat([c @ self.weight.t() for c in flat.split(CHUNK_ROWS)])[:n]
        return out.reshape(*x.shape[:-1], -1)

    @property
    def tensor(self) -> torch.Tensor:
        """The weight as the kernel reads it (packed BF16, or fp32)."""
        return self.bf16 if self.bf16 is not None else self.weight

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()
