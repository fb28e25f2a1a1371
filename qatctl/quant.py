"""THE quantizer: W4A16 INT4 symmetric group-wise (DESIGN §4).

Fake quant in training, the INT4 converter and the engine's dequantization all call the
functions below, so they agree bit for bit. The one written rule:

    w      = round_to_bf16(w)                                  # checkpoints store BF16
    amax   = max |w| over each group of `group_size` inputs     (fp32, exact)
    scale  = round_to_bf16(amax / divisor).clamp_min(BF16_TINY) # divisor 7 (kimi) / 7.5 (minmax)
    q      = clamp(round_half_even(fp32(w) / fp32(scale)), qmin, qmax)
    w_hat  = bf16(q) * scale                                    # one BF16 rounding

Every step after the BF16 rounding is an IEEE-correctly-rounded fp32 operation on exact
inputs, so it gives the same bits on any CPU or GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from qatctl.errors import QatctlError

# The scheme as data lives in qatctl/scheme.py (torch-free); re-exported here for the quantizer's callers.
from qatctl.scheme import (  # noqa: F401
    BITS,
    DEFAULT_IGNORE,
    GROUP_SIZES,
    SCALE_RULES,
    STE_MODES,
    TARGET_PRESETS,
    QuantScheme,
    check_shape,
    in_decoder_block,
    is_ignored,
    is_target,
)

# A zero (or subnormal) group still gets a positive, finite scale: q is then 0 and w_hat is 0.
BF16_TINY = torch.finfo(torch.bfloat16).tiny

def check_quantizable(name: str, w: torch.Tensor, scheme: QuantScheme) -> None:
    """Input checks every caller runs before quantizing `w` (the error names the tensor)."""
    check_shape(name, w.shape, scheme)
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise QatctlError(f"{name}: {bad} NaN/Inf value(s) in the weight")


def quantize(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., in] (any float dtype) -> (q int8 [..., in], scale bf16 [..., in / group_size])."""
    _, qmin, qmax = SCALE_RULES[scheme.scale_rule]
    unclamped, scale = _scaled(w, scheme)
    return unclamped.clamp_(qmin, qmax).to(torch.int8).reshape(w.shape), scale


def _scaled(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """round_half_even(w / scale) before the clamp, grouped [..., in/g, g], and the BF16 scale."""
    g = scheme.group_size
    wg = w.detach().to(torch.bfloat16).float().reshape(*w.shape[:-1], w.shape[-1] // g, g)
    amax = wg.abs().amax(dim=-1, keepdim=True)
    scale = (amax / SCALE_RULES[scheme.scale_rule][0]).to(torch.bfloat16).clamp_min(BF16_TINY)
    return torch.round(wg / scale.float()), scale.squeeze(-1)


def dequant(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """(q int [..., in], scale bf16 [..., in/group]) -> w_hat bf16 [..., in] = q * scale in BF16."""
    qg = q.to(torch.bfloat16).reshape(*q.shape[:-1], q.shape[-1] // group_size, group_size)
    return (qg * scale.to(torch.bfloat16).unsqueeze(-1)).reshape(q.shape)


def fake_quant_value(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """w_hat = dequant(quantize(w)) in w's dtype (BF16 values are exact in fp32)."""
    q, scale = quantize(w, scheme)
    return dequant(q, scale, scheme.group_size).to(w.dtype)


class _FakeQuantSTE(torch.autograd.Function):
    """Forward: w_hat. Backward: straight-through estimator (DESIGN §4)."""

    @staticmethod
    def forward(ctx, w, scheme):
        _, qmin, qmax = SCALE_RULES[scheme.scale_rule]
        unclamped, scale = _scaled(w, scheme)
        if scheme.ste == "clipped":
            # Zero the gradient exactly where clamp changed q (torchao's masked STE). Never
            # happens under `kimi`; under `minmax` only when the BF16 scale rounded down.
            # Kept on ctx, not save_for_backward: a step that fake-quantizes once
            # (parametrize.cached) backpropagates through this node once per micro-batch.
            ctx.mask = ((unclamped >= qmin) & (unclamped <= qmax)).reshape(w.shape)
        ctx.clipped = scheme.ste == "clipped"
        q = unclamped.clamp_(qmin, qmax).reshape(w.shape)
        return dequant(q, scale, scheme.group_size).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        if ctx.clipped:
            return grad * ctx.mask, None
        return grad, None


def fake_quant(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Differentiable fake INT4 quantization of a weight ([out, in] or fused [experts, out, in])."""
    return _FakeQuantSTE.apply(w, scheme)


def pack(q: torch.Tensor) -> torch.Tensor:
    """int8 q [out, in] -> compressed-tensors `weight_packed` int32 [out, in/8], nibble u = q + 8.

    The library's packer is the reference writer of the format SGLang and vLLM read.
    """
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32(q.to(torch.int8), BITS)


def unpack(packed: torch.Tensor, shape) -> torch.Tensor:
    """compressed-tensors `weight_packed` int32 -> int8 q of `shape`."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    return unpack_from_int32(packed, BITS, torch.Size(shape))


@dataclass
class SqnrTotals:
    """Accumulates PTQ error over many tensors (pooled, not averaged, SQNR)."""

    signal: float = 0.0
    noise: float = 0.0
    params: int = 0
    tensors: int = 0
    per_tensor: dict = field(default_factory=dict)

    def add(self, name: str, w: torch.Tensor, w_hat: torch.Tensor) -> None:
        wf = w.float()
        s, n = wf.pow(2).sum().item(), (wf - w_hat.float()).pow(2).sum().item()
        self.signal, self.noise = self.signal + s, self.noise + n
        self.params += w.numel()
        self.tensors += 1
        self.per_tensor[name] = round(10 * math.log10(s / n), 3) if n > 0 and s > 0 else None

    def summary(self) -> dict:
        db = 10 * math.log10(self.signal / self.noise) if self.noise > 0 and self.signal > 0 else None
        vals = [v for v in self.per_tensor.values() if v is not None]
        return {"sqnr_db": None if db is None else round(db, 3),
                "sqnr_db_min": min(vals) if vals else None,
                "quantized_tensors": self.tensors, "quantized_params": self.params}
