"""The embedded engine: the real 4-bit kernel, agreement with the fake-quant model, determinism,
seeded sampling, batch invariance, stop conditions."""

import pytest
import torch

from qatctl import models
from qatctl.artifacts import read_artifact
from qatctl.engines import SamplingParams, load_engine
from qatctl.engines.embedded import EmbeddedEngine
from qatctl.engines.linears import Int4Linear, RowInvariantLinear
from qatctl.errors import QatctlError
from qatctl.quant import QuantScheme, dequant, quantize

PRESETS = ("tiny-llama", "tiny-qwen3", "tiny-qwen3-moe")


def fake_quant_logprobs(ckpt, ids, start):
    """Logprobs of ids[start:] under the fake-quant HF model (the training view), fp32."""
    model, _ = models.load_checkpoint(ckpt)
    models.materialize_fake_quant(model, QuantScheme.from_manifest(read_artifact(ckpt).manifest["quant"]))
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return torch.tensor([lp[i - 1, ids[i]].item() for i in range(start, len(ids))])


@pytest.mark.parametrize("shape,group_size", [((576, 576), 32), ((1536, 576), 32), ((576, 1536), 32),
                                              ((576, 1536), 128), ((64, 128), 64), ((64, 128), 128)])
def test_int4_kernel_matches_dense_dequant_within_bf16(shape, group_size):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    q, scale = quantize(w, QuantScheme(group_size=group_size))
    lin = Int4Linear(q, scale, group_size)
    for m in (1, 5, 32):
        x = torch.randn(m, shape[1])
        xb, wd = x.to(torch.bfloat16).float(), dequant(q, scale, group_size).float()
        ref = xb @ wd.t()
        got = lin(x)
        # The kernel rounds partial products to BF16: the bound is BF16's relative error (2^-8) on
        # every product term plus one rounding of the output. Measured: ~1/10 of this bound.
        bound = 2**-8 * (xb.abs() @ wd.abs().t()) + 2**-8 * ref.abs() + 1e-6
        assert ((got - ref).abs() <= bound).all(), ((got - ref).abs() / bound).max()
        if m > 1:  # row-invariant in M: a row's result does not depend on the other rows
            assert torch.equal(lin(x[1:2]), got[1:2])


def test_int4_packing_is_proven_at_load():
    """The load-time check compares the kernel with the dense dequantized matmul and refuses a
    packing that does not match (here: the nibbles of another weight)."""
    g = torch.Generator().manual_seed(1)
    q, scale = quantize(torch.randn(64, 128, generator=g) * 0.05, QuantScheme(group_size=32))
    lin = Int4Linear(q, scale, 32, check=True)
    other, _ = quantize(torch.randn(64, 128, generator=g) * 0.05, QuantScheme(group_size=32))
    wrong = Int4Linear(other, scale, 32)
    if lin.native is not None:
        lin.native = wrong.native
    else:
        lin.packed = wrong.packed
    with pytest.raises(QatctlError, match="differs from the dense dequantized matmul"):
        lin._check(q, scale)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_engine_device_cuda_refused_without_gpu(tiny_pairs):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(QatctlError, match="no CUDA device"):
        load_engine(tiny_pairs["tiny-llama"][1], device="cuda")
    assert load_engine(tiny_pairs["tiny-llama"][1]).info()["device"] == "cpu"


@CUDA
@pytest.mark.parametrize("shape,group_size", [((576, 576), 32), ((1536, 576), 32), ((576, 1536), 128)])
def test_int4_cuda_kernel_matches_dense_dequant(shape, group_size):
    torch.manual_seed(0)
    q, scale = quantize(torch.randn(shape) * 0.05, QuantScheme(group_size=group_size))
    lin = Int4Linear(q, scale, group_size, torch.device("cuda"), check=True)
    x = torch.randn(5, shape[1])
    xb, wd = x.to(torch.bfloat16).float(), dequant(q, scale, group_size).float()
    ref = xb @ wd.t()
    got = lin(x.cuda()).cpu()
    bound = 2**-8 * (xb.abs() @ wd.abs().t()) + 2**-8 * ref.abs() + 1e-6
    assert ((got - ref).abs() <= bound).all(), ((got - ref).abs() / bound).max()


@CUDA
@pytest.mark.parametrize("preset", PRESETS)
def test_int4_engine_on_cuda_close_to_fake_quant(tiny_pairs, preset):
    ckpt, int4 = tiny_pairs[preset]
    eng = load_engine(int4, device="cuda")
    assert eng.kernel.startswith("aten._weight_int4pack_mm (CUDA")
    ids = list(range(3, 40))
    got = torch.tensor(eng.score([ids[:9]], [ids[9:]])[0])
    assert (got - fake_quant_logprobs(ckpt, ids, 9)).abs().max() < 0.02
    out = eng.generate([ids[:9]], SamplingParams(temperature=0.8, max_new_tokens=8, seed=3))[0]
    assert out == eng.generate([ids[:9]], SamplingParams(temperature=0.8, max_new_tokens=8, seed=3))[0]


@pytest.mark.parametrize("onednn", [True, False])
def test_lm_head_linear_rows_independent_of_batch(monkeypatch, onednn):
    """The lm_head / router linear gives each row the same bits alone and in any batch, on the
    prepacked oneDNN path and on the chunked-matmul fallback, and matches x @ w.T in fp32."""
    if not onednn:
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(3000, 96, generator=g), torch.randn(45, 96, generator=g)
    lin = RowInvariantLinear(w)
    assert lin.kernel.startswith("mkldnn" if onednn and torch.backends.mkldnn.is_available() else "fp32 matmul")
    alone = torch.cat([lin(r) for r in x.split(1)])
    for n in (2, 7, 8, 9, 32, 45):
        assert torch.equal(lin(x[:n]), alone[:n]), n
    assert torch.equal(lin(x[3:20].view(1, 17, 96)), alone[3:20].unsqueeze(0))
    torch.testing.assert_close(alone, x @ w.t(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("preset", PRESETS)
def test_engine_structure_exact_in_dense_fp32(tiny_pairs, preset):
    """Run dense fp32 (the dequantized INT4 weights), the engine equals HF's fake-quant model up to
    fp32 reduction order: the architecture (RoPE, GQA, q/k norms, MoE routing) is right."""
    ckpt, int4 = tiny_pairs[preset]
    ids = list(range(3, 40))
    eng = EmbeddedEngine.load(int4, weights="fp32")
    got = torch.tensor(eng.score([ids[:9]], [ids[9:]])[0])
    assert (got - fake_quant_logprobs(ckpt, ids, 9)).abs().max() < 1e-5


@pytest.mark.parametrize("preset", PRESETS)
def test_int4_engine_close_to_fake_quant(tiny_pairs, preset):
    ckpt, int4 = tiny_pairs[preset]
    eng = load_engine(int4)
    from qatctl.engines import kernels

    assert eng.kernel.startswith("native W4A16") if kernels.available() else \
        eng.kernel == "aten._weight_int4pack_mm_for_cpu"
    ids = list(range(3, 40))
    got = torch.tensor(eng.score([ids[:9]], [ids[9:]])[0])
    # BF16 activations around the int4 kernel are the only difference from the fp32 training view
    assert (got - fake_quant_logprobs(ckpt, ids, 9)).abs().max() < 0.02


def test_greedy_deterministic_and_seeded_sampling(tiny_pairs):
    eng = load_engine(tiny_pairs["tiny-qwen3"][1])
    prompt = [list(range(10, 30))]
    g = SamplingParams(temperature=0, max_new_tokens=12)
    assert eng.generate(prompt, g)[0].output_ids == eng.generate(prompt, g)[0].output_ids
    s1 = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, max_new_tokens=12, seed=7)
    a, b = eng.generate(prompt, s1)[0], eng.generate(prompt, s1)[0]
    assert a.output_ids == b.output_ids and a.logprobs == b.logprobs
    c = eng.generate(prompt, SamplingParams(temperature=1.0, max_new_tokens=12, seed=8))[0]
    assert c.output_ids != a.output_ids
    assert all(lp <= 0 for lp in a.logprobs) and len(a.logprobs) == len(a.output_ids)


@pytest.mark.parametrize("preset", PRESETS)
def test_batch_invariance_mixed_lengths(tiny_pairs, preset):
    """A sequence's tokens and logprobs are identical alone and in a batch of mixed lengths."""
    eng = load_engine(tiny_pairs[preset][1])
    prompts = [list(range(5, 5 + n)) for n in (3, 17, 9, 17, 30)]
    params = [SamplingParams(temperature=0.9, max_new_tokens=10 + i, seed=100 + i) for i in range(len(prompts))]
    batched = eng.generate(prompts, params)
    for p, sp, got in zip(prompts, params, batched, strict=True):
        eng.flush_cache()  # each prompt prefilled alone, not copied from the batch's prefill
        alone = eng.generate([p], sp)[0]
        assert alone.output_ids == got.output_ids and alone.logprobs == got.logprobs
    scores = eng.score(prompts, [o.output_ids for o in batched])
    assert scores[1] == eng.score([prompts[1]], [batched[1].output_ids])[0]


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3-moe"])
def test_repeated_prompts_prefill_once_and_match_alone(tiny_pairs, preset, monkeypatch):
    """A GRPO group (one prompt, several seeds) mixed with other prompts: each distinct prompt is
    prefilled once, and every row's tokens and logprobs equal its run alone."""
    eng = load_engine(tiny_pairs[preset][1])
    a, b = list(range(7, 30)), list(range(40, 52))
    prompts = [a, b, a, a, b, a]
    params = [SamplingParams(temperature=1.0, max_new_tokens=12, seed=s) for s in range(len(prompts))]
    calls = []
    real = type(eng)._prefill
    monkeypatch.setattr(type(eng), "_prefill", lambda self, ids, cache, row, start: (calls.append(row), real(self, ids, cache, row, start))[1])
    batched = eng.generate(prompts, params)
    assert calls == [0, 1]
    monkeypatch.undo()
    for p, sp, got in zip(prompts, params, batched, strict=True):
        eng.flush_cache()
        alone = eng.generate([p], sp)[0]
        assert alone.output_ids == got.output_ids and alone.logprobs == got.logprobs
    assert len({tuple(o.output_ids) for o in batched}) > 2  # the seeds did differ


def test_stop_conditions(tiny_pairs):
    eng = load_engine(tiny_pairs["tiny-llama"][1])
    prompt = [list(range(10, 30))]
    free = eng.generate(prompt, SamplingParams(temperature=0, max_new_tokens=8))[0]
    assert free.finish_reason == "length" and len(free.output_ids) == 8
    stop_id = free.output_ids[3]
    first = free.output_ids.index(stop_id)
    out = eng.generate(prompt, SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=(stop_id,)))[0]
    assert out.finish_reason == "stop" and out.output_ids == free.output_ids[:first + 1]
    text = eng.tokenizer.decode(free.output_ids[:5], skip_special_tokens=True)
    if text.strip():
        s = text.strip()[-1]
        cut = eng.generate(prompt, SamplingParams(temperature=0, max_new_tokens=8, stop=(s,)))[0]
        assert cut.finish_reason == "stop" and s not in cut.text
    assert eng.generate(prompt, SamplingParams(max_new_tokens=0))[0].output_ids == []


def test_engine_refuses_bad_inputs(tiny_pairs, tmp_path):
    ckpt, int4 = tiny_pairs["tiny-llama"]
    with pytest.raises(QatctlError, match="not an int4-checkpoint"):
        load_engine(ckpt)
    with pytest.raises(QatctlError, match="no config.json"):
        load_engine(tmp_path)
    eng = load_engine(int4)
    with pytest.raises(QatctlError, match="exceeds the model's 512 positions"):
        eng.generate([[1] * 500], SamplingParams(max_new_tokens=20))
    with pytest.raises(QatctlError, match="temperature"):
        SamplingParams(temperature=-1)


@pytest.mark.slow
def test_smollm2_int4_engine_matches_fake_quant(smollm2_pair):
    """On SmolLM2 the INT4 engine's greedy tokens equal the fake-quant model's, and the per-token
    |logp_engine - logp_fake_quant| stays small (measured here: max 0.02, mean ~0.004)."""
    ckpt, int4 = smollm2_pair
    eng = load_engine(int4)
    tok = eng.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"] for q in ("What is 12+7?", "Name a color.")]
    outs = eng.generate(prompts, SamplingParams(temperature=0, max_new_tokens=16))
    ref, _ = models.load_checkpoint(ckpt)
    models.materialize_fake_quant(ref, QuantScheme.from_manifest(read_artifact(ckpt).manifest["quant"]))
    for p, o in zip(prompts, outs, strict=True):
        with torch.no_grad():
            hf = ref.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False)[0, len(p):].tolist()
        assert hf[:len(o.output_ids)] == o.output_ids
        diff = (torch.tensor(eng.score([p], [o.output_ids])[0])
                - fake_quant_logprobs(ckpt, p + o.output_ids, len(p))).abs()
        assert diff.max() < 0.1 and diff.mean() < 0.02, diff
        alone = eng.generate([p], SamplingParams(temperature=0, max_new_tokens=16))[0]
        assert alone.output_ids == o.output_ids and alone.logprobs == o.logprobs


def test_decode_attention_is_batch_invariant_at_every_thread_count():
    """CPU SDPA changes a row's bits with the batch at 2+ threads; the engine's decode attention
    does not, and it equals SDPA within fp32 rounding."""
    from qatctl.engines.embedded import _decode_attention

    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    try:
        for n in sorted({1, 2, threads}):
            torch.set_num_threads(n)
            for B, L in ((2, 21), (5, 40), (17, 77), (32, 130)):
                q, k, v = (torch.randn(B, h, t, 64, generator=g) for h, t in ((9, 1), (3, L), (3, L)))
                full = _decode_attention(q, k, v)
                alone = torch.cat([_decode_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1]) for i in range(B)])
                assert torch.equal(full, alone), (n, B, L)
                ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(threads)


def test_update_weights_from_disk_equals_a_fresh_load_and_refuses_another_architecture(tiny_pairs, tmp_path):
    """The Engine protocol's update_weights_from_disk on the embedded engine: the other
    checkpoint's tokens and logprobs bit for bit; another architecture, a dense folder on an
    int4 engine, or a missing folder is refused and the engine keeps its weights."""
    from conftest import make_pair

    other = make_pair(tmp_path / "other", seed=1)[1]
    prompts = [[5, 6, 7, 8], [9, 10]]
    sp = SamplingParams(temperature=1.0, max_new_tokens=8, seed=4, ignore_eos=True)
    eng = load_engine(tiny_pairs["tiny-llama"][1])
    before = eng.generate(prompts, sp)
    assert "Succeeded" in eng.update_weights_from_disk(str(other))
    fresh = load_engine(other).generate(prompts, sp)
    after = eng.generate(prompts, sp)
    assert [(o.output_ids, o.logprobs) for o in after] == [(o.output_ids, o.logprobs) for o in fresh]
    assert [o.logprobs for o in after] != [o.logprobs for o in before]
    for bad, words in ((tiny_pairs["tiny-qwen3"][1], "model_type"), (tiny_pairs["tiny-llama"][0], "not an int4-checkpoint"),
                       (tmp_path / "missing", "no config.json")):
        with pytest.raises(QatctlError, match=words):
            eng.update_weights_from_disk(str(bad))
        assert [o.logprobs for o in eng.generate(prompts, sp)] == [o.logprobs for o in fresh]
    assert eng.info()["model"] == str(other)


def test_engines_satisfy_their_protocols(tiny_pairs):
    """Every member callers use is declared: the embedded engine is a BatchingEngine (what the
    scheduler and server need), the remote one an Engine."""
    from qatctl.engines import BatchingEngine, Engine
    from qatctl.engines.remote import RemoteEngine

    eng = load_engine(tiny_pairs["tiny-llama"][1])
    assert isinstance(eng, BatchingEngine) and isinstance(eng, Engine)
    remote = RemoteEngine("http://127.0.0.1:9", tokenizer=eng.tokenizer)
    assert isinstance(remote, Engine) and not isinstance(remote, BatchingEngine)
