"""The logprob gap between llama.cpp and qatctl on the same INT4 weights (issue 25, item 3).

    python bench/llama_cpp_logprobs.py --bin ~/.cache/llama-cpp/src/build/bin \\
        --policy runs/x/sft --int4 runs/x/int4 --gguf runs/x/gguf/model.gguf \\
        --prompts recipes/data/arith-val.jsonl --limit 64 --out results/llama-cpp/logprob-gap.json

llama-server generates greedily from each prompt (token ids tokenized by qatctl, as
bench/llama_cpp_eval.py) and returns the full-softmax logprob of every token it chose (n_probs,
pre-sampling). The same tokens are then scored by (a) qatctl's embedded W4A16 engine on the
int4-checkpoint the GGUF was exported beside (same codes and scales), and (b) the training view:
the policy's fake-INT4 weights, bf16(q * scale), in an fp32 forward through transformers, which
is what QAT trains. llama.cpp differs from (b) in two places: it multiplies by the unrounded
fp32 product d * (u - 8) (one BF16 rounding of the weight apart), and its CPU dot products
quantize the activations to Q8_0 blocks (32 values, one scale, int8). The record gives the
token-level |dlogp| statistics of each pair (consistency.mismatch_metrics) and whether the
engine's own greedy choice agrees with llama.cpp's tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def llama_cpp_greedy(url: str, prompts: list[list[int]], max_new: int) -> tuple[list, list]:
    """(token ids, their logprobs) of llama-server's greedy completion of each prompt."""
    import httpx

    ids, lps = [], []
    for p in prompts:
        r = httpx.post(url + "/completion", timeout=300, json={
            "prompt": p, "n_predict": max_new, "temperature": 0, "top_k": 1, "samplers": ["top_k"],
            "cache_prompt": False, "return_tokens": True, "n_probs": 1, "post_sampling_probs": False}).json()
        probs = r.get("completion_probabilities") or []
        toks = [c["id"] for c in probs]
        if toks != (r.get("tokens") or [])[: len(toks)]:
            raise SystemExit("llama-server: completion_probabilities do not follow its tokens")
        ids.append(toks)
        lps.append([float(c["logprob"]) for c in probs])
    return ids, lps


def q8_0(x):
    """ggml's quantize_row_q8_0 in fp32: blocks of 32 along the last dimension, d = amax / 127
    stored as fp16, q = round(x / d) (round half away from zero, as roundf), value q * fp16(d)."""
    import torch

    shape = x.shape
    xb = x.float().reshape(*shape[:-1], shape[-1] // 32, 32)
    d = xb.abs().amax(dim=-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    v = xb * inv
    q = torch.sign(v) * torch.floor(v.abs() + 0.5)
    return (q * d.half().float()).reshape(shape).to(x.dtype)


def unrounded(model, policy: Path, scheme) -> None:
    """Every quantized weight as llama.cpp dequantizes Q4_0: the fp32 product of the code and the
    (fp16-exact) scale, without the training view's BF16 rounding; from the checkpoint's weights."""
    import torch

    from qatctl import models
    from qatctl.quant import quantize

    dense, _ = models.load_checkpoint(policy)
    src = {n: getattr(m, p) for n, m, p in models.quant_targets(dense, scheme)}
    g = scheme.group_size
    with torch.no_grad():
        for name, mod, pname in models.quant_targets(model, scheme):
            w = src[name]
            q, scale = quantize(w, scheme)
            qg = q.float().reshape(*w.shape[:-1], w.shape[-1] // g, g)
            getattr(mod, pname).copy_((qg * scale.float().unsqueeze(-1)).reshape(w.shape))


def main() -> None:
    from _report import machine
    from llama_cpp_eval import llama_server

    from qatctl import data, models
    from qatctl.artifacts import read_artifact, sha256_file
    from qatctl.consistency import mismatch_metrics, train_logprobs
    from qatctl.engines import load_engine
    from qatctl.quant import QuantScheme
    from qatctl.safeio import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", type=Path, required=True, help="llama.cpp's build/bin (bench/build-llama.sh)")
    ap.add_argument("--policy", type=Path, required=True, help="the qat-checkpoint both files were converted from")
    ap.add_argument("--int4", type=Path, required=True, help="its int4-checkpoint (convert-int4)")
    ap.add_argument("--gguf", type=Path, required=True, help="its GGUF export (convert-int4 --format gguf)")
    ap.add_argument("--prompts", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.limit < 1 or a.max_new_tokens < 1 or a.threads < 1:
        raise SystemExit("--limit, --max-new-tokens and --threads must be >= 1")

    import torch

    torch.set_num_threads(a.threads)
    tok = load_tokenizer(a.policy)
    rows = data.load_prompts(a.prompts, tok)[: a.limit]
    prompts = [list(p.prompt_ids) for p in rows]
    with llama_server(a.bin, a.gguf, a.threads, a.out.stem) as url:
        import httpx

        build = httpx.get(url + "/props", timeout=10).json().get("build_info", "?")
        comps, llama = llama_cpp_greedy(url, prompts, a.max_new_tokens)
    keep = [i for i, c in enumerate(comps) if c]
    prompts, comps, llama = [prompts[i] for i in keep], [comps[i] for i in keep], [llama[i] for i in keep]

    engine = load_engine(a.int4, device="cpu")
    eng_lp, eng_top = engine.score_argmax(prompts, comps)

    policy = read_artifact(a.policy, "qat-checkpoint")
    scheme = QuantScheme.from_manifest(policy.manifest["quant"])
    model, _ = models.load_checkpoint(a.policy)
    models.materialize_fake_quant(model, scheme)
    model.eval()
    view_lp, view_top = train_logprobs(model, prompts, comps)

    # llama.cpp's arithmetic emulated on the training model, one difference at a time: the
    # activations entering every quantized linear as Q8_0 blocks, then also the weights as the
    # unrounded fp32 product d * q instead of bf16(q * scale).
    hooks = [mod.register_forward_pre_hook(lambda m, args: (q8_0(args[0]), *args[1:]))
             for _, mod, _ in models.quant_targets(model, scheme)]
    q8_lp, q8_top = train_logprobs(model, prompts, comps)
    unrounded(model, a.policy, scheme)
    emu_lp, emu_top = train_logprobs(model, prompts, comps)
    for h in hooks:
        h.remove()

    pairs = {"llama.cpp vs qatctl engine": (llama, eng_lp, comps, eng_top),
             "llama.cpp vs training view": (llama, view_lp, comps, view_top),
             "qatctl engine vs training view": (eng_lp, view_lp, eng_top, view_top),
             "training view + Q8_0 activations vs training view": (q8_lp, view_lp, q8_top, view_top),
             "llama.cpp vs training view + Q8_0 activations": (llama, q8_lp, comps, q8_top),
             "llama.cpp vs + Q8_0 activations + unrounded weights": (llama, emu_lp, comps, emu_top)}
    # mismatch_metrics(train, infer): |train - infer|; llama.cpp's greedy tokens are its argmax
    table = {name: mismatch_metrics(y, x, ty, tx) for name, (x, y, tx, ty) in pairs.items()}
    result = {"policy": str(a.policy), "int4": str(a.int4), "gguf": str(a.gguf),
              "gguf_digest": sha256_file(a.gguf), "prompts": str(a.prompts), "prompts_digest": sha256_file(a.prompts),
              "limit": a.limit, "max_new_tokens": a.max_new_tokens, "threads": a.threads,
              "llama_cpp": f"llama-server {build}", "engine": engine.info(), "machine": machine(),
              "sequences": len(comps), "tokens": sum(map(len, comps)), "pairs": table,
              "records": [{"prompt_ids": p, "output_ids": c, "llama_cpp": x, "engine": e, "training_view": v}
                          for p, c, x, e, v in zip(prompts, comps, llama, eng_lp, view_lp, strict=True)]}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    from rich.table import Table

    from qatctl.ui import console

    t = Table(title=f"|dlogp| on llama.cpp's greedy tokens ({result['tokens']} tokens, {len(comps)} sequences)")
    for col in ("pair", "mean", "p50", "p99", "max", "greedy agreement"):
        t.add_column(col)
    for name, m in table.items():
        t.add_row(name, f"{m['mean_abs_diff']:.5f}", f"{m['p50_abs_diff']:.5f}", f"{m['p99_abs_diff']:.4f}",
                  f"{m['max_abs_diff']:.4f}", f"{m['greedy_agreement']:.4f}" if m.get("greedy_agreement") is not None
                  else "-")
    console.print(t)
    console.print(f"-> {a.out}")


if __name__ == "__main__":
    main()
