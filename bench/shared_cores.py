"""Benchmark: the CPU path when the cores are shared with another process.

    python bench/shared_cores.py          (make bench)

On SmolLM2-135M (INT4, native kernel): decode tokens/s at batch 1 and 16, and one fake-quant
training step (forward + backward + AdamW on 16 x 48 tokens, the RL update's inner loop), each in
a fresh process at 1 and 2 threads, alone and beside one busy single-threaded process (a Python
spin loop: what a second run or a test suite does to a 2-core machine), under OpenMP's default
wait policy and OMP_WAIT_POLICY=passive. Configurations interleave, RUNS rounds; each cell is the
median (min-max) over rounds. The goal (issue 28): 2 threads beside one busy process no slower
than 1 thread alone. Writes docs/benchmarks.md#shared-cores.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "bench-shared"
ROUNDS = int(os.environ.get("RUNS", "3"))


def worker(ckpt: Path, int4: Path) -> dict:
    import torch

    from qatctl import models
    from qatctl.artifacts import read_artifact
    from qatctl.engines import SamplingParams, load_engine
    from qatctl.quant import QuantScheme

    engine = load_engine(int4)
    out = {"threads": torch.get_num_threads()}
    for batch in (1, 16):
        prompts = [list(range(100, 116)) for _ in range(batch)]
        engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True))
        t = time.perf_counter()
        engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=33, ignore_eos=True))
        out[f"decode_b{batch}"] = batch * 33 / (time.perf_counter() - t)
    model, _ = models.load_checkpoint(ckpt)
    models.apply_fake_quant(model, QuantScheme.from_manifest(read_artifact(ckpt).manifest["quant"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    ids = torch.randint(100, 4000, (16, 48), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(3):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    out["train_step_s"] = sorted(times[1:])[0]  # the first warms up
    return out


def run_config(threads: int, busy: bool, passive: bool, ckpt: Path, int4: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("OMP_WAIT_POLICY", None)
    if passive:
        env["OMP_WAIT_POLICY"] = "passive"
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        p = subprocess.run([sys.executable, __file__, "--worker", str(ckpt), str(int4)], env=env, capture_output=True,
                           text=True, timeout=1800, check=True)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from bench._report import machine, median, write_section
    from stages import convert_int4, init_qat

    ckpt, int4 = RUNS / "init", RUNS / "int4"
    init_qat.run(init_qat.InitQatConfig(model="smollm2-135m", out=ckpt))
    convert_int4.run(convert_int4.ConvertInt4Config(ckpt=ckpt, out=int4))
    configs = [(t, busy, passive) for passive in (False, True) for busy in (False, True) for t in (1, 2)]
    results: dict = {c: [] for c in configs}
    for r in range(ROUNDS):
        for c in configs:
            results[c].append(run_config(*c, ckpt, int4))
            print(f"round {r + 1}/{ROUNDS} {c}: {results[c][-1]}", file=sys.stderr)

    def cell(c, key, fmt="{:.0f}"):
        vals = sorted(x[key] for x in results[c])
        return f"{fmt.format(median(vals))} ({fmt.format(vals[0])}-{fmt.format(vals[-1])})"

    rows = []
    for c in configs:
        t, busy, passive = c
        rows.append(f"| {t} | {'one busy process' if busy else 'alone'} | {'passive' if passive else 'default'} | "
                    f"{cell(c, 'decode_b1')} | {cell(c, 'decode_b16')} | {cell(c, 'train_step_s', '{:.2f}')} |")
    med = lambda c, k: median([x[k] for x in results[c]])  # noqa: E731
    goal = []
    for passive in (False, True):
        alone1, busy2 = (1, False, passive), (2, True, passive)
        goal.append(f"wait policy {'passive' if passive else 'default'}: 2 threads beside a busy process vs 1 thread "
                    f"alone: decode b1 {med(busy2, 'decode_b1') / med(alone1, 'decode_b1'):.2f}x, b16 "
                    f"{med(busy2, 'decode_b16') / med(alone1, 'decode_b16'):.2f}x, train step "
                    f"{med(alone1, 'train_step_s') / med(busy2, 'train_step_s'):.2f}x (above 1: faster)")
    lines = [
        f"## Sharing the cores ({datetime.date.today()})",
        "",
        f"Machine: {machine()}. `python bench/shared_cores.py`: SmolLM2-135M INT4 (native kernel, "
        "schedule(dynamic) loops), each configuration a fresh process; decode tokens/s at batch 1 and 16 "
        "(33 new tokens), one fake-quant training step (16 x 48 tokens, forward + backward + AdamW) in seconds. "
        f"Median (min-max) of {ROUNDS} interleaved rounds. The busy process is one Python spin loop.",
        "",
        "| threads | beside | OMP wait policy | decode b1 tok/s | decode b16 tok/s | train step s |",
        "|---:|---|---|---:|---:|---:|",
        *rows,
        "",
        *[f"- {g}" for g in goal],
    ]
    write_section("shared-cores", lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(ROOT))
        print(json.dumps(worker(Path(sys.argv[2]), Path(sys.argv[3]))))
    else:
        main()
