"""The quantizer's invariants, bit for bit (DESIGN §4)."""

import math

import numpy as np
import pytest
import torch

from qatctl.errors import QatctlError
from qatctl.quant import (
    BF16_TINY,
    GROUP_SIZES,
    SCALE_RULES,
    QuantScheme,
    check_quantizable,
    dequant,
    fake_quant,
    fake_quant_value,
    is_target,
    pack,
    quantize,
    unpack,
)

SHAPES = [(1, 128), (7, 256), (64, 384), (3, 5, 128)]  # incl. a fused-expert 3-D shape


def schemes():
    return [QuantScheme(group_size=g, scale_rule=r) for g in GROUP_SIZES for r in SCALE_RULES]


def reference_pack(q: torch.Tensor) -> torch.Tensor:
    """The layout written out independently: nibble u = q + 8 of element i sits at bits 4*(i % 8)
    of int32 word i // 8."""
    u = (q.numpy().astype(np.int64) + 8).reshape(q.shape[0], -1, 8)
    words = np.zeros(u.shape[:2], dtype=np.int64)
    for i in range(8):
        words |= u[:, :, i] << (4 * i)
    return torch.from_numpy(words.astype(np.uint32).view(np.int32))


@pytest.mark.parametrize("scheme", schemes(), ids=lambda s: f"{s.scale_rule}-g{s.group_size}")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_pack_unpack_dequant_equals_fake_quant(scheme, shape):
    torch.manual_seed(hash((shape, scheme.group_size)) % 2**31)
    w = torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 0.1  # rows of different magnitude
    q, scale = quantize(w, scheme)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16
    assert scale.shape == (*shape[:-1], shape[-1] // scheme.group_size)
    qmin, qmax = scheme.qrange
    assert q.min() >= qmin and q.max() <= qmax
    q2 = q.reshape(-1, shape[-1])
    packed = pack(q2)
    assert packed.dtype == torch.int32 and packed.shape == (q2.shape[0], shape[-1] // 8)
    assert torch.equal(packed, reference_pack(q2))
    back = unpack(packed, q2.shape).reshape(shape)
    assert torch.equal(back, q)
    assert torch.equal(dequant(back, scale, scheme.group_size).float(), fake_quant_value(w, scheme))


def test_library_dequantize_agrees():
    """compressed-tensors' own dequantize (what its decompressor runs) gives our w_hat bits."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    for scheme in schemes():
        w = torch.randn(32, 256)
        q, scale = quantize(w, scheme)
        args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group",
                                group_size=scheme.group_size)
        theirs = dequantize(x_q=q, scale=scale, zero_point=None, args=args)
        assert torch.equal(theirs.to(torch.bfloat16), dequant(q, scale, scheme.group_size))


def test_rules_by_hand():
    # kimi: amax 7 -> scale 1 exactly; -3.5 is a tie and rounds half to even (-4)
    q, s = quantize(torch.tensor([[7.0, -3.5, 1.0, 0.0] + [0.0] * 28]), QuantScheme(scale_rule="kimi"))
    assert s.item() == 1.0 and q[0, :4].tolist() == [7, -4, 1, 0]
    # minmax: amax 7.5 -> scale 1; +7.5 rounds to 8 and is clamped to 7, -7.5 maps to -8
    q, s = quantize(torch.tensor([[7.5, -7.5, 2.5] + [0.0] * 29]), QuantScheme(scale_rule="minmax"))
    assert s.item() == 1.0 and q[0, :3].tolist() == [7, -8, 2]
    # the scale is rounded to BF16 before it is used: amax 0.7 -> bf16(0.1) = 0.10009765625
    q, s = quantize(torch.tensor([[0.7] + [0.0] * 31]), QuantScheme(scale_rule="kimi"))
    assert s.item() == torch.tensor(0.7 / 7).to(torch.bfloat16).item() == 0.10009765625


def test_kimi_never_clips_and_hits_the_ends():
    torch.manual_seed(0)
    w = torch.randn(256, 128)
    q, scale = quantize(w, QuantScheme(scale_rule="kimi"))
    assert q.abs().amax(dim=-1).eq(7).all()  # every row's absmax element maps to +-7
    assert q.min() >= -7


def test_zero_group_gets_tiny_scale():
    w = torch.zeros(2, 64)
    w[1, 32:] = 1e-40  # subnormal group
    q, scale = quantize(w, QuantScheme())
    assert (scale.float() >= BF16_TINY).all() and torch.isfinite(scale.float()).all()
    assert torch.equal(fake_quant_value(w[:1], QuantScheme()), torch.zeros(1, 64))


def test_fp32_master_and_bf16_copy_quantize_identically():
    torch.manual_seed(1)
    w = torch.randn(16, 128)
    for scheme in schemes():
        assert torch.equal(fake_quant_value(w, scheme), fake_quant_value(w.to(torch.bfloat16), scheme).float())


def test_round_half_to_even():
    # 0.5 * scale and 2.5 * scale are exact ties: they round to 0 and 2
    s = 1.0
    w = torch.tensor([[7 * s, 0.5 * s, 2.5 * s, -1.5 * s] + [0.0] * 28])
    q, scale = quantize(w, QuantScheme(scale_rule="kimi"))
    assert scale.item() == 1.0
    assert q[0, :4].tolist() == [7, 0, 2, -2]


def test_ste_identity_gradient():
    torch.manual_seed(2)
    w = torch.randn(8, 64, requires_grad=True)
    g = torch.randn(8, 64)
    out = fake_quant(w, QuantScheme())
    assert torch.equal(out.detach(), fake_quant_value(w.detach(), QuantScheme()))
    out.backward(g)
    assert torch.equal(w.grad, g)


def test_ste_clipped_zeroes_only_clamped_elements():
    scheme = QuantScheme(scale_rule="minmax", ste="clipped")
    # find amax values whose BF16 scale rounds down, so amax / scale > 7.5 and q is clamped
    bf16_values = [0.5 + k / 256 for k in range(128)]  # every BF16 number in [0.5, 1)
    vals = [a for a in bf16_values if a / torch.tensor(a / 7.5).to(torch.bfloat16).item() > 7.5]
    assert vals, "no clamping value found"
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1] = vals[0], 0.1
    w.requires_grad_(True)
    fake_quant(w, scheme).sum().backward()
    assert w.grad[0, 0] == 0 and w.grad[0, 1] == 1
    w2 = w.detach().clone().requires_grad_(True)
    fake_quant(w2, QuantScheme(scale_rule="kimi", ste="clipped")).sum().backward()
    assert torch.equal(w2.grad, torch.ones_like(w2))  # kimi never clamps


def test_fused_experts_equal_per_expert_quantization():
    """Fake quant on transformers 5's fused [E, 2I, H] / [E, H, I] tensors equals per-expert
    quantization of the on-disk per-expert 2-D weights (what convert-int4 sees)."""
    torch.manual_seed(3)
    E, inter, hidden = 4, 64, 128
    gate_up = torch.randn(E, 2 * inter, hidden) * 0.05
    down = torch.randn(E, hidden, inter) * 0.05
    for scheme in [QuantScheme(group_size=32), QuantScheme(group_size=64, scale_rule="minmax")]:
        fused_gu, fused_d = fake_quant_value(gate_up, scheme), fake_quant_value(down, scheme)
        for e in range(E):
            gate, up = gate_up[e, :inter], gate_up[e, inter:]
            assert torch.equal(fused_gu[e, :inter], fake_quant_value(gate, scheme))
            assert torch.equal(fused_gu[e, inter:], fake_quant_value(up, scheme))
            assert torch.equal(fused_d[e], fake_quant_value(down[e], scheme))


def test_bad_inputs_name_the_tensor():
    with pytest.raises(QatctlError, match=r"layers.0.mlp.down_proj: input dimension 96 .* group_size 64"):
        check_quantizable("layers.0.mlp.down_proj", torch.zeros(4, 96), QuantScheme(group_size=64))
    w = torch.zeros(4, 64)
    w[1, 3] = math.nan
    with pytest.raises(QatctlError, match=r"q_proj: 1 NaN/Inf"):
        check_quantizable("q_proj", w, QuantScheme())
    with pytest.raises(QatctlError, match="group_size=48"):
        QuantScheme(group_size=48)
    with pytest.raises(QatctlError, match="scale_rule"):
        QuantScheme(scale_rule="absmax")


def test_targets_and_ignore_patterns():
    s = QuantScheme()
    assert is_target("model.layers.3.self_attn.q_proj", s)
    assert is_target("model.layers.3.mlp.experts.7.down_proj", s)
    assert not is_target("lm_head", s)
    assert not is_target("model.embed_tokens", s)
    assert not is_target("model.layers.3.mlp.gate", s)  # MoE router
    s2 = QuantScheme(ignore=s.ignore + ("model.layers.3", r"re:.*\.v_proj$"))
    assert not is_target("model.layers.3.self_attn.q_proj", s2)  # prefix
    assert is_target("model.layers.30.self_attn.q_proj", s2)  # a prefix matches at dots only
    assert not is_target("model.layers.1.self_attn.v_proj", s2)  # regex


@pytest.mark.slow
def test_bit_exact_on_every_smollm2_tensor(smollm2_pair):
    """Every quantized tensor of the real SmolLM2, both rules, every group size that divides it."""
    from safetensors import safe_open

    from qatctl.int4format import target_module as _target_module

    ckpt, _ = smollm2_pair
    checked = 0
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        for key in f.keys():
            w = f.get_tensor(key)
            if _target_module(key, w.ndim, QuantScheme()) is None:
                continue
            for scheme in schemes():
                if w.shape[-1] % scheme.group_size:
                    continue
                q, scale = quantize(w, scheme)
                back = unpack(pack(q), q.shape)
                assert torch.equal(dequant(back, scale, scheme.group_size), fake_quant_value(w, scheme)), key
                checked += 1
    assert checked == 210 * 2 * 2 + 30 * 2  # 210 tensors x {32, 64}; down_proj (in 1536) also at 128
