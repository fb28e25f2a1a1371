"""Benchmark: train/inference mismatch of each CPU int4 kernel on the same tokens.

    python bench/kernel_mismatch.py [SFT_CKPT INT4_CKPT]      (default runs/demo/sft runs/demo/int4)

eval-consistency samples its rollouts on the engine under test, so two kernels are compared on
different completions (any changed logit bit changes the samples). Here the completions are
sampled once (64 prompts of recipes/data/arith-test.jsonl x 2, temperature 1, 32 tokens, seeded),
the training side's fake-int4 view scores them once (HF transformers, fp32), and every kernel
scores the same tokens (teacher-forced, `engine.score`): the mean / p99 / max |delta logp| are
then the kernels' own contribution. Kernels: the native W4A16 kernel (weights bf16(q * scale),
the training view's bits) and torch's `_weight_int4pack_mm_for_cpu` (the pure-torch fallback,
unrounded q * scale). Writes docs/benchmarks.md#kernel-mismatch.
"""

from __future__ import annotations

import datetime
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._report import machine, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def stats(train: list[list[float]], infer: list[list[float]]) -> tuple[float, float, float]:
    d = sorted(abs(a - b) for t, i in zip(train, infer, strict=True) for a, b in zip(t, i, strict=True))
    return sum(d) / len(d), d[int(0.99 * (len(d) - 1))], d[-1]


def main() -> None:
    from qatctl import ablation, data
    from qatctl.artifacts import read_artifact
    from qatctl.engines import kernels, load_engine
    from qatctl.models import load_tokenizer
    from qatctl.quant import QuantScheme

    sft, int4 = (Path(a) for a in sys.argv[1:3]) if len(sys.argv) == 3 else (REPO / "runs/demo/sft",
                                                                              REPO / "runs/demo/int4")
    for p in (sft, int4):
        if not (p / "config.json").is_file():
            print(f"bench/kernel_mismatch.py: skipped, {p} has no checkpoint (run `make demo` first, or pass "
                  "SFT_CKPT INT4_CKPT)", file=sys.stderr)
            return
    prompts = data.load_prompts(REPO / "recipes/data/arith-test.jsonl", load_tokenizer(int4), need_answer=False)[:64]
    cfg = types.SimpleNamespace(samples_per_prompt=2, seed=0, temperature=1.0, max_new_tokens=32)
    native = load_engine(int4)
    rollouts = ablation.generate(native, ablation.jobs([p.prompt_ids for p in prompts], cfg), cfg)
    scheme = QuantScheme.from_manifest(read_artifact(sft).manifest["quant"])
    train = ablation.train_side(sft, scheme, ["fake-int4"], rollouts)["fake-int4"][0]
    P, C = [r["prompt_ids"] for r in rollouts], [r["output_ids"] for r in rollouts]
    rows = {f"{native.kernel} (shipped), scoring": stats(train, native.score(P, C)),
            f"{native.kernel} (shipped), its own rollout logprobs (decode path)":
                stats(train, [r["rollout_logprobs"] for r in rollouts])}
    if kernels.available():
        fallback = load_engine(int4, kernel="torch")
        rows[f"{fallback.kernel} (pure-torch fallback), scoring"] = stats(train, fallback.score(P, C))
    tokens = sum(len(c) for c in C)
    lines = [f"## Train/inference mismatch per int4 kernel, same tokens ({datetime.date.today()})", "",
             f"Machine: {machine()}. `python bench/kernel_mismatch.py` on {sft} / {int4}: {len(rollouts)} "
             f"completions ({tokens} tokens) sampled once, scored by the fake-int4 training view (HF fp32) "
             "and by each kernel on the same tokens.", "",
             "| kernel | mean \\|Δlogp\\| | p99 | max |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {m:.5f} | {p99:.4f} | {mx:.4f} |" for k, (m, p99, mx) in rows.items()]
    write_section("kernel-mismatch", lines)


if __name__ == "__main__":
    main()
