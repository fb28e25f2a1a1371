"""Greedy exact-match accuracy of a GGUF file run by llama.cpp itself (llama-server), in the shape
`qatctl accuracy --json` writes, so `qatctl compare` pairs it with qatctl's own engine on the same
problems.

    python bench/llama_cpp_eval.py --bin ~/.cache/llama-cpp/src/build/bin --gguf runs/x/gguf/model.gguf \\
        --tokenizer runs/x/sft --prompts recipes/data/arith-test.jsonl --out acc-llama.json

The prompts are tokenized by qatctl (the checkpoint's chat template) and sent to llama-server as
token ids, so both engines see the same tokens; generation is greedy (temperature 0, top_k 1),
32 new tokens as `qatctl accuracy`, EOS stops it; the completion is decoded by the same tokenizer.
Its record also says how many prompt texts llama.cpp itself tokenizes to the same ids (the GGUF's
tokenizer.ggml.pre at work). For llama.cpp's own PTQ baseline: its convert_hf_to_gguf.py (in the
same sdist; needs `pip install sentencepiece`) to BF16, then `llama-quantize ... Q4_0`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_server(bin_dir: Path, gguf: Path, threads: int, name: str):
    """llama-server on GGUF at a free loopback port, one slot, until the block ends; its URL.
    Its log goes to the temp folder (not beside the records)."""
    import httpx

    port = free_port()
    log = open(Path(tempfile.gettempdir()) / f"{name}.llama-server.log", "w")
    server = subprocess.Popen([str(bin_dir / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port",
                               str(port), "-t", str(threads), "-c", "1024", "-np", "1", "--no-webui"],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise SystemExit(f"llama-server exited {server.returncode}; see {log.name}")
            time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    import httpx

    from qatctl import data
    from qatctl.artifacts import sha256_file
    from qatctl.rl.rewards import exact_number
    from qatctl.safeio import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", type=Path, required=True, help="llama.cpp's build/bin (bench/build-llama.sh)")
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True, help="the checkpoint folder the GGUF came from")
    ap.add_argument("--prompts", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    a = ap.parse_args()

    tok = load_tokenizer(a.tokenizer)
    rows = data.load_prompts(a.prompts, tok)[: a.limit]
    with llama_server(a.bin, a.gguf, a.threads, a.out.stem) as url:
        # llama.cpp's own tokenization of the prompt text (the GGUF's tokenizer.ggml.pre at work)
        # against the ids qatctl's tokenizer gives: the export's tokenizer is right when they agree
        same_tokens = sum(httpx.post(url + "/tokenize", timeout=60, json={
            "content": p.text, "add_special": False, "parse_special": True}).json()["tokens"] == list(p.prompt_ids)
            for p in rows)
        samples, correct, t0 = [], 0, time.perf_counter()
        for p in rows:
            r = httpx.post(url + "/completion", timeout=300, json={
                "prompt": list(p.prompt_ids), "n_predict": a.max_new_tokens, "temperature": 0, "top_k": 1,
                "cache_prompt": False, "return_tokens": True, "samplers": ["top_k"]}).json()
            ids = r.get("tokens") or []
            text = tok.decode(ids, skip_special_tokens=True)
            reward = exact_number(text, p.answer)
            correct += reward > 0
            samples.append({"index": p.index, "answer": p.answer, "completion": text, "reward": reward, "output_ids": ids})
        seconds = time.perf_counter() - t0
        props = httpx.get(url + "/props", timeout=10).json()
    result = {"model": str(a.gguf), "kind": "gguf", "kernel": f"llama.cpp llama-server ({props.get('build_info', '?')})",
              "device": "cpu", "threads": a.threads, "prompts": str(a.prompts), "prompts_digest": sha256_file(a.prompts),
              "limit": a.limit, "max_new_tokens": a.max_new_tokens, "reward_name": "exact-number",
              "accuracy": correct / len(rows), "correct": correct, "total": len(rows), "seconds": round(seconds, 1),
              "prompts_tokenized_identically": same_tokens,
              "samples": samples}
    a.out.write_text(json.dumps(result, indent=1))
    print(f"{a.gguf}: {correct}/{len(rows)} ({100 * correct / len(rows):.1f}%) in {seconds:.0f} s; prompts tokenized as "
          f"qatctl does: {same_tokens}/{len(rows)} -> {a.out}")


if __name__ == "__main__":
    main()
