"""`qatctl serve` driven by the real clients: the official `openai` package and
lm-evaluation-harness's `local-completions` model (loglikelihood through echo + logprobs, and
generate_until), compared with the in-process engine."""

import pytest
from test_serve import Served

from qatctl.engines import SamplingParams, load_engine


@pytest.fixture(scope="module")
def served(tiny_pairs):
    s = Served(tiny_pairs["tiny-llama"][1], "--model-name", "tiny")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def engine(tiny_pairs):
    return load_engine(tiny_pairs["tiny-llama"][1])


@pytest.fixture(scope="module")
def client(served):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)


def test_openai_completions_lists_n_and_logprobs(client, engine):
    r = client.completions.create(model="tiny", prompt=["hello", "world"], max_tokens=5, n=2, temperature=0.8,
                                  seed=3, logprobs=2)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)
    for c in r.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
        # keyed by token text, as OpenAI's are: two byte tokens that decode alike share a key
        assert all(1 <= len(top) <= 2 and all(x <= 0 for x in top.values()) for top in lp.top_logprobs)
    # choice 2*i + j is prompt i's sample j, drawn with seed 3 + j: the same as asking for it alone
    ids = engine.tokenizer("world")["input_ids"]
    alone = engine.generate([ids], SamplingParams(temperature=0.8, max_new_tokens=5, seed=4))[0]
    assert next(c for c in r.choices if c.index == 3).logprobs.token_logprobs == alone.logprobs


def test_openai_echo_gives_prompt_logprobs(client, engine):
    ids = [5, 6, 7, 8, 9]
    r = client.completions.create(model="tiny", prompt=[ids], max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == engine.score([ids[:1]], [ids[1:]])[0]
    assert r.choices[0].text == engine.tokenizer.decode(ids)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_openai_chat_parts_n_stream_usage_and_logprobs(client):
    text = [{"type": "text", "text": "Say"}, {"type": "text", "text": " hi"}]
    parts = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}], max_tokens=6,
                                           temperature=0)
    plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Say hi"}],
                                           max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    assert parts.choices[0].message.content == plain.choices[0].message.content
    content = plain.choices[0].logprobs.content
    assert len(content) == plain.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)
    two = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Say hi"}], n=2,
                                         max_tokens=6, temperature=1.0, seed=11)
    assert [c.index for c in two.choices] == [0, 1]

    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Say hi"}],
                                            max_tokens=6, temperature=0, logprobs=True, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens and chunks[-1].choices == []
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content
    lps = [t.logprob for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert lps == [t.logprob for t in content]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason


def test_openai_refusals_name_the_field(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       response_format={"type": "json_object"})
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model="tiny", prompt="hi", suffix="!")


def test_lm_eval_local_completions(served, engine, tiny_pairs):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(base_url=served.url + "/v1/completions", model="tiny", tokenizer_backend="huggingface",
                             tokenizer=str(tiny_pairs["tiny-llama"][1]), max_length=256, max_retries=1,
                             max_gen_toks=8)
    pairs = [("The answer is", " 42"), ("hello", " world again"), ("a b c", " d")]
    lls = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                           disable_tqdm=True)
    for (ctx, cont), (ll, greedy) in zip(pairs, lls, strict=True):
        c_ids, k_ids = lm._encode_pair(ctx, cont)
        ref = engine.score([c_ids], [k_ids])[0]
        assert ll == pytest.approx(sum(ref), abs=1e-5)
        _, argmax = engine.score_argmax([c_ids], [k_ids])
        assert greedy == (argmax[0] == k_ids)
    gens = lm.generate_until([Instance("generate_until", {}, ("hello", {"until": ["\n"], "max_gen_toks": 8,
                                                                         "temperature": 0}), 0)],
                             disable_tqdm=True)
    ids = engine.tokenizer("hello")["input_ids"]
    eos = engine.tokenizer.decode([engine.tokenizer.eos_token_id]) if engine.tokenizer.eos_token_id is not None else None
    stops = ("\n",) + ((eos,) if eos else ())
    ref = engine.generate([ids], SamplingParams(temperature=0, max_new_tokens=8, stop=stops, seed=1234))[0]
    assert gens[0] == ref.text


TASKS = """
task: qatctl_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
---
task: qatctl_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
"""


def test_lm_eval_runs_tasks_from_a_jsonl_file(served, engine, tiny_pairs, tmp_path, monkeypatch):
    """lm-eval's own evaluator, a generate_until task and a loglikelihood (multiple-choice) task
    read from tests/data/lm_eval_tiny.jsonl, against the server; the choice scores are the
    engine's own loglikelihoods."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    import json
    from pathlib import Path

    import lm_eval
    from lm_eval.tasks import TaskManager

    data = Path(__file__).parent / "data" / "lm_eval_tiny.jsonl"
    for i, text in enumerate(TASKS.format(data=data).split("---")):
        (tmp_path / f"task{i}.yaml").write_text(text)
    args = (f"base_url={served.url}/v1/completions,model=tiny,tokenizer_backend=huggingface,"
            f"tokenizer={tiny_pairs['tiny-llama'][1]},max_length=256,max_retries=1")
    out = lm_eval.simple_evaluate(model="local-completions", model_args=args,
                                  tasks=["qatctl_tiny_gen", "qatctl_tiny_choice"],
                                  task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
                                  apply_chat_template=False)
    assert out["results"]["qatctl_tiny_gen"]["exact_match,none"] >= 0  # ran end to end through generate_until
    samples = out["samples"]["qatctl_tiny_choice"]
    rows = [json.loads(ln) for ln in data.read_text().splitlines()]
    assert len(samples) == len(rows)
    compared = 0
    for s in samples:
        row = s["doc"]
        ctx = engine.tokenizer(row["question"])["input_ids"]
        for choice, (ll, _greedy) in zip(row["choices"], s["filtered_resps"], strict=True):
            whole = engine.tokenizer(row["question"] + " " + choice)["input_ids"]
            cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else None
            if cont:
                assert ll == pytest.approx(sum(engine.score([ctx], [cont])[0]), abs=1e-4)
                compared += 1
    assert compared >= len(rows)  # the tokenization split cleanly for most choices
    gen = out["samples"]["qatctl_tiny_gen"]
    ids = engine.tokenizer(gen[0]["doc"]["question"])["input_ids"]
    ref = engine.generate([ids], SamplingParams(temperature=0, max_new_tokens=6, stop=("\n",)))[0]
    assert gen[0]["resps"][0][0] == ref.text
