"""init-qat -> convert-int4 round trips on tiny Llama, Qwen3 and Qwen3-MoE (fused experts),
read back by an independent reader: transformers + compressed-tensors decompressing on CPU."""

import json

import pytest
import torch
from safetensors import safe_open

from qatctl import models
from qatctl.artifacts import read_artifact
from qatctl.quant import QuantScheme, dequant, fake_quant_value, unpack

PRESETS = ("tiny-llama", "tiny-qwen3", "tiny-qwen3-moe")


def decompressed(int4_dir):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(int4_dir, dtype=torch.bfloat16,
                                                quantization_config=CompressedTensorsConfig(dequantize=True)).eval()


def fake_quant_reference(ckpt):
    scheme = QuantScheme.from_manifest(read_artifact(ckpt).manifest["quant"])
    model, _ = models.load_checkpoint(ckpt)
    n = models.materialize_fake_quant(model, scheme)
    return model, scheme, n


@pytest.mark.parametrize("preset", PRESETS)
def test_independent_reader_matches_fake_quant(tiny_pairs, preset):
    ckpt, int4 = tiny_pairs[preset]
    ref, scheme, n_targets = fake_quant_reference(ckpt)
    theirs = decompressed(int4)
    ours, got = ref.state_dict(), theirs.state_dict()
    assert set(ours) == set(got)
    for k in ours:
        assert torch.equal(ours[k].to(torch.bfloat16), got[k].to(torch.bfloat16)), k
    # the quantized weights really changed (the reader did not just load the BF16 masters)
    plain, _ = models.load_checkpoint(ckpt)
    changed = [k for k, v in plain.state_dict().items() if not torch.equal(v, ours[k])]
    assert len(changed) == n_targets
    ids = torch.randint(0, ref.config.vocab_size - 3, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, theirs.float()(ids).logits)


@pytest.mark.parametrize("preset", PRESETS)
def test_int4_folder_format(tiny_pairs, preset):
    ckpt, int4 = tiny_pairs[preset]
    m = read_artifact(int4, "int4-checkpoint").manifest
    assert m["inputs"][0]["kind"] == "qat-checkpoint" and m["inputs"][0]["digest"] == read_artifact(ckpt).digest
    cfg = json.loads((int4 / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert cfg["quantization_status"] == "compressed"
    w = cfg["config_groups"]["group_0"]
    assert w["targets"] == ["Linear"]
    assert {k: w["weights"][k] for k in ("num_bits", "type", "symmetric", "strategy", "group_size")} == \
        {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
    assert "lm_head" in cfg["ignore"]
    if preset == "tiny-qwen3-moe":
        assert "model.layers.0.mlp.gate" in cfg["ignore"]
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (int4 / name).is_file()
    scheme = QuantScheme.from_manifest(m["quant"])
    with safe_open(ckpt / "model.safetensors", "pt") as src, safe_open(int4 / "model.safetensors", "pt") as dst:
        keys = set(dst.keys())
        packed = sorted(k[: -len(".weight_packed")] for k in keys if k.endswith(".weight_packed"))
        assert packed and all(f"{p}.weight" not in keys for p in packed)
        for mod in packed:
            wp, ws, shape = (dst.get_tensor(f"{mod}.{s}") for s in ("weight_packed", "weight_scale", "weight_shape"))
            w = src.get_tensor(f"{mod}.weight")
            assert wp.dtype == torch.int32 and wp.shape == (w.shape[0], w.shape[1] // 8)
            assert ws.dtype == torch.bfloat16 and ws.shape == (w.shape[0], w.shape[1] // 32)
            assert shape.dtype == torch.int64 and shape.tolist() == list(w.shape)
            assert torch.equal(dequant(unpack(wp, w.shape), ws, 32), fake_quant_value(w, scheme))


def test_kimi_experts_preset_quantizes_only_experts(tmp_path):
    from conftest import make_int4, make_tiny

    m = make_tiny("tiny-qwen3-moe", tmp_path / "ckpt", preset_targets="kimi-experts", group_size=64,
                  scale_rule="minmax")
    assert m["quant"]["group_size"] == 64 and m["quant"]["scale_rule"] == "minmax"
    assert all(".experts." in n for n in m["metrics"]["sqnr_db_per_tensor"])
    make_int4(tmp_path / "ckpt", tmp_path / "int4")
    cfg = json.loads((tmp_path / "int4" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.self_attn.q_proj" in cfg["ignore"]
    with safe_open(tmp_path / "int4" / "model.safetensors", "pt") as f:
        packed = [k for k in f.keys() if k.endswith("weight_packed")]
    assert packed and all(".mlp.experts." in k for k in packed)
    ref, _, _ = fake_quant_reference(tmp_path / "ckpt")
    theirs = decompressed(tmp_path / "int4")
    for k, v in ref.state_dict().items():
        assert torch.equal(v.to(torch.bfloat16), theirs.state_dict()[k].to(torch.bfloat16)), k


def test_fake_quant_parametrization_matches_materialized(tiny_pairs):
    """apply_fake_quant (training path, STE) and materialize (inference path) see the same weights."""
    ckpt, _ = tiny_pairs["tiny-qwen3-moe"]
    ref, scheme, _ = fake_quant_reference(ckpt)
    model, _ = models.load_checkpoint(ckpt)
    assert models.apply_fake_quant(model, scheme) == 12
    ids = torch.arange(10).unsqueeze(0)
    out = model(ids).logits
    with torch.no_grad():
        assert torch.equal(out, ref(ids).logits)
    out.sum().backward()
    expert = model.model.layers[0].mlp.experts
    assert expert.parametrizations.gate_up_proj.original.grad is not None
    models.remove_fake_quant(model)
    plain, _ = models.load_checkpoint(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values(), strict=True))
