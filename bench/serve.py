"""Benchmark: `qatctl serve` under RL-shaped load, and batch-1 decode as a client sees it.

    python bench/serve.py          (make bench)

1. RL-shaped load on SmolLM2-135M INT4: 32 prompts x 8 samples sent as 256 separate concurrent
   /generate requests (as slime sends a GRPO group), with a long tail of output lengths (3 of 4
   samples stop after 16 tokens, 1 of 4 runs to 128). Side by side in one run, all with at most 32
   running: run-to-completion (the old scheduler: a batch runs until its last request ends before
   anyone waiting joins) and continuous batching, each without and with shared prompt prefixes
   (the old scheduler shared a prompt's prefill only inside one gathered batch). Throughput (generated tokens/s), p50/p99 request latency, and the
   tokens served from the prefix cache. All three give the same tokens (the engine is
   batch-invariant); the bench checks it.
2. Batch-1 decode: the engine in process vs one /generate request at a time through the server
   (128 new tokens, greedy), same thread count.
Writes docs/benchmarks.md#serve.
"""

from __future__ import annotations

import asyncio
import datetime
import random
import socket
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._report import machine, write_section  # noqa: E402
from bench.engine import cpu_flags  # noqa: E402
from qatctl.engines import SamplingParams  # noqa: E402
from qatctl.engines.scheduler import Scheduler  # noqa: E402
from stages import convert_int4, init_qat  # noqa: E402
from stages.serve import ServeConfig  # noqa: E402

RUNS = Path(__file__).resolve().parents[1] / "runs" / "bench"
PROMPTS, SAMPLES, SHORT, LONG, MAX_BATCH = 32, 8, 16, 128, 32


class RunToCompletion(Scheduler):
    """The scheduler continuous batching replaced: nobody joins until the whole batch is done."""

    def _free_slots(self) -> int:
        return 0 if self._running else self.max_batch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """qatctl's Server as `qatctl serve` runs it: uvicorn on a thread, the scheduler (and so the
    engine) on this process's main thread while `client(url)` runs on a third."""

    def __init__(self, engine, ckpt: Path, scheduler_cls=Scheduler):
        from qatctl.server import Server

        self.port = free_port()
        config = ServeConfig(ckpt=ckpt, port=self.port, max_batch=MAX_BATCH)
        self.server = Server(engine, config, scheduler_thread=False)
        if scheduler_cls is not Scheduler:
            self.server.scheduler = scheduler_cls(engine, MAX_BATCH, thread=False)
        self.url = f"http://127.0.0.1:{self.port}"

    def run(self, client):
        """client(url) on a thread, served until it returns; returns its result."""
        import uvicorn

        http = uvicorn.Server(uvicorn.Config(self.server.app, host="127.0.0.1", port=self.port, log_level="warning"))
        web = threading.Thread(target=http.run, daemon=True)
        web.start()
        while not http.started:
            time.sleep(0.05)
        result = {}

        def call():
            try:
                result["value"] = client(self.url)
            except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
                result["error"] = e
        worker = threading.Thread(target=call)
        worker.start()
        self.server.scheduler.run(stop=lambda: not worker.is_alive())
        http.should_exit = True
        web.join(10)
        if "error" in result:
            raise result["error"]
        return result["value"]


def rl_load(tokenizer) -> list[dict]:
    import json

    from qatctl.data import chat_prompt_ids

    rows = [json.loads(ln) for ln in open(Path(__file__).resolve().parents[1] / "recipes/data/arith-test.jsonl")]
    rng = random.Random(0)
    body = []
    for i, row in enumerate(rows[:PROMPTS]):
        ids = chat_prompt_ids(tokenizer, row["messages"][:1])
        for j in range(SAMPLES):
            n = LONG if rng.random() < 0.25 else SHORT
            body.append({"input_ids": ids, "rid": f"p{i}-s{j}", "return_logprob": True,
                         "sampling_params": {"temperature": 1.0, "sampling_seed": 1000 * i + j, "max_new_tokens": n,
                                             "ignore_eos": True}})
    rng.shuffle(body)
    return body


async def send_all(url: str, bodies: list[dict]) -> tuple[float, list[float], dict]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=512)) as client:
        async def one(b):
            t = time.perf_counter()
            r = await client.post("/generate", json=b)
            r.raise_for_status()
            return time.perf_counter() - t, r.json()

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(b) for b in bodies))
        wall = time.perf_counter() - t0
    return wall, [lat for lat, _ in results], {b["rid"]: out for b, (_, out) in zip(bodies, results, strict=True)}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def batch1(engine, ckpt: Path, new: int = 128) -> tuple[float, float]:
    import httpx

    prompt = list(range(100, 116))
    sp = SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True)
    engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True))
    rates = []
    for _ in range(3):
        t = time.perf_counter()
        engine.generate([prompt], sp)
        rates.append(new / (time.perf_counter() - t))
    in_process = max(rates)
    body = {"input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": new, "ignore_eos": True}}

    def client(url):
        with httpx.Client(base_url=url, timeout=120) as c:
            c.post("/generate", json={**body, "sampling_params": {"max_new_tokens": 4}})
            rates = []
            for _ in range(3):
                t = time.perf_counter()
                c.post("/generate", json=body).raise_for_status()
                rates.append(new / (time.perf_counter() - t))
        return max(rates)
    return in_process, LiveServer(engine, ckpt).run(client)


def main() -> None:
    from qatctl.engines import load_engine

    ckpt, int4 = RUNS / "smollm2-init", RUNS / "smollm2-int4"
    init_qat.run(init_qat.InitQatConfig(model="smollm2-135m", out=ckpt))
    convert_int4.run(convert_int4.ConvertInt4Config(ckpt=ckpt, out=int4))
    engine = load_engine(int4)
    bodies = rl_load(engine.tokenizer)
    tokens = sum(b["sampling_params"]["max_new_tokens"] for b in bodies)
    rows, outputs = [], {}
    for name, cls, cache in (("run-to-completion (old)", RunToCompletion, False),
                             ("run-to-completion + shared prefixes", RunToCompletion, True),
                             ("continuous batching", Scheduler, False),
                             ("continuous + shared prefixes", Scheduler, True)):
        engine.flush_cache()
        engine.prefix_cache.budget = 256 * 2**20 if cache else 0
        wall, lat, outs = LiveServer(engine, int4, cls).run(lambda url: asyncio.run(send_all(url, bodies)))
        cached = sum(o["meta_info"]["cached_tokens"] for o in outs.values())
        rows.append((name, tokens / wall, pct(lat, 0.5), pct(lat, 0.99), cached, wall))
        outputs[name] = {rid: (o["output_ids"], [x[0] for x in o["meta_info"].get("output_token_logprobs", [])])
                         for rid, o in outs.items()}
        print(f"{name}: {tokens / wall:.0f} tok/s, p50 {pct(lat, 0.5):.2f}s, p99 {pct(lat, 0.99):.2f}s", flush=True)
    engine.prefix_cache.budget = 256 * 2**20
    same = all(v == outputs[rows[0][0]] for v in outputs.values())
    in_process, served = batch1(engine, int4)

    base = rows[0][1]
    lines = [f"## Serving RL-shaped load on SmolLM2-135M INT4 ({datetime.date.today()})", "",
             f"Machine: {machine()}. CPU flags: {cpu_flags()}. `python bench/serve.py`.", "",
             f"{PROMPTS} prompts x {SAMPLES} samples = {len(bodies)} concurrent `/generate` requests (temperature 1, "
             f"seeded), 3 of 4 samples {SHORT} new tokens and 1 of 4 {LONG} ({tokens} tokens in all), at most "
             f"{MAX_BATCH} running. Same engine, same requests, four schedulers, one run:", "",
             "| scheduler | tokens/s | vs run-to-completion | p50 latency s | p99 latency s | prompt tokens from cache | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {n} | {r:.0f} | {r / base:.2f}x | {p50:.2f} | {p99:.2f} | {c} | {w:.1f} |"
              for n, r, p50, p99, c, w in rows]
    lines += ["", f"Identical tokens and logprobs under all four schedulers: **{same}** (batch invariance under continuous "
              "batching and prefix sharing).", "",
              f"Batch-1 decode, 128 new tokens, greedy, {torch.get_num_threads()} threads: in process "
              f"**{in_process:.1f} tok/s**, through `/generate` one request at a time **{served:.1f} tok/s** "
              f"({served / in_process:.0%} of in process)."]
    write_section("serve", lines)
    if not same:
        raise SystemExit("the schedulers gave different tokens: batch invariance is broken")


if __name__ == "__main__":
    main()
