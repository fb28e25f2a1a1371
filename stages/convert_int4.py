"""convert-int4: `qat-checkpoint` -> `int4-checkpoint` in compressed-tensors pack-quantized format.

Reads:  a qat-checkpoint (its manifest names the quant scheme).
Writes: an HF folder SGLang and vLLM load as-is: every target Linear becomes `weight_packed`
        (int32 [out, in/8]), `weight_scale` (BF16 [out, in/group]) and `weight_shape`
        (int64 [2]); config.json gains `quantization_config`; tokenizer and generation config
        are copied. Works tensor by tensor, shard by shard: the input is memory-mapped and only
        one output shard is held at a time.

    qatctl convert-int4 runs/demo/init --out runs/demo/int4
    qatctl convert-int4 runs/demo/sft --format gguf --out runs/demo/gguf   # OUT/model.gguf (Q4_0)

--format gguf writes one llama.cpp file instead (qatctl/ggufformat.py): the same integers and
scales as Q4_0 blocks; the manifest counts the scales fp16 cannot hold exactly.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from qatctl.artifacts import OutputDir, read_artifact

STAGE, KIND = "convert-int4", "int4-checkpoint"
FORMATS = ("compressed-tensors", "gguf")
INDEX = "model.safetensors.index.json"  # int4format.INDEX (this module imports no torch at load)


@dataclass(frozen=True)
class ConvertInt4Config:
    ckpt: Path  # a qat-checkpoint
    out: Path
    force: bool = False  # replace an existing output made from other inputs
    format: str = "compressed-tensors"  # or gguf (one llama.cpp file, Q4_0 blocks)
    gguf_pre: str | None = None  # llama.cpp's tokenizer.ggml.pre (default: from the tokenizer)

    def recorded(self) -> dict:
        # the scheme comes from the input manifest, whose digest is recorded; the default format
        # records nothing (outputs made before --format existed stay up to date)
        if self.format == "compressed-tensors":
            return {}
        return {"format": self.format, "gguf_pre": self.gguf_pre}


def _shards(ckpt: Path) -> list[str]:
    if (ckpt / INDEX).is_file():
        return sorted(set(json.loads((ckpt / INDEX).read_text())["weight_map"].values()))
    return sorted(p.name for p in ckpt.glob("*.safetensors"))


def _check_shapes(ckpt: Path, shards: list[str], scheme) -> tuple[list[str], int]:
    """Validate every target's shape from the safetensors headers (no weight is read).

    Returns the Linear modules left in BF16 (the `ignore` list) and the number of targets.
    """
    from safetensors import safe_open

    from qatctl.errors import QatctlError
    from qatctl.int4format import ignored_modules, target_module
    from qatctl.quant import check_shape

    dense, n = [], 0
    for shard in shards:
        with safe_open(ckpt / shard, "pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                module = target_module(key, len(shape), scheme)
                if module is not None:
                    check_shape(f"{ckpt / shard}: {module}", shape, scheme)
                    n += 1
                elif len(shape) == 2 and key.endswith(".weight"):
                    dense.append(key)
    if n == 0:
        raise QatctlError(f"{ckpt}: no tensor matches the quant targets (decoder-block Linear weights)")
    return ignored_modules(dense, scheme), n


def run(config: ConvertInt4Config) -> dict:
    from qatctl.errors import QatctlError

    if config.format not in FORMATS:
        raise QatctlError(f"--format {config.format!r}: expected {' or '.join(FORMATS)}")
    if config.gguf_pre is not None and config.format != "gguf":
        raise QatctlError("--gguf-pre applies to --format gguf only")
    src = read_artifact(config.ckpt, "qat-checkpoint")
    if config.format == "gguf":
        return _run_gguf(config, src)
    out = OutputDir(config.out, stage=STAGE, kind=KIND, config=config.recorded(),
                    inputs=[src.as_input()], force=config.force)
    if (done := out.up_to_date()) is not None:
        return {**done, "up_to_date": True}

    from safetensors import safe_open

    from qatctl.errors import QatctlError
    from qatctl.int4format import convert_tensor, target_module, write_folder
    from qatctl.models import check_weight_files, load_tokenizer
    from qatctl.quant import QuantScheme
    from qatctl.state import read_json
    from qatctl.ui import progress

    ckpt = src.path
    scheme = QuantScheme.from_manifest(src.manifest.get("quant") or {}, f"{ckpt}/qatctl.json")
    shards = _shards(ckpt)
    if not shards:
        raise QatctlError(f"{ckpt}: no *.safetensors weights")
    check_weight_files(ckpt)  # truncated / empty / corrupt shards: one line, before any output
    read_json(ckpt / "config.json")  # a broken config.json is named as such, before the tokenizer reads it
    load_tokenizer(ckpt)  # copied into the output: one that does not fit the model is refused here
    ignore, n_targets = _check_shapes(ckpt, shards, scheme)

    t0 = time.perf_counter()
    bytes_in = sum((ckpt / s).stat().st_size for s in shards)
    with out.building() as tmp, progress() as bar:
        task = bar.add_task("convert-int4", total=n_targets, info="")

        def converted():  # one shard at a time: the input memory-mapped, one output shard held
            for shard in shards:
                tensors = {}
                with safe_open(ckpt / shard, "pt") as f:
                    for key in f.keys():
                        t = f.get_tensor(key)
                        tensors.update(convert_tensor(key, t, scheme, where=f"{ckpt / shard}: "))
                        if (module := target_module(key, t.ndim, scheme)) is not None:
                            bar.update(task, advance=1, info=module)
                yield shard, tensors

        index = read_json(ckpt / INDEX) if (ckpt / INDEX).is_file() else None
        write_folder(tmp, ckpt, converted(), scheme, ignore, index)

        seconds = time.perf_counter() - t0
        bytes_out = sum((tmp / s).stat().st_size for s in shards)
        metrics = {"quantized_tensors": n_targets, "bytes_in": bytes_in, "bytes_out": bytes_out,
                   "ratio": round(bytes_in / bytes_out, 3), "seconds": round(seconds, 3),
                   "gb_per_s": round(bytes_in / seconds / 1e9, 3), "ignore": ignore}
        return out.commit(tmp, quant=scheme.to_manifest(), metrics=metrics)


def _run_gguf(config: ConvertInt4Config, src) -> dict:
    """OUT/model.gguf: every quantized linear as Q4_0 blocks of the shared quantizer's codes and
    scales; refused (nothing written) where Q4_0 cannot express the scheme."""
    from qatctl.errors import QatctlError
    from qatctl.ggufformat import check_exportable, pretokenizer, write_gguf
    from qatctl.int4format import Int4Reader, convert_tensor
    from qatctl.models import check_weight_files, load_tokenizer
    from qatctl.quant import QuantScheme
    from qatctl.state import read_json

    ckpt = src.path
    scheme = QuantScheme.from_manifest(src.manifest.get("quant") or {}, f"{ckpt}/qatctl.json")
    cfg = read_json(ckpt / "config.json")
    check_exportable(cfg, scheme.group_size, str(ckpt))
    if not (ckpt / "tokenizer.json").is_file():
        raise QatctlError(f"{ckpt}: no tokenizer.json (the GGUF carries the tokenizer)")
    pre = pretokenizer(read_json(ckpt / "tokenizer.json"), config.gguf_pre, f"{ckpt}/tokenizer.json")
    out = OutputDir(config.out, stage=STAGE, kind="gguf", config=config.recorded(), inputs=[src.as_input()],
                    force=config.force)
    if (done := out.up_to_date()) is not None:
        return {**done, "up_to_date": True}
    shards = _shards(ckpt)
    if not shards:
        raise QatctlError(f"{ckpt}: no *.safetensors weights")
    check_weight_files(ckpt)
    tokenizer = load_tokenizer(ckpt)
    _check_shapes(ckpt, shards, scheme)

    from safetensors import safe_open

    t0 = time.perf_counter()
    tensors = {}
    for shard in shards:
        with safe_open(ckpt / shard, "pt") as f:
            for key in f.keys():
                tensors.update(convert_tensor(key, f.get_tensor(key), scheme, where=f"{ckpt / shard}: "))
    reader = Int4Reader.from_tensors(tensors, scheme.group_size, where=str(ckpt))
    with out.building() as tmp:
        exact = write_gguf(ckpt, reader, cfg, tokenizer, tmp / "model.gguf", pre, name=ckpt.name)
        metrics = {**exact, "tokenizer_pre": pre, "bytes_out": (tmp / "model.gguf").stat().st_size,
                   "seconds": round(time.perf_counter() - t0, 3)}
        return out.commit(tmp, quant=scheme.to_manifest(), metrics=metrics)
