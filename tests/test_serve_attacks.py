"""`qatctl serve` tried as an attacker would, on loopback: every bad request fails alone with a
4xx naming the field while its concurrent good requests succeed, limits hold, abandoned work is
dropped, and the key and port are handled before anything loads."""

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from test_serve import Served, free_port, post

from conftest import REPO

GOOD = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 8, "temperature": 0.5, "sampling_seed": 1}}


@pytest.fixture(scope="module")
def srv(tiny_pairs):
    s = Served(tiny_pairs["tiny-llama"][1], "--max-request-bytes", str(2**20), "--max-queue", "64")
    yield s
    s.stop()


def state(s):
    return httpx.get(s.url + "/get_server_info", timeout=10).json()["internal_states"][0]


def wait_for(s, cond, seconds=30):
    deadline = time.time() + seconds
    while not cond(state(s)):
        assert time.time() < deadline, state(s)
        time.sleep(0.02)


@pytest.mark.parametrize("route, bad, field", [
    ("/generate", {"input_ids": [], "sampling_params": {"max_new_tokens": 2}}, "empty"),
    ("/generate", {**GOOD, "sampling_params": {"sampling_seed": 2**70}}, "seed"),
    ("/generate", b'{"input_ids": [5], "sampling_params": {"temperature": NaN}}', "temperature"),
    ("/generate", {**GOOD, "sampling_params": {"max_new_tokens": 10**9}}, "max_new_tokens"),
    ("/generate", {**GOOD, "sampling_params": {"temperature": 1e-40}}, "temperature"),
    ("/generate", {"input_ids": [5] * 600, "sampling_params": {"max_new_tokens": 4}}, "context"),
    ("/generate", {**GOOD, "sampling_params": {"logit_bias": {"99999": 1.0}}}, "logit_bias"),
    ("/generate", {"input_ids": [[5]] * 2000}, "max-prompts-per-request"),
    ("/v1/completions", {"prompt": [5, 6], "max_tokens": 4, "logprobs": 9}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "role"),
])
def test_a_bad_request_fails_alone(srv, route, bad, field):
    with ThreadPoolExecutor(9) as pool:
        good = [pool.submit(post, srv, "/generate", GOOD) for _ in range(8)]
        kw = {"content": bad, "headers": {"content-type": "application/json"}} if isinstance(bad, bytes) else {"json": bad}
        r = httpx.post(srv.url + route, timeout=60, **kw)
        assert r.status_code == 400, r.text
        assert field in r.json()["error"]["message"], r.text
        outs = [f.result() for f in good]
    assert all(o.status_code == 200 for o in outs)
    assert len({tuple(o.json()["output_ids"]) for o in outs}) == 1  # same seed, same tokens, whatever ran beside
    assert post(srv, "/generate", GOOD).status_code == 200


def test_oversized_body_is_413_and_huge_prompts_do_not_block_the_loop(srv):
    r = httpx.post(srv.url + "/generate", json={"text": "x" * (2**20 + 10)}, timeout=30)
    assert r.status_code == 413 and "--max-request-bytes" in r.json()["error"]["message"]
    with ThreadPoolExecutor(1) as pool:  # just under the limit: tokenized off the event loop
        big = pool.submit(post, srv, "/generate", {"text": "ab " * 300_000, "sampling_params": {"max_new_tokens": 1}})
        t0 = time.time()
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        assert time.time() - t0 < 2
        assert big.result().status_code == 400  # longer than the context


def test_abandoned_requests_stop_running(long_int4):
    srv = Served(long_int4[0])  # 32k context: a request that runs to its cap takes seconds
    longest = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 32000, "ignore_eos": True}}
    try:
        steps = state(srv)["steps"]
        with httpx.stream("POST", srv.url + "/generate", json={**longest, "stream": True}, timeout=60) as s:
            lines = s.iter_lines()
            next(ln for ln in lines if ln.startswith("data:"))
        wait_for(srv, lambda st: st["running"] == 0, 10)
        assert state(srv)["steps"] - steps < 16000  # dropped at the next step, not run to the cap
        # a non-streaming client that gives up: its request is dropped even while it still waits
        assert post(srv, "/pause_generation", {"mode": "in_place"}).status_code == 200
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/generate", json=longest, timeout=0.3)
        wait_for(srv, lambda st: st["waiting"] == 0 and st["running"] == 0, 10)
        assert post(srv, "/continue_generation", {}).status_code == 200
        assert post(srv, "/generate", GOOD).status_code == 200
    finally:
        srv.stop()


def test_queue_bound_gives_503(tiny_pairs):
    s = Served(tiny_pairs["tiny-llama"][1], "--max-batch", "1", "--max-queue", "2")
    try:
        with ThreadPoolExecutor(4) as pool:
            assert post(s, "/pause_generation", {"mode": "in_place"}).status_code == 200
            waiting = [pool.submit(post, s, "/generate", GOOD) for _ in range(2)]
            wait_for(s, lambda st: st["waiting"] == 2)
            r = post(s, "/generate", GOOD)
            assert r.status_code == 503 and "--max-queue" in r.json()["error"]["message"]
            assert post(s, "/continue_generation", {}).status_code == 200
            assert all(f.result().status_code == 200 for f in waiting)
    finally:
        s.stop()


def test_corrupt_checkpoint_update_is_400_and_serving_goes_on(srv, tiny_pairs, tmp_path):
    import shutil

    bad = tmp_path / "bad-int4"
    shutil.copytree(tiny_pairs["tiny-llama"][1], bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 100)
    r = post(srv, "/update_weights_from_disk", {"model_path": str(bad)})
    assert r.status_code == 400 and r.json()["success"] is False and "safetensors" in r.json()["message"]
    assert post(srv, "/generate", GOOD).status_code == 200


def test_api_key_from_env_and_file_port_checked_before_load(tiny_pairs, tmp_path):
    ckpt = tiny_pairs["tiny-llama"][1]
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    s = Served(ckpt, "--api-key-file", key_file)
    try:
        body = {"input_ids": [5], "sampling_params": {"max_new_tokens": 1}}
        assert post(s, "/generate", body).status_code == 401
        assert post(s, "/generate", body, headers={"Authorization": "Bearer from-file"}).status_code == 200
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert "from-file" not in ps
    finally:
        s.stop()
    env = {**os.environ, "QATCTL_API_KEY": "from-env"}
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qatctl.cli", "serve", ckpt, "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.2)
        url = f"http://127.0.0.1:{port}/v1/models"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer from-env"}).status_code == 200
        # the port is in use: refused in about a second, before any model load
        t0 = time.time()
        p = subprocess.run([sys.executable, "-m", "qatctl.cli", "serve", ckpt, "--port", str(port)], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and f"--port {port}" in p.stderr and len(p.stderr.strip().splitlines()) == 1
        assert time.time() - t0 < 30
    finally:
        proc.terminate()
        proc.wait(10)
