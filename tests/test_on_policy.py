"""True on-policy, INT4 and BF16 (DESIGN §6a): the engine's prefill ≡ its decode step, so a scored token's
logprob is the sampled one's bits; rl-step --true-on-policy trains with those values (the
trainer's logprob of every rollout token == the rollout's), skips the scoring pass, and takes
the same gradient as the default mode; refusals where it cannot hold."""

import os

import pytest
import torch
from test_cli import assert_usage_error

from conftest import REPO, make_pair, make_tiny, qatctl

ARITH = REPO / "recipes/data/arith-train.jsonl"
PRESETS = ["tiny-llama", "tiny-qwen3", "tiny-qwen3-moe"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("onpolicy")
    return {p: make_pair(root / p, p) for p in PRESETS}


@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("weights", ["int4", "bf16"])
@pytest.mark.parametrize("preset", PRESETS)
def test_score_equals_generate_alone_batched_and_cached(pairs, preset, weights, threads):
    """The INT4 engine on the int4-checkpoint and the BF16 engine (the native W16A16 path) on the
    dense checkpoint: prefill ≡ decode, alone ≡ batched ≡ cached."""
    from qatctl.engines import SamplingParams, load_engine

    qat, int4 = pairs[preset]
    eng = load_engine(int4, exact=True) if weights == "int4" else load_engine(qat, weights="bf16", exact=True)
    assert eng.exact and eng.info()["exact"]
    assert ("W4A16" if weights == "int4" else "W16A16") in eng.kernel
    g = torch.Generator().manual_seed(threads)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (1, 5, 23, 23, 40, 9)]
    prompts[3] = prompts[2]  # a repeated prompt: its KV comes from the prefix cache
    params = [SamplingParams(temperature=1.0, max_new_tokens=6 + 3 * i, seed=50 + i, ignore_eos=True)
              for i in range(len(prompts))]
    batched = eng.generate(prompts, params)
    assert eng.prefix_cache.hits >= 1
    scored = eng.score(prompts, [o.output_ids for o in batched])
    for p, sp, o, s in zip(prompts, params, batched, scored, strict=True):
        assert len(o.output_ids) == sp.max_new_tokens
        assert s == o.logprobs  # prefill ≡ decode: every token's bits
        eng.flush_cache()
        alone = eng.generate([p], sp)[0]
        assert alone.output_ids == o.output_ids and alone.logprobs == o.logprobs
        cached = eng.generate([p], sp)[0]  # the prompt's KV and logits copied from the cache
        assert cached.logprobs == o.logprobs
        echo, _ = eng.prompt_logprobs(p + o.output_ids)
        assert echo[len(p) - 1:] == o.logprobs  # the server's input_token_logprobs: the same bits


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3"])
def test_score_of_a_group_shares_its_prompt_and_keeps_the_bits(pairs, preset, monkeypatch):
    """The native score runs a prompt once for all its samples (GRPO's group) and their completion
    tokens through shared calls: split over pools (SCORE_ROWS) and calls (PREFILL_CHUNK) that cut
    through rows, every token's logprob and argmax are still the decode step's."""
    from qatctl.engines import SamplingParams, embedded, load_engine

    eng = load_engine(pairs[preset][1])
    assert eng.native_exact
    g = torch.Generator().manual_seed(7)
    group, other = torch.randint(3, 250, (17,), generator=g).tolist(), torch.randint(3, 250, (4,), generator=g).tolist()
    prompts = [group] * 5 + [other] + [group]
    params = [SamplingParams(temperature=1.0, max_new_tokens=3 + 2 * i, seed=90 + i, ignore_eos=True)
              for i in range(len(prompts))]
    outs = eng.generate(prompts, params)
    completions = [o.output_ids for o in outs]
    completions[2] = []  # an empty completion scores as []
    monkeypatch.setattr(embedded, "SCORE_ROWS", 2)
    monkeypatch.setattr(embedded, "PREFILL_CHUNK", 7)
    got, tops = eng.score_argmax(prompts, completions)
    for p, c, o, lp, top in zip(prompts, completions, outs, got, tops, strict=True):
        assert lp == o.logprobs[:len(c)]
        ref = eng.prompt_logprobs(p + c + [0])[0][len(p) - 1:-1] if c else []  # one sequence alone
        assert lp == ref
        assert len(top) == len(c)
    greedy = eng.generate([group], SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True))[0].output_ids
    assert eng.score_argmax([group], [greedy])[1][0] == greedy  # argmax at each position = the greedy decode


def test_without_exact_the_moe_torch_prefill_differs(pairs):
    """What the stepwise prefill fixes: the MoE model's torch prefill (SDPA over the whole prompt)
    is not its decode step's arithmetic, so `exact` is False and some score differs."""
    from qatctl.engines import SamplingParams, load_engine

    eng = load_engine(pairs["tiny-qwen3-moe"][1])
    assert not eng.exact
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in range(8, 48, 2)]
    outs = eng.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=16, seed=3, ignore_eos=True))
    scored = eng.score(prompts, [o.output_ids for o in outs])
    differ = sum(a != b for s, o in zip(scored, outs, strict=True) for a, b in zip(s, o.logprobs, strict=True))
    assert differ > 0
    assert load_engine(pairs["tiny-llama"][1]).exact  # the native INT4 engine is exact without asking
    bf16 = load_engine(pairs["tiny-llama"][0], weights="bf16")  # BF16 is torch's (oneDNN) matmul unless asked
    assert not bf16.exact and bf16.kernel == "dense bfloat16 matmul"
    assert load_engine(pairs["tiny-llama"][0], weights="bf16", exact=True).native_exact  # the fused W16A16 step


# ------------------------------------------------------------------ the trainer


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("onpolicy-rl")
    make_tiny("tiny-llama", root / "llama")
    make_tiny("tiny-qwen3-moe", root / "moe")
    (root / "rw.py").write_text("def odd_length(completion, answer):\n    return float(len(completion) % 2)\n")
    return root


def session(root, tmp_path, preset="llama", **options):
    from qatctl import data, models
    from qatctl.artifacts import read_artifact
    from qatctl.quant import QuantScheme
    from qatctl.rl.rewards import load_reward
    from qatctl.rl.session import Session
    from stages.rl_step import RlStepConfig

    c = RlStepConfig(policy=root / preset, out=tmp_path / "o", prompts=ARITH, prompts_per_step=4,
                     samples_per_prompt=4, max_new_tokens=8, lr=1e-3, reward=f"{root / 'rw.py'}:odd_length",
                     **options)
    policy = read_artifact(c.policy)
    tok = models.load_tokenizer(c.policy)
    return Session(c, policy, None, None, QuantScheme.from_manifest(policy.manifest["quant"]), tok,
                   data.load_prompts(ARITH, tok, need_answer=False), load_reward(c.reward))


@pytest.mark.parametrize("preset, mini_batches, precision", [("llama", 1, "int4"), ("llama", 2, "int4"), ("moe", 1, "int4"),
                                                              ("llama", 2, "bf16"), ("moe", 1, "bf16")])
def test_trainer_logprobs_equal_rollout_logprobs_every_iteration(root, tmp_path, preset, mini_batches, precision,
                                                                 monkeypatch):
    """The int4-qat arm (W4A16 rollouts of the fake-quant policy) and the bf16 arm (W16A16
    rollouts of the BF16 policy)."""
    from qatctl.rl import loop as loop_mod

    s = session(root, tmp_path, preset, true_on_policy=True, iterations=3, mini_batches=mini_batches,
                rollout_precision=precision)
    assert ("W4A16" if precision == "int4" else "W16A16") in s.engine.kernel
    loop = s.loop
    monkeypatch.setattr(loop, "_score_only", lambda *a: pytest.fail("a scoring pass ran"))
    seen = []  # per micro-batch: (its rows, the logprob values the loss computed with, the mask)
    real_loss, real_apply = loop._loss, loop_mod.ValuesFrom.apply

    def loss(model, mb, n_tokens, fused=False):
        def apply(x, values, mask):
            out = real_apply(x, values, mask)
            seen.append((mb, out.detach().clone(), mask, loop.iteration))
            return out

        monkeypatch.setattr(loop_mod.ValuesFrom, "apply", apply)
        try:
            return real_loss(model, mb, n_tokens, fused)
        finally:
            monkeypatch.setattr(loop_mod.ValuesFrom, "apply", real_apply)

    monkeypatch.setattr(loop, "_loss", loss)
    refreshes = []
    real_refresh = loop.refresh
    loop.refresh = lambda m: (refreshes.append(loop.iteration), real_refresh(m))[1]
    checked = {}
    for it in range(1, 4):
        seen.clear()
        rows, m = loop.iteration_step()
        assert m["mismatch_exact"] and m["mismatch_tokens_differing"] == 0 and m["tis_mean"] == 1.0
        assert m["seconds_score"] == 0.0 or m["seconds_score"] < 1e-3
        assert seen, "no update ran"
        first = {id(r) for r in rows if r.get("native_checked")}
        for mb, out, mask, _ in seen:
            for i, r in enumerate(mb):
                got = out[i][mask[i]]  # this row's completion positions, in order
                if id(r) in first:  # before any optimizer step: the rollout's bits exactly
                    assert torch.equal(got, torch.tensor(r["rollout_logprobs"], dtype=got.dtype)), (it, i)
                    checked[it] = checked.get(it, 0) + 1
                else:  # a later mini-batch: the updated policy's, through the refreshed engine
                    assert torch.equal(got, torch.tensor(r["native_logprobs"], dtype=got.dtype))
    assert set(checked) == {1, 2, 3}
    assert len(refreshes) == (3 if mini_batches == 2 else 0)


@pytest.mark.parametrize("precision", ["int4", "bf16"])
def test_true_on_policy_gradient_equals_the_default_modes(root, tmp_path, precision):
    """Same start, seed and rollouts: with TIS off, one iteration of each mode updates the masters
    to the same bits (the loss, ratio 1 and the STE backward are the same; only the forward
    values differ by the default mode's mismatch, which a ratio of exactly 1 does not see)."""
    after = {}
    for mode in (False, True):
        s = session(root, tmp_path / str(mode), true_on_policy=mode, tis_cap=0.0, iterations=1,
                    rollout_precision=precision)
        rows, m = s.loop.iteration_step()
        assert m["update_sequences"] > 0
        after[mode] = {k: v.detach().clone() for k, v in s.model.state_dict().items()}
    before = session(root, tmp_path / "start").model.state_dict()
    moved = [k for k in after[True] if not torch.equal(after[True][k], before[k])]
    assert moved, "nothing trained"
    for k in after[True]:
        torch.testing.assert_close(after[True][k], after[False][k], rtol=0, atol=1e-6)


def test_a_difference_stops_the_run_naming_the_token(root, tmp_path):
    from qatctl.errors import QatctlError

    s = session(root, tmp_path, true_on_policy=True, iterations=1)
    real = s.engine.score

    def off_by_one_ulp(prompts, completions):
        got = real(prompts, completions)
        got[0][2] = float(torch.nextafter(torch.tensor(got[0][2]), torch.tensor(0.0)))
        return got

    s.engine.score = off_by_one_ulp
    with pytest.raises(QatctlError) as e:
        s.loop.iteration_step()
    assert e.value.exit_code == 1 and "completion token 2" in str(e.value) and "iteration 1" in str(e.value)
    assert "agree at every layer and the lm_head" in str(e.value)  # the engine's two paths do agree here


def _break_prefill_from_layer(plan, layer, monkeypatch):
    """Make the native step's multi-token calls (prefill) differ from `layer` on (their last row)."""
    cls, real = type(plan), type(plan).__call__

    def call(self, x, pool, rows, positions, head=True, layers=None):
        out = real(self, x, pool, rows, positions, head=head, layers=layers)
        if len(rows) > 1 and (layers is None or layers > layer):
            out[-1, 0] += 0.5  # one logit (or hidden unit): a whole-row shift would leave log-softmax as it is
        return out

    monkeypatch.setattr(cls, "__call__", call)


def test_the_exit_names_the_first_layer_where_prefill_and_decode_differ(root, tmp_path, monkeypatch):
    from qatctl.errors import QatctlError

    s = session(root, tmp_path, true_on_policy=True, iterations=1)
    ids = list(range(5, 25))
    assert s.engine.trace_divergence(ids, 12) is None  # the shipped paths agree at every layer
    _break_prefill_from_layer(s.engine.decode_plan, 1, monkeypatch)
    assert s.engine.trace_divergence(ids, 12) == "model.layers.1"
    with pytest.raises(QatctlError) as e:
        s.loop.iteration_step()
    assert e.value.exit_code == 1 and "prefill and decode first differ at model.layers.1" in str(e.value)


def test_refusals(root, tmp_path):
    out = tmp_path / "out"
    base = [root / "llama", "--prompts", ARITH, "--out", out, "--true-on-policy", "--max-new-tokens", "4"]
    assert_usage_error(qatctl("rl-step", *base, "--no-fake-quant", check=False), "PTQ arm", absent=[out])
    assert_usage_error(qatctl("rl-step", *base, "--engine-url", "http://127.0.0.1:9", "--rollout-model", root / "llama",
                              check=False), "--engine-url", absent=[out])
    env = {**os.environ, "QATCTL_NO_NATIVE": "1"}
    assert_usage_error(qatctl("rl-step", *base, check=False, env=env), "native kernels are unavailable", absent=[out])


@pytest.mark.parametrize("arm", [(), ("--rollout-precision", "bf16")], ids=["int4-qat", "bf16"])
def test_cli_run_records_exact_zero(root, tmp_path, arm):
    import json

    out = tmp_path / "out"
    qatctl("rl-step", root / "llama", "--prompts", ARITH, "--out", out, "--true-on-policy", "--iterations", "2",
           "--prompts-per-step", "2", "--samples-per-prompt", "4", "--max-new-tokens", "6",
           "--reward", f"{root / 'rw.py'}:odd_length", *arm)
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["mismatch_exact"] for m in lines] == [True, True]
    manifest = json.loads((out / "qatctl.json").read_text())
    assert manifest["config"]["true_on_policy"] is True
    assert manifest["metrics"]["rollout_engine"]["exact"] is True


def test_eval_consistency_true_on_policy_is_exactly_zero(pairs, tmp_path):
    import json

    qat, int4 = pairs["tiny-llama"]
    out = tmp_path / "rep"
    qatctl("eval-consistency", qat, int4, "--prompts", ARITH, "--out", out, "--limit", "4", "--samples-per-prompt", "2",
           "--max-new-tokens", "12", "--true-on-policy")
    m = json.loads((out / "qatctl.json").read_text())["metrics"]
    assert m["main_arm"].startswith("train exact") and m["tokens"] > 20
    assert m["max_abs_diff"] == 0.0 and m["greedy_agreement"] == 1.0
    grid = tmp_path / "grid"
    qatctl("eval-consistency", qat, "--ablation", "--prompts", ARITH, "--out", grid, "--limit", "4",
           "--max-new-tokens", "12", "--true-on-policy")
    g = json.loads((grid / "qatctl.json").read_text())["metrics"]["grid_mean_abs_diff"]
    exact = {k: v for k, v in g.items() if k.startswith("train exact")}
    assert set(exact) == {"train exact fake-int4 (true on-policy) / rollout int4",
                          "train exact bf16 (true on-policy) / rollout bf16 (W16A16)"}
    assert set(exact.values()) == {0.0} and g["train fake-int4 / rollout int4"] > 0  # the default train side is not
    single = tmp_path / "bf16"  # the bf16 arm's matched pair: BF16 view, BF16 checkpoint on the W16A16 path
    qatctl("eval-consistency", qat, qat, "--train-view", "bf16", "--prompts", ARITH, "--out", single, "--limit", "4",
           "--samples-per-prompt", "2", "--max-new-tokens", "12", "--true-on-policy")
    m = json.loads((single / "qatctl.json").read_text())["metrics"]
    assert m["main_arm"] == "train exact bf16 (true on-policy) / rollout bf16 (W16A16)" and m["tokens"] > 20
    assert m["max_abs_diff"] == 0.0
    env = {**os.environ, "QATCTL_NO_NATIVE": "1"}
    bad = tmp_path / "bad"
    assert_usage_error(qatctl("eval-consistency", qat, int4, "--prompts", ARITH, "--out", bad, "--true-on-policy",
                              check=False, env=env), "native kernels are unavailable", absent=[bad])
    assert_usage_error(qatctl("eval-consistency", qat, qat, "--prompts", ARITH, "--out", bad, "--true-on-policy",
                              check=False), "must be an int4-checkpoint", absent=[bad])


@pytest.mark.slow
def test_smollm2_true_on_policy(smollm2_pair, tmp_path):
    """The real model: score == generate bit for bit on chat prompts, and two rl-step iterations in
    the mode (a run that saw one differing token would exit 1) record exactly 0."""
    import json

    from qatctl import data, models
    from qatctl.engines import SamplingParams, load_engine

    qat, int4 = smollm2_pair
    eng = load_engine(int4, exact=True)
    prompts = [p.prompt_ids for p in data.load_prompts(ARITH, models.load_tokenizer(qat), need_answer=False)[:6]]
    outs = eng.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=24, seed=7))
    assert eng.score(prompts, [o.output_ids for o in outs]) == [o.logprobs for o in outs]
    out = tmp_path / "rl"
    (tmp_path / "rw.py").write_text("def odd(completion, answer):\n    return float(len(completion) % 2)\n")
    qatctl("rl-step", qat, "--rollout-model", int4, "--prompts", ARITH, "--out", out, "--true-on-policy",
           "--iterations", "2", "--prompts-per-step", "2", "--samples-per-prompt", "4", "--max-new-tokens", "8",
           "--reward", f"{tmp_path / 'rw.py'}:odd", "--lr", "1e-5")
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(m["mismatch_exact"] and m["seconds_score"] == 0.0 and m["mismatch_checked_tokens"] > 0 for m in lines)


@pytest.mark.parametrize("flags", [("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2", "-mno-fma")],
                         ids=["avx2", "portable"])
def test_prefill_equals_decode_on_each_build(pairs, flags, monkeypatch):
    """What an AVX2-only or a pre-AVX2 CPU compiles (forced by compiler flags, then made the
    engine's library): prefill ≡ decode holds on that build with itself, and its bits are this
    CPU's build's (the three builds compute the same chains)."""
    from qatctl.engines import SamplingParams, kernels, load_engine

    qat, int4 = pairs["tiny-qwen3"]
    prompts = [list(range(9, 9 + n)) for n in (4, 19, 33)]
    sp = SamplingParams(temperature=1.0, max_new_tokens=10, seed=5, ignore_eos=True)
    engines = {"int4": lambda: load_engine(int4), "bf16": lambda: load_engine(qat, weights="bf16", exact=True)}
    here = {k: make().generate(prompts, sp) for k, make in engines.items()}
    lib = kernels.library(flags)
    if lib is None:
        pytest.skip(f"cannot build with {flags} here")
    monkeypatch.setitem(kernels._libs, (), lib)
    for k, make in engines.items():
        eng = make()
        assert eng.exact and kernels.isa() in eng.kernel
        outs = eng.generate(prompts, sp)
        assert eng.score(prompts, [o.output_ids for o in outs]) == [o.logprobs for o in outs]
        assert [o.logprobs for o in outs] == [o.logprobs for o in here[k]], k
