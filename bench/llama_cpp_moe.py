"""llama.cpp runs qatctl's Qwen3-MoE GGUF export (issue 25 item 1): a small random Qwen3-MoE with
SmolLM2's tokenizer (the tiny presets' byte-level tokenizer has no merges, which llama.cpp's BPE
loader requires), through init-qat -> convert-int4 (compressed-tensors and --format gguf), then
bench/llama_cpp_logprobs.py on the pair: llama-server's greedy tokens and their logprobs against
qatctl's engine and the training view. A negative control writes the same export with each
layer's experts in reverse order (what a wrong merge would do): llama.cpp must then disagree.

    python bench/llama_cpp_moe.py --bin ~/.cache/llama-cpp/src/build/bin --out results/llama-cpp/qwen3-moe

Writes OUT/gap.json and OUT/gap-experts-reversed.json (bench/llama_cpp_logprobs.py records).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(root: Path) -> Path:
    """An HF Qwen3-MoE folder: 2 layers, 4 experts (top 2, renormalized as llama.cpp's qwen3moe
    computes), hidden 128, SmolLM2's tokenizer and vocabulary; weights N(0, 0.08), seed 0."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from qatctl.models import load_tokenizer
    from stages import init_qat

    smol = root / "smollm2"
    init_qat.run(init_qat.InitQatConfig(model="smollm2-135m", out=smol))
    tok = load_tokenizer(smol)
    cfg = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=4,
                         num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.08)
    hf = root / "hf"
    model.to(torch.bfloat16).save_pretrained(hf)
    tok.save_pretrained(hf)
    return hf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", type=Path, required=True, help="llama.cpp's build/bin (bench/build-llama.sh)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench-moe-gguf")
    ap.add_argument("--limit", type=int, default=16)
    a = ap.parse_args()

    from qatctl import ggufformat
    from stages import convert_int4, init_qat

    a.work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    init = a.work / "init"
    init_qat.run(init_qat.InitQatConfig(model=str(build(a.work)), out=init, force=True))
    convert_int4.run(convert_int4.ConvertInt4Config(ckpt=init, out=a.work / "int4", force=True))
    convert_int4.run(convert_int4.ConvertInt4Config(ckpt=init, out=a.work / "gguf", format="gguf", force=True))
    merged = ggufformat._merged_experts

    def reversed_experts(writer, reader, names, folder, cfg, prefix, proj, members, inexact):
        n = len(members)
        return merged(writer, reader, names, folder, cfg, prefix, proj, {x: members[n - 1 - x] for x in members},
                      inexact)

    ggufformat._merged_experts = reversed_experts  # the control only: a wrong merge
    try:
        convert_int4.run(convert_int4.ConvertInt4Config(ckpt=init, out=a.work / "gguf-reversed", format="gguf",
                                                        force=True))
    finally:
        ggufformat._merged_experts = merged
    for gguf, name in ((a.work / "gguf", "gap"), (a.work / "gguf-reversed", "gap-experts-reversed")):
        subprocess.run([sys.executable, str(REPO / "bench/llama_cpp_logprobs.py"), "--bin", str(a.bin),
                        "--policy", str(init), "--int4", str(a.work / "int4"), "--gguf", str(gguf / "model.gguf"),
                        "--prompts", "recipes/data/arith-val.jsonl", "--limit", str(a.limit),
                        "--threads", "1", "--out", str(a.out / f"{name}.json")], check=True, cwd=REPO)


if __name__ == "__main__":
    main()
