"""The cells of eval-consistency (a cell = one train view x one rollout engine; "arm" elsewhere means an
RL arm: int4-qat, int4-ptq, bf16; the report keeps its `arms` key for compatibility): rollouts generated (or read) on the inference side, scored by
the training side's views, and the mismatch of each {train view} x {rollout} cell, plus the
engine's own floor. The stage (stages/eval_consistency.py) validates, calls these and writes
the report; `config` is its EvalConsistencyConfig.

Completion k of prompt i is sampled with seed `seed * 1_000_003 + i * samples_per_prompt + k`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qatctl.errors import QatctlError

if TYPE_CHECKING:
    from qatctl.engines import Engine

VIEWS = ("fake-int4", "bf16")


# The train sides of --true-on-policy (the engine's own exact forward on the training weights), by rollout kind
EXACT = "exact fake-int4 (true on-policy)"
EXACT_BF16 = "exact bf16 (true on-policy)"


def vocab_size(ckpt: Path) -> int:
    from qatctl.state import read_json

    size = read_json(Path(ckpt) / "config.json").get("vocab_size")
    if not isinstance(size, int) or size < 1:
        raise QatctlError(f"{ckpt}/config.json: vocab_size {size!r} is not a positive integer")
    return size


def read_rollouts(path: Path, vocab_size: int) -> list[dict]:
    """rollouts.jsonl rows with prompt_ids, output_ids and (optionally) rollout_logprobs."""
    import math

    from qatctl.data import read_jsonl

    rows = []
    for n, obj in read_jsonl(path):
        for key in ("prompt_ids", "output_ids"):
            v = obj.get(key)
            if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
                raise QatctlError(f"{path}:{n}: {key!r} must be a list of token ids")
            if any(not 0 <= i < vocab_size for i in v):
                raise QatctlError(f"{path}:{n}: {key!r} holds a token id outside [0, {vocab_size})")
        if not obj["prompt_ids"]:
            raise QatctlError(f"{path}:{n}: 'prompt_ids' is empty")
        lps = obj.get("rollout_logprobs")
        if lps is not None and (not isinstance(lps, list) or len(lps) != len(obj["output_ids"])):
            raise QatctlError(f"{path}:{n}: rollout_logprobs must be a list of one value per output token")
        if lps is not None and not all(isinstance(x, (int, float)) and math.isfinite(x) and x <= 0 for x in lps):
            raise QatctlError(f"{path}:{n}: rollout_logprobs must be finite log-probabilities (<= 0)")
        rows.append({"prompt_ids": obj["prompt_ids"], "output_ids": obj["output_ids"], "rollout_logprobs": lps})
    return rows


def jobs(prompt_ids: list[list[int]], c) -> list[tuple[list[int], int]]:
    """(prompt, seed) of every completion: sample k of prompt i uses seed * 1_000_003 + i * n + k."""
    n = c.samples_per_prompt
    return [(p, c.seed * 1_000_003 + i * n + k) for i, p in enumerate(prompt_ids) for k in range(n)]


def generate(engine: Engine, todo: list[tuple[list[int], int]], c) -> list[dict]:
    """Seeded completions with the logprob of each sampled token; empty ones dropped."""
    from qatctl.engines import sample

    outs = sample(engine, todo, c.temperature, c.max_new_tokens)
    rows = [{"prompt_ids": o.prompt_ids, "output_ids": o.output_ids, "rollout_logprobs": o.logprobs, "seed": seed}
            for o, (_, seed) in zip(outs, todo, strict=True)]
    return [r for r in rows if r["output_ids"]]


def train_side(train_ckpt: Path, scheme, views, rollouts):
    """{view: (logprobs, argmax)} of the rollouts' tokens under the training model's views."""
    from qatctl import models
    from qatctl.consistency import train_logprobs

    model, _ = models.load_checkpoint(train_ckpt)
    res = {}
    P, C = [r["prompt_ids"] for r in rollouts], [r["output_ids"] for r in rollouts]
    for v in sorted(views, key=lambda v: v != "bf16"):  # bf16 first: fake-int4 overwrites the weights
        if v == "fake-int4":
            models.materialize_fake_quant(model, scheme)
        res[v] = train_logprobs(model, P, C)
    return res


def exact_train_side(train_ckpt: Path, scheme, rollouts, precision: str = "int4"):
    """(logprobs, argmax) of the rollouts' tokens as rl-step --true-on-policy's trainer computes
    them: the engine's exact forward on the training model's weights handed over in memory, as
    rl-step's sync does (int4: the shared quantizer's integers and scales of the fake-int4 view;
    bf16: the BF16 weights, on the W16A16 path), not transformers' modules."""
    from qatctl import models
    from qatctl.engines import load_engine
    from qatctl.int4format import int4_tensors

    model, _ = models.load_checkpoint(train_ckpt)
    state = models.disk_state_dict(model)
    del model
    if precision == "int4":
        engine = load_engine(train_ckpt, tensors=int4_tensors(state, scheme), group_size=scheme.group_size, exact=True)
    else:
        engine = load_engine(train_ckpt, weights="bf16", tensors=state, exact=True)
    return engine.score_argmax([r["prompt_ids"] for r in rollouts], [r["output_ids"] for r in rollouts])


def infer_side(engine: Engine, rollouts):
    """(rollout logprobs, engine argmax per position) for the rollouts."""
    P, C = [r["prompt_ids"] for r in rollouts], [r["output_ids"] for r in rollouts]
    scored, argmax = engine.score_argmax(P, C)
    lps = [r["rollout_logprobs"] if r.get("rollout_logprobs") is not None else s
           for r, s in zip(rollouts, scored, strict=True)]
    return lps, argmax


def cell_metrics(train_side, infer_side) -> dict:
    """Mismatch metrics of one cell, with the per-token and per-position values the plots use."""
    from qatctl.consistency import mismatch_metrics, per_position

    (train_lps, train_top), (infer_lps, infer_top) = train_side, infer_side
    m = mismatch_metrics(train_lps, infer_lps, train_top, infer_top)
    m["per_position"] = per_position(train_lps, infer_lps)
    m["abs_diffs"] = [abs(a - b) for t, i in zip(train_lps, infer_lps, strict=True) for a, b in zip(t, i, strict=True)]
    return m


def single(config, train, infer, view, prompts, rollouts_in, scheme) -> dict:
    from qatctl.consistency import weight_check
    from qatctl.engines import connect, load_engine

    rollout_kind = "int4" if infer.kind == "int4-checkpoint" else "bf16"
    if config.true_on_policy and (rollout_kind, view) not in (("int4", "fake-int4"), ("bf16", "bf16")):
        raise QatctlError("--true-on-policy matches the trainer's exact forward with rollouts of the same kind: INFER_CKPT "
                          "must be an int4-checkpoint with the fake-int4 train view, or a BF16 checkpoint with the bf16 "
                          f"view (here: {infer.kind}, view {view})")
    if config.engine_url:  # the server serves what this report describes
        engine = connect(config.engine_url, model_path=infer.path, api_key=config.api_key)
    elif config.true_on_policy:  # BF16 rollouts on the engine's BF16 path (W16A16), whose forward the trainer runs
        engine = load_engine(infer.path, weights=rollout_kind, exact=True)
    else:
        engine = load_engine(infer.path, weights="int4" if rollout_kind == "int4" else "fp32")
    rollouts = rollouts_in if rollouts_in is not None else generate(engine, jobs([p.prompt_ids for p in prompts],
                                                                                  config), config)
    if config.true_on_policy:
        cell = f"train {EXACT} / rollout int4" if rollout_kind == "int4" else f"train {EXACT_BF16} / rollout bf16 (W16A16)"
        trained = exact_train_side(train.path, scheme, rollouts, rollout_kind)
    else:
        cell = f"train {view} / rollout {rollout_kind}"
        trained = train_side(train.path, scheme, [view], rollouts)[view]
    metrics = cell_metrics(trained, infer_side(engine, rollouts))
    wc = weight_check(train.path, infer.path, view, scheme)
    return {"main_arm": cell, "arms": {cell: metrics}, "weight_check": wc, "kernel": engine.kernel,
            "train_view": view, "rollout": rollout_kind, "rollouts": len(rollouts)}


def grid(config, train, prompts, scheme) -> dict:
    import tempfile

    from qatctl import models
    from qatctl.consistency import mismatch_metrics, weight_check
    from qatctl.engines import load_engine
    from qatctl.int4format import int4_tensors, write_int4_checkpoint

    # The INT4 cells' checkpoint, by the library's converter, in a scratch folder outside OUT.
    scratch = tempfile.TemporaryDirectory(prefix="qatctl-ablation-")
    work = Path(scratch.name)
    model, _ = models.load_checkpoint(train.path)
    write_int4_checkpoint(int4_tensors(models.disk_state_dict(model), scheme), train.path, work / "int4", scheme,
                          note={"ablation_of": str(train.path)}, stage="eval-consistency")
    del model
    engines = {"int4": load_engine(work / "int4", exact=config.true_on_policy),
               "bf16": load_engine(train.path, weights="fp32")}
    todo = jobs([p.prompt_ids for p in prompts], config)
    rollouts_by = {rollout: generate(engine, todo, config) for rollout, engine in engines.items()}
    infer_by = {rollout: infer_side(engines[rollout], rows) for rollout, rows in rollouts_by.items()}
    # One training-side pass per view over both rollout sets: the model loads once.
    every = [r for rows in rollouts_by.values() for r in rows]
    by_cell, cells = {}, {}
    for v, (lps, top) in train_side(train.path, scheme, VIEWS, every).items():
        start = 0
        for rollout, rows in rollouts_by.items():
            part = (lps[start:start + len(rows)], top[start:start + len(rows)])
            start += len(rows)
            name = f"train {v} / rollout {rollout}"
            by_cell[name], cells[name] = cell_metrics(part, infer_by[rollout]), [v, rollout]
    if config.true_on_policy:  # the true on-policy mode's matched cells beside the grid, one per RL arm
        by_cell[f"train {EXACT} / rollout int4"] = cell_metrics(exact_train_side(train.path, scheme, rollouts_by["int4"]),
                                                              infer_by["int4"])
        w16 = load_engine(train.path, weights="bf16", exact=True)  # the bf16 arm's rollout engine (W16A16)
        rows = generate(w16, todo, config)
        by_cell[f"train {EXACT_BF16} / rollout bf16 (W16A16)"] = cell_metrics(
            exact_train_side(train.path, scheme, rows, "bf16"), infer_side(w16, rows))
    # The engine's own floor: the same INT4 rollouts regenerated one request at a time.
    batched = rollouts_by["int4"]
    alone = []
    for r in batched:
        engines["int4"].flush_cache()  # prefilled alone, not copied from the batched run's prefill
        alone.append(generate(engines["int4"], [(r["prompt_ids"], r["seed"])], config)[0])
    floor = mismatch_metrics([a["rollout_logprobs"] for a in alone], [r["rollout_logprobs"] for r in batched])
    floor["same_tokens"] = all(a["output_ids"] == r["output_ids"] for a, r in zip(alone, batched, strict=True))
    wc = weight_check(train.path, work / "int4", "fake-int4", scheme)
    scratch.cleanup()
    return {"main_arm": "train fake-int4 / rollout int4", "arms": by_cell, "cells": cells, "floor": floor,
            "weight_check": wc,
            "kernel": engines["int4"].kernel, "rollouts": len(rollouts_by["int4"])}


