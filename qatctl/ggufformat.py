"""The GGUF export: a qat-checkpoint as one llama.cpp `.gguf` file whose quantized linears are Q4_0
blocks built from qatctl's own integers and scales (never re-quantized by another tool).

A Q4_0 block is 32 weights: an fp16 scale d and 16 bytes of 4-bit codes u in [0, 15], weight
d * (u - 8); byte j holds element j in its low nibble and element j + 16 in its high nibble. The
INT4 scheme at group 32 is that block: u = q + 8 (q in [-7, 7] for kimi, [-8, 7] for minmax) and
d = the group's scale. qatctl's scales are BF16; fp16 holds a BF16 value exactly when it lies in
fp16's range at full precision (|d| in [2^-14 * 2^-3, 65504], roughly: a BF16 value below 2^-17 or
above 65504 is rounded): every scale fp16 cannot hold exactly is counted and named, never claimed.

What llama.cpp computes with differs from the training view by one rounding: it dequantizes to
the unrounded fp32 product d * (u - 8), the training view is bf16(q * scale).

Names, Q/K row order and metadata follow llama.cpp's own converter (convert_hf_to_gguf.py) for
the architecture: Llama's q_proj / k_proj rows are permuted for its rotary layout (a row
permutation: whole Q4_0 rows move, codes and scales unchanged); Qwen3 keeps HF order and adds its
q/k norms; Qwen3-MoE (the converter's Qwen3MoeModel) merges each layer's experts into one 3-D tensor
per projection (blk.N.ffn_{gate,up,down}_exps: [experts, rows, columns], Q4_0 rows from the same
codes and scales) and writes the router (ffn_gate_inp) as F32. Embeddings, lm_head and norms keep the checkpoint's precision (BF16; 1-D norms F32, as
the converter writes them). The tokenizer (BPE tokens, types, merges, special ids, chat template)
goes inside.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from qatctl.errors import QatctlError

ARCHES = {"llama": "LLAMA", "qwen3": "QWEN3", "qwen3_moe": "QWEN3MOE"}  # model_type -> gguf.MODEL_ARCH member
EXPERT = re.compile(r"(.+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)$")  # HF's per-expert linears
BLOCK = 32  # Q4_0 weights per block


def check_exportable(cfg: dict, group_size: int, where: str) -> None:
    """One line naming what would work, before anything is written."""
    mt = cfg.get("model_type")
    if mt == "qwen3_moe":  # what llama.cpp's qwen3moe graph computes, or the file would be another model
        if not cfg.get("norm_topk_prob", False):
            raise QatctlError(f"{where}: --format gguf: llama.cpp's qwen3moe always renormalizes the top-k router "
                              "weights, and this config has norm_topk_prob false; keep the compressed-tensors format")
        if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
            raise QatctlError(f"{where}: --format gguf: llama.cpp's qwen3moe has an MoE block in every layer; this "
                              "config has dense layers (mlp_only_layers / decoder_sparse_step); keep the "
                              "compressed-tensors format")
    if mt not in ARCHES:
        raise QatctlError(f"{where}: --format gguf exports {', '.join(ARCHES)}, not model_type {mt!r}")
    if group_size != BLOCK:
        raise QatctlError(f"{where}: --format gguf needs group size 32 (a Q4_0 block is 32 weights); this scheme has "
                          f"group size {group_size}: re-run init-qat with --group-size 32, or keep the compressed-tensors "
                          "format")


def q4_0_blocks(q: torch.Tensor, scale: torch.Tensor) -> tuple[np.ndarray, list[int]]:
    """(q int8 [N, K] in [-8, 7], scale [N, K/32]) -> (uint8 [N, K/32 * 18] Q4_0 bytes, the flat
    indices of scales fp16 does not hold exactly)."""
    N, K = q.shape
    if K % BLOCK or scale.shape != (N, K // BLOCK):
        raise QatctlError(f"Q4_0: a [{N}, {K}] weight needs [{N}, {K // BLOCK}] scales, got {tuple(scale.shape)}")
    if int(q.min()) < -8 or int(q.max()) > 7:
        raise QatctlError("Q4_0: codes outside [-8, 7]")
    d = scale.float().to(torch.float16)
    inexact = torch.nonzero((d.float() != scale.float()).flatten()).flatten().tolist()
    u = (q.to(torch.int16) + 8).to(torch.uint8).reshape(N, K // BLOCK, BLOCK)
    packed = u[..., :16] | (u[..., 16:] << 4)  # [N, K/32, 16]
    d_bytes = d.contiguous().view(torch.uint8).reshape(N, K // BLOCK, 2)  # little-endian fp16
    return torch.cat([d_bytes, packed], dim=-1).reshape(N, -1).numpy(), inexact


def llama_permute(w: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """llama.cpp's converter's row permutation of q_proj / k_proj (LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def pretokenizer(tokenizer_json: dict, override: str | None, where: str) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for this tokenizer: the one whose splitting equals its own.
    A byte-level BPE with GPT-2's regex and no normalizer is llama.cpp's `gpt-2`; anything else needs
    --gguf-pre (llama.cpp would otherwise split text another way than qatctl's tokenizer does)."""
    if override:
        return override
    pre, norm = tokenizer_json.get("pre_tokenizer"), tokenizer_json.get("normalizer")
    if norm is None and isinstance(pre, dict) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    raise QatctlError(f"{where}: its pre-tokenizer ({json.dumps(pre)[:120]}) has no llama.cpp name qatctl knows; pass "
                      "--gguf-pre NAME (llama.cpp's tokenizer.ggml.pre whose splitting equals it)")


def _vocab(writer, folder: Path, tokenizer, vocab_size: int, pre: str) -> None:
    """tokenizer.ggml.* as llama.cpp's converter writes a BPE vocab (get_vocab_base)."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif reverse[i] in added:
            tokens.append(reverse[i])
            special = decoder[i].special if i in decoder else False
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if special.add_special_token.get("bos") is None:  # what the tokenizer does, stated, not left to a default
        ids = tokenizer("a")["input_ids"]
        special.add_special_token["bos"] = bool(ids) and ids[0] == tokenizer.bos_token_id
    special.add_to_gguf(writer)


def _metadata(writer, cfg: dict, arch: str, name: str) -> None:
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    writer.add_name(name)
    writer.add_context_length(cfg.get("max_position_embeddings", 4096))
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    rope = cfg.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    if cfg.get("head_dim") is not None:  # as the converter: whenever the config names it
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    n_experts = cfg.get("num_local_experts", cfg.get("num_experts"))
    if n_experts is not None:  # as TextModel and Qwen2MoeModel.set_gguf_parameters
        writer.add_expert_count(n_experts)
        writer.add_expert_used_count(cfg["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(cfg["moe_intermediate_size"])


def write_gguf(folder: Path, reader, cfg: dict, tokenizer, out_file: Path, pre: str, name: str) -> dict:
    """Write `out_file` from an int4 reader (qatctl.int4format.Int4Reader over the checkpoint's
    converted tensors). Returns the export's exactness: tensors, inexact scales and where."""
    import gguf

    arch = ARCHES[cfg["model_type"]]
    n_layers = cfg["num_hidden_layers"]
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), n_layers)
    writer = gguf.GGUFWriter(str(out_file), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch)])
    _metadata(writer, cfg, arch, name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _vocab(writer, folder, tokenizer, cfg["vocab_size"], pre)

    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    inexact: dict[str, int] = {}
    q4 = 0
    experts: dict[tuple[str, str], dict[int, str]] = {}  # (layer's experts prefix, projection) -> {expert: module}
    for key in sorted(reader.keys):
        if key.endswith((".weight_packed", ".weight_shape")):
            continue
        module = key.removesuffix(".weight_scale").removesuffix(".weight")
        if (m := EXPERT.match(module)) is not None:
            experts.setdefault((m[1], m[3]), {})[int(m[2])] = module
            continue
        gname = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if gname is None:
            raise QatctlError(f"{folder}: tensor {key} has no llama.cpp name for {arch.lower()}")
        if key.endswith(".weight_scale"):
            q, scale = reader.q_scale(module)
            if arch == "LLAMA" and module.endswith(("q_proj", "k_proj")):
                heads = (n_head, n_head) if module.endswith("q_proj") else (n_head, n_kv)
                q, scale = llama_permute(q, *heads), llama_permute(scale, *heads)
            data, bad = q4_0_blocks(q, scale)
            if bad:
                inexact[gname] = len(bad)
            writer.add_tensor(gname, data, raw_dtype=gguf.GGMLQuantizationType.Q4_0)  # byte shape -> [N, K]
            q4 += 1
        else:
            t = reader.tensor(key)
            if t.ndim == 1 or gname.endswith("ffn_gate_inp.weight"):  # norms, the MoE router: F32, as the
                writer.add_tensor(gname, t.float().numpy())                # converter writes them (exact from BF16)
            elif t.dtype == torch.bfloat16:
                writer.add_tensor(gname, t.contiguous().view(torch.int16).numpy().view(np.uint16),
                                  raw_shape=tuple(t.shape), raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                writer.add_tensor(gname, t.float().numpy())
    for (prefix, proj), members in sorted(experts.items()):
        q4 += _merged_experts(writer, reader, names, folder, cfg, prefix, proj, members, inexact)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"q4_0_tensors": q4, "inexact_scales": sum(inexact.values()), "inexact_scale_tensors": inexact}


def _merged_experts(writer, reader, names, folder, cfg, prefix, proj, members, inexact) -> int:
    """One layer's experts of one projection as the converter merges them: a [experts, rows, columns]
    tensor named from `PREFIX.PROJ.weight` (Q4_0 rows of each expert's own codes and scales, or
    BF16 where the experts were left unquantized). Returns 1 if it was written as Q4_0."""
    import gguf

    n = cfg.get("num_local_experts", cfg.get("num_experts"))
    if sorted(members) != list(range(n)):
        raise QatctlError(f"{folder}: {prefix}: experts {sorted(members)} for {proj}, expected 0..{n - 1}")
    gname = names.get_name(f"{prefix}.{proj}.weight", try_suffixes=(".weight",))
    if gname is None:
        raise QatctlError(f"{folder}: {prefix}.{proj} has no llama.cpp name")
    quantized = {reader.is_quantized(members[x]) for x in range(n)}
    if quantized == {True}:
        rows, bad = [], 0
        for x in range(n):
            data, b = q4_0_blocks(*reader.q_scale(members[x]))
            rows.append(data)
            bad += len(b)
        if bad:
            inexact[gname] = bad
        writer.add_tensor(gname, np.stack(rows), raw_dtype=gguf.GGMLQuantizationType.Q4_0)  # -> [E, N, K]
        return 1
    if quantized == {False}:
        t = torch.stack([reader.tensor(members[x] + ".weight") for x in range(n)])
        if t.dtype != torch.bfloat16:
            writer.add_tensor(gname, t.float().numpy())
        else:
            writer.add_tensor(gname, t.contiguous().view(torch.int16).numpy().view(np.uint16), raw_shape=tuple(t.shape),
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
        return 0
    raise QatctlError(f"{folder}: {prefix}: some experts' {proj} are quantized and some are not; a GGUF tensor holds "
                      "one type")
