"""train-sft-qat: supervised fine-tuning through fake INT4 weights (STE), resumable.

Reads:  CKPT, a `qat-checkpoint` (its manifest carries the quant scheme), and --data FILE.jsonl
        with `{"messages": [...]}` (loss on assistant turns, the checkpoint's chat template) or
        `{"prompt", "completion"}` (loss on the completion).
Writes: a `qat-checkpoint` (BF16 HF folder) with `metrics.jsonl` (one line per step) and a
        manifest holding the loss curve, tokens/s and wall time, and whether fake quant was on.

The output also carries `trainer_state/` (fp32 masters + AdamW moments, safetensors), so a
chained stage continues exactly; an input's trainer_state is continued (--reset-optimizer: masters
only). Every `--save-every` steps the full training state (fp32 masters, AdamW, schedule, RNG,
step) is written atomically inside OUT.partial/state/ as safetensors + JSON (the last two kept); re-running the same command after a kill
resumes from it (the default; --no-resume starts over), and the result is bit-identical to an
uninterrupted run on CPU.

    qatctl train-sft-qat runs/demo/init --data recipes/data/arith-train.jsonl --out runs/demo/sft \\
        --steps 60 --batch-size 8 --micro-batch 8 --lr 5e-5
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from qatctl.artifacts import OutputDir, read_artifact
from qatctl.errors import QatctlError

STAGE, KIND = "train-sft-qat", "qat-checkpoint"


@dataclass(frozen=True)
class TrainSftQatConfig:
    ckpt: Path  # a qat-checkpoint
    data: Path  # JSONL: messages, or prompt + completion
    out: Path
    steps: int | None = None  # optimizer steps; default: one epoch (or --epochs)
    epochs: float | None = None  # passes over the data, used when steps is not given
    batch_size: int = 8  # sequences per optimizer step, over all ranks
    micro_batch: int = 4  # sequences per forward/backward (gradient accumulation in between)
    max_seq_len: int = 512  # tokens; longer examples are truncated (counted in the metrics)
    lr: float = 2e-5  # peak learning rate (AdamW)
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warmup, then cosine decay
    min_lr_ratio: float = 0.1  # final LR = lr * min_lr_ratio
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables
    seed: int = 0  # data order and RNG
    fake_quant_after: int = 0  # steps trained without fake quant before it switches on
    no_fake_quant: bool = False  # plain BF16 baseline through the same code
    save_every: int = 50  # steps between resumable checkpoints
    deepspeed: Path | None = None  # DeepSpeed JSON config (ZeRO 0-3); launch with deepspeed/torchrun
    device: str = "auto"  # auto, cpu or cuda
    compute_dtype: str = "auto"  # training matmuls: auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16 (autocast)
    reset_optimizer: bool = False  # start AdamW fresh instead of CKPT's trainer_state moments
    resume: bool = True  # continue from OUT.partial's last checkpoint of the same run
    force: bool = False  # replace an existing output made with other config/inputs

    def recorded(self) -> dict:
        d = asdict(self)
        for k in ("out", "force", "resume"):
            del d[k]
        return d


def _validate(c: TrainSftQatConfig) -> None:
    from qatctl.checks import fields_at_least

    fields_at_least(c, 1, "batch_size", "micro_batch", "max_seq_len", "save_every", "steps")
    if c.compute_dtype not in ("auto", "fp32", "bf16"):
        raise QatctlError(f"--compute-dtype {c.compute_dtype!r}: expected auto, fp32 or bf16")
    if c.epochs is not None:
        from qatctl.checks import finite as _finite

        _finite("--epochs", c.epochs, lo=0.0, lo_open=True, hi=1e6)
    if c.steps is not None and c.epochs is not None:
        raise QatctlError("--steps and --epochs: give one, not both")
    from qatctl.checks import finite

    finite("--lr", c.lr, lo=0.0, lo_open=True, hi=1.0)
    finite("--weight-decay", c.weight_decay, lo=0.0)
    finite("--min-lr-ratio", c.min_lr_ratio, lo=0.0, hi=1.0)
    finite("--max-grad-norm", c.max_grad_norm, lo=0.0)
    if c.warmup_steps < 0:
        raise QatctlError(f"--warmup-steps {c.warmup_steps}: must be >= 0")
    if c.fake_quant_after < 0:
        raise QatctlError(f"--fake-quant-after {c.fake_quant_after}: must be >= 0")
    if c.no_fake_quant and c.fake_quant_after:
        raise QatctlError("--no-fake-quant and --fake-quant-after: give one, not both")
    if c.batch_size % c.micro_batch:
        raise QatctlError(f"--batch-size {c.batch_size} is not a multiple of --micro-batch {c.micro_batch}")
    if c.deepspeed is not None and not Path(c.deepspeed).is_file():
        raise QatctlError(f"{c.deepspeed}: no such DeepSpeed config")


def run(config: TrainSftQatConfig) -> dict:
    _validate(config)
    src = read_artifact(config.ckpt, "qat-checkpoint")
    from qatctl.quant import QuantScheme

    scheme = QuantScheme.from_manifest(src.manifest.get("quant") or {}, str(config.ckpt))
    out = OutputDir(config.out, stage=STAGE, kind=KIND, config=config.recorded(),
                    inputs=[src.as_input(), _data_input(config.data)], force=config.force)
    if (done := out.up_to_date()) is not None:
        return {**done, "up_to_date": True}

    from qatctl import data, models

    tokenizer = models.load_tokenizer(config.ckpt)
    examples = data.load_sft(config.data, tokenizer, config.max_seq_len)  # bad lines fail before weights load
    total = config.steps or max(1, math.ceil((config.epochs or 1.0) * len(examples) / config.batch_size))

    import torch

    from qatctl import models
    from qatctl.train import (
        OptimSettings,
        RankedPartial,
        device_and_dtype,
        dist_env,
        make_trainer,
        resume_steps,
        save_step,
        sft_loss,
    )

    device, dtype = device_and_dtype(config.device)
    torch.manual_seed(config.seed)
    model, _ = models.load_checkpoint(config.ckpt, dtype=dtype)
    model.to(device).train()
    fake_quant = not config.no_fake_quant
    n_targets = models.apply_fake_quant(model, scheme) if fake_quant else 0
    settings = OptimSettings(lr=config.lr, weight_decay=config.weight_decay, warmup_steps=config.warmup_steps,
                             min_lr_ratio=config.min_lr_ratio, max_grad_norm=config.max_grad_norm,
                             compute_dtype=config.compute_dtype)
    trainer = make_trainer(model, settings, total, config.batch_size, config.micro_batch, config.deepspeed)
    from qatctl import state

    optimizer = trainer.optimizer if trainer.backend == "torch" else None  # DeepSpeed keeps its own
    continued = state.continue_from(src, model, None if config.reset_optimizer else optimizer)
    rank, _ = dist_env()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def batches(step: int):
        return data.sft_step_batches(examples, step, config.batch_size, config.micro_batch, config.seed, pad_id, device)

    with RankedPartial(out, trainer) as tmp:
        state_root = tmp / "state"
        history, start = resume_steps(trainer, state_root, config.resume)
        if trainer.is_main:
            _rewrite_metrics(tmp / "metrics.jsonl", history)
        t_start = time.perf_counter()
        wall_before = history[-1]["wall_seconds"] if history else 0.0
        from qatctl.ui import progress

        with progress(transient=False) as bar:
            task = bar.add_task("train-sft-qat", total=total, completed=start, info="")
            for step in range(start, total):
                qat_on = fake_quant and step >= config.fake_quant_after
                models.set_fake_quant(trainer.model, qat_on)
                t0 = time.perf_counter()
                stats = trainer.step(batches(step), sft_loss)
                dt = time.perf_counter() - t0
                tokens = trainer.reduce_sum(sum(i["tokens"] for i in stats["infos"]))
                row = {"step": step + 1, "loss": stats["loss"], "lr": stats["lr"], "grad_norm": stats["grad_norm"],
                       "tokens": int(tokens), "tokens_per_s": tokens / dt, "fake_quant": qat_on,
                       "wall_seconds": wall_before + time.perf_counter() - t_start}
                history.append(row)
                if trainer.is_main:
                    with open(tmp / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                bar.update(task, advance=1, info=f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
                                                 f"{row['tokens_per_s']:.0f} tok/s")
                if (step + 1) % config.save_every == 0 and step + 1 < total:
                    save_step(trainer, state_root, step + 1, {"step": step + 1, "history": history})
        model = trainer.gather_weights()
        if not trainer.is_main:
            trainer.barrier()
            return {"status": "complete", "rank": rank}
        # trainer_state/ first (atomic: from then on a rerun after a kill resumes from it and
        # trains nothing), the step states after it, the checkpoint last.
        trainer_state = state.write_trainer_state(tmp, model, optimizer, {"step": total})
        if trainer.backend == "torch":
            shutil.rmtree(state_root, ignore_errors=True)
        models.remove_fake_quant(model)
        models.save_checkpoint(model, tokenizer, tmp)
        shutil.rmtree(state_root, ignore_errors=True)
        metrics = {**_summary(history, examples, n_targets, trainer), "continued_from": continued}
        manifest = out.commit(tmp, quant=scheme.to_manifest(), metrics=metrics,
                              extra={"training": {"fake_quant": fake_quant,
                                                  "fake_quant_after": config.fake_quant_after},
                                     "trainer_state": trainer_state})
    trainer.barrier()
    return manifest


def _data_input(path: Path) -> dict:
    from qatctl.artifacts import file_input

    return file_input(path, "data")


def _rewrite_metrics(path: Path, history: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in history))


def _summary(history: list, examples, n_targets: int, trainer) -> dict:
    losses = [r["loss"] for r in history]
    tokens = sum(r["tokens"] for r in history)
    step_seconds = [r["tokens"] / r["tokens_per_s"] for r in history if r["tokens_per_s"] > 0]
    return {
        "steps": len(history), "examples": len(examples), "truncated_examples": sum(e.truncated for e in examples),
        "first_loss": losses[0], "final_loss": losses[-1], "loss_curve": losses,
        "tokens": tokens, "tokens_per_s": tokens / sum(step_seconds) if step_seconds else None,
        "wall_seconds": history[-1]["wall_seconds"], "fake_quant_targets": n_targets,
        "fake_quant_steps": sum(r["fake_quant"] for r in history), "backend": trainer.backend,
        "world_size": trainer.world, "threads": __import__("torch").get_num_threads(),
    }
