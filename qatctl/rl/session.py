"""One rl-step run around the GRPO loop: the policy and its optimizer (continued from the input's
trainer_state), the rollout engine and how weights reach it, resume state, and the per-iteration
files. stages/rl_step.py validates, opens the inputs, and commits what this writes.

Files it keeps in the output folder while it runs (OUT.partial):
    metrics.jsonl            one line per iteration
    rollouts.jsonl           every drawn group's rollouts, with `iteration` and `used`
    state/iter-NNNNNN/       resume state every --save-every iterations (qatctl/state.py layout + loop meta)
    sync/iter-NNNNNN/        with --engine-url: the INT4 checkpoint pushed after iteration N (latest only)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from qatctl import models
from qatctl.errors import QatctlError
from qatctl.rl.loop import GRPOLoop, rollout_tensors
from qatctl.state import continue_from
from qatctl.train import (
    OptimSettings,
    barrier,
    compute_context,
    device_and_dtype,
    dist_env,
    init_distributed,
    make_trainer,
    resolve_compute_dtype,
)
from qatctl.trainrun import TrainingRun


class Session:
    def __init__(self, c, policy, int4, reference, scheme, tokenizer, prompts, reward_fn):
        self.c, self.scheme, self.tokenizer = c, scheme, tokenizer
        self.rank, self.world = dist_env() if c.deepspeed else (0, 1)
        if c.deepspeed is not None:  # ranks meet before the DeepSpeed engine exists (OUT.partial)
            _deepspeed_env()
            init_distributed()
        self.fake_quant = not c.no_fake_quant and c.rollout_precision == "int4"
        self.device, dtype = device_and_dtype(c.device)
        model, _ = models.load_checkpoint(policy.path, dtype=dtype)
        model.to(self.device)
        if self.fake_quant:
            models.apply_fake_quant(model, scheme)
        # The rollout engine holds the BF16 rounding of every master (that is what a sync pushes):
        # the trainer computes with the same BF16 values, as a BF16 trainer's forward does.
        models.apply_bf16_view(model)
        self.model, self.trainer = model, None
        self.compute_dtype = resolve_compute_dtype(c.compute_dtype, self.device)
        settings = OptimSettings(lr=c.lr, max_grad_norm=c.max_grad_norm, min_lr_ratio=1.0,
                                 compute_dtype=self.compute_dtype)
        self._make_trainer = lambda n: make_trainer(model, settings, 1, n, 1, c.deepspeed)
        if c.deepspeed is None:
            self.trainer = self._make_trainer(1)
        self.continued = continue_from(policy, model, self.trainer.optimizer if self.trainer and not c.reset_optimizer
                                       else None)
        ref_model = None
        if c.kl_coef > 0:
            ref_model, _ = models.load_checkpoint((reference or policy).path, dtype=dtype)
            if self.fake_quant:
                models.materialize_fake_quant(ref_model, scheme)
            ref_model.to(self.device)
        self.engine, self.engine_info = self._open_engine(policy, int4)
        prev = policy.manifest.get("rl") or {}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.loop = GRPOLoop(c, model, pad, self.engine, self._trainer_for, reward_fn, prompts, sync=self._sync,
                             world=self.world, iteration=int(prev.get("iteration", 0)),
                             cursor=int(prev.get("cursor", 0)), reference=ref_model,
                             device=self.device,
                             compute=lambda m: compute_context(m, self.compute_dtype, self.device),
                             refresh=self._refresh)
        self.sync_root = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        barrier()  # the process group exists before the trainer (init_distributed)

    def _trainer_for(self, n_micro: int):
        if self.trainer is None:
            self.trainer = self._make_trainer(n_micro)
        return self.trainer

    # ------------------------------------------------------------------ engine and weight sync

    def _open_engine(self, policy, int4):
        c = self.c
        if c.engine_url:
            from qatctl.engines import connect

            engine = connect(c.engine_url, api_key=c.api_key)
            engine.update_weights_from_disk(str(Path(c.rollout_model).resolve()),
                                            weight_version=str(self.start_iteration_of(policy)))
            return engine, {"engine": "remote", "url": c.engine_url}
        from qatctl.engines import load_engine

        if c.rollout_precision == "bf16":
            engine = load_engine(policy.path, weights="bf16", device=c.device, exact=c.true_on_policy)
        elif int4 is not None:
            engine = load_engine(int4.path, device=c.device, exact=c.true_on_policy)
        else:  # quantized in memory by the shared converter: the bits convert-int4 would write
            engine = load_engine(policy.path, device=c.device, group_size=self.scheme.group_size,
                                 tensors=rollout_tensors(self.model, self.scheme, "int4"), exact=c.true_on_policy)
        if c.true_on_policy and not engine.exact:
            raise QatctlError(f"--true-on-policy: the engine on {engine.device} has no exact forward "
                              f"(kernel: {engine.kernel})")
        engine.max_running = c.max_batch
        info = engine.info()
        return engine, {"engine": "embedded", "kernel": info["kernel"], "lm_head_kernel": info["lm_head_kernel"],
                        "max_batch": info["max_running"], "exact": info["exact"]}

    @staticmethod
    def start_iteration_of(policy) -> int:
        return int((policy.manifest.get("rl") or {}).get("iteration", 0))

    def _refresh(self, model) -> None:
        """--true-on-policy between two optimizer steps of one iteration: the engine takes the policy
        as it is now (in memory, as a sync), so its forward gives the updated policy's logprobs."""
        with self._full_weights():
            tensors = rollout_tensors(model, self.scheme, self.c.rollout_precision)
        self.engine.update_weights(tensors)

    def _full_weights(self):
        """ZeRO-3 partitions the masters between steps: a sync reads them whole."""
        import contextlib

        return self.trainer.full_weights() if self.trainer is not None else contextlib.nullcontext()

    def _sync(self, model, iteration: int) -> dict:
        """Push the updated policy to the engine; its parts' seconds: requantize (masters -> BF16
        -> the shared INT4 quantizer and packing, or the BF16 copy) and load (into the engine)."""
        import time

        t = time.perf_counter()
        with self._full_weights():
            tensors = rollout_tensors(model, self.scheme, self.c.rollout_precision)
        t2 = time.perf_counter()
        if not self.c.engine_url:
            self.engine.update_weights(tensors)
            return {"sync_requantize": t2 - t, "sync_load": time.perf_counter() - t2}
        from qatctl.int4format import write_int4_checkpoint

        if self.is_main:  # one push; the other DeepSpeed ranks roll out on the server after it
            folder = self.sync_root / f"iter-{iteration:06d}"
            write_int4_checkpoint(tensors, self.c.policy, folder, self.scheme, note={"iteration": iteration},
                                  stage="rl-step")
            self.engine.update_weights_from_disk(str(folder.resolve()), weight_version=str(iteration))
            for old in self.sync_root.glob("iter-*"):
                if old != folder:
                    shutil.rmtree(old, ignore_errors=True)
        self.barrier()
        return {"sync_requantize": t2 - t, "sync_load": time.perf_counter() - t2}

    # ------------------------------------------------------------------ the run

    def run(self, tmp: Path) -> dict:
        """All iterations (resuming from the newest state a killed run left in OUT.partial); the
        summary metrics. Every DeepSpeed rank runs it (tmp: OUT.partial; ranks other than 0 write
        only their ZeRO partitions into it)."""
        from qatctl.ui import progress

        c, loop = self.c, self.loop
        self.sync_root = tmp / "sync"
        run = self.run_folder = TrainingRun(tmp, self._trainer_factory(), prefix="iter", counter="done",
                                            rank=self.rank, require=("iteration", "cursor"))
        history, done, meta = run.resume(c.resume)
        if meta:
            loop.iteration, loop.cursor = meta["iteration"], meta["cursor"]
            if done < c.iterations:
                self._sync(self.model, loop.iteration)  # the engine serves the resumed masters
        if self.is_main:  # rollouts of iterations the resumed state has not seen are drawn again
            rollouts = tmp / "rollouts.jsonl"
            kept = [ln for ln in (rollouts.read_text().splitlines() if rollouts.is_file() else [])
                    if json.loads(ln)["iteration"] <= loop.iteration] if meta else []
            rollouts.write_text("".join(ln + "\n" for ln in kept))
        with progress(transient=False) as bar:
            task = bar.add_task("rl-step", total=c.iterations, completed=done, info="")
            for j in range(done, c.iterations):
                last = j + 1 == c.iterations
                loop.sync_fn = _no_sync if last else self._sync  # the output is written, not pushed
                rows, metrics = loop.iteration_step()
                metrics["synced"] = not last
                history.append(metrics)
                run.record([metrics])
                run.record(rows, "rollouts.jsonl")
                if c.save_every and (j + 1) % c.save_every == 0 and not last:
                    run.save(j + 1, {"iteration": loop.iteration, "cursor": loop.cursor, "history": history})
                gap = ("0 exact" if metrics.get("mismatch_exact")
                       else f"{metrics['train_rollout_logprob_abs_diff_mean'] or 0:.4f}")
                bar.update(task, advance=1, info=f"reward {metrics['reward_mean']:.3f}  |dlogp| {gap}")
        return self._summary(history)

    def _trainer_factory(self):
        """The trainer, or (DeepSpeed, before the first update) what builds it: iteration 1 scores
        its rollouts before the engine exists, so a run that loads no state builds it there."""
        if self.trainer is not None:
            return self.trainer
        return lambda: self._trainer_for(self.world)  # the step sets its own accumulation

    def _summary(self, history: list) -> dict:
        last = dict(history[-1])
        curve = lambda key: [m[key] for m in history]  # noqa: E731
        return {**last, "iterations_run": len(history), "arm": self.c.arm, "fake_quant": self.fake_quant,
                "reward_curve": curve("reward_mean"), "mismatch_curve": curve("train_rollout_logprob_abs_diff_mean"),
                "rollout_engine": self.engine_info, "backend": self.trainer.backend if self.trainer else None,
                # what a result must hold fixed from its first iteration to its last
                "compute_dtype": str(self.compute_dtype), "threads": _threads(),
                "prompt_order": self.c.prompt_order, "prompt_passes": round(self.loop.cursor / len(self.loop.prompts), 3),
                "continued_from": self.continued}

    def save_policy(self, tmp: Path) -> dict | None:
        """trainer_state/ first (fp32 masters, AdamW without DeepSpeed, and the loop's position:
        atomic, so a rerun after a kill from here on resumes from it and runs no iteration again),
        the BF16 checkpoint last; resume states and pushed checkpoints are not part of the output.
        Every DeepSpeed rank calls it (ZeRO-3 gathers collectively); None off rank 0."""
        model = self.trainer.gather_weights() if self.trainer is not None else self.model
        if not self.is_main:
            return None
        info = self.run_folder.finish(model, {"iteration": self.loop.iteration, "cursor": self.loop.cursor})
        models.remove_fake_quant(model)
        models.save_checkpoint(model, self.tokenizer, tmp)
        self.run_folder.close("sync")
        return info

    def rl_state(self, prompts_path) -> dict:
        return {"iteration": self.loop.iteration, "cursor": self.loop.cursor, "prompts": str(prompts_path)}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _deepspeed_env() -> None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _no_sync(model, iteration):
    pass
