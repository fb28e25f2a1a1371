"""Benchmark: one GRPO iteration's time per phase (a ledger), INT4 vs BF16 rollouts, at the task's
short shape and at a rollout-dominated long shape; and the in-memory weight sync vs convert-int4 +
an engine reload.

    python bench/rl.py          (make bench; RUNS=3 rounds by default)
    python bench/rl.py --true-on-policy    (default mode vs --true-on-policy, its own section)
    python bench/rl.py --beside-busy       (1 and 2 threads, alone and beside one busy process)

On SmolLM2-135M (init-qat of the GGUF, or runs/demo/sft when `make demo` has made it), one thread
count for everything. Two shapes:
- short: the arithmetic task, 8 prompts x 8 samples x 24 new tokens, exact-number reward;
- long: open-ended writing prompts, 4 prompts x 8 samples x 256 new tokens, a length reward (so no
  group is flat and completions run to the cap): rollout-dominated, as long reasoning is.
For each shape and arm, rl-step --iterations 3; phases are the mean of iterations 2 and 3 (the
first warms up; sync is iteration 2's: the last is written, not pushed). Arms and shapes
interleave in every round, so machine noise hits all of them; each cell is the median (min-max)
over rounds. Writes docs/benchmarks.md#rl.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._report import machine, median, write_section  # noqa: E402
from stages import convert_int4, init_qat, rl_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "bench-rl"
PROMPTS = ROOT / "recipes/data/arith-train.jsonl"
ROUNDS = int(os.environ.get("RUNS", "3"))
PHASES = ("rollout", "rollout_prefill", "rollout_decode", "reward", "score", "update", "sync_requantize",
          "sync_load", "sync", "iteration")
TOPICS = ["a lighthouse keeper", "a city under the sea", "the first day of school", "a robot learning to paint",
          "a storm at harvest", "two rival bakers", "a lost library", "a journey across a desert"]
LENGTH_REWARD = "def length(completion, answer):\n    return min(len(completion), 2000) / 2000.0\n"
SHAPES = {"short": dict(prompts_per_step=8, samples_per_prompt=8, max_new_tokens=24),
          "long": dict(prompts_per_step=4, samples_per_prompt=8, max_new_tokens=256)}


def policy() -> Path:
    sft = ROOT / "runs/demo/sft"
    if (sft / "qatctl.json").is_file():
        return sft
    init = RUNS / "init"
    init_qat.run(init_qat.InitQatConfig(model="smollm2-135m", out=init))
    return init


def long_inputs() -> tuple[Path, str]:
    prompts = RUNS / "writing.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Write a long, detailed story about {t}."}], "answer": "0"}) + "\n"
                               for t in TOPICS))
    (RUNS / "length_reward.py").write_text(LENGTH_REWARD)
    return prompts, f"{RUNS / 'length_reward.py'}:length"


def arm(start: Path, name: str, shape: str, **kw) -> list[dict]:
    out = RUNS / f"{name}-{shape}"
    shutil.rmtree(out, ignore_errors=True)
    prompts, reward = (PROMPTS, "exact-number") if shape == "short" else long_inputs()
    rl_step.run(rl_step.RlStepConfig(policy=start, prompts=prompts, out=out, iterations=3, lr=1e-5, seed=0,
                                     reward=reward, **SHAPES[shape], **kw))
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def sync_vs_reload(start: Path) -> dict:
    """In-memory: masters -> BF16 -> shared converter -> engine.update_weights. On disk:
    save the BF16 checkpoint, convert-int4, load a fresh engine."""
    from qatctl import models
    from qatctl.artifacts import read_artifact
    from qatctl.engines import load_engine
    from qatctl.quant import QuantScheme
    from qatctl.rl.loop import rollout_tensors

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


def per_run(ms: list[dict], key: str) -> float | None:
    """A run's mean seconds_KEY over iterations 2.. (the first warms up); sync phases iteration
    2's alone (the last iteration writes its policy and pushes nothing: its sync is 0)."""
    vals = [m.get(f"seconds_{key}") for m in (ms[1:2] if key.startswith("sync") else ms[1:])]
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def cell(vals: list, fmt: str = "{:.2f}") -> str:
    """median (min-max) of the values that exist, '-' when none does."""
    vals = sorted(v for v in vals if v is not None)
    if not vals:
        return "-"
    return f"{fmt.format(median(vals))} ({fmt.format(vals[0])}-{fmt.format(vals[-1])})"


def true_on_policy(start: Path) -> None:
    """Both arms the mode serves (int4-qat: the W4A16 path; bf16: the dense path, whose default
    rollouts are torch's oneDNN matmul and whose mode's are the native W16A16 step) at the short
    shape, default mode vs --true-on-policy, at --mini-batches 1 (the update's forward is the
    scoring pass) and 2 (a separate scoring pass, which the mode skips), interleaved per round.
    Writes docs/benchmarks.md#rl-true-on-policy."""
    arms = {"int4-qat": {}, "bf16": {"rollout_precision": "bf16"}}
    modes = {(a, tp, mb): {"true_on_policy": tp, "mini_batches": mb, **kw}
             for a, kw in arms.items() for mb in (1, 2) for tp in (False, True)}
    runs: dict = {k: [] for k in modes}
    for r in range(ROUNDS):
        for k, kw in modes.items():
            runs[k].append(arm(start, f"{k[0]}-tp{int(k[1])}-mb{k[2]}", "short", **kw))
            print(f"round {r + 1}/{ROUNDS}: {k[0]} true_on_policy={k[1]} mini_batches={k[2]} done", file=sys.stderr)
    phases = ("rollout", "score", "update", "update_native_forward", "sync", "iteration")

    sh = SHAPES["short"]
    lines = [f"## RL iteration: default vs --true-on-policy ({datetime.date.today()})", "",
             f"Machine: {machine()}. `python bench/rl.py --true-on-policy`: the int4-qat and bf16 arms on "
             f"SmolLM2-135M from `{start.relative_to(ROOT)}`, the arithmetic task, {sh['prompts_per_step']} prompts x "
             f"{sh['samples_per_prompt']} samples x {sh['max_new_tokens']} new tokens, lr 1e-5, seed 0; seconds per "
             f"phase, mean of iterations 2-3 of 3 (sync: iteration 2's), median (min-max) over {ROUNDS} interleaved rounds. "
             "update_native_forward (part of update): the engine's exact forward that gives the mode's logprob "
             "values (a prompt's samples scored together; at mini-batch 2 also the engine's refresh to the updated "
             "weights). The bf16 arm's default rollouts run torch's oneDNN BF16 matmul, its mode's the native "
             "W16A16 step (the only exact dense path).", ""]
    for name in arms:
        for mb in (1, 2):
            a, b = runs[(name, False, mb)], runs[(name, True, mb)]
            lines += [f"**{name}, --mini-batches {mb}**", "", "| phase (seconds) | default | --true-on-policy |",
                      "|---|---:|---:|"]
            for phase in phases:
                lines.append(f"| {phase} | {cell([per_run(m, phase) for m in a])} | "
                             f"{cell([per_run(m, phase) for m in b])} |")
            ratio = [per_run(y, "iteration") / per_run(x, "iteration") for x, y in zip(a, b, strict=True)]
            mism = [ms[-1].get("train_rollout_logprob_abs_diff_mean") for ms in a]
            lines += ["", f"Iteration time, --true-on-policy / default (paired by round): **{cell(ratio)}x**; "
                      f"mismatch (mean |dlogp|, last iteration) default {median(mism):.4f} ({min(mism):.4f}-"
                      f"{max(mism):.4f}), true on-policy exactly 0 "
                      f"({sum(m['mismatch_checked_tokens'] for ms in b for m in ms)} tokens checked, all equal).", ""]
    write_section("rl-true-on-policy", lines)


BUSY_CONFIGS = {"1 thread, alone": (1, False), "2 threads, alone": (2, False),
                "1 thread, beside one busy process": (1, True), "2 threads, beside one busy process": (2, True)}


def beside_busy(start: Path) -> None:
    """The int4-qat arm at the short shape (rl-step --mini-batches 1), each run a fresh process at
    OMP_NUM_THREADS 1 or 2, alone or beside one busy single-threaded process (a Python spin loop:
    a second run or a test suite on a 2-core machine), interleaved per round. Writes
    docs/benchmarks.md#rl-beside-busy."""
    runs: dict = {k: [] for k in BUSY_CONFIGS}
    for r in range(ROUNDS):
        for name, (threads, busy) in BUSY_CONFIGS.items():
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "passive"}
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
            try:
                p = subprocess.run([sys.executable, __file__, "--one-run", str(start)], env=env,
                                   capture_output=True, text=True, timeout=3600, check=True)
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
            runs[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{ROUNDS}: {name} done", file=sys.stderr)
    phases = ("rollout", "score", "update", "sync", "iteration")

    sh = SHAPES["short"]
    names = list(BUSY_CONFIGS)
    lines = [f"## RL iteration beside a busy process ({datetime.date.today()})", "",
             f"Machine: {machine()}. `python bench/rl.py --beside-busy`: the int4-qat arm on SmolLM2-135M from "
             f"`{start.relative_to(ROOT)}`, the arithmetic task, {sh['prompts_per_step']} prompts x "
             f"{sh['samples_per_prompt']} samples x {sh['max_new_tokens']} new tokens, --mini-batches 1, lr 1e-5, "
             "seed 0; each run a fresh process (OMP_NUM_THREADS as named, OMP_WAIT_POLICY=passive); the busy "
             "process is one Python spin loop. Seconds per phase, mean of iterations 2-3 of 3 (sync: iteration 2's), median (min-max) "
             f"over {ROUNDS} interleaved rounds.", "",
             "| phase (seconds) | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for phase in phases:
        lines.append(f"| {phase} | " + " | ".join(cell([per_run(ms, phase) for ms in runs[n]]) for n in names) + " |")
    alone1 = [per_run(ms, "iteration") for ms in runs[names[0]]]
    lines.append("")
    for n in names[1:]:
        ratio = [a / per_run(ms, "iteration") for a, ms in zip(alone1, runs[n], strict=True)]
        lines.append(f"- {n} vs 1 thread alone (iteration, paired by round; above 1: faster): **{cell(ratio)}x**")
    write_section("rl-beside-busy", lines)


def one_run(start: Path) -> None:
    """A child of beside_busy: one 3-iteration run; prints its metrics rows as JSON."""
    ms = arm(start, f"busy-{os.getpid()}", "short")
    shutil.rmtree(RUNS / f"busy-{os.getpid()}-short", ignore_errors=True)
    print(json.dumps(ms))


def main() -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    if "--one-run" in sys.argv[1:]:
        i = sys.argv.index("--one-run")
        one_run(Path(sys.argv[i + 1]))
        return
    start = policy()
    if "--true-on-policy" in sys.argv[1:]:
        true_on_policy(start)
        return
    if "--beside-busy" in sys.argv[1:]:
        beside_busy(start)
        return
    arms = {"int4-qat": {}, "bf16": {"rollout_precision": "bf16"}}
    runs: dict = {(a, sh): [] for sh in SHAPES for a in arms}
    for r in range(ROUNDS):
        for sh in SHAPES:
            for a, kw in arms.items():
                runs[(a, sh)].append(arm(start, a, sh, **kw))
                print(f"round {r + 1}/{ROUNDS}: {a} {sh} done", file=sys.stderr)
    sync = sync_vs_reload(start)

    def med(vals):
        vals = [v for v in vals if v is not None]
        return median(vals) if vals else float("nan")

    lines = [
        f"## RL iteration ledger: INT4 vs BF16 rollouts, short and long shapes ({datetime.date.today()})",
        "",
        f"Machine: {machine()}. `python bench/rl.py`: rl-step on SmolLM2-135M from `{start.relative_to(ROOT)}`, "
        "lr 1e-5, seed 0, dynamic sampling on. short: the arithmetic task, 8 prompts x 8 samples x 24 new tokens; "
        "long: writing prompts, 4 x 8 x 256 new tokens, a length reward. Phases: mean of iterations 2-3 of 3 "
        f"(sync: iteration 2's); each cell the median (min-max) over {ROUNDS} interleaved rounds. The bf16 arm "
        "rolls out the same engine's dense BF16 path and trains without fake quant; the int4 arm rolls out the "
        "4-bit kernel and trains through fake quant. rollout = prefill + decode (+ bookkeeping); sync = "
        "requantize (masters -> BF16 -> shared INT4 quantizer and packing) + load into the engine.",
        "",
    ]
    for sh in SHAPES:
        lines += [f"**{sh}** ({SHAPES[sh]['prompts_per_step']} x {SHAPES[sh]['samples_per_prompt']} x "
                  f"{SHAPES[sh]['max_new_tokens']} tokens)", "",
                  "| phase (seconds) | int4-qat | bf16 | int4 / bf16 (medians) |", "|---|---:|---:|---:|"]
        for phase in PHASES:
            a = [per_run(ms, phase) for ms in runs[("int4-qat", sh)]]
            b = [per_run(ms, phase) for ms in runs[("bf16", sh)]]
            ratio = f"{med(a) / med(b):.2f}x" if med(b) > 0.005 else "-"
            lines.append(f"| {phase} | {cell(a)} | {cell(b)} | {ratio} |")
        share = [per_run(ms, "rollout") / per_run(ms, "iteration") for ms in runs[("bf16", sh)]]
        speed = [per_run(b, "iteration") / per_run(a, "iteration")
                 for a, b in zip(runs[("int4-qat", sh)], runs[("bf16", sh)], strict=True)]
        tok = {a: [med([m.get("rollout_tokens_per_s") for m in ms[1:]]) for ms in runs[(a, sh)]] for a in arms}
        lines += ["", f"Rollout share of the bf16 iteration: {cell(share, '{:.0%}')}. Iteration speed-up of INT4 "
                  f"rollouts (bf16 / int4 iteration seconds, paired by round): **{cell(speed)}x**. Rollout "
                  f"tokens/s: int4 {cell(tok['int4-qat'], '{:.0f}')}, bf16 {cell(tok['bf16'], '{:.0f}')}.", ""]
    lines += [
        f"Weight sync after an update (median of 3): in memory (masters -> BF16 -> shared INT4 converter -> "
        f"engine.update_weights) **{sync['sync']:.2f} s**, against **{sync['reload']:.2f} s** for saving the "
        f"BF16 checkpoint, convert-int4 and loading a fresh engine ({sync['reload'] / sync['sync']:.1f}x).",
    ]
    write_section("rl", lines)


if __name__ == "__main__":
    main()
