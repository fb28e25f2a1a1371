"""Continuous batching and the prefix cache (qatctl/engines/batch.py): a sequence's tokens and
logprobs are bit-identical whether it runs alone, in a batch from the start, or joins mid-flight;
identical prompts share one prefill; abort ends one row and leaves the others as they were."""

import pytest

from qatctl.engines import SamplingParams, load_engine


def alone(eng, prompt, sp):
    eng.flush_cache()  # prefilled alone, not copied from another sequence's prefill
    return eng.generate([prompt], sp)[0]


def same(a, b):
    return a.output_ids == b.output_ids and a.logprobs == b.logprobs and a.finish_reason == b.finish_reason


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3", "tiny-qwen3-moe"])
def test_joining_mid_flight_is_bit_identical_to_running_alone(tiny_pairs, preset):
    eng = load_engine(tiny_pairs[preset][1])
    a, b, c = list(range(5, 25)), list(range(30, 37)), list(range(50, 91))
    plan = [(0, a, SamplingParams(temperature=0.9, max_new_tokens=20, seed=1)),
            (3, b, SamplingParams(temperature=1.0, max_new_tokens=6, seed=2)),  # joins at step 3, leaves early
            (5, a, SamplingParams(temperature=1.0, max_new_tokens=16, seed=3)),  # same prompt as the first
            (9, c, SamplingParams(temperature=0, max_new_tokens=12)),  # longer: the KV pool grows mid-flight
            (11, b, SamplingParams(temperature=0.7, top_k=5, max_new_tokens=9, seed=4))]  # reuses a freed row
    eng.flush_cache()
    batch, seqs, step = eng.open_batch(), [], 0
    while len(seqs) < len(plan) or batch.running:
        seqs += [batch.add(p, sp) for at, p, sp in plan[len(seqs):] if at == step]
        batch.step()
        step += 1
    assert [s.cached_tokens for s in seqs] == [0, 0, len(a), 0, len(b)]
    for (_, p, sp), s in zip(plan, seqs, strict=True):
        assert s.done and same(s.completion, alone(eng, p, sp))
    # and the same five in one batch from the start
    eng.flush_cache()
    together = eng.generate([p for _, p, _ in plan], [sp for _, _, sp in plan])
    assert all(same(s.completion, t) for s, t in zip(seqs, together, strict=True))


def test_prefix_cache_shares_prompts_across_calls_and_flushes(tiny_pairs):
    eng = load_engine(tiny_pairs["tiny-llama"][1])
    p = list(range(9, 40))
    sp = SamplingParams(temperature=1.0, max_new_tokens=8, seed=5)
    first = eng.generate([p], sp)[0]
    batch = eng.open_batch()
    seq = batch.add(p, sp)
    assert seq.cached_tokens == len(p) and eng.prefix_cache.hits == 1
    while batch.running:
        batch.step()
    assert same(seq.completion, first)
    assert eng.flush_cache() == 1 and eng.prefix_cache.bytes == 0
    assert eng.open_batch().add(p, sp).cached_tokens == 0


def test_prefix_cache_stays_within_its_budget(tiny_pairs):
    eng = load_engine(tiny_pairs["tiny-llama"][1])
    eng.generate([list(range(5, 25))], SamplingParams(max_new_tokens=1))
    one = eng.prefix_cache.bytes
    eng.prefix_cache.flush()
    eng.prefix_cache.budget = 2 * one
    eng.generate([list(range(5 + i, 25 + i)) for i in range(4)], SamplingParams(max_new_tokens=1))
    assert eng.prefix_cache.bytes <= 2 * one and len(eng.prefix_cache.entries) == 2
    assert tuple(range(8, 28)) in eng.prefix_cache.entries  # least recently used went first


def test_weight_update_flushes_the_prefix_cache(tiny_pairs):
    from safetensors.torch import load_file

    eng = load_engine(tiny_pairs["tiny-llama"][1])
    eng.generate([list(range(5, 25))], SamplingParams(max_new_tokens=2))
    assert eng.prefix_cache.entries
    tensors = {}
    for f in sorted(tiny_pairs["tiny-llama"][1].glob("*.safetensors")):
        tensors.update(load_file(f))
    eng.update_weights(tensors)
    assert not eng.prefix_cache.entries


def test_abort_ends_one_row_and_leaves_the_others(tiny_pairs):
    eng = load_engine(tiny_pairs["tiny-qwen3"][1])
    eng.flush_cache()
    batch = eng.open_batch()
    sp = [SamplingParams(temperature=1.0, max_new_tokens=12, ignore_eos=True, seed=s) for s in (1, 2, 3)]
    seqs = [batch.add(list(range(5, 15 + i)), s) for i, s in enumerate(sp)]
    for _ in range(4):
        batch.step()
    batch.abort(seqs[1])
    assert seqs[1].done and seqs[1].completion.finish_reason == "abort" and len(seqs[1].completion.output_ids) == 4
    while batch.running:
        batch.step()
    for i in (0, 2):
        assert same(seqs[i].completion, alone(eng, list(range(5, 15 + i)), sp[i]))
    ref = alone(eng, list(range(5, 16)), sp[1])  # the aborted row's 4 tokens are its first 4 alone
    assert seqs[1].completion.output_ids == ref.output_ids[:4] and seqs[1].completion.logprobs == ref.logprobs[:4]


def test_stop_reports_what_matched(tiny_pairs):
    eng = load_engine(tiny_pairs["tiny-llama"][1])
    p = list(range(5, 20))
    free = eng.generate([p], SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True))[0]
    stop_id = free.output_ids[3]
    out = eng.generate([p], SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=(stop_id,)))[0]
    assert out.finish_reason == "stop" and out.matched == stop_id
    assert free.matched is None and free.finish_reason == "length"


def test_generate_bounds_running_rows_and_gives_the_same_tokens(tiny_pairs):
    """generate() with more prompts than max_running: waiting prompts join as rows finish, and
    every sequence equals its run alone."""
    eng = load_engine(tiny_pairs["tiny-llama"][1])
    prompts = [list(range(5 + i, 12 + 2 * i)) for i in range(7)]
    params = [SamplingParams(temperature=1.0, max_new_tokens=3 + 5 * (i % 3), seed=i) for i in range(7)]
    eng.max_running = 3
    seen = []
    real = type(eng).open_batch

    def spy(self):
        batch = real(self)
        step = batch.step

        def counted():
            seen.append(len(batch.running))
            return step()
        batch.step = counted
        return batch
    type(eng).open_batch, saved = spy, real
    try:
        outs = eng.generate(prompts, params)
    finally:
        type(eng).open_batch = saved
    assert max(seen) == 3
    for p, sp, o in zip(prompts, params, outs, strict=True):
        assert same(o, alone(eng, p, sp))
