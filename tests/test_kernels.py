"""The native BF16-read linear (qatctl/engines/kernels.py): equal to the fp32 matmul within fp32
rounding, bit-identical per row at any M and thread count, and the engine's pure-torch fallback
(forced by QATCTL_NO_NATIVE=1) gives the same tokens."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from qatctl.engines import SamplingParams, kernels, load_engine

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
    """QATCTL_NO_NATIVE=1: the oneDNN fp32 lm_head; greedy tokens equal the native path's and
    logprobs agree within fp32 summation-order rounding."""
    prompts = [list(range(5, 20)), list(range(30, 41))]
    code = f"""
import json, sys
from qatctl.engines import SamplingParams, load_engine
eng = load_engine({str(tiny_pairs['tiny-llama'][1])!r})
outs = eng.generate({prompts!r}, SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True))
print(json.dumps({{"kernel": eng.info()["lm_head_kernel"], "ids": [o.output_ids for o in outs],
                  "lps": [o.logprobs for o in outs]}}))
"""
    runs = {}
    for flag in ("0", "1"):
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                           env={**os.environ, "QATCTL_NO_NATIVE": flag})
        assert p.returncode == 0, p.stderr[-2000:]
        runs[flag] = json.loads(p.stdout.strip().splitlines()[-1])
    assert not runs["1"]["kernel"].startswith("native")
    if kernels.available():
        assert runs["0"]["kernel"].startswith("native")
    assert runs["0"]["ids"] == runs["1"]["ids"]
    for a, b in zip(runs["0"]["lps"], runs["1"]["lps"], strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4
    eng = load_engine(tiny_pairs["tiny-llama"][1])
    assert eng.generate(prompts, SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True))[0].output_ids \
        == runs["0"]["ids"][0]
