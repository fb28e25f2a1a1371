"""convert-int4 --format gguf (issue 25): llama.cpp Q4_0 blocks built from qatctl's own codes and
scales, read back by readers that are not qatctl's: the `gguf` package's reader and dequantizer,
and transformers' GGUF loader (which also undoes llama.cpp's Q/K row order)."""

from __future__ import annotations

import json

import gguf  # a declared dependency: a missing one fails, never skips
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import assert_usage_error

from conftest import make_tiny, qatctl, redigest


def _codes(ckpt):
    """{HF module: (q, scale)} of every quantized linear, by the shared quantizer (the fake-quant codes)."""
    from qatctl.int4format import Int4Reader, convert_tensor
    from qatctl.quant import QuantScheme

    scheme = QuantScheme.from_manifest(json.loads((ckpt / "qatctl.json").read_text())["quant"])
    out = {}
    for key, w in load_file(ckpt / "model.safetensors").items():
        conv = convert_tensor(key, w, scheme)
        if len(conv) > 1:
            module = key.removesuffix(".weight")
            out[module] = Int4Reader.from_tensors(conv, scheme.group_size).q_scale(module)
    return out, scheme


def _product(q, scale):
    """q * scale in fp32, unrounded: what llama.cpp dequantizes a Q4_0 block to."""
    return (q.float().reshape(q.shape[0], -1, 32) * scale.float().unsqueeze(-1)).reshape(q.shape)


def _expected_names(cfg, arch):
    per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    if arch == "qwen3":
        per_block += ["attn_q_norm", "attn_k_norm"]
    names = {"token_embd.weight", "output_norm.weight"}
    if not cfg.get("tie_word_embeddings", False):
        names.add("output.weight")
    return names | {f"blk.{i}.{n}.weight" for i in range(cfg["num_hidden_layers"]) for n in per_block}


@pytest.mark.parametrize("preset, arch", [("tiny-llama", "llama"), ("tiny-qwen3", "qwen3")])
def test_gguf_holds_qatctls_codes_and_scales(preset, arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from qatctl.ggufformat import llama_permute
    from qatctl.quant import dequant

    make_tiny(preset, tmp_path / "init")
    out = tmp_path / "gguf"
    m = json.loads(qatctl("convert-int4", tmp_path / "init", "--format", "gguf", "--gguf-pre", "gpt-2", "--out", out,
                          "--json").stdout)
    assert m["kind"] == "gguf" and m["metrics"]["inexact_scales"] == 0 and m["metrics"]["tokenizer_pre"] == "gpt-2"
    cfg = json.loads((tmp_path / "init" / "config.json").read_text())
    codes, _ = _codes(tmp_path / "init")
    reader = gguf.GGUFReader(out / "model.gguf")
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == _expected_names(cfg, arch)
    assert m["metrics"]["q4_0_tensors"] == len(codes) == 7 * cfg["num_hidden_layers"]
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hf_to_gguf = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), cfg["num_hidden_layers"])
    for module, (q, scale) in codes.items():
        t = tensors[hf_to_gguf.get_name(module + ".weight", try_suffixes=(".weight",))]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
        got = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
        if arch == "llama" and module.endswith(("q_proj", "k_proj")):  # llama.cpp's rotary row order
            heads = (n_head, n_head) if module.endswith("q_proj") else (n_head, n_kv)
            q, scale = llama_permute(q, *heads), llama_permute(scale, *heads)
        assert torch.equal(got, _product(q, scale)), module
        # llama.cpp computes with the unrounded product; the training view is its BF16 rounding
        assert torch.equal(got.bfloat16(), dequant(q, scale, 32)), module
    fields = reader.fields
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == cfg["vocab_size"]
    assert bytes(fields["tokenizer.ggml.pre"].parts[-1]).decode() == "gpt-2"
    assert "tokenizer.chat_template" in fields and fields["general.architecture"].parts[-1].tobytes().decode() == arch
    # transformers' own GGUF reader (llama: it undoes the Q/K permutation) gives every linear as
    # q * scale in HF order, and every other tensor as the checkpoint holds it. Not for qwen3:
    # transformers' qwen3 GGUF mapping reads no attention.key_length, so a head_dim other than
    # Qwen3Config's default 128 (tiny-qwen3 has 32) loads with the wrong shapes there.
    if arch == "qwen3":
        return
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
    sd = model.state_dict()
    for key, w in load_file(tmp_path / "init" / "model.safetensors").items():
        module = key.removesuffix(".weight")
        want = _product(*codes[module]) if module in codes else w.float()
        assert torch.equal(sd[key], want), key


def _set_config(ckpt, **fields):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, **fields}, indent=2))
    redigest(ckpt)


@pytest.mark.parametrize("targets", [None, "kimi-experts"])
def test_gguf_qwen3_moe_merges_each_layers_experts_as_the_converter_does(targets, tmp_path):
    """Qwen3-MoE: per layer and projection one [experts, rows, columns] Q4_0 tensor
    (blk.N.ffn_{gate,up,down}_exps) whose expert e is expert e's own codes and scales, the router
    (ffn_gate_inp) F32, the expert counts in the metadata; with kimi-experts (experts quantized,
    attention left BF16) the attention linears are the checkpoint's BF16 tensors."""
    opts = {} if targets is None else {"preset_targets": targets}
    make_tiny("tiny-qwen3-moe", tmp_path / "init", **opts)
    _set_config(tmp_path / "init", norm_topk_prob=True)  # Qwen3-30B-A3B's value, what llama.cpp computes
    out = tmp_path / "gguf"
    m = json.loads(qatctl("convert-int4", tmp_path / "init", "--format", "gguf", "--gguf-pre", "gpt-2", "--out", out,
                          "--json").stdout)
    cfg = json.loads((tmp_path / "init" / "config.json").read_text())
    n_layers, n_exp = cfg["num_hidden_layers"], cfg["num_local_experts"]
    codes, _ = _codes(tmp_path / "init")
    reader = gguf.GGUFReader(out / "model.gguf")
    tensors = {t.name: t for t in reader.tensors}
    per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm", "ffn_norm",
                 "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]
    assert set(tensors) == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(n_layers) for n in per_block}
    attn_q4 = 0 if targets else 4
    assert m["metrics"]["q4_0_tensors"] == (attn_q4 + 3) * n_layers and m["metrics"]["inexact_scales"] == 0
    hf = load_file(tmp_path / "init" / "model.safetensors")
    for i in range(n_layers):
        for proj, name in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
            t = tensors[f"blk.{i}.{name}.weight"]
            assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
            got = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
            want = torch.stack([_product(*codes[f"model.layers.{i}.mlp.experts.{e}.{proj}"]) for e in range(n_exp)])
            assert torch.equal(got, want), (i, proj)
        router = tensors[f"blk.{i}.ffn_gate_inp.weight"]
        assert router.tensor_type == gguf.GGMLQuantizationType.F32
        assert torch.equal(torch.from_numpy(np.array(router.data)), hf[f"model.layers.{i}.mlp.gate.weight"].float())
        q = tensors[f"blk.{i}.attn_q.weight"]
        if targets:  # left BF16 by the scheme: written as the checkpoint holds it
            assert q.tensor_type == gguf.GGMLQuantizationType.BF16
            raw = torch.from_numpy(np.array(q.data).view(np.int16)).view(torch.bfloat16)
            assert torch.equal(raw.reshape(hf[f"model.layers.{i}.self_attn.q_proj.weight"].shape),
                               hf[f"model.layers.{i}.self_attn.q_proj.weight"])
        else:
            assert q.tensor_type == gguf.GGMLQuantizationType.Q4_0
    f = reader.fields
    assert f["general.architecture"].parts[-1].tobytes().decode() == "qwen3moe"
    assert int(f["qwen3moe.expert_count"].parts[-1][0]) == n_exp
    assert int(f["qwen3moe.expert_used_count"].parts[-1][0]) == cfg["num_experts_per_tok"]
    assert int(f["qwen3moe.expert_feed_forward_length"].parts[-1][0]) == cfg["moe_intermediate_size"]


def test_gguf_refuses_what_q4_0_cannot_express(tmp_path):
    make_tiny("tiny-llama", tmp_path / "g64", group_size=64)
    out = tmp_path / "out"
    p = qatctl("convert-int4", tmp_path / "g64", "--format", "gguf", "--gguf-pre", "gpt-2", "--out", out, check=False)
    assert_usage_error(p, "group size 32", "group size 64", "--group-size 32", absent=[out])
    make_tiny("tiny-qwen3-moe", tmp_path / "moe")  # norm_topk_prob false: llama.cpp's qwen3moe would renormalize
    p = qatctl("convert-int4", tmp_path / "moe", "--format", "gguf", "--gguf-pre", "gpt-2", "--out", out, check=False)
    assert_usage_error(p, "norm_topk_prob false", absent=[out])
    _set_config(tmp_path / "moe", norm_topk_prob=True, mlp_only_layers=[1])  # a dense layer llama.cpp has no slot for
    p = qatctl("convert-int4", tmp_path / "moe", "--format", "gguf", "--gguf-pre", "gpt-2", "--out", out, check=False)
    assert_usage_error(p, "mlp_only_layers", absent=[out])
    make_tiny("tiny-llama", tmp_path / "tiny")  # a byte-level tokenizer without GPT-2's split: no llama.cpp name
    p = qatctl("convert-int4", tmp_path / "tiny", "--format", "gguf", "--out", out, check=False)
    assert_usage_error(p, "tokenizer.json", "--gguf-pre", absent=[out])
    assert_usage_error(qatctl("convert-int4", tmp_path / "tiny", "--format", "onnx", "--out", out, check=False),
                       "--format 'onnx'", absent=[out])
    assert_usage_error(qatctl("convert-int4", tmp_path / "tiny", "--gguf-pre", "gpt-2", "--out", out, check=False),
                       "--gguf-pre", absent=[out])


def test_a_scale_fp16_cannot_hold_is_counted_not_rounded_silently(tmp_path):
    from qatctl.ggufformat import q4_0_blocks

    make_tiny("tiny-llama", tmp_path / "init")
    f = tmp_path / "init" / "model.safetensors"
    w = load_file(f)
    key = "model.layers.0.mlp.down_proj.weight"
    big = w[key].clone()
    big[0, :32] *= 1e7  # that row's first group: a scale far above fp16's 65504
    big[1, 32:64] *= 1e-6  # one below fp16's exact range
    w[key] = big
    save_file(w, f, metadata={"format": "pt"})
    redigest(tmp_path / "init")
    m = json.loads(qatctl("convert-int4", tmp_path / "init", "--format", "gguf", "--gguf-pre", "gpt-2", "--out",
                          tmp_path / "out", "--json").stdout)["metrics"]
    assert m["inexact_scales"] == 2 and m["inexact_scale_tensors"] == {"blk.0.ffn_down.weight": 2}
    q = torch.zeros(1, 64, dtype=torch.int8)
    _, bad = q4_0_blocks(q, torch.tensor([[1.0e5, 2.0 ** -10]], dtype=torch.bfloat16))
    assert bad == [0]


@pytest.mark.slow
def test_smollm2_exports_exactly(smollm2_pair, tmp_path):
    """The real model: llama.cpp's `gpt-2` pre-tokenizer recognized from tokenizer.json, every one of
    the 210 linears Q4_0 with every scale exact in fp16, and the gguf dequantizer gives back q * scale
    (the Q/K row order is proven on tiny-llama through transformers' reader)."""
    init = smollm2_pair[0]
    out = tmp_path / "gguf"
    m = json.loads(qatctl("convert-int4", init, "--format", "gguf", "--out", out, "--json").stdout)["metrics"]
    assert m == {**m, "q4_0_tensors": 210, "inexact_scales": 0, "tokenizer_pre": "gpt-2"}
    codes, _ = _codes(init)
    tensors = {t.name: t for t in gguf.GGUFReader(out / "model.gguf").tensors}
    assert sum(t.tensor_type == gguf.GGMLQuantizationType.Q4_0 for t in tensors.values()) == len(codes) == 210
    for module, gname in (("model.layers.7.mlp.down_proj", "blk.7.ffn_down.weight"),
                          ("model.layers.29.self_attn.v_proj", "blk.29.attn_v.weight")):
        got = torch.from_numpy(np.array(gguf.quants.dequantize(tensors[gname].data, tensors[gname].tensor_type)))
        assert torch.equal(got, _product(*codes[module])), module
