"""INT4 conversion of one checkpoint tensor, shared by convert-int4 (from disk, shard by shard)
and the in-memory weight sync of rl-step (from the training model), so both give the same bits.

    tensors = int4_tensors(bf16_state, scheme)      # {on-disk name: tensor} -> pack-quantized names

A target weight `M.weight` becomes `M.weight_packed` (int32 [out, in/8]), `M.weight_scale`
(BF16 [out, in/group]) and `M.weight_shape` (int64 [2]); every other tensor passes unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qatctl.errors import QatctlError
from qatctl.quant import QuantScheme, check_quantizable, in_decoder_block, is_ignored, is_target, pack, quantize

# Files of an HF folder besides weights and config that an engine needs (tokenizer, generation config).
_SIDE_FILES = ("tokenizer", "special_tokens_map", "generation_config", "chat_template", "vocab", "merges",
               "added_tokens")


def target_module(key: str, ndim: int, scheme: QuantScheme) -> str | None:
    """The module name if on-disk tensor `key` is a weight the scheme quantizes."""
    if ndim == 2 and key.endswith(".weight") and is_target(key[: -len(".weight")], scheme):
        return key[: -len(".weight")]
    return None


def convert_tensor(key: str, t: torch.Tensor, scheme: QuantScheme, where: str = "") -> dict[str, torch.Tensor]:
    """One on-disk tensor -> its pack-quantized tensors (or itself, when not a target)."""
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise QatctlError(f"{where}{key}: NaN/Inf values in the weight")
    module = target_module(key, t.ndim, scheme)
    if module is None:
        return {key: t}
    check_quantizable(f"{where}{module}", t, scheme)
    q, scale = quantize(t, scheme)
    return {f"{module}.weight_packed": pack(q), f"{module}.weight_scale": scale.contiguous(),
            f"{module}.weight_shape": torch.tensor(t.shape, dtype=torch.int64)}


def int4_tensors(state: dict[str, torch.Tensor], scheme: QuantScheme) -> dict[str, torch.Tensor]:
    """A whole BF16 state dict (on-disk names) converted, as convert-int4 writes it."""
    out = {}
    for key, t in state.items():
        out.update(convert_tensor(key, t, scheme))
    return out


def quantization_config(scheme, ignore: list[str]) -> dict:
    """config.json's `quantization_config`, built with compressed-tensors' own schema."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    args = QuantizationArgs(num_bits=scheme.bits, type="int", symmetric=scheme.symmetric,
                            strategy="group", group_size=scheme.group_size)
    cfg = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                             format="pack-quantized", quantization_status="compressed", ignore=ignore)
    return cfg.to_dict()


def ignored_modules(keys, scheme: QuantScheme) -> list[str]:
    """The `ignore` list of quantization_config: lm_head and every decoder-block Linear left in BF16."""
    names = ["lm_head"]
    for key in keys:
        if key.endswith(".weight"):
            name = key[: -len(".weight")]
            if in_decoder_block(name) and is_ignored(name, scheme.ignore):
                names.append(name)
    return list(dict.fromkeys(names))


def write_int4_checkpoint(tensors: dict[str, torch.Tensor], src: Path, out: Path, scheme: QuantScheme,
                          note: dict) -> dict:
    """An int4-checkpoint folder (artifact) from converted tensors held in memory: the weights,
    src's config.json with quantization_config, and src's tokenizer files. rl-step writes one per
    iteration for --engine-url; `note` goes into the manifest's config."""
    from safetensors.torch import save_file

    from qatctl.artifacts import OutputDir, copy_plain_file

    src = Path(src)
    o = OutputDir(out, stage="rl-step", kind="int4-checkpoint", config=note, inputs=[], force=True)
    with o.building() as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        cfg = json.loads((src / "config.json").read_text())
        dense_keys = [k for k in tensors if k.endswith(".weight") and tensors[k].ndim == 2]
        cfg["quantization_config"] = quantization_config(scheme, ignored_modules(dense_keys, scheme))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        for p in src.iterdir():
            if p.is_file() and p.name.startswith(_SIDE_FILES):
                copy_plain_file(p, tmp / p.name)
        return o.commit(tmp, quant=scheme.to_manifest())
