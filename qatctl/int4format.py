"""The int4-checkpoint format, in one place: compressed-tensors `pack-quantized`, as SGLang and
vLLM load it. The quantizer's rule lives in quant.py; how its output is laid out on disk lives here.

    tensors = int4_tensors(bf16_state, scheme)               # {on-disk name: tensor} -> packed names
    write_folder(tmp, src, [("model.safetensors", tensors)], scheme, ignore)   # the one writer
    r = Int4Reader.from_folder(folder)                       # the one reader
    q, scale = r.q_scale("model.layers.0.mlp.up_proj")

A target weight `M.weight` becomes `M.weight_packed` (int32 [out, in/8]), `M.weight_scale`
(BF16 [out, in/group]) and `M.weight_shape` (int64 [2]); every other tensor passes unchanged.
config.json gains `quantization_config` (compressed-tensors' own schema: one group targeting
Linear, int, symmetric, strategy group, and the `ignore` list of Linear modules left in BF16).
The folder also gets the source's tokenizer and generation files (SIDE_FILES), nothing else.

Writers: convert-int4 (from disk, shard by shard), rl-step's weight sync to a server and
eval-consistency's ablation (from memory, through write_int4_checkpoint). Readers: the embedded
engine and eval-consistency's weight check. A second scheme (W4A8, NVFP4) is a second handler
beside this one: its tensors, its quantization_config, its reader.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from qatctl.errors import QatctlError
from qatctl.quant import (
    QuantScheme,
    check_quantizable,
    dequant,
    in_decoder_block,
    is_ignored,
    is_target,
    pack,
    quantize,
    unpack,
)

FORMAT = "pack-quantized"
INDEX = "model.safetensors.index.json"
# The files of an HF folder besides weights and config that a loader needs (tokenizer, chat
# template, generation config): the only side files an int4-checkpoint gets from its source.
SIDE_FILES = ("tokenizer", "special_tokens_map", "generation_config", "chat_template", "vocab", "merges",
              "added_tokens")


# ---------------------------------------------------------------- tensors

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


def quantization_config(scheme: QuantScheme, ignore: list[str]) -> dict:
    """config.json's `quantization_config`, built with compressed-tensors' own schema."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    args = QuantizationArgs(num_bits=scheme.bits, type="int", symmetric=scheme.symmetric,
                            strategy="group", group_size=scheme.group_size)
    cfg = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                             format=FORMAT, quantization_status="compressed", ignore=ignore)
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


# ---------------------------------------------------------------- the writer

def write_folder(tmp: Path, src: Path, shards: Iterable[tuple[str, dict[str, torch.Tensor]]], scheme: QuantScheme,
                 ignore: list[str], index: dict | None = None) -> list[str]:
    """The files of an int4-checkpoint into `tmp` (an OutputDir's building folder): each
    (shard name, converted tensors) pair as a safetensors file, the weight index when `index`
    (the source's) is given, src's config.json with quantization_config, and src's SIDE_FILES.
    Shards are written as the iterable yields them, so one is held in memory at a time."""
    from safetensors.torch import save_file

    from qatctl.artifacts import copy_plain_file
    from qatctl.safeio import read_json

    weight_map, names = {}, []
    for name, tensors in shards:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        names.append(name)
    if index is not None:
        index = {**index, "weight_map": dict(sorted(weight_map.items()))}
        index.setdefault("metadata", {})["total_size"] = sum((tmp / s).stat().st_size for s in names)
        (tmp / INDEX).write_text(json.dumps(index, indent=2))
    cfg = read_json(Path(src) / "config.json")
    cfg["quantization_config"] = quantization_config(scheme, ignore)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for p in sorted(Path(src).iterdir()):
        if p.name.startswith(SIDE_FILES) and (p.is_file() or p.is_symlink()):
            copy_plain_file(p, tmp / p.name)
    return names


def write_int4_checkpoint(tensors: dict[str, torch.Tensor], src: Path, out: Path, scheme: QuantScheme,
                          note: dict, stage: str) -> dict:
    """An int4-checkpoint artifact from converted tensors held in memory (one shard), made by
    `stage` (rl-step's sync to a server, eval-consistency's ablation); `note` is its config."""
    from qatctl.artifacts import OutputDir

    o = OutputDir(out, stage=stage, kind="int4-checkpoint", config=note, inputs=[], force=True)
    dense_keys = [k for k in tensors if k.endswith(".weight") and tensors[k].ndim == 2]
    with o.building() as tmp:
        write_folder(tmp, src, [("model.safetensors", tensors)], scheme, ignored_modules(dense_keys, scheme))
        return o.commit(tmp, quant=scheme.to_manifest())


# ---------------------------------------------------------------- the reader

class Int4Reader:
    """The tensors of an HF checkpoint, int4 pack-quantized or dense, read one by one: from a
    folder's safetensors files (memory-mapped) or from an in-memory {on-disk name: tensor} dict."""

    def __init__(self, get, keys, int4: bool, group_size: int | None, where: str):
        self._get, self.keys, self.int4, self.group_size, self.where = get, set(keys), int4, group_size, where

    @classmethod
    def from_folder(cls, folder: Path, cfg: dict | None = None) -> Int4Reader:
        from qatctl.safeio import open_safetensors, read_json

        folder = Path(folder)
        cfg = read_json(folder / "config.json") if cfg is None else cfg
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise QatctlError(f"{folder}: no *.safetensors weights")
        handles = [open_safetensors(p) for p in files]
        where = {k: h for h in handles for k in h.keys()}
        qc = cfg.get("quantization_config") or {}
        int4 = qc.get("format") == FORMAT
        if qc and not int4:
            raise QatctlError(f"{folder}/config.json: quantization format {qc.get('format')!r} is not supported "
                              f"(expected compressed-tensors {FORMAT})")
        try:
            group = qc["config_groups"]["group_0"]["weights"]["group_size"] if int4 else None
        except (KeyError, TypeError):
            raise QatctlError(f"{folder}/config.json: quantization_config has no config_groups.group_0.weights."
                              "group_size") from None
        return cls(lambda k: where[k].get_tensor(k), where, int4, group, str(folder))

    @classmethod
    def from_tensors(cls, tensors: dict, group_size: int | None, where: str = "update_weights") -> Int4Reader:
        return cls(tensors.__getitem__, tensors, any(k.endswith(".weight_packed") for k in tensors), group_size, where)

    def has(self, key: str) -> bool:
        return key in self.keys

    def tensor(self, key: str) -> torch.Tensor:
        if key not in self.keys:
            raise QatctlError(f"{self.where}: tensor {key!r} is missing")
        return self._get(key)

    def is_quantized(self, module: str) -> bool:
        return self.has(f"{module}.weight_packed")

    def q_scale(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(q int8 [out, in], scale BF16 [out, in/group]) of a quantized module."""
        shape = self.tensor(f"{module}.weight_shape").tolist()
        return unpack(self.tensor(f"{module}.weight_packed"), shape), self.tensor(f"{module}.weight_scale")

    def weight(self, module: str) -> torch.Tensor:
        """The module's weight as inference computes with it: dequant(q, scale) in BF16 for a
        quantized module, the stored tensor otherwise."""
        if self.is_quantized(module):
            q, scale = self.q_scale(module)
            return dequant(q, scale, self.group_size)
        return self.tensor(f"{module}.weight")
