"""The INT4 scheme as data (DESIGN §4): what a checkpoint was or will be quantized with, which
modules it targets, and its checks. No torch here, so the CLI's option defaults and the stages'
configs read it at start-up; the arithmetic is qatctl/quant.py's.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from qatctl.errors import QatctlError

BITS = 4
GROUP_SIZES = (32, 64, 128)
# scale_rule -> (divisor, qmin, qmax)
SCALE_RULES = {"kimi": (7.0, -7, 7), "minmax": (7.5, -8, 7)}
STE_MODES = ("identity", "clipped")
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
