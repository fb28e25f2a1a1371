"""Benchmark: embedded engine decode and prefill on SmolLM2-135M, all variants in one run.

    python bench/engine.py          (make bench)
    python bench/engine.py --prefill    (only the exact-vs-torch prefill section)
    LLAMA_BIN=.../build/bin python bench/engine.py --vs-llama-cpp   (same weights, interleaved)

Decode tokens/s at batch 1, 8, 32, 64 for the INT4 engine as shipped and with each native part
taken away (pure torch -> native lm_head -> native W4A16 kernel -> fused decode step), the same
weights run dense BF16 and fp32, and HF `generate` (fp32, fake-quant weights); prefill tokens/s;
batch 1 through `qatctl serve`; llama.cpp's llama-bench on the same GGUF when LLAMA_BENCH names
a binary (at the same thread count and at 1); where a token's time goes; peak RSS; the read
bandwidth measured in the same run and the bytes read per decoded token, for the roofline.
Writes docs/benchmarks.md#engine.
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


def decode_breakdown(engine) -> dict[str, float]:
    """Milliseconds per decoded token at batch 1, each part timed directly: the fused native step
    (all 30 layers, the final norm and the lm_head in one call), the lm_head alone, and the rest
    (embedding, sampling, Python)."""
    from qatctl.engines.batch import DecodeBatch

    total = 1e3 / decode_rate(engine, 1, NEW)
    batch = DecodeBatch(engine)
    seq = batch.add(list(range(100, 116)), SamplingParams(temperature=0, max_new_tokens=NEW, ignore_eos=True))
    x = engine.embed[torch.tensor([7])]
    pool = engine.decode_plan.pool(batch.cache)
    engine.decode_plan(x, pool, [seq.row], [seq.length])
    t = time.perf_counter()
    for _ in range(20):
        engine.decode_plan(x, pool, [seq.row], [seq.length])
    step = (time.perf_counter() - t) / 20 * 1e3
    h = torch.randn(1, engine.hidden)
    engine._logits(h)
    t = time.perf_counter()
    for _ in range(20):
        engine._logits(h)
    head = (time.perf_counter() - t) / 20 * 1e3
    fused = "30 layers, final norm and lm_head" if engine.decode_plan.vocab else "30 layers"
    return {f"fused native decode step ({fused}: one call)": step,
            f"  of which the lm_head ({engine.lm_head.kernel.split(' (')[0]}), timed alone": head,
            "everything else (embedding, sampling, Python)": max(total - step, 0.0),
            "total": total}


def variants(int4: Path) -> dict[str, EmbeddedEngine]:
    """The INT4 engine as shipped and with each native part taken away, oldest path first, so each
    step's gain is measured in this run: pure torch (aten int4 kernel, oneDNN fp32 lm_head, torch
    forward) -> + native BF16-read lm_head -> + native W4A16 kernel -> + fused decode step."""
    from qatctl.engines import kernels
    from qatctl.engines.linears import RowInvariantLinear

    out = {}
    if kernels.available():
        out["int4, pure torch (aten int4, oneDNN fp32 lm_head)"] = EmbeddedEngine.load(int4, weights="int4", kernel="torch")
        head = EmbeddedEngine.load(int4, weights="int4", kernel="torch")
        head.lm_head = RowInvariantLinear(head.embed, head.device)
        out["int4, + native BF16-read lm_head"] = head
        unfused = EmbeddedEngine.load(int4, weights="int4")
        unfused.decode_plan = None
        out["int4, + native W4A16 kernel (torch forward)"] = unfused
    out["int4, + fused native decode step (shipped)"] = EmbeddedEngine.load(int4, weights="int4")
    return out


def prefill_exact(int4: Path, rounds: int = 5) -> None:
    """The exact prefill (the decode step's native forward over the prompt, prefill ≡ decode) against
    the torch forward it replaced (SDPA, torch norms and RoPE, the same W4A16 linears), on one engine
    and the same ids, interleaved; median (min-max) of `rounds`. Writes docs/benchmarks.md#prefill-exact."""
    from bench._report import median

    eng = EmbeddedEngine.load(int4)
    plan = eng.decode_plan

    def rate(n: int, exact: bool) -> float:
        eng.decode_plan = plan if exact else None  # None: the torch forward (engine.exact is then False)
        try:
            ids = list(range(100, 100 + n))
            t = time.perf_counter()
            eng.score([ids[:-1]], [ids[-1:]])
            return n / (time.perf_counter() - t)
        finally:
            eng.decode_plan = plan

    sizes = (32, 128, 512)
    for n in sizes:  # warm-up
        rate(n, True), rate(n, False)
    got = {(n, e): [] for n in sizes for e in (True, False)}
    for _ in range(rounds):
        for n in sizes:
            for e in (True, False):
                got[(n, e)].append(rate(n, e))

    def cell(v):
        return f"{median(v):.0f} ({min(v):.0f}-{max(v):.0f})"

    lines = [f"## Exact prefill vs the torch prefill ({datetime.date.today()})", "",
             f"Machine: {machine()}. `python bench/engine.py --prefill`: SmolLM2-135M INT4 (g32), one prompt of N "
             "tokens scored (prefill + the last position's lm_head), the two paths on one engine and the same "
             f"ids, interleaved; tokens/s, median (min-max) of {rounds} rounds. exact: the decode step's native "
             "forward (qatctl_decode) over the prompt's tokens, so every position's logits are the bits a decode "
             "step gives (prefill ≡ decode, issue 24); torch: the forward it replaced (SDPA over the whole "
             "prompt, torch norms and RoPE, the same W4A16 linears), which is not.", "",
             "| prompt tokens | exact (native) tok/s | torch tok/s | exact / torch (medians) |", "|---:|---:|---:|---:|"]
    for n in sizes:
        a, b = got[(n, True)], got[(n, False)]
        lines.append(f"| {n} | {cell(a)} | {cell(b)} | {median(a) / median(b):.2f}x |")
    slower = [n for n in sizes if median(got[(n, True)]) < 0.9 * median(got[(n, False)])]
    if slower:
        lines += ["", f"Exact prefill costs more than 10% at {', '.join(map(str, slower))} tokens. Its attention is "
                  "one query per task over its own keys (O(N^2) dot products, each key loaded once per query, no GEMM tile), so the "
                  "gap grows with the prompt. What would recover it: query blocks that share their keys' loads "
                  "while keeping each output's reduction order (a fixed-order flash-style tile)."]
    else:
        lines += ["", "Exact prefill costs no more than 10% at any measured length."]
    write_section("prefill-exact", lines)


DECODE_CONTEXT = 16  # tokens before the decoded ones, both sides: ours a prompt of that length, llama-bench's -d


def _llama_bench_once(binary: Path, gguf: Path, threads: int, prompt: int, new: int) -> tuple[float, float, str]:
    """One llama-bench repetition (-r 1): (prefill tok/s of `prompt` tokens from an empty context,
    decode tok/s of `new` tokens after DECODE_CONTEXT tokens of context (-d: ours decodes after a
    prompt of that length), build commit)."""
    import json
    import subprocess

    p = subprocess.run([str(binary), "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(new),
                        "-d", f"0,{DECODE_CONTEXT}", "-r", "1", "-o", "json"], capture_output=True, text=True,
                       timeout=900)
    if p.returncode != 0:
        raise SystemExit(f"llama-bench failed ({p.returncode}): {p.stderr[-500:]}")
    runs = json.loads(p.stdout)
    tg = next(r for r in runs if r.get("n_gen", 0) > 0 and r.get("n_depth", 0) == DECODE_CONTEXT)
    pp = next(r for r in runs if r.get("n_prompt", 0) > 0 and r.get("n_depth", 0) == 0)
    return pp["avg_ts"], tg["avg_ts"], str(tg.get("build_commit", "?"))


def _served_decode(engine, int4: Path, new: int) -> float:
    """One /generate of `new` tokens after a 16-token prompt through `qatctl serve` (batch 1)."""
    import httpx

    from bench.serve import LiveServer

    prompt = list(range(100, 116))
    body = {"input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": new, "ignore_eos": True}}

    def client(url):
        with httpx.Client(base_url=url, timeout=300) as c:
            c.post("/generate", json={**body, "sampling_params": {"max_new_tokens": 4}}).raise_for_status()
            t = time.perf_counter()
            c.post("/generate", json=body).raise_for_status()
            return new / (time.perf_counter() - t)
    return LiveServer(engine, int4).run(client)


def vs_llama_cpp(rounds: int = 5, prompt: int = 256, new: int = 128) -> None:
    """qatctl's engine and llama.cpp on the same weights (issue 25 item 4): the int4-checkpoint for
    qatctl, its GGUF export (Q4_0 blocks of the same codes and scales) for llama.cpp, and the original
    Q4_1 file as a second llama.cpp row. Interleaved rounds A B C D (qatctl in process, qatctl
    serve, llama-bench on the export, llama-bench on Q4_1), the same thread count, prompt and
    new-token counts; prefill and decode timed separately on both sides; median (min-max) over the
    rounds, ratios median (min-max) of the per-round ratios. LLAMA_BIN names llama.cpp's build/bin
    (bench/build-llama.sh)."""
    import os

    from bench._report import median
    from qatctl.engines import kernels
    from qatctl.models import smollm2_gguf

    bin_dir = Path(os.environ.get("LLAMA_BIN", ""))
    binary = bin_dir / "llama-bench"
    if not os.access(binary, os.X_OK):
        raise SystemExit(f"LLAMA_BIN={bin_dir}: no llama-bench there (bash bench/build-llama.sh prints the folder)")
    if rounds < 5:
        raise SystemExit(f"--rounds {rounds}: at least 5")
    ckpt, int4, gguf_dir = RUNS / "smollm2-init", RUNS / "smollm2-int4", RUNS / "smollm2-gguf"
    init_qat.run(init_qat.InitQatConfig(model="smollm2-135m", out=ckpt))
    convert_int4.run(convert_int4.ConvertInt4Config(ckpt=ckpt, out=int4))
    convert_int4.run(convert_int4.ConvertInt4Config(ckpt=ckpt, out=gguf_dir, format="gguf"))
    gguf, q41 = gguf_dir / "model.gguf", smollm2_gguf()
    threads = torch.get_num_threads()
    engine = EmbeddedEngine.load(int4)
    ids = list(range(100, 100 + prompt))
    engine.score([ids[:8]], [ids[8:16]])  # warm up
    decode_rate(engine, 1, 8)
    cols = {k: ([], []) for k in ("qatctl", "qatctl serve", "llama.cpp export", "llama.cpp Q4_1")}
    build = "?"
    for r in range(rounds):
        t = time.perf_counter()
        engine.score([ids[:-1]], [ids[-1:]])
        cols["qatctl"][0].append(prompt / (time.perf_counter() - t))
        cols["qatctl"][1].append(decode_rate(engine, 1, new))
        cols["qatctl serve"][1].append(_served_decode(engine, int4, new))
        for name, f in (("llama.cpp export", gguf), ("llama.cpp Q4_1", q41)):
            pp, tg, build = _llama_bench_once(binary, f, threads, prompt, new)
            cols[name][0].append(pp)
            cols[name][1].append(tg)
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} decode {v[1][-1]:.1f}" for k, v in cols.items()), flush=True)

    def mr(vals):
        return f"{median(vals):.1f} ({min(vals):.1f}-{max(vals):.1f})"

    def ratio(a, b):
        rs = [x / y for x, y in zip(a, b, strict=True)]
        return f"{median(rs):.2f}x ({min(rs):.2f}-{max(rs):.2f})"

    ref = cols["llama.cpp export"]
    lines = [f"## Engine vs llama.cpp on the same weights ({datetime.date.today()})", "",
             f"Machine: {machine()}; CPU flags: {cpu_flags()}; native int4 path: {kernels.isa() or 'none'}; "
             f"llama.cpp build {build} ({_llama_version()}). `LLAMA_BIN=... python bench/engine.py --vs-llama-cpp`. "
             f"SmolLM2-135M-Instruct quantized once by qatctl: the int4-checkpoint for qatctl, its GGUF export (Q4_0 "
             f"blocks of the same codes and scales) for llama.cpp; the original Q4_1 GGUF as a second llama.cpp row. "
             f"{rounds} interleaved rounds (qatctl, qatctl serve, llama.cpp export, llama.cpp Q4_1), {threads} threads "
             f"each; prefill: one {prompt}-token prompt (llama-bench pp{prompt}); decode: {new} tokens at batch 1 "
             f"(after {DECODE_CONTEXT} tokens of context on both sides: ours a {DECODE_CONTEXT}-token prompt, prefill subtracted; llama-bench tg{new} at -d {DECODE_CONTEXT}; serve: "
             f"one /generate, its prefill included). Every figure is the median (min-max) over the rounds; ratios are "
             f"the median (min-max) of the per-round ratios against llama.cpp on the export.", "",
             "| | prefill tok/s | decode tok/s | prefill vs llama.cpp export | decode vs llama.cpp export |",
             "|---|---:|---:|---:|---:|"]
    for name, (pre, dec) in cols.items():
        lines.append(f"| {name} | {mr(pre) if pre else '-'} | {mr(dec)} | "
                     f"{ratio(pre, ref[0]) if pre else '-'} | {ratio(dec, ref[1])} |")
    write_section("engine-vs-llama-cpp", lines)


def _llama_version() -> str:
    import os

    f = Path(os.environ.get("LLAMA_BIN", "")).parents[2] / "VERSION"  # bench/build-llama.sh's
    if not f.is_file():
        return "version file not found"
    lines = f.read_text().splitlines()
    isa = next((ln for ln in lines if ln.startswith("cmake ISA:")), "")
    isa = "-march=native" if "GGML_NATIVE=ON" in isa else "ISA named flag by flag, AMX off" if isa else "?"
    commit = next((ln.split(":", 1)[1].strip()[:9] for ln in lines if ln.startswith("llama.cpp commit:")), "unknown")
    return f"{lines[0]}, vendoring ggml-org/llama.cpp@{commit}; {isa}"


def main() -> None:
    if "--vs-llama-cpp" in sys.argv[1:]:
        vs_llama_cpp()
        return
    if "--prefill" in sys.argv[1:]:
        ckpt, int4 = RUNS / "smollm2-init", RUNS / "smollm2-int4"
        init_qat.run(init_qat.InitQatConfig(model="smollm2-135m", out=ckpt))
        convert_int4.run(convert_int4.ConvertInt4Config(ckpt=ckpt, out=int4))
        prefill_exact(int4)
        return
    from bench.serve import batch1
    from qatctl.engines import kernels

    ckpt, int4 = RUNS / "smollm2-init", RUNS / "smollm2-int4"
    init_qat.run(init_qat.InitQatConfig(model="smollm2-135m", out=ckpt))
    convert_int4.run(convert_int4.ConvertInt4Config(ckpt=ckpt, out=int4))
    threads = torch.get_num_threads()
    bw, read_bw = copy_bandwidth(), read_bandwidth()
    engines = variants(int4)
    shipped = engines["int4, + fused native decode step (shipped)"]
    engines.update({f"dense {w}": EmbeddedEngine.load(int4, weights=w) for w in ("fp32", "bf16")})
    if kernels.available():  # the exact BF16 path (true on-policy's bf16 arm): the W4A16 code on BF16 weights
        engines["dense bf16, native W16A16 (exact)"] = EmbeddedEngine.load(int4, weights="bf16", exact=True)
    batches = (1, 8, 32, 64)
    rows = {}
    for name, eng in engines.items():
        rows[name] = ({b: decode_rate(eng, b, NEW) for b in batches}, prefill_rate(eng), eng)
    hf = {b: hf_rate(ckpt, b, NEW if b > 1 else 16) for b in (1, 8)}
    parts = decode_breakdown(shipped) if shipped.decode_plan is not None else {}
    in_process, served = batch1(shipped, int4)
    torch.set_num_threads(1)
    one = {"int4": decode_rate(shipped, 1, NEW), "hf": hf_rate(ckpt, 1, 16)}
    peer_one = llama_bench(1)
    torch.set_num_threads(threads)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peer = llama_bench(threads)

    lm_head = shipped.lm_head.nbytes
    per_token = shipped.weight_bytes + lm_head
    roofline = read_bw / per_token
    int4 = rows["int4, + fused native decode step (shipped)"][0]
    bf16, bf16_pre = rows["dense bf16"][0], rows["dense bf16"][1]
    int4_pre = rows["int4, + fused native decode step (shipped)"][1]
    lines = [f"## Engine decode on SmolLM2-135M ({datetime.date.today()})", "",
             f"Machine: {machine()}; CPU flags: {cpu_flags()}; native int4 path: {kernels.isa() or 'none (no compiler)'}. "
             f"`python bench/engine.py`. Greedy, prompt 16 tokens, {NEW} new tokens, prefill timed separately and "
             "subtracted; every variant in this one run.", "",
             "| variant | decode tok/s b=1 | b=8 | b=32 | b=64 | prefill tok/s (256) | linear weight MB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, (rates, pre, eng) in rows.items():
        cells = [f"{rates[b]:.1f}" for b in batches]
        lines.append(f"| engine {name} | {' | '.join(cells)} | {pre:.0f} | {eng.weight_bytes / 1e6:.0f} |")
    lines.append(f"| HF generate fp32 (fake-quant weights) | {hf[1]:.1f} | {hf[8]:.1f} | - | - | - | - |")
    if peer:
        lines.append(f"| llama.cpp llama-bench ({peer['type']}, {peer['file']}, build {peer['build']}) | "
                     f"{peer['decode']:.1f} | - | - | - | {peer['prefill']:.0f} | - |")
    lines += ["", "**Batch 1 against llama.cpp, as a client sees it** (same run, same threads; ours: 128 new tokens "
                  "after a 16-token prompt, best of 3; llama.cpp: tg128):", "",
              "| | tok/s | vs llama.cpp |", "|---|---:|---:|"]
    for name, v in (("INT4 engine in process", in_process), ("one /generate at a time through `qatctl serve`", served),
                    ("llama.cpp llama-bench tg128", peer["decode"] if peer else None)):
        if v is not None:
            ratio = f"{v / peer['decode']:.2f}x" if peer else "-"
            lines.append(f"| {name} | {v:.1f} | {ratio} |")
    if not peer:
        lines += ["", "llama.cpp peer: not measured in this run (set LLAMA_BENCH=path/to/llama-bench)."]
    names = list(rows)
    if len(names) > 3:
        lines += ["", "What each native step bought at batch 1 (same run):", ""]
        for prev, cur in zip(names[:3], names[1:4], strict=True):
            lines.append(f"- {cur.split(', ', 1)[1]}: {rows[prev][0][1]:.1f} -> {rows[cur][0][1]:.1f} tok/s "
                         f"({rows[cur][0][1] / rows[prev][0][1]:.2f}x)")
        lines.append(f"- all together: {rows[names[0]][0][1]:.1f} -> {int4[1]:.1f} tok/s "
                     f"({int4[1] / rows[names[0]][0][1]:.2f}x)")
    lines += ["", f"With 1 thread: INT4 engine {one['int4']:.1f} tok/s, HF generate {one['hf']:.1f} tok/s (batch 1)"
                  + (f", llama.cpp {peer_one['decode']:.1f} tok/s ({one['int4'] / peer_one['decode']:.2f}x)."
                     if peer_one else ".")]
    if parts:
        lines += ["", "Where a decoded token's time goes (shipped INT4 engine, batch 1, each part timed directly):", "",
                  "| part | ms / token |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in parts.items()]
    lines += ["",
              "Rollout batch sizes, INT4 (shipped) vs the dense BF16 engine, same run: "
              + ", ".join(f"batch {b} {int4[b]:.0f} vs {bf16[b]:.0f} tok/s ({int4[b] / bf16[b]:.2f}x)" for b in batches)
              + f"; prefill {int4_pre:.0f} vs {bf16_pre:.0f} tok/s ({int4_pre / bf16_pre:.2f}x).",
              "",
              f"- Bandwidth in this run: streaming read {read_bw / 1e9:.1f} GB/s, copy {bw / 1e9:.1f} GB/s "
              f"(read+write). Bytes read per decoded token: {per_token / 1e6:.0f} MB "
              f"({shipped.weight_bytes / 1e6:.0f} MB INT4 linears with scales + {lm_head / 1e6:.0f} MB lm_head) "
              f"-> roofline {roofline:.0f} tok/s at batch 1; the INT4 engine reaches {int4[1] / roofline:.0%} of it.",
              f"- INT4 / HF generate fp32 at batch 1 ({threads} threads): {int4[1] / hf[1]:.1f}x.",
              f"- Peak RSS of the benchmark process: {rss:.0f} MB."]
    write_section("engine", lines)


if __name__ == "__main__":
    main()
