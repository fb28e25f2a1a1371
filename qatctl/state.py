"""Training state on disk as safetensors + JSON (no pickles): fp32 masters, AdamW, schedule, RNG.

One layout serves the resume folders of train-sft-qat and rl-step and the `trainer_state/`
subfolder a training stage leaves in its output qat-checkpoint (so a chained stage continues
exactly: BF16 weights alone round a small update away):

    masters.safetensors     {param name: fp32 master}        names as on disk (no parametrization)
    optimizer.safetensors   {name + ".exp_avg", ".exp_avg_sq", ".step"}
    state.json              {"optimizer": {"type": "AdamW", "param_groups": [...]},
                             "scheduler": LambdaLR state or null, "python_rng": [...], "meta": {...}}
    rng.safetensors         {"torch": torch's CPU generator state}

Every file is written, flushed and fsynced before the folder is renamed into place, and
loading checks names, shapes and dtypes against the live model before anything is changed:
a state from another model is a one-line error (exit 2), never a partial load.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from qatctl.artifacts import fsync_dir
from qatctl.errors import QatctlError
from qatctl.safeio import open_safetensors, read_json, read_tensors  # noqa: F401  (re-exported)

TRAINER_STATE = "trainer_state"  # subfolder of a qat-checkpoint written by a training stage
MASTERS, OPTIMIZER, STATE, RNG = "masters.safetensors", "optimizer.safetensors", "state.json", "rng.safetensors"
ADAM_KEYS = ("exp_avg", "exp_avg_sq", "step")


def param_name(name: str) -> str:
    """The on-disk name of a parameter: `a.parametrizations.weight.original` -> `a.weight`."""
    return name.replace(".parametrizations.", ".").removesuffix(".original")


def named_masters(model) -> dict[str, torch.nn.Parameter]:
    """{on-disk name: parameter} of every trainable parameter (tied ones once)."""
    return {param_name(n): p for n, p in model.named_parameters() if p.requires_grad}


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(tensors: dict, path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_state(folder: Path, model, optimizer=None, scheduler=None, meta: dict | None = None) -> None:
    """Write the state into `folder` (created here). The caller renames a tmp folder into place."""
    folder.mkdir(parents=True)
    masters = named_masters(model)
    _save_tensors({n: p.float() for n, p in masters.items()}, folder / MASTERS)
    state = {"meta": meta or {}, "optimizer": None, "scheduler": None}
    if optimizer is not None:
        by_id = {id(p): n for n, p in masters.items()}
        tensors = {}
        for p, s in optimizer.state.items():
            for key in ADAM_KEYS:
                if key in s:
                    tensors[f"{by_id[id(p)]}.{key}"] = s[key] if torch.is_tensor(s[key]) else torch.tensor(s[key])
        _save_tensors(tensors, folder / OPTIMIZER)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        state["optimizer"] = {"type": type(optimizer).__name__, "param_groups": _jsonable(groups)}
    if scheduler is not None:
        state["scheduler"] = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    save_meta(folder, state)


def save_meta(folder: Path, state: dict) -> None:
    """The RNG and state.json (written last: its presence marks the folder complete)."""
    state = {"python_rng": _jsonable(random.getstate()), **state}
    _save_tensors({"torch": torch.get_rng_state()}, folder / RNG)
    _write_json(folder / STATE, state)
    fsync_dir(folder)


def _meta_of(folder: Path, state, require: tuple[str, ...]) -> dict:
    """state.json's meta, with the keys a resumed loop needs: a state.json edited or cut to
    something else is a one-line error naming it (so a resume falls back to an older state)."""
    meta = state.get("meta") if isinstance(state, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    missing = [k for k in require if k not in meta]
    if missing or not isinstance(state, dict):
        raise QatctlError(f"{folder / STATE}: its meta lacks {', '.join(missing) or 'everything'} "
                          "(not a resume state qatctl wrote)")
    return meta


def load_meta(folder: Path, restore_rng: bool = True, require: tuple[str, ...] = ()) -> dict:
    """state.json's meta, restoring the RNG state saved beside it."""
    state = read_json(folder / STATE)
    _meta_of(folder, state, require)
    if restore_rng:
        rng = read_tensors(folder / RNG)
        torch.set_rng_state(rng["torch"])
        random.setstate(_tupled(state["python_rng"]))
    return state.get("meta") or {}


def load_state(folder: Path, model, optimizer=None, scheduler=None, restore_rng: bool = True,
               restore_groups: bool = True, require: tuple[str, ...] = ()) -> dict:
    """Load masters (and the optimizer, scheduler and RNG when given) from `folder`; returns meta.

    `restore_groups` also restores the optimizer's hyperparameters (the scheduled lr of a resumed
    run); a new run continuing another's state keeps its own. Everything is read and checked
    first; the model and optimizer change only when all of it fits.
    """
    state = read_json(folder / STATE)
    _meta_of(folder, state, require)
    masters = named_masters(model)
    saved = read_tensors(folder / MASTERS)
    _check_tensors(folder / MASTERS, saved, {n: (tuple(p.shape), torch.float32) for n, p in masters.items()})
    opt_tensors = None
    if optimizer is not None:
        if not state.get("optimizer"):
            raise QatctlError(f"{folder / STATE}: holds no optimizer state")
        if state["optimizer"].get("type") != type(optimizer).__name__:
            raise QatctlError(f"{folder / STATE}: optimizer {state['optimizer'].get('type')!r}, expected "
                              f"{type(optimizer).__name__}")
        opt_tensors = read_tensors(folder / OPTIMIZER)
        for key, t in opt_tensors.items():
            name, _, kind = key.rpartition(".")
            if name not in masters or kind not in ADAM_KEYS:
                raise QatctlError(f"{folder / OPTIMIZER}: tensor {key!r} matches no parameter of this model")
            if kind != "step" and tuple(t.shape) != tuple(masters[name].shape):
                raise QatctlError(f"{folder / OPTIMIZER}: {key} has shape {tuple(t.shape)}, the model's parameter "
                                  f"has {tuple(masters[name].shape)} (state from another model)")
            if not torch.isfinite(t).all():
                raise QatctlError(f"{folder / OPTIMIZER}: {key} holds NaN/Inf values")
    rng = read_tensors(folder / RNG) if restore_rng else None
    with torch.no_grad():
        for name, p in masters.items():
            p.copy_(saved[name])
    if optimizer is not None:
        groups = state["optimizer"]["param_groups"]
        if len(groups) != len(optimizer.param_groups):
            raise QatctlError(f"{folder / STATE}: {len(groups)} optimizer param groups, expected "
                              f"{len(optimizer.param_groups)}")
        if restore_groups:
            for group, saved_group in zip(optimizer.param_groups, groups, strict=True):
                group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved_group.items()})
        optimizer.state.clear()
        for name, p in masters.items():
            # Moments live beside their parameter (CUDA masters); `step` stays a CPU scalar, as
            # torch's own Optimizer.load_state_dict leaves it for the foreach/for-loop AdamW.
            s = {k: opt_tensors[f"{name}.{k}"].to(p.device if k != "step" else "cpu", copy=True)
                 for k in ADAM_KEYS if f"{name}.{k}" in opt_tensors}
            if s:
                optimizer.state[p] = s
    if scheduler is not None and state.get("scheduler"):
        scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
    if rng is not None:
        torch.set_rng_state(rng["torch"])
        random.setstate(_tupled(state["python_rng"]))
    return state.get("meta") or {}


def _check_tensors(path: Path, saved: dict, expected: dict) -> None:
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    if missing or extra:
        what = f"missing {missing[:2]}" if missing else f"unknown {extra[:2]}"
        raise QatctlError(f"{path}: does not match the model's parameters ({what}; state from another model)")
    for name, (shape, dtype) in expected.items():
        t = saved[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise QatctlError(f"{path}: {name} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape} "
                              "(state from another model)")
        if not torch.isfinite(t).all():
            raise QatctlError(f"{path}: {name} holds NaN/Inf values")


def _jsonable(obj):
    if isinstance(obj, (tuple, list)):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if torch.is_tensor(obj):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    return obj


def _tupled(obj):
    return tuple(_tupled(x) for x in obj) if isinstance(obj, list) else obj


# ---------------------------------------------------------------- numbered state folders

def complete_states(root: Path, prefix: str) -> list[Path]:
    """Complete `PREFIX-NNNNNN` folders under root (state.json present), newest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.glob(f"{prefix}-*") if not p.name.endswith(".tmp") and (p / STATE).is_file()]
    return sorted(done, key=lambda p: int(p.name.rsplit("-", 1)[1]), reverse=True)


def load_newest(root: Path, prefix: str, load) -> tuple[Path, dict] | None:
    """load(folder) on the newest complete state; a corrupt one falls back to the next with a
    warning. None when there is none; an error naming --no-resume when none loads."""
    from qatctl.ui import console

    states = complete_states(root, prefix)
    errors = []
    for folder in states:
        try:
            return folder, load(folder)
        except QatctlError as e:
            errors.append(str(e))
            console.print(f"[yellow]warning:[/] resume state {folder} does not load ({e}); trying an older one")
    if errors:
        raise QatctlError(f"{root}: no resume state loads ({errors[0]}); rerun with --no-resume to start over")
    return None


def continue_from(artifact, model, optimizer) -> dict | None:
    """Load the artifact's trainer_state (fp32 masters; AdamW moments and step when `optimizer`
    is given) into the model built from its BF16 weights. The masters must round to exactly
    those weights: a trainer_state from another checkpoint is refused."""
    info = artifact.manifest.get(TRAINER_STATE)
    folder = artifact.path / TRAINER_STATE
    if not info or not folder.is_dir():
        return None
    if optimizer is not None and not info.get("optimizer"):
        optimizer = None  # written without one (DeepSpeed): AdamW starts fresh
    named = named_masters(model)
    bf16 = {n: p.detach().to(torch.bfloat16) for n, p in named.items()}
    load_state(folder, model, optimizer, restore_rng=False, restore_groups=False)
    for n, p in named.items():
        if not torch.equal(p.detach().to(torch.bfloat16), bf16[n]):
            raise QatctlError(f"{folder}: masters do not round to {artifact.path}'s BF16 weights ({n}); "
                              "this trainer_state belongs to another checkpoint")
    return {"masters": True, "optimizer": optimizer is not None}


def final_state(tmp: Path) -> Path | None:
    """The complete trainer_state/ inside a partial output: the run finished training and was
    killed while writing its output. A rerun loads it and writes the rest (nothing retrained)."""
    folder = tmp / TRAINER_STATE
    return folder if (folder / STATE).is_file() else None


def write_trainer_state(tmp: Path, model, optimizer, meta: dict) -> dict:
    """trainer_state/ of an output qat-checkpoint, and the manifest field describing it.

    Written into trainer_state.tmp and renamed, so a complete trainer_state/ in a partial folder
    always holds the finished run's full state (see final_state); one already there (this rerun
    loaded it) is kept as it is."""
    folder = tmp / TRAINER_STATE
    if final_state(tmp) is None:
        work = tmp / (TRAINER_STATE + ".tmp")
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete one (no state.json)
        save_state(work, model, optimizer, meta=meta)
        os.replace(work, folder)
        fsync_dir(tmp)
    step = max((int(s["step"]) for s in optimizer.state.values()), default=0) if optimizer is not None else None
    return {"path": TRAINER_STATE, "masters": "fp32", "optimizer": type(optimizer).__name__ if optimizer else None,
            "optimizer_step": step, "bytes": sum(p.stat().st_size for p in (tmp / TRAINER_STATE).iterdir())}
