"""The SFT-QAT run train-sft-qat drives, beside rl-step's (qatctl/rl/session.py): the policy
through fake INT4 weights (STE), its Trainer (plain torch or DeepSpeed), continued from the
input's trainer_state, and the steps with their resume states and metrics (qatctl/trainrun.py).
stages/train_sft_qat.py validates, opens the inputs and commits what this writes.

    session = SftSession(settings, optim, src, scheme, tokenizer, examples)
    with RankedPartial(out, session.trainer) as tmp:
        history = session.run(tmp)
        trainer_state = session.save_policy(tmp)      # None off rank 0
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qatctl import data, models, state
from qatctl.train import OptimSettings, device_and_dtype, dist_env, make_trainer
from qatctl.trainrun import TrainingRun


@dataclass(frozen=True, kw_only=True)
class SftSettings:
    """What the loop uses (train-sft-qat's options of the same names)."""

    steps: int  # optimizer steps of the whole run
    batch_size: int = 8  # sequences per optimizer step, over all ranks
    micro_batch: int = 4  # sequences per forward/backward
    seed: int = 0  # data order and torch's RNG
    fake_quant: bool = True  # off: the plain BF16 baseline through the same code
    fake_quant_after: int = 0  # steps trained without fake quant before it switches on
    save_every: int = 50  # steps between resume states
    resume: bool = True  # continue from OUT.partial's newest resume state
    reset_optimizer: bool = False  # AdamW fresh instead of the input's trainer_state moments
    deepspeed: Path | None = None  # DeepSpeed JSON config (ZeRO 0-3)
    device: str = "auto"


def sft_loss(model, mb):
    """Token cross-entropy on trained tokens, summed and divided by the step's trained-token count."""
    import torch.nn.functional as F

    ids, labels, mask, step_tokens = mb
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss / step_tokens, {"tokens": int(mask.sum())}


class SftSession:
    def __init__(self, s: SftSettings, optim: OptimSettings, src, scheme, tokenizer, examples):
        """src: the input qat-checkpoint (artifacts.Artifact); examples: data.load_sft's."""
        self.s, self.scheme, self.tokenizer, self.examples = s, scheme, tokenizer, examples
        self.device, dtype = device_and_dtype(s.device)
        torch.manual_seed(s.seed)
        model, _ = models.load_checkpoint(src.path, dtype=dtype)
        model.to(self.device).train()
        self.n_targets = models.apply_fake_quant(model, scheme) if s.fake_quant else 0
        self.trainer = make_trainer(model, optim, s.steps, s.batch_size, s.micro_batch, s.deepspeed)
        optimizer = self.trainer.optimizer if self.trainer.backend == "torch" else None  # DeepSpeed keeps its own
        self.continued = state.continue_from(src, model, None if s.reset_optimizer else optimizer)
        self.rank, _ = dist_env()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.run_folder: TrainingRun | None = None

    @property
    def is_main(self) -> bool:
        return self.trainer.is_main

    def barrier(self) -> None:
        self.trainer.barrier()

    def _batches(self, step: int):
        s = self.s
        return data.sft_step_batches(self.examples, step, s.batch_size, s.micro_batch, s.seed, self.pad_id, self.device)

    def run(self, tmp: Path) -> list[dict]:
        """Every step from where a killed run left off; the metrics history. Every rank runs it
        (tmp: OUT.partial; ranks other than 0 write only their ZeRO partitions into it)."""
        from qatctl.ui import progress

        s, trainer = self.s, self.trainer
        run = self.run_folder = TrainingRun(tmp, trainer, prefix="step", counter="step")
        history, start, _ = run.resume(s.resume)
        t_start = time.perf_counter()
        wall_before = history[-1]["wall_seconds"] if history else 0.0
        with progress(transient=False) as bar:
            task = bar.add_task("train-sft-qat", total=s.steps, completed=start, info="")
            for step in range(start, s.steps):
                qat_on = s.fake_quant and step >= s.fake_quant_after
                models.set_fake_quant(trainer.model, qat_on)
                t0 = time.perf_counter()
                stats = trainer.step(self._batches(step), sft_loss)
                dt = time.perf_counter() - t0
                tokens = trainer.reduce_sum(sum(i["tokens"] for i in stats["infos"]))
                row = {"step": step + 1, "loss": stats["loss"], "lr": stats["lr"], "grad_norm": stats["grad_norm"],
                       "tokens": int(tokens), "tokens_per_s": tokens / dt, "fake_quant": qat_on,
                       "wall_seconds": wall_before + time.perf_counter() - t_start}
                history.append(row)
                run.record([row])
                bar.update(task, advance=1, info=f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
                                                 f"{row['tokens_per_s']:.0f} tok/s")
                if (step + 1) % s.save_every == 0 and step + 1 < s.steps:
                    run.save(step + 1, {"history": history})
        return history

    def save_policy(self, tmp: Path) -> dict | None:
        """trainer_state/ first (atomic: from then on a rerun after a kill resumes from it and
        trains nothing), the BF16 checkpoint last; the manifest's trainer_state field. Every rank
        calls it (ZeRO-3 gathers collectively); None off rank 0."""
        model = self.trainer.gather_weights()
        if not self.is_main:
            return None
        info = self.run_folder.finish(model, {"step": self.s.steps})
        models.remove_fake_quant(model)
        models.save_checkpoint(model, self.tokenizer, tmp)
        self.run_folder.close()
        return info

    def summary(self, history: list) -> dict:
        losses = [r["loss"] for r in history]
        tokens = sum(r["tokens"] for r in history)
        step_seconds = [r["tokens"] / r["tokens_per_s"] for r in history if r["tokens_per_s"] > 0]
        return {
            "steps": len(history), "examples": len(self.examples),
            "truncated_examples": sum(e.truncated for e in self.examples),
            "first_loss": losses[0], "final_loss": losses[-1], "loss_curve": losses,
            "tokens": tokens, "tokens_per_s": tokens / sum(step_seconds) if step_seconds else None,
            "wall_seconds": history[-1]["wall_seconds"], "fake_quant_targets": self.n_targets,
            "fake_quant_steps": sum(r["fake_quant"] for r in history), "backend": self.trainer.backend,
            "world_size": self.trainer.world, "threads": torch.get_num_threads(), "continued_from": self.continued,
        }
