"""One training run's working folder, the same for train-sft-qat and rl-step: numbered resume
states written and read through the Trainer (plain torch, or DeepSpeed ZeRO 0-3 where every rank
writes its partition), resume after a kill, metrics.jsonl, and the final trainer_state/.

    with RankedPartial(out, trainer) as tmp:            # rank 0 owns OUT.partial
        run = TrainingRun(tmp, trainer, prefix="step", counter="step")
        history, done, meta = run.resume(enabled=True)  # [], 0, {} on a fresh start
        for ...:
            run.record([row])                           # one metrics.jsonl line (rank 0)
            run.save(done, {"history": history, ...})   # every --save-every (every rank)
        info = run.finish(model, meta)                  # trainer_state/ (rank 0)
        ...write the checkpoint...
        run.close()                                     # the resume states go

Layout inside OUT.partial (qatctl/state.py's folder layout):
    metrics.jsonl                one line per optimizer step (SFT) or iteration (RL)
    state/PREFIX-NNNNNN/         every --save-every; the newest two kept
    trainer_state/               written once training is over, before the checkpoint: a rerun
                                 that finds it complete trains nothing and writes the rest

A resume state's meta holds `counter` (steps or iterations done) and `history` (the metrics rows
so far), plus whatever the stage adds; a state that does not load falls back to the one before.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from qatctl import state
from qatctl.errors import QatctlError

STATES = "state"
METRICS = "metrics.jsonl"


def save_step(trainer, root: Path, number: int, meta: dict, prefix: str = "step", keep: int = 2) -> Path:
    """Write PREFIX-NNNNNN through the trainer (every rank: DeepSpeed writes partitions) into a
    tmp folder, rename it into place and keep the newest `keep` (a corrupt newest one then falls
    back to the one before: state.load_newest)."""
    final = root / f"{prefix}-{number:06d}"
    tmp = root / f"{prefix}-{number:06d}.tmp"
    if trainer.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    trainer.barrier()
    trainer.save_state(tmp, meta)
    if trainer.is_main:
        if final.exists():  # a corrupt state of this number that resume fell back past
            shutil.rmtree(final)
        os.replace(tmp, final)
        state.fsync_dir(root)
        for p in state.complete_states(root, prefix)[keep:]:
            shutil.rmtree(p, ignore_errors=True)
    trainer.barrier()
    return final


class RankedPartial:
    """`with RankedPartial(out, trainer) as tmp`: rank 0 owns OUT.partial (kept for resume);
    other ranks get its path to write their ZeRO partitions into."""

    def __init__(self, out, trainer):  # out: an artifacts.OutputDir
        self.out, self.trainer, self.ctx = out, trainer, None

    def __enter__(self) -> Path:
        if self.trainer.is_main:
            self.ctx = self.out.building(resume=True)
            path = self.ctx.__enter__()
        self.trainer.barrier()
        return path if self.trainer.is_main else self.out.partial

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx else False


class TrainingRun:
    """OUT.partial of one training stage. `trainer` is a train.Trainer, or a callable that builds
    it for a loop that makes it lazily (rl-step under DeepSpeed: the first iteration scores before
    the engine exists): it is then built here only when a state must be loaded. `prefix` names
    the state folders (step, iter); `counter` is the meta key counting what is done; `rank` is
    this process's (dist_env) while the trainer is not built."""

    def __init__(self, tmp: Path, trainer, *, prefix: str, counter: str, rank: int = 0,
                 require: tuple[str, ...] = ()):
        self.tmp, self.prefix, self.counter, self.rank = tmp, prefix, counter, rank
        self._trainer = trainer
        self.require = (counter, "history", *require)
        self.root, self.metrics = tmp / STATES, tmp / METRICS

    @property
    def trainer(self):
        """The trainer (built now if it was lazy)."""
        if callable(self._trainer) and not hasattr(self._trainer, "step"):
            self._trainer = self._trainer()
        return self._trainer

    @property
    def built(self) -> bool:
        return hasattr(self._trainer, "step")

    @property
    def is_main(self) -> bool:
        return self._trainer.is_main if self.built else self.rank == 0

    def resume(self, enabled: bool) -> tuple[list, int, dict]:
        """(metrics history, steps or iterations done, the state's meta) from the finished run's
        trainer_state/ (plain torch: it holds the whole state), else from the newest loadable
        resume state; ([], 0, {}) with the states cleared when there is none or `enabled` is off.
        metrics.jsonl is rewritten to the history (rank 0)."""
        history, done, meta = self._resume(enabled)
        if self.is_main:
            self.metrics.write_text("".join(json.dumps(r) + "\n" for r in history))
        return history, done, meta

    def _resume(self, enabled: bool) -> tuple[list, int, dict]:
        from qatctl.ui import console

        if not self.built and not (enabled and state.complete_states(self.root, self.prefix)):
            if self.is_main:  # nothing to load: the lazy trainer stays unbuilt
                shutil.rmtree(self.root, ignore_errors=True)
                if not enabled:
                    shutil.rmtree(self.tmp / state.TRAINER_STATE, ignore_errors=True)
            return [], 0, {}
        trainer = self.trainer
        final = state.final_state(self.tmp) if trainer.backend == "torch" else None
        if enabled and final is not None:  # training had finished; the kill came during the final save
            try:
                meta = trainer.load_state(final, require=self.require[2:])
                history = [json.loads(ln) for ln in self.metrics.read_text().splitlines()]
            except (QatctlError, OSError, ValueError) as e:
                console.print(f"[yellow]warning:[/] {final} does not load ({e}); resuming from the {self.prefix} states")
                shutil.rmtree(final)
            else:
                console.print(f"resuming from {final} (training finished after {len(history)} {self.prefix}s; "
                              "writing the output)")
                return history, len(history), meta
        if not enabled and trainer.is_main:
            shutil.rmtree(self.tmp / state.TRAINER_STATE, ignore_errors=True)
        found = state.load_newest(self.root, self.prefix, lambda f: trainer.load_state(f, require=self.require)) \
            if enabled else None
        if found is None:
            if self.root.exists() and trainer.is_main:
                shutil.rmtree(self.root, ignore_errors=True)
            trainer.barrier()
            return [], 0, {}
        folder, meta = found
        if trainer.is_main:
            console.print(f"resuming from {folder} ({self.prefix} {meta[self.counter]})")
        return meta["history"], meta[self.counter], meta

    def record(self, rows: list[dict], name: str = METRICS) -> None:
        """Append rows to a JSONL file of the run (metrics.jsonl by default); rank 0 only."""
        if not self.is_main:
            return
        with open(self.tmp / name, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    def save(self, done: int, meta: dict) -> Path:
        """The resume state after `done` steps or iterations (every rank calls it)."""
        return save_step(self.trainer, self.root, done, {self.counter: done, **meta}, prefix=self.prefix)

    def finish(self, model, meta: dict) -> dict:
        """trainer_state/ (fp32 masters; AdamW without DeepSpeed, which keeps its own) written
        atomically first: with plain torch it holds the whole state, so the resume states go at
        once (under DeepSpeed they stay until `close`). The manifest field describing it. Rank 0
        only, after trainer.gather_weights()."""
        trainer = self._trainer if self.built else None  # a lazy one never built: masters only
        torch_backend = trainer is not None and trainer.backend == "torch"
        info = state.write_trainer_state(self.tmp, model, trainer.optimizer if torch_backend else None, meta)
        if torch_backend:
            shutil.rmtree(self.root, ignore_errors=True)
        return info

    def close(self, *work: str) -> None:
        """After the checkpoint is written: the resume states and the named work folders go."""
        for name in (STATES, *work):
            shutil.rmtree(self.tmp / name, ignore_errors=True)
