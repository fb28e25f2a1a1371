"""`qatctl serve` through a real uvicorn process on a free loopback port, the remote engine
against it, and the SGLang launcher (without sglang installed)."""

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import REPO, make_pair
from qatctl.engines import load_engine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, ckpt, *extra):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "qatctl.cli", "serve", ckpt, "--port", str(self.port),
                                      *extra], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("server did not come up")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def other_int4(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("other"), seed=1)[1]


@pytest.fixture(scope="module")
def server(tiny_pairs):
    s = Served(tiny_pairs["tiny-llama"][1])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def long_server(long_int4):
    """A server whose requests can run for seconds (32k context): for tests that act mid-request."""
    s = Served(long_int4[0])
    yield s
    s.stop()


def wait_running(s, n=1, seconds=60):
    deadline = time.time() + seconds
    while httpx.get(s.url + "/get_server_info").json()["internal_states"][0]["running"] < n:
        assert time.time() < deadline
        time.sleep(0.005)


def post(server, route, body, **kw):
    return httpx.post(server.url + route, json=body, timeout=60, **kw)


def test_health_models_info(server, tiny_pairs):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = httpx.get(server.url + "/v1/models").json()
    assert models["data"][0]["id"] == tiny_pairs["tiny-llama"][1].name
    info = httpx.get(server.url + "/get_model_info").json()
    from qatctl.engines import kernels

    assert info["kernel"] == load_engine(tiny_pairs["tiny-llama"][1]).kernel
    assert info["kernel"].startswith("native W4A16" if kernels.available() else "aten._weight_int4pack_mm_for_cpu")
    assert info["model_path"] == str(tiny_pairs["tiny-llama"][1])


def test_generate_native_with_logprobs(server):
    body = {"input_ids": [5, 6, 7, 8], "sampling_params": {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True},
            "return_logprob": True}
    r = post(server, "/generate", body).json()
    meta = r["meta_info"]
    assert len(r["output_ids"]) == 6 and meta["completion_tokens"] == 6 and meta["prompt_tokens"] == 4
    assert meta["finish_reason"] == {"type": "length", "length": 6}
    assert [t for _, t, _ in meta["output_token_logprobs"]] == r["output_ids"]
    assert all(lp <= 0 and text is None for lp, _, text in meta["output_token_logprobs"])
    batch = post(server, "/generate", {"text": ["hello", "hi there"], "sampling_params": {"max_new_tokens": 3}}).json()
    assert isinstance(batch, list) and len(batch) == 2 and all(len(b["output_ids"]) <= 3 for b in batch)
    # Prompt logprobs (what RemoteEngine.score uses).
    r = post(server, "/generate", {"input_ids": [5, 6, 7, 8], "return_logprob": True, "logprob_start_len": 2,
                                   "sampling_params": {"max_new_tokens": 0}}).json()
    assert [t for _, t, _ in r["meta_info"]["input_token_logprobs"]] == [7, 8] and r["output_ids"] == []


def test_remote_engine_equals_in_process(server, tiny_pairs):
    from qatctl.engines import SamplingParams, load_engine
    from qatctl.engines.remote import RemoteEngine

    local = load_engine(tiny_pairs["tiny-llama"][1])
    remote = RemoteEngine(server.url, tokenizer=local.tokenizer)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [40]]
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, seed=s) for s in (1, 2, 3)]
    a, b = local.generate(prompts, params), remote.generate(prompts, params)
    for x, y in zip(a, b, strict=True):
        assert x.output_ids == y.output_ids and x.logprobs == y.logprobs and x.finish_reason == y.finish_reason
    completions = [o.output_ids for o in a]
    assert local.score(prompts, completions) == remote.score(prompts, completions)


def test_openai_routes_and_streaming(server):
    chat = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8, "temperature": 0.7, "seed": 3,
            "logprobs": True}
    r = post(server, "/v1/chat/completions", chat).json()
    assert r["object"] == "chat.completion" and r["choices"][0]["message"]["role"] == "assistant"
    assert r["usage"]["completion_tokens"] == len(r["choices"][0]["logprobs"]["content"]) <= 8
    text = r["choices"][0]["message"]["content"]

    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**chat, "stream": True}, timeout=60) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = [ln[len("data: "):] for ln in s.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")

    comp = {"prompt": "abc", "max_tokens": 5, "temperature": 0}
    r = post(server, "/v1/completions", comp).json()
    assert r["object"] == "text_completion" and r["usage"]["prompt_tokens"] == 3
    with httpx.stream("POST", server.url + "/v1/completions", json={**comp, "stream": True}, timeout=60) as s:
        events = [ln[len("data: "):] for ln in s.iter_lines() if ln.startswith("data: ")]
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == r["choices"][0]["text"]


@pytest.mark.parametrize("route, body", [
    ("/generate", b"{not json"),
    ("/generate", {"sampling_params": {}}),
    ("/generate", {"text": "a", "input_ids": [1]}),
    ("/generate", {"text": "a", "sampling_params": {"temperature": -1}}),
    ("/generate", {"input_ids": [1, 999999]}),
    ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": "lots"}}),
    ("/v1/completions", {"prompt": 3}),
    ("/v1/completions", {"prompt": "a", "suffix": "x"}),
    ("/v1/completions", {"prompt": "a", "n": 0}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
    ("/generate", {"text": "a", "sampling_params": {"regex": "[0-9]+"}}),
    ("/generate", b'{"text": "a", "sampling_params": {"frequency_penalty": NaN}}'),
    ("/v1/completions", b'{"prompt": "a", "temperature": Infinity}'),
    ("/generate", {"text": "a", "no_such_field": 1}),
    ("/generate", {"text": "a", "sampling_params": {"min_new_tokens": 9, "max_new_tokens": 4}}),
    ("/update_weights_from_disk", {"model_path": "x", "flush_cache": False}),
    ("/pause_generation", {"mode": "sideways"}),
    ("/v1/chat/completions", {"messages": "hi"}),
    ("/update_weights_from_disk", {}),
])
def test_bad_bodies_get_400_and_the_server_keeps_serving(server, route, body):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + route, timeout=30, **kw)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]
    assert post(server, "/generate", {"text": "ok", "sampling_params": {"max_new_tokens": 1}}).status_code == 200


@pytest.mark.parametrize("body, name", [
    ({"text": "a", "sampling_params": {"regex": "a+"}}, "sampling_params.regex"),
    ({"text": "a", "sampling_params": {"min_p": 0.1}}, "sampling_params.min_p=0.1"),
    ({"text": "a", "sampling_params": {"json_schema": "{}"}}, "sampling_params.json_schema"),
    ({"text": "a", "sampling_params": {"stream_interval": 4}}, "sampling_params.stream_interval=4"),
    ({"text": "a", "sampling_params": {"temprature": 0.5}}, "sampling_params.temprature is not a known parameter"),
    ({"text": "a", "return_hidden_states": True}, "return_hidden_states=True"),
    ({"text": "a", "lora_path": "adapter"}, "lora_path='adapter'"),
    ({"text": "a", "image_data": "x.png"}, "image_data='x.png'"),
    ({"text": "a", "sampling_params": {"n": 65}}, "sampling_params.n"),
])
def test_unsupported_sglang_parameters_are_400_naming_them(server, body, name):
    r = post(server, "/generate", body)
    assert r.status_code == 400 and name in r.json()["error"]["message"], r.text


def test_neutral_values_rid_and_weight_version(server):
    sp = {"max_new_tokens": 2, "n": 1, "min_new_tokens": 0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
          "logit_bias": {}, "no_stop_trim": False, "skip_special_tokens": True}
    r = post(server, "/generate", {"text": ["a", "b"], "sampling_params": sp, "rid": ["r-a", "r-b"],
                                   "top_logprobs_num": 0})
    assert r.status_code == 200, r.text
    assert [x["meta_info"]["id"] for x in r.json()] == ["r-a", "r-b"]
    assert all(x["meta_info"]["weight_version"] == "default" for x in r.json())
    assert httpx.get(server.url + "/get_weight_version").json() == {"weight_version": "default"}


def gen(server, body):
    r = post(server, "/generate", body)
    assert r.status_code == 200, r.text
    return r.json()


def test_n_samples_share_the_prefill_and_equal_separate_requests(server):
    body = {"input_ids": [9, 10, 11, 12], "sampling_params": {"n": 3, "temperature": 1.0, "sampling_seed": 40,
                                                              "max_new_tokens": 6}, "rid": "grp"}
    outs = gen(server, body)
    assert len(outs) == 3 and [o["meta_info"]["id"] for o in outs] == ["grp_0", "grp_1", "grp_2"]
    assert max(o["meta_info"]["cached_tokens"] for o in outs) == 4  # one prefill, two copies
    for j, o in enumerate(outs):  # sample j is the request with seed 40 + j
        one = gen(server, {"input_ids": [9, 10, 11, 12], "sampling_params": {"temperature": 1.0, "max_new_tokens": 6,
                                                                             "sampling_seed": 40 + j}})
        assert one["output_ids"] == o["output_ids"]
    assert gen(server, {"input_ids": [9, 10, 11, 12], "sampling_params": {"max_new_tokens": 1}}
               )["meta_info"]["cached_tokens"] == 4  # the prefix cache holds across requests
    assert httpx.post(server.url + "/flush_cache").status_code == 200
    assert gen(server, {"input_ids": [9, 10, 11, 12], "sampling_params": {"max_new_tokens": 1}}
               )["meta_info"]["cached_tokens"] == 0


def test_sglang_sampling_semantics(server):
    base = {"input_ids": [20, 21, 22], "return_logprob": True}
    free = gen(server, {**base, "sampling_params": {"temperature": 1.0, "sampling_seed": 7, "max_new_tokens": 8, "ignore_eos": True}})
    ids = free["output_ids"]
    # min_new_tokens: a stop token cannot end it early
    k = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])
    stop = ids[k]
    early = gen(server, {**base, "sampling_params": {"temperature": 1.0, "sampling_seed": 7, "max_new_tokens": 8, "stop_token_ids": [stop]}})
    assert early["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop} and len(early["output_ids"]) == k + 1
    held = gen(server, {**base, "sampling_params": {"temperature": 1.0, "sampling_seed": 7, "max_new_tokens": 8, "stop_token_ids": [stop],
                                                    "min_new_tokens": 8, "ignore_eos": True}})
    assert len(held["output_ids"]) == 8 and stop not in held["output_ids"]
    # no_stop_trim keeps the stop token's text; the default trims it (text and ids then differ by it)
    kept = gen(server, {**base, "sampling_params": {"temperature": 1.0, "sampling_seed": 7, "max_new_tokens": 8, "stop_token_ids": [stop],
                                                    "no_stop_trim": True, "skip_special_tokens": False}})
    trimmed = gen(server, {**base, "sampling_params": {"temperature": 1.0, "sampling_seed": 7, "max_new_tokens": 8, "stop_token_ids": [stop],
                                                       "skip_special_tokens": False}})
    assert kept["output_ids"] == trimmed["output_ids"] == ids[:k + 1]
    assert kept["text"].startswith(trimmed["text"]) and len(kept["text"]) > len(trimmed["text"])
    # logit_bias forces a token; penalties move the choice; logprobs stay the model's own
    forced = gen(server, {**base, "sampling_params": {"temperature": 0, "max_new_tokens": 3, "ignore_eos": True,
                                                      "logit_bias": {"42": 100.0}}})
    assert forced["output_ids"] == [42, 42, 42]
    rep = gen(server, {**base, "sampling_params": {"temperature": 0, "max_new_tokens": 3, "ignore_eos": True,
                                                   "logit_bias": {"42": 100.0}, "frequency_penalty": 2.0,
                                                   "repetition_penalty": 2.0}})
    assert rep["output_ids"][0] == 42
    # top_logprobs_num with text: the sampled greedy token is the top entry at each step
    top = gen(server, {**base, "top_logprobs_num": 3, "return_text_in_logprobs": True, "logprob_start_len": 0,
                       "sampling_params": {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}})
    meta = top["meta_info"]
    assert len(meta["output_top_logprobs"]) == 4 and all(len(t) == 3 for t in meta["output_top_logprobs"])
    for (lp, tok, text), tops in zip(meta["output_token_logprobs"], meta["output_top_logprobs"], strict=True):
        assert tops[0][1] == tok and tops[0][0] == lp and isinstance(text, str)
    assert meta["input_token_logprobs"][0][0] is None and len(meta["input_token_logprobs"]) == 3
    assert meta["input_top_logprobs"][0] is None and len(meta["input_top_logprobs"][1]) == 3


def test_stop_string_matched_and_no_stop_trim(server):
    free = gen(server, {"text": "hello", "sampling_params": {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}})
    text = free["text"]
    stop = next((text[i:i + 2] for i in range(2, len(text) - 2) if text[i:i + 2].isprintable()), None)
    if stop is None:
        pytest.skip("the tiny model's greedy text has no printable stop string to cut at")
    cut = gen(server, {"text": "hello", "sampling_params": {"temperature": 0, "max_new_tokens": 12, "stop": stop}})
    assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert stop not in cut["text"] and text.startswith(cut["text"])
    kept = gen(server, {"text": "hello", "sampling_params": {"temperature": 0, "max_new_tokens": 12, "stop": stop,
                                                             "no_stop_trim": True}})
    assert stop in kept["text"] and kept["output_ids"] == cut["output_ids"]


def test_control_routes(long_int4):
    s = Served(long_int4[0], "--max-batch", "4")
    try:
        assert httpx.get(s.url + "/health_generate", timeout=30).status_code == 200
        info = httpx.get(s.url + "/get_server_info").json()
        assert info["max_running_requests"] == 4 and info["internal_states"][0]["running"] == 0
        assert httpx.get(s.url + "/server_info").json()["weight_version"] == "default"
        assert httpx.get(s.url + "/flush_cache").status_code == 200
        long = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 32000, "ignore_eos": True}}

        def state():
            return httpx.get(s.url + "/get_server_info").json()["internal_states"][0]

        def wait_for(cond):
            deadline = time.time() + 30
            while not cond(state()):
                assert time.time() < deadline
                time.sleep(0.01)

        with ThreadPoolExecutor(3) as pool:
            assert post(s, "/pause_generation", {"mode": "in_place"}).json()["status"] == "ok"
            futs = [pool.submit(post, s, "/generate", {**long, "rid": f"long-{i}"}) for i in range(2)]
            wait_for(lambda st: st["waiting"] == 2 and st["paused"])
            assert httpx.post(s.url + "/flush_cache").status_code == 400  # SGLang: not while requests wait or run
            assert post(s, "/abort_request", {"rid": "long-0"}).status_code == 200
            first = futs[0].result(timeout=30).json()
            assert first["meta_info"]["finish_reason"]["type"] == "abort" and first["output_ids"] == []
            assert post(s, "/continue_generation", {}).json()["status"] == "ok"
            wait_for(lambda st: st["running"] == 1)
            assert post(s, "/pause_generation", {"mode": "in_place"}).status_code == 200
            steps = state()["steps"]
            time.sleep(0.3)
            assert state()["steps"] == steps and not futs[1].done()  # paused in place: no decode steps
            assert post(s, "/continue_generation", {}).status_code == 200
            assert post(s, "/abort_request", {"abort_all": True}).status_code == 200
            second = futs[1].result(timeout=60).json()
            assert second["meta_info"]["finish_reason"]["type"] == "abort" and 0 < len(second["output_ids"]) < 32000
        # pause with the default mode aborts what runs; new requests wait until continue
        fut = ThreadPoolExecutor(1).submit(post, s, "/generate", {**long, "rid": "late"})
        wait_for(lambda st: st["running"] == 1)
        assert post(s, "/pause_generation", {}).status_code == 200
        assert fut.result(timeout=60).json()["meta_info"]["finish_reason"]["type"] == "abort"
        waiting = ThreadPoolExecutor(1).submit(post, s, "/generate", {"input_ids": [5], "sampling_params": {"max_new_tokens": 2}})
        time.sleep(0.5)
        assert not waiting.done()
        assert post(s, "/continue_generation", {}).status_code == 200
        assert waiting.result(timeout=60).status_code == 200
    finally:
        s.stop()


def test_concurrent_clients_are_batched(server):
    def client(i):
        with httpx.Client(base_url=server.url, timeout=120) as c:
            outs = []
            for j in range(10):
                r = c.post("/generate", json={"input_ids": [3 + i, 4 + j], "return_logprob": True,
                                              "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
                assert r.status_code == 200
                outs.append(r.json()["output_ids"])
            return outs

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(client, range(8)))
    assert sum(len(r) for r in results) == 80
    assert httpx.get(server.url + "/get_model_info").json()["largest_batch"] > 1
    # Batch invariance: the same request alone gives the same tokens.
    alone = post(server, "/generate", {"input_ids": [3, 4], "sampling_params": {"max_new_tokens": 4,
                                                                                 "temperature": 0}}).json()
    assert alone["output_ids"] == results[0][0]


def test_api_key(tiny_pairs):
    s = Served(tiny_pairs["tiny-llama"][1], "--api-key", "sekret")
    try:
        body = {"text": "a", "sampling_params": {"max_new_tokens": 1}}
        assert post(s, "/generate", body).status_code == 401
        assert post(s, "/generate", body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert post(s, "/generate", body, headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.stop()


def test_update_weights_from_disk_switches_checkpoints(tiny_pairs, other_int4):
    from qatctl.engines import SamplingParams
    from qatctl.engines.remote import RemoteEngine

    s = Served(tiny_pairs["tiny-llama"][1])
    try:
        remote = RemoteEngine(s.url)
        greedy = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
        before = remote.generate([[5, 6, 7]], greedy)[0]
        assert "Succeeded" in remote.update_weights_from_disk(str(other_int4))
        assert httpx.get(s.url + "/get_model_info").json()["model_path"] == str(other_int4)
        after = remote.generate([[5, 6, 7]], greedy)[0]
        assert after.logprobs != before.logprobs
        r = post(s, "/update_weights_from_disk", {"model_path": str(tiny_pairs["tiny-llama"][0])})
        assert r.status_code == 400 and r.json()["success"] is False and "int4-checkpoint" in r.json()["message"]
        assert remote.generate([[5, 6, 7]], greedy)[0].logprobs == after.logprobs  # still the new weights
    finally:
        s.stop()


def test_sglang_launcher_command_and_missing_sglang(tiny_pairs, tmp_path):
    from test_cli import assert_usage_error

    from conftest import qatctl
    from stages.serve import ServeConfig, sglang_command

    int4 = tiny_pairs["tiny-llama"][1]
    cmd = sglang_command(ServeConfig(ckpt=int4, port=31000, api_key="k", sglang_args=("--tp-size", "2")), "py")
    assert cmd == ["py", "-m", "sglang.launch_server", "--model-path", str(int4), "--host", "127.0.0.1", "--port",
                   "31000", "--quantization", "compressed-tensors", "--dtype", "bfloat16", "--served-model-name",
                   int4.name, "--api-key", "k", "--tp-size", "2"]
    p = qatctl("serve", int4, "--backend", "sglang", check=False)
    assert_usage_error(p, "sglang is not installed")
    assert_usage_error(qatctl("serve", tiny_pairs["tiny-llama"][0], check=False), "expected a 'int4-checkpoint'")


def test_weight_update_with_requests_in_flight(long_int4):
    """SGLang's contract: running requests finish on the old weights, then the update lands
    (or, with abort_all_requests, they end as aborted); the prefix cache is flushed."""
    from qatctl.engines import SamplingParams, load_engine

    old = load_engine(long_int4[0])
    body = {"input_ids": [5, 6, 7], "return_logprob": True,
            "sampling_params": {"max_new_tokens": 3000, "temperature": 1.0, "sampling_seed": 3, "ignore_eos": True}}
    ref = old.generate([[5, 6, 7]], SamplingParams(max_new_tokens=3000, temperature=1.0, seed=3, ignore_eos=True))[0]
    s = Served(long_int4[0])
    try:
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(post, s, "/generate", body)
            wait_running(s)
            r = post(s, "/update_weights_from_disk", {"model_path": str(long_int4[1]), "weight_version": "v2"})
            assert r.status_code == 200 and r.json()["success"]
            out = running.result().json()
        assert out["output_ids"] == ref.output_ids  # finished on the old weights
        assert [x[0] for x in out["meta_info"]["output_token_logprobs"]] == ref.logprobs
        assert out["meta_info"]["weight_version"] == "default"
        after = post(s, "/generate", {**body, "sampling_params": {**body["sampling_params"], "max_new_tokens": 4}}).json()
        assert after["meta_info"]["weight_version"] == "v2" and after["meta_info"]["cached_tokens"] == 0
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(post, s, "/generate", {**body, "sampling_params": {**body["sampling_params"],
                                                                                      "max_new_tokens": 32000}})
            wait_running(s)
            r = post(s, "/update_weights_from_disk", {"model_path": str(long_int4[0]),
                                                      "abort_all_requests": True})
            assert r.status_code == 200
            assert running.result().json()["meta_info"]["finish_reason"]["type"] == "abort"
    finally:
        s.stop()


def test_abort_mid_stream_and_openapi_schema(server, long_server):
    body = {"input_ids": [5, 6], "rid": "streamed", "stream": True,
            "sampling_params": {"max_new_tokens": 32000, "ignore_eos": True}}
    with httpx.stream("POST", long_server.url + "/generate", json=body, timeout=60) as s:
        events = []
        for line in s.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[len("data: "):])
            if len(events) == 2:
                assert post(long_server, "/abort_request", {"rid": "streamed"}).status_code == 200
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["meta_info"]["finish_reason"]["type"] == "abort" and len(last["output_ids"]) < 32000
    schema = httpx.get(server.url + "/openapi.json").json()
    gen = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert {"text", "input_ids", "sampling_params", "return_logprob", "top_logprobs_num", "rid"} <= set(gen)
    assert "ChatRequest" in schema["components"]["schemas"] and "/v1/completions" in schema["paths"]
    assert httpx.get(server.url + "/docs").status_code == 200


def test_remote_score_argmax_equals_in_process(server, tiny_pairs):
    from qatctl.engines import load_engine
    from qatctl.engines.remote import RemoteEngine

    local, remote = load_engine(tiny_pairs["tiny-llama"][1]), RemoteEngine(server.url)
    prompts, completions = [[5, 6, 7], [9, 10]], [[11, 12, 13, 14], [15, 16]]
    assert remote.score_argmax(prompts, completions) == local.score_argmax(prompts, completions)
    assert remote.score(prompts, completions) == local.score(prompts, completions)


def test_server_batch_invariance_alone_joining_and_cached(long_server):
    """Through HTTP: one request alone (cache flushed), joining a running batch mid-flight, and
    again with its prompt's KV from the prefix cache: identical tokens and logprobs (==)."""
    body = {"input_ids": [40, 41, 42, 43], "return_logprob": True,
            "sampling_params": {"temperature": 1.0, "sampling_seed": 77, "max_new_tokens": 12}}

    def run():
        r = post(long_server, "/generate", body).json()
        return r["output_ids"], [x[0] for x in r["meta_info"]["output_token_logprobs"]], r["meta_info"]["cached_tokens"]

    long = {"input_ids": [7, 8], "sampling_params": {"max_new_tokens": 32000, "ignore_eos": True}}
    assert httpx.post(long_server.url + "/flush_cache").status_code == 200
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(post, long_server, "/generate", long)
        wait_running(long_server)
        joined = run()  # prefilled fresh, joins the running batch
        assert not busy.done()
        assert post(long_server, "/abort_request", {"abort_all": True}).status_code == 200
        assert busy.result().status_code == 200
    assert joined[2] == 0
    assert httpx.post(long_server.url + "/flush_cache").status_code == 200
    alone = run()
    cached = run()
    assert alone[2] == 0 and cached[2] == 4
    assert alone[:2] == joined[:2] == cached[:2]


def test_remote_engine_sends_every_sampling_field(server, tiny_pairs):
    """Each SamplingParams field set alone: a RemoteEngine on `qatctl serve` samples exactly what the
    embedded engine does (ids, logprobs, finish reason, what matched, text, top logprobs), so no
    field is dropped on the way; what SGLang's API cannot carry is refused."""
    import dataclasses

    from qatctl.engines import SamplingParams, load_engine
    from qatctl.engines.remote import RemoteEngine
    from qatctl.errors import QatctlError

    local = load_engine(tiny_pairs["tiny-llama"][1])
    remote = RemoteEngine(server.url, tokenizer=local.tokenizer)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    base = dict(temperature=1.0, max_new_tokens=10, seed=3, ignore_eos=True)
    plain = local.generate(prompts, SamplingParams(**base))
    tok, piece = plain[0].output_ids[3], plain[0].text[2:4]
    special = local.tokenizer.all_special_ids[0]
    changed = {  # field -> a value other than its default that changes what this request does
        "temperature": 0.7, "top_p": 0.5, "top_k": 3, "max_new_tokens": 6, "stop_token_ids": (tok,), "stop": (piece,),
        "seed": 11, "ignore_eos": False, "min_new_tokens": 4, "no_stop_trim": True, "skip_special_tokens": False,
        "spaces_between_special_tokens": False, "logit_bias": ((special, 30.0), (tok, -5.0)),
        "frequency_penalty": 1.5, "presence_penalty": -1.0, "repetition_penalty": 1.7, "top_logprobs": 3,
    }
    assert set(changed) == {f.name for f in dataclasses.fields(SamplingParams)}  # a new field needs a case here
    context = {  # what a field needs around it to act at all
        "no_stop_trim": {"stop": (piece,)}, "ignore_eos": {"logit_bias": ((local.tokenizer.eos_token_id, 30.0),)}, "min_new_tokens": {"ignore_eos": False, "stop_token_ids": (plain[0].output_ids[1],)},
        "skip_special_tokens": {"logit_bias": ((special, 30.0),)},
        "spaces_between_special_tokens": {"logit_bias": ((special, 30.0),), "skip_special_tokens": False},
    }
    inert = {"spaces_between_special_tokens"}  # a fast tokenizer's decode ignores it: sent, but no effect here
    for name, value in changed.items():
        sp = SamplingParams(**{**base, **context.get(name, {}), name: value})
        a, b = local.generate(prompts, sp), remote.generate(prompts, sp)
        without = local.generate(prompts, SamplingParams(**{**base, **context.get(name, {})}))
        seen = lambda outs: [(o.output_ids, o.logprobs, o.finish_reason, o.matched, o.text, o.top_logprobs) for o in outs]  # noqa: E731
        assert seen(a) == seen(b), name
        assert (seen(a) != seen(without)) or name in inert, f"{name}: the case does not change the request"
    with pytest.raises(QatctlError, match="top_logprobs differs"):
        remote.generate(prompts, [SamplingParams(top_logprobs=1), SamplingParams(top_logprobs=2)])
    with pytest.raises(QatctlError, match="logit_bias names a token id twice"):
        remote.generate(prompts[:1], SamplingParams(logit_bias=((5, 1.0), (5, 2.0))))
