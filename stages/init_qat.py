"""init-qat: turn a pretrained model into a `qat-checkpoint` with its INT4 scheme attached.

Reads:  MODEL, an HF folder, a .gguf file, or a preset (smollm2-135m, tiny-llama, tiny-qwen3,
        tiny-qwen3-moe).
Writes: a `qat-checkpoint`: BF16 safetensors masters that plain transformers loads, tokenizer,
        generation config, and a manifest carrying the quant scheme and the PTQ error (SQNR)
        of every tensor the scheme will quantize.

    qatctl init-qat smollm2-135m --out runs/demo/init --group-size 32 --scale-rule kimi
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from qatctl.artifacts import OutputDir, sha256_file
from qatctl.scheme import QuantScheme

STAGE, KIND = "init-qat", "qat-checkpoint"


@dataclass(frozen=True)
class InitQatConfig:
    model: str  # HF folder, .gguf file, or preset name
    out: Path
    group_size: int = QuantScheme.group_size  # 32, 64 or 128 input elements per scale
    scale_rule: str = QuantScheme.scale_rule  # kimi (amax/7, q in [-7,7]) or minmax (amax/7.5, q in [-8,7])
    ignore: tuple[str, ...] = ()  # extra modules left in BF16: exact name, prefix or re:regex
    preset_targets: str | None = None  # "kimi-experts": quantize routed MoE experts only
    seed: int = 0  # initializes the tiny random presets
    force: bool = False  # replace an existing output with a different config

    def recorded(self) -> dict:
        d = asdict(self)
        del d["out"], d["force"]
        return d


def scheme_for(config: InitQatConfig):
    from qatctl.errors import QatctlError
    from qatctl.scheme import DEFAULT_IGNORE, TARGET_PRESETS

    if config.preset_targets is not None and config.preset_targets not in TARGET_PRESETS:
        raise QatctlError(f"--preset-targets {config.preset_targets!r}: unknown (known: {', '.join(TARGET_PRESETS)})")
    extra = TARGET_PRESETS.get(config.preset_targets, ())
    return QuantScheme(group_size=config.group_size, scale_rule=config.scale_rule,
                       ignore=tuple(dict.fromkeys((*DEFAULT_IGNORE, *extra, *config.ignore))))


def _source_input(src) -> dict:
    if src.kind == "preset" and src.path is None:
        digest = hashlib.sha256(f"preset:{src.name}".encode()).hexdigest()
    elif src.path.is_file():
        digest = sha256_file(src.path)
    else:  # the files that define the model; tokenizer edits do not change the weights' digest
        h = hashlib.sha256()
        for p in sorted(src.path.glob("*.safetensors")) + [src.path / "config.json"]:
            h.update(p.name.encode() + sha256_file(p).encode())
        digest = h.hexdigest()
    return {**src.describe(), "digest": digest}


def run(config: InitQatConfig) -> dict:
    scheme = scheme_for(config)  # bad scheme settings fail before anything is read
    from qatctl import models

    src = models.resolve_source(config.model)
    out = OutputDir(config.out, stage=STAGE, kind=KIND, config=config.recorded(),
                    inputs=[_source_input(src)], force=config.force)
    if (done := out.up_to_date()) is not None:
        return {**done, "up_to_date": True}

    import torch

    # Shapes are checked on a meta-device model before any weight is read.
    from transformers import AutoModelForCausalLM

    from qatctl.quant import SqnrTotals, check_quantizable, fake_quant_value
    from qatctl.ui import progress
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(models.load_config(src))
    models.check_model_shapes(meta, scheme)
    del meta

    t0 = time.perf_counter()
    model, tokenizer = models.load_source(src, seed=config.seed)
    load_s = time.perf_counter() - t0
    targets = list(models.quant_targets(model, scheme))
    totals = SqnrTotals()
    with torch.no_grad(), progress() as bar:
        task = bar.add_task("PTQ error", total=len(targets), info="")
        for name, mod, pname in targets:
            w = getattr(mod, pname)
            check_quantizable(name, w, scheme)
            w_bf16 = w.to(torch.bfloat16)
            totals.add(name, w_bf16, fake_quant_value(w_bf16, scheme))
            bar.update(task, advance=1, info=name)
    n_params = sum(p.numel() for p in model.parameters())

    with out.building() as tmp:
        t1 = time.perf_counter()
        models.save_checkpoint(model, tokenizer, tmp)
        metrics = {**totals.summary(), "params": n_params, "model_type": model.config.model_type,
                   "load_seconds": round(load_s, 3), "save_seconds": round(time.perf_counter() - t1, 3),
                   "sqnr_db_per_tensor": totals.per_tensor}
        return out.commit(tmp, quant=scheme.to_manifest(), metrics=metrics)


def sqnr_rows(per_tensor: dict) -> list[tuple]:
    """Per-tensor SQNR grouped by role (q_proj, experts.down_proj, ...): count, mean, worst."""
    groups = defaultdict(list)
    for name, db in per_tensor.items():
        role = re.sub(r"^.*?layers\.\d+\.", "", name)
        groups[re.sub(r"\.\d+\.", ".", role)].append((db if db is not None else float("inf"), name))
    rows = []
    for role, vals in groups.items():
        worst = min(vals)
        rows.append((role, len(vals), sum(v for v, _ in vals) / len(vals), worst[0], worst[1]))
    return rows
