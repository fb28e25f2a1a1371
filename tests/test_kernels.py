"""The native kernels (qatctl/engines/native.c via kernels.py): the BF16-read lm_head equals the
fp32 matmul within fp32 rounding; the W4A16 linear equals the dense dequantized matmul within
BF16 rounding, and its AVX512-BF16, AVX2 and plain C builds agree bit for bit; both are
bit-identical per row at any M and thread count; the fused decode step gives the torch path's
tokens and is batch-invariant; the engine's pure-torch fallback (QATCTL_NO_NATIVE=1) gives the
same tokens."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from qatctl.engines import SamplingParams, kernels, load_engine
from qatctl.errors import QatctlError

native = pytest.mark.skipif(not kernels.available(), reason="no C compiler: the engine runs its pure-torch path")


@native
@pytest.mark.parametrize("n, k", [(49152, 576), (100, 96), (37, 100), (16, 5), (1000, 1536)])
def test_bf16_linear_matches_fp32_and_is_row_invariant(n, k):
    g = torch.Generator().manual_seed(n + k)
    w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    packed = kernels.pack_bf16(w)
    x = torch.randn(64, k, generator=g)
    got = kernels.bf16_linear(x, packed, n)
    ref = x.double() @ w.double().t()
    # only the summation order differs from the fp32 matmul: an fp32 rounding bound on |x| |w|
    bound = k * 2**-23 * (x.abs().double() @ w.abs().double().t()) + 1e-7
    assert ((got.double() - ref).abs() <= bound).all()
    alone = torch.cat([kernels.bf16_linear(r, packed, n) for r in x.split(1)])
    for m in (1, 2, 3, 4, 5, 7, 8, 9, 17, 33, 64):
        assert torch.equal(kernels.bf16_linear(x[:m], packed, n), alone[:m]), m
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(kernels.bf16_linear(x, packed, n), got)
    finally:
        torch.set_num_threads(threads)


@native
def test_engine_lm_head_runs_native_when_weights_are_bf16(tiny_pairs):
    eng = load_engine(tiny_pairs["tiny-llama"][1])
    assert eng.info()["lm_head_kernel"].startswith("native BF16-read")
    fp32 = load_engine(tiny_pairs["tiny-llama"][0], weights="fp32")  # a BF16 checkpoint: still BF16 values
    assert fp32.lm_head.bf16 is not None


def test_fallback_forced_by_env_gives_the_same_tokens(tiny_pairs):
    """QATCTL_NO_NATIVE=1: aten's int4 kernel, the oneDNN fp32 lm_head and the torch forward;
    greedy tokens equal the native path's. Logprobs agree within BF16 rounding: aten multiplies by
    q * scale unrounded, the native kernel by the training view's bf16(q * scale)."""
    prompts = [list(range(5, 20)), list(range(30, 41))]
    code = f"""
import json, sys
from qatctl.engines import SamplingParams, load_engine
eng = load_engine({str(tiny_pairs['tiny-llama'][1])!r})
outs = eng.generate({prompts!r}, SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True))
print(json.dumps({{"kernel": eng.info()["lm_head_kernel"], "int4": eng.kernel, "fused": eng.decode_plan is not None,
                  "ids": [o.output_ids for o in outs],
                  "lps": [o.logprobs for o in outs]}}))
"""
    runs = {}
    for flag in ("0", "1"):
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                           env={**os.environ, "QATCTL_NO_NATIVE": flag})
        assert p.returncode == 0, p.stderr[-2000:]
        runs[flag] = json.loads(p.stdout.strip().splitlines()[-1])
    assert not runs["1"]["kernel"].startswith("native")
    assert not runs["1"]["int4"].startswith("native") and not runs["1"]["fused"]
    if kernels.available():
        assert runs["0"]["kernel"].startswith("native")
        assert runs["0"]["int4"].startswith("native W4A16") and runs["0"]["fused"]
    assert runs["0"]["ids"] == runs["1"]["ids"]
    for a, b in zip(runs["0"]["lps"], runs["1"]["lps"], strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 0.02
    eng = load_engine(tiny_pairs["tiny-llama"][1])
    assert eng.generate(prompts, SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True))[0].output_ids \
        == runs["0"]["ids"][0]
    # kernel="torch" chooses the same pure-torch path in-process (what the benchmarks compare),
    # bit for bit what the environment switch gives; the native engine stays native beside it
    torch_path = load_engine(tiny_pairs["tiny-llama"][1], kernel="torch")
    outs = torch_path.generate(prompts, SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True))
    assert torch_path.kernel == runs["1"]["int4"] and torch_path.info()["lm_head_kernel"] == runs["1"]["kernel"]
    assert [o.output_ids for o in outs] == runs["1"]["ids"] and [o.logprobs for o in outs] == runs["1"]["lps"]
    assert torch_path.decode_plan is None and eng.kernel == runs["0"]["int4"]
    with pytest.raises(QatctlError, match="kernel='fast'"):
        load_engine(tiny_pairs["tiny-llama"][1], kernel="fast")


def _int4_case(n, k, group, seed):
    from qatctl.quant import QuantScheme, dequant, quantize

    g = torch.Generator().manual_seed(seed)
    q, scale = quantize(torch.randn(n, k, generator=g) * 0.05, QuantScheme(group_size=group))
    return q, scale, dequant(q, scale, group).double(), torch.randn(64, k, generator=g)


@native
@pytest.mark.parametrize("n, k, group", [(960, 576, 64), (576, 1536, 128), (100, 96, 32), (37, 256, 128),
                                         (16, 64, 32), (3072, 576, 32)])
def test_int4_linear_matches_dense_and_is_row_and_thread_invariant(n, k, group):
    q, scale, w, x = _int4_case(n, k, group, n + k)
    packed = kernels.pack_int4(q, scale, group)
    got = kernels.int4_linear(x, packed)
    xb = x.bfloat16().double()
    ref = xb @ w.t()
    # the training view's weight bf16(q * scale) to the bit: BF16 x BF16 products are exact, fp32
    # sums in a fixed order, then one rounding of the output to BF16
    bound = 2**-8 * ref.abs() + k * 2**-23 * (xb.abs() @ w.abs().t()) + 1e-7
    assert ((got.double() - ref).abs() <= bound).all()
    assert torch.equal(got, got.bfloat16().float())  # BF16 values, as a W4A16 kernel returns
    alone = torch.cat([kernels.int4_linear(r, packed) for r in x.split(1)])
    for m in range(1, 65):  # every tiling: 8/16-row tiles, the expanded-block path from 32 rows, leftovers
        assert torch.equal(kernels.int4_linear(x[:m], packed), alone[:m]), m
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(kernels.int4_linear(x, packed), got)
    finally:
        torch.set_num_threads(threads)


@native
@pytest.mark.parametrize("flags", [("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2", "-mno-fma")],
                         ids=["avx2", "portable"])
def test_int4_linear_builds_for_older_cpus_give_the_same_bits(flags):
    """What an AVX2-only or a pre-AVX2 CPU compiles (forced here by compiler flags) computes the
    same chain of fused multiply-adds as this CPU's build: the same bits."""
    lib = kernels.library(flags)
    if lib is None:
        pytest.skip(f"cannot build with {flags} here")
    assert kernels.isa(lib) == ("avx2+fma" if "-mno-avx2" not in flags else "portable C")
    for n, k, group in [(960, 576, 64), (37, 256, 128), (100, 96, 32)]:
        q, scale, _, x = _int4_case(n, k, group, 7 * n)
        packed, theirs = kernels.pack_int4(q, scale, group), kernels.pack_int4(q, scale, group, lib)
        for m in (1, 5, 64):
            assert torch.equal(kernels.int4_linear(x[:m], theirs, lib), kernels.int4_linear(x[:m], packed)), (n, m)


def _w16a16_reference(x, w):
    """The W16A16 chain written out in torch: per output, over the pairs p in order,
    acc = fma(x[2p+1], w[2p+1], acc); acc = fma(x[2p], w[2p], acc) (a BF16 x BF16 product is exact in
    fp32, so each fma is one fp32 add), then one rounding to BF16."""
    xb, wb = x.bfloat16().float(), w.bfloat16().float()
    acc = torch.zeros(x.shape[0], w.shape[0])
    for p in range(x.shape[1] // 2):
        acc = acc + xb[:, 2 * p + 1, None] * wb[None, :, 2 * p + 1]
        acc = acc + xb[:, 2 * p, None] * wb[None, :, 2 * p]
    return acc.bfloat16().float()


@native
@pytest.mark.parametrize("flags", [(), ("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2", "-mno-fma")],
                         ids=["here", "avx2", "portable"])
def test_w16a16_linear_is_the_written_chain_and_row_and_thread_invariant(flags):
    """The dense BF16 linear of the engine's BF16 path: on every build each output is the chain
    above to the bit, whatever M, the tiling or the thread count."""
    lib = kernels.library(flags)
    if lib is None:
        pytest.skip(f"cannot build with {flags} here")
    g = torch.Generator().manual_seed(3)
    threads = torch.get_num_threads()
    for n, k in [(40, 64), (100, 96), (70, 128), (192, 576)]:
        x, w = torch.randn(40, k, generator=g), (torch.randn(n, k, generator=g) * 0.05).bfloat16().float()
        packed = kernels.pack_dense_bf16(w)
        got = kernels.w16a16_linear(x, packed, lib)
        assert torch.equal(got, _w16a16_reference(x, w)), (n, k)
        alone = torch.cat([kernels.w16a16_linear(r, packed, lib) for r in x.split(1)])
        for m in (1, 3, 4, 9, 16, 31, 32, 33, 40):  # the row blocks, the tile path from 32 rows, leftovers
            assert torch.equal(kernels.w16a16_linear(x[:m], packed, lib), alone[:m]), (n, k, m)
        try:
            torch.set_num_threads(1)
            assert torch.equal(kernels.w16a16_linear(x, packed, lib), got)
        finally:
            torch.set_num_threads(threads)
    # where the order shows: x all ones; column 0's pair 1 is (even -1, odd 2^-24) after a sum of 1:
    # odd first, 1 + 2^-24 rounds to 1 (a tie, to even), then -1 gives 0; even first gives 2^-24.
    # Column 1 the mirror (the even term is the tiny one); column 2 the pairs in reverse would differ.
    w = torch.zeros(3, 64)
    w[0, :4] = torch.tensor([1.0, 0.0, -1.0, 2**-24])
    w[1, :4] = torch.tensor([0.0, 1.0, 2**-24, -1.0])
    w[2, :4] = torch.tensor([1.0, 0.0, 2**-24, 0.0])
    w[2, 4:6] = torch.tensor([-1.0, 0.0])
    got = kernels.w16a16_linear(torch.ones(1, 64), kernels.pack_dense_bf16(w), lib)
    assert got.tolist() == [[0.0, 2**-24, 0.0]]
    with pytest.raises(ValueError, match="BF16 values"):
        kernels.pack_dense_bf16(torch.full((16, 32), 1.0 + 2**-12))


@native
def test_w16a16_on_the_dequantized_weight_is_the_int4_kernel():
    """One arithmetic for both paths: the dense BF16 linear on bf16(q * scale) (the training
    view's weight) gives exactly the W4A16 kernel's bits on the 4-bit weight."""
    for n, k, group in [(960, 576, 64), (100, 96, 32)]:
        q, scale, w, x = _int4_case(n, k, group, 5 * n)
        dense = kernels.pack_dense_bf16(w.float())
        for m in (1, 7, 64):
            assert torch.equal(kernels.w16a16_linear(x[:m], dense), kernels.int4_linear(x[:m], kernels.pack_int4(q, scale, group)))


@native
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3"])
def test_fused_decode_matches_the_torch_path(tiny_pairs, preset):
    """The fused native decode step (one call for all layers) against the engine's torch forward
    over the same kernels: the same greedy tokens, logprobs within fp32 reordering noise, and
    batch-invariant on its own (tests/test_batch.py and test_engine.py run through it too)."""
    fused = load_engine(tiny_pairs[preset][1])
    assert fused.decode_plan is not None
    plain = load_engine(tiny_pairs[preset][1])
    plain.decode_plan = None
    prompts = [list(range(5, 5 + n)) for n in (3, 17, 9)]
    sp = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
    a, b = fused.generate(prompts, sp), plain.generate(prompts, sp)
    for x, y in zip(a, b, strict=True):
        assert x.output_ids == y.output_ids
        assert max(abs(u - v) for u, v in zip(x.logprobs, y.logprobs, strict=True)) < 1e-3
    fused.flush_cache()
    assert fused.generate(prompts[1:2], sp)[0].logprobs == a[1].logprobs  # alone == in the batch


def test_moe_engine_keeps_the_torch_decode(tiny_pairs):
    assert load_engine(tiny_pairs["tiny-qwen3-moe"][1]).decode_plan is None


@native
def test_dynamic_schedule_gives_the_same_bits_beside_a_busy_process(tiny_pairs):
    """The native loops are schedule(dynamic): which thread takes a block changes from call to
    call when another process takes a core, the bits never do (int4 linear at several M, and the
    fused decode of a batch)."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    threads = torch.get_num_threads()
    try:
        q, scale, _, x = _int4_case(3072, 576, 32, 11)
        packed = kernels.pack_int4(q, scale, 32)
        torch.set_num_threads(1)
        ref = {m: kernels.int4_linear(x[:m], packed) for m in (1, 7, 40, 64)}
        torch.set_num_threads(max(2, threads))
        for _ in range(5):
            for m, want in ref.items():
                assert torch.equal(kernels.int4_linear(x[:m], packed), want), m
        eng = load_engine(tiny_pairs["tiny-llama"][1])
        prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
        sp = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
        torch.set_num_threads(1)
        want = [(o.output_ids, o.logprobs) for o in eng.generate(prompts, sp)]
        torch.set_num_threads(max(2, threads))
        for _ in range(3):
            assert [(o.output_ids, o.logprobs) for o in eng.generate(prompts, sp)] == want
    finally:
        torch.set_num_threads(threads)
        spinner.kill()
        spinner.wait()
