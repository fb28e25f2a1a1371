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
import re
from dataclasses import asdict, dataclass, field

import torch

from qatctl.errors import QatctlError

BITS = 4
GROUP_SIZES = (32, 64, 128)
# scale_rule -> (divisor, qmin, qmax)
SCALE_RULES = {"kimi": (7.0, -7, 7), "minmax": (7.5, -8, 7)}
STE_MODES = ("identity", "clipped")
# A zero (or subnormal) group still gets a positive, finite scale: q is then 0 and w_hat is 0.
BF16_TINY = torch.finfo(torch.bfloat16).tiny

# Not quantized by default besides embeddings and norms (never targets): the output head and
# MoE router gates, which are tiny and precision-critical.
DEFAULT_IGNORE = ("lm_head", r"re:.*\.mlp\.gate$", r"re:.*\.shared_expert_gate$")
# Kimi K2 Thinking's scheme: only routed experts in INT4; attention, shared experts and dense
# MLPs stay BF16.
TARGET_PRESETS = {
    "kimi-experts": (
        r"re:.*\.self_attn\..*",
        r"re:.*\.shared_experts?\..*",
        r"re:.*\.mlp\.(gate|up|down)_proj$",
    ),
}
_DECODER_BLOCK = re.compile(r"(^|\.)layers\.\d+\.")


@dataclass(frozen=True)
class QuantScheme:
    """The INT4 scheme a checkpoint was (or will be) quantized with; travels in manifests."""

    group_size: int = 32  # consecutive input elements sharing one scale: 32, 64 or 128
    scale_rule: str = "kimi"  # "kimi": amax/7, q in [-7, 7]; "minmax": amax/7.5, q in [-8, 7]
    ignore: tuple[str, ...] = DEFAULT_IGNORE  # module names, prefixes or `re:` regexes
    ste: str = "identity"  # backward of fake quant: "identity", or "clipped" (0 where q clamps)
    bits: int = BITS
    symmetric: bool = True

    def __post_init__(self):
        if self.bits != BITS or not self.symmetric:
            raise QatctlError(f"quant scheme: only 4-bit symmetric is supported, got bits={self.bits} "
                              f"symmetric={self.symmetric}")
        if self.group_size not in GROUP_SIZES:
            raise QatctlError(f"quant scheme: group_size={self.group_size} is not one of {GROUP_SIZES}")
        if self.scale_rule not in SCALE_RULES:
            raise QatctlError(f"quant scheme: scale_rule={self.scale_rule!r} is not one of "
                              f"{sorted(SCALE_RULES)}")
        if self.ste not in STE_MODES:
            raise QatctlError(f"quant scheme: ste={self.ste!r} is not one of {STE_MODES}")
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise QatctlError(f"quant scheme: ignore pattern {pattern!r} is not a valid regex: {e}") from None

    def to_manifest(self) -> dict:
        d = asdict(self)
        d["ignore"] = list(self.ignore)
        return d

    @classmethod
    def from_manifest(cls, d: dict, source: str = "manifest") -> QuantScheme:
        try:
            return cls(group_size=int(d["group_size"]), scale_rule=d["scale_rule"],
                       ignore=tuple(d["ignore"]), ste=d.get("ste", "identity"),
                       bits=int(d["bits"]), symmetric=bool(d["symmetric"]))
        except (KeyError, TypeError, ValueError) as e:
            raise QatctlError(f"{source}: field 'quant' is malformed ({e!r}); expected bits, group_size, "
                              "symmetric, scale_rule, ignore") from None

    @property
    def qrange(self) -> tuple[int, int]:
        return SCALE_RULES[self.scale_rule][1:]


def is_ignored(module_name: str, patterns) -> bool:
    """compressed-tensors matching: `re:` regex (re.match), else exact name or dotted prefix."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], module_name):
                return True
        elif module_name == p or module_name.startswith(p + "."):
            return True
    return False


def in_decoder_block(module_name: str) -> bool:
    return bool(_DECODER_BLOCK.search(module_name))


def is_target(module_name: str, scheme: QuantScheme) -> bool:
    """A weight inside a decoder block (attention, MLP, experts) that the scheme does not ignore.

    Callers pass only Linear weights (2-D on disk) and fused 3-D expert parameters; embeddings,
    lm_head and norms sit outside decoder blocks or are 1-D, so they are never targets.
    """
    return in_decoder_block(module_name) and not is_ignored(module_name, scheme.ignore)


def check_shape(name: str, shape, scheme: QuantScheme) -> None:
    """The input dimension must split into whole groups (no padding scheme is supported)."""
    if shape[-1] % scheme.group_size:
        raise QatctlError(f"{name}: input dimension {shape[-1]} (shape {tuple(shape)}) is not a "
                          f"multiple of group_size {scheme.group_size}")


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
