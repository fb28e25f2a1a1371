"""Benchmark: one GRPO iteration's time per phase, INT4 vs BF16 rollouts, side by side in one run;
and the in-memory weight sync vs convert-int4 + an engine reload.

    python bench/rl.py          (make bench)

On SmolLM2-135M (init-qat of the GGUF, or runs/demo/sft when `make demo` has made it): for each
arm, rl-step --iterations 3 (8 prompts x 8 samples x 24 tokens, the same seed and prompts), and
the phases of iterations 2-3 (the first warms up) are averaged. Arms run alternately in one
process so machine noise hits both. Writes docs/benchmarks.md#rl.
"""

from __future__ import annotations

import datetime
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._report import machine, write_section  # noqa: E402
from stages import convert_int4, init_qat, rl_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "bench-rl"
PROMPTS = ROOT / "recipes/data/arith-train.jsonl"
PHASES = ("rollout", "reward", "score", "update", "sync", "iteration")


def policy() -> Path:
    sft = ROOT / "runs/demo/sft"
    if (sft / "qatctl.json").is_file():
        return sft
    init = RUNS / "init"
    init_qat.run(init_qat.InitQatConfig(model="smollm2-135m", out=init))
    return init


def arm(start: Path, name: str, **kw) -> list[dict]:
    out = RUNS / name
    shutil.rmtree(out, ignore_errors=True)
    rl_step.run(rl_step.RlStepConfig(policy=start, prompts=PROMPTS, out=out, iterations=3, prompts_per_step=8,
                                     samples_per_prompt=8, max_new_tokens=24, lr=1e-5, seed=0, **kw))
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def sync_vs_reload(start: Path) -> dict:
    """In-memory: masters -> BF16 -> shared converter -> engine.update_weights. On disk:
    save the BF16 checkpoint, convert-int4, load a fresh engine."""
    from qatctl import models
    from qatctl.artifacts import read_artifact
    from qatctl.engines import load_engine
    from qatctl.grpo import rollout_tensors
    from qatctl.quant import QuantScheme

    scheme = QuantScheme.from_manifest(read_artifact(start).manifest["quant"])
    model, tok = models.load_checkpoint(start)
    models.apply_fake_quant(model, scheme)
    engine = load_engine(start, group_size=scheme.group_size, tensors=rollout_tensors(model, scheme, "int4"))
    times = {"sync": [], "reload": []}
    for i in range(3):
        t = time.perf_counter()
        engine.update_weights(rollout_tensors(model, scheme, "int4"))
        times["sync"].append(time.perf_counter() - t)
        folder = RUNS / f"reload-{i}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(folder.with_name(folder.name + "-int4"), ignore_errors=True)
        t = time.perf_counter()
        plain, _ = models.load_checkpoint(start)
        plain.load_state_dict(models.disk_state_dict(model, torch.float32), strict=False)
        from qatctl.artifacts import OutputDir

        o = OutputDir(folder, stage="train-sft-qat", kind="qat-checkpoint", config={}, inputs=[])
        with o.building() as tmp:
            models.save_checkpoint(plain, tok, tmp)
            o.commit(tmp, quant=scheme.to_manifest())
        convert_int4.run(convert_int4.ConvertInt4Config(ckpt=folder, out=folder.with_name(folder.name + "-int4")))
        load_engine(folder.with_name(folder.name + "-int4"))
        times["reload"].append(time.perf_counter() - t)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def main() -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    start = policy()
    int4 = arm(start, "int4-qat")
    bf16 = arm(start, "bf16", rollout_precision="bf16")
    sync = sync_vs_reload(start)

    def avg(ms, key):
        vals = [m[key] for m in ms[1:] if m.get(key) is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    rows = []
    for phase in PHASES:
        a, b = avg(int4, f"seconds_{phase}"), avg(bf16, f"seconds_{phase}")
        ratio = f"{a / b:.2f}x" if b > 0.005 else "-"  # score is fused into update: ~0 s in both arms
        rows.append(f"| {phase} | {a:.2f} | {b:.2f} | {ratio} |")
    tok = [avg(ms, "rollout_tokens_per_s") for ms in (int4, bf16)]
    lines = [
        f"## RL iteration: INT4 vs BF16 rollouts ({datetime.date.today()})",
        "",
        f"Machine: {machine()}. `python bench/rl.py`: rl-step on SmolLM2-135M from `{start.relative_to(ROOT)}`, "
        "8 prompts x 8 samples x 24 new tokens per iteration, dynamic sampling on, lr 1e-5, seed 0; "
        "mean of iterations 2-3 of 3 (the first warms up). The bf16 arm rolls out the same engine's dense "
        "BF16 path and trains without fake quant; the int4 arm rolls out the 4-bit kernel and trains "
        "through fake quant. Iteration 3 is the run's last and is written, not synced, so `sync` is "
        "iteration 2's.",
        "",
        "| phase (seconds) | int4-qat | bf16 | int4 / bf16 |",
        "|---|---:|---:|---:|",
        *rows,
        "",
        f"Rollout decode throughput: int4 {tok[0]:.0f} tok/s, bf16 {tok[1]:.0f} tok/s. Rollout phases draw "
        "different numbers of prompts (dynamic sampling keeps sampling until 8 groups carry signal), so "
        "compare per-token rates as well as seconds.",
        "",
        f"Weight sync after an update (median of 3): in memory (masters -> BF16 -> shared INT4 converter -> "
        f"engine.update_weights) **{sync['sync']:.2f} s**, against **{sync['reload']:.2f} s** for saving the "
        f"BF16 checkpoint, convert-int4 and loading a fresh engine ({sync['reload'] / sync['sync']:.1f}x).",
    ]
    write_section("rl", lines)


if __name__ == "__main__":
    main()
