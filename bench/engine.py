"""Benchmark: embedded engine decode and prefill on SmolLM2-135M, all variants in one run.

    python bench/engine.py          (make bench)

Decode tokens/s at batch 1, 8, 32 for the INT4 engine, the same engine with dense BF16 and
fp32 weights, and HF `generate` (fp32, fake-quant weights); prefill tokens/s; peak RSS; the
copy bandwidth measured in the same run and the bytes read per decoded token, for the
bandwidth roofline. Writes docs/benchmarks.md#engine.
"""

from __future__ import annotations

import datetime
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._report import machine, write_section  # noqa: E402
from qatctl.engines import SamplingParams  # noqa: E402
from qatctl.engines.embedded import EmbeddedEngine  # noqa: E402
from stages import convert_int4, init_qat  # noqa: E402

RUNS = Path(__file__).resolve().parents[1] / "runs" / "bench"
NEW = 32


def decode_rate(engine, batch: int, new: int) -> float:
    prompts = [list(range(100, 116)) for _ in range(batch)]
    sp = SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True)
    engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True))  # warm up
    t = time.perf_counter()
    engine.generate(prompts, sp)
    total = time.perf_counter() - t
    t = time.perf_counter()
    engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True))
    prefill = time.perf_counter() - t  # prefill + one lm_head: subtracted to leave decode steps
    return batch * (new - 1) / max(total - prefill, 1e-9)


def prefill_rate(engine, n: int = 256) -> float:
    ids = list(range(100, 100 + n))
    engine.score([ids[:8]], [ids[8:16]])
    t = time.perf_counter()
    engine.score([ids[:-1]], [ids[-1:]])
    return n / (time.perf_counter() - t)


def hf_rate(ckpt: Path, batch: int, new: int) -> float:
    from qatctl import models
    from qatctl.artifacts import read_artifact
    from qatctl.quant import QuantScheme

    model, _ = models.load_checkpoint(ckpt)
    models.materialize_fake_quant(model, QuantScheme.from_manifest(read_artifact(ckpt).manifest["quant"]))
    ids = torch.arange(100, 116).repeat(batch, 1)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        total = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False)
        first = time.perf_counter() - t
    return batch * (new - 1) / (total - first)


def copy_bandwidth() -> float:
    src, dst = torch.ones(256 << 20, dtype=torch.uint8), torch.zeros(256 << 20, dtype=torch.uint8)
    dst.copy_(src)
    t = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    return 2 * 5 * src.numel() / (time.perf_counter() - t)  # read + write


def read_bandwidth() -> float:
    """Bytes/s of a streaming read (sum of 256 MB, all threads): what decode does to its weights."""
    t = torch.ones(64 << 20)
    t.sum()
    start = time.perf_counter()
    for _ in range(10):
        t.sum()
    return 10 * t.numel() * 4 / (time.perf_counter() - start)


def llama_bench(threads: int) -> dict | None:
    """llama.cpp's own tg128 and pp256 on the same GGUF (LLAMA_BENCH=path/to/llama-bench; built by
    ../shared/tools/build-llama-bench.sh), or None when no binary is given."""
    import json
    import os
    import subprocess

    from qatctl.models import smollm2_gguf

    binary = os.environ.get("LLAMA_BENCH")
    if not binary:
        return None
    if not os.access(binary, os.X_OK):
        raise SystemExit(f"LLAMA_BENCH={binary}: not an executable")
    gguf = smollm2_gguf()
    p = subprocess.run([binary, "-m", str(gguf), "-t", str(threads), "-p", "256", "-n", "128", "-r", "3", "-o", "json"],
                       capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise SystemExit(f"llama-bench failed ({p.returncode}): {p.stderr[-500:]}")
    runs = json.loads(p.stdout)
    tg = next(r for r in runs if r.get("n_gen", 0) > 0)
    pp = next(r for r in runs if r.get("n_prompt", 0) > 0)
    return {"decode": tg["avg_ts"], "prefill": pp["avg_ts"], "type": tg.get("model_type", "?"),
            "file": gguf.name, "build": tg.get("build_commit", "?")}


def cpu_flags() -> str:
    """The SIMD flags that decide which kernels run (printed with every result)."""
    try:
        flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return "unknown"
    keep = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return " ".join(f for f in keep if f in flags) or "none of " + ", ".join(keep)


BREAKDOWN = {"INT4 linears": ("aten::_weight_int4pack_mm_for_cpu",),
             "lm_head (oneDNN path)": ("mkldnn::_linear_pointwise", "aten::mm"),
             "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::bmm", "aten::_softmax")}


def decode_breakdown(engine) -> dict[str, float]:
    """Milliseconds per decoded token at batch 1 by op group (torch.profiler self CPU time)."""
    from torch.profiler import profile

    with profile() as prof:
        engine.generate([list(range(100, 116))], SamplingParams(temperature=0, max_new_tokens=NEW, ignore_eos=True))
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    out = {k: sum(e.self_cpu_time_total for e in events if e.key in ops) for k, ops in BREAKDOWN.items()}
    out["everything else (norms, RoPE, casts, cache, sampling)"] = total - sum(out.values())
    out = {k: v / 1e3 / NEW for k, v in out.items()}
    if engine.lm_head.bf16 is not None:  # a native call: not a torch op, timed directly
        h = torch.randn(1, engine.hidden)
        engine._logits(h)
        t = time.perf_counter()
        for _ in range(20):
            engine._logits(h)
        out["lm_head (native BF16-read)"] = (time.perf_counter() - t) / 20 * 1e3
        out.pop("lm_head (oneDNN path)")
    return out


def main() -> None:
    ckpt, int4 = RUNS / "smollm2-init", RUNS / "smollm2-int4"
    init_qat.run(init_qat.InitQatConfig(model="smollm2-135m", out=ckpt))
    convert_int4.run(convert_int4.ConvertInt4Config(ckpt=ckpt, out=int4))
    threads = torch.get_num_threads()
    bw, read_bw = copy_bandwidth(), read_bandwidth()
    engines = {w: EmbeddedEngine.load(int4, weights=w) for w in ("int4", "fp32", "bf16")}
    from qatctl.engines import kernels

    native = kernels.available()
    if native:  # the same INT4 engine with the pure-torch fp32 lm_head: what the native kernel bought
        real = kernels.available
        kernels.available = lambda: False
        engines["int4, fp32 oneDNN lm_head (pure-torch path)"] = EmbeddedEngine.load(int4, weights="int4")
        kernels.available = real
    rows = []
    for name, eng in engines.items():
        new = NEW if name != "bf16" else 8  # BF16 dense prefill/decode is slow at large M on AVX2
        rates = {b: decode_rate(eng, b, new) for b in (1, 8, 32)}
        rows.append((f"engine {name} ({eng.kernel}; lm_head {eng.lm_head.kernel.split(' (')[0]})", rates,
                     prefill_rate(eng), eng.weight_bytes))
    hf = {b: hf_rate(ckpt, b, NEW if b > 1 else 16) for b in (1, 8)}
    rows.append(("HF generate fp32 (fake-quant weights)", hf, None, None))
    parts = decode_breakdown(engines["int4"])
    torch.set_num_threads(1)
    one = {"int4": decode_rate(engines["int4"], 1, NEW), "hf": hf_rate(ckpt, 1, 16)}
    peer_one = llama_bench(1)
    torch.set_num_threads(threads)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peer = llama_bench(threads)

    lm_head = engines["int4"].lm_head.nbytes
    per_token = engines["int4"].weight_bytes + lm_head
    roofline = read_bw / per_token
    int4_b1 = rows[0][1][1]
    dense_b1 = max(rows[1][1][1], rows[2][1][1])
    lines = [f"## Engine decode on SmolLM2-135M ({datetime.date.today()})", "",
             f"Machine: {machine()}; CPU flags: {cpu_flags()}. Greedy, prompt 16 tokens, {NEW} new tokens (8 for BF16 dense), "
             f"prefill timed separately and subtracted. lm_head: {engines['int4'].lm_head.kernel}.", "",
             "| variant | decode tok/s b=1 | b=8 | b=32 | prefill tok/s (256) | linear weight MB |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, rates, pre, wb in rows:
        cells = [f"{rates[b]:.1f}" if b in rates else "-" for b in (1, 8, 32)]
        lines.append(f"| {name} | {' | '.join(cells)} | {f'{pre:.0f}' if pre else '-'} | "
                     f"{f'{wb / 1e6:.0f}' if wb else '-'} |")
    if peer:
        lines.append(f"| llama.cpp llama-bench ({peer['type']}, {peer['file']}, build {peer['build']}) | "
                     f"{peer['decode']:.1f} | - | - | {peer['prefill']:.0f} | - |")
    lines += ["", f"llama.cpp peer, same run and threads: INT4 engine / llama.cpp at batch 1 = "
                  f"{int4_b1 / peer['decode']:.2f}x." if peer else
              "llama.cpp peer: not measured in this run (set LLAMA_BENCH=path/to/llama-bench)."]
    if native:
        before = rows[3][1][1]
        lines += ["", f"What the native BF16-read lm_head bought at batch 1: {int4_b1:.1f} vs {before:.1f} tok/s "
                      f"({int4_b1 / before:.2f}x) with the fp32 oneDNN lm_head, same run."]
    lines += ["", f"With 1 thread: INT4 engine {one['int4']:.1f} tok/s, HF generate {one['hf']:.1f} tok/s (batch 1)"
                  + (f", llama.cpp {peer_one['decode']:.1f} tok/s ({one['int4'] / peer_one['decode']:.2f}x)."
                     if peer_one else "."), "",
              "Where a decoded token's time goes (INT4 engine, batch 1, torch.profiler self CPU time; the "
              "profiler's own overhead inflates the small ops):", "",
              "| part | ms / token |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in parts.items()]
    lines += ["",
              f"- Bandwidth in this run: streaming read {read_bw / 1e9:.1f} GB/s, copy {bw / 1e9:.1f} GB/s "
              f"(read+write). Bytes read per decoded token: {per_token / 1e6:.0f} MB "
              f"({engines['int4'].weight_bytes / 1e6:.0f} MB INT4 linears + {lm_head / 1e6:.0f} MB lm_head) "
              f"-> roofline {roofline:.0f} tok/s at batch 1; the INT4 engine reaches {int4_b1 / roofline:.0%} of it.",
              f"- Ratios at batch 1 ({threads} threads): INT4 / HF generate fp32 in this run = {int4_b1 / hf[1]:.1f}x "
              f"(and {int4_b1 / 12:.1f}x the brief's 12 tok/s); INT4 / fastest dense engine = "
              f"{int4_b1 / dense_b1:.2f}x.",
              f"- Peak RSS of the benchmark process: {rss:.0f} MB.",
              "- Limits: the INT4 kernel (torch's) reaches about half the streaming bandwidth on these small "
              "matrices (its unpacking is compute-bound); the rest is per-op overhead of ~40 small ops x 30 "
              "layers. The lm_head (tied embeddings, 49152 x 576) is read as BF16 by the native kernel "
              "when one could be built (57 MB instead of 113).",
              f"- Batch 32: dense BF16 {rows[2][1][32]:.0f} tok/s vs INT4 {rows[0][1][32]:.0f} "
              f"({rows[0][1][32] / rows[2][1][32]:.2f}x). The INT4 kernel's unpacking grows with the rows; the "
              "engine stays on the 4-bit kernel (issue 14 rules out a dense copy made at load)."]
    write_section("engine", lines)


if __name__ == "__main__":
    main()
