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

import math
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

    from qatctl.sft import SftSession, SftSettings
    from qatctl.train import OptimSettings
    from qatctl.trainrun import RankedPartial

    c = config
    settings = SftSettings(steps=total, batch_size=c.batch_size, micro_batch=c.micro_batch, seed=c.seed,
                           fake_quant=not c.no_fake_quant, fake_quant_after=c.fake_quant_after,
                           save_every=c.save_every, resume=c.resume, reset_optimizer=c.reset_optimizer,
                           deepspeed=c.deepspeed, device=c.device)
    optim = OptimSettings(lr=c.lr, weight_decay=c.weight_decay, warmup_steps=c.warmup_steps,
                          min_lr_ratio=c.min_lr_ratio, max_grad_norm=c.max_grad_norm, compute_dtype=c.compute_dtype)
    session = SftSession(settings, optim, src, scheme, tokenizer, examples)
    with RankedPartial(out, session.trainer) as tmp:
        history = session.run(tmp)
        trainer_state = session.save_policy(tmp)
        if not session.is_main:
            session.barrier()
            return {"status": "complete", "rank": session.rank}
        manifest = out.commit(tmp, quant=scheme.to_manifest(), metrics=session.summary(history),
                              extra={"training": {"fake_quant": settings.fake_quant,
                                                  "fake_quant_after": c.fake_quant_after},
                                     "trainer_state": trainer_state})
    session.barrier()
    return manifest


def _data_input(path: Path) -> dict:
    from qatctl.artifacts import file_input

    return file_input(path, "data")
