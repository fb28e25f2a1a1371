"""Reliability, third pass (issue 28): each case found by an attacker's or a careless user's sweep
is a test that failed before its fix — a kill at any point of the final save, a corrupt newest
resume state, another config on a resumable --out, a planted lock symlink, serve's option typos,
the body limit on a chunked body, concurrent weight updates."""

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file
from test_cli import assert_usage_error
from test_serve import Served, post, wait_running

from conftest import REPO, make_tiny, qatctl, redigest

ARITH = REPO / "recipes/data/arith-train.jsonl"
KILLAT = Path(__file__).with_name("killat.py")
SFT = ["--data", ARITH, "--steps", "6", "--save-every", "2", "--lr", "1e-3", "--batch-size", "4", "--micro-batch", "2"]
REWARD = "def odd_length(completion, answer):\n    return float(len(completion) % 2)\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    make_tiny("tiny-llama", root / "init")
    (root / "rw.py").write_text(REWARD)
    return root


def sft_args(tiny, out, *extra):
    return ["train-sft-qat", tiny / "init", "--out", out, *SFT, *extra]


def rl_args(tiny, out, *extra):
    return ["rl-step", tiny / "init", "--prompts", ARITH, "--out", out, "--reward", f"{tiny / 'rw.py'}:odd_length",
            "--prompts-per-step", "2", "--samples-per-prompt", "4", "--max-new-tokens", "6", "--lr", "1e-3",
            "--micro-batch", "8", "--iterations", "3", "--save-every", "1", *extra]


def killed_at(point: str, argv, nth: int = 1) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, str(KILLAT), point, str(nth), "--", *map(str, argv)], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == -9, (p.returncode, p.stderr[-2000:])
    return p


def tensors(folder: Path) -> dict:
    """Every tensor of every safetensors file of an output, by file and name: the BF16 weights,
    the fp32 masters and AdamW moments. Not the global torch RNG snapshot in trainer_state/ (a
    chained stage never restores it: rollouts draw from per-request generators, and resuming
    from a mid-run state consumes the global stream differently from a straight run)."""
    return {f"{p.relative_to(folder)}:{k}": v for p in sorted(folder.rglob("*.safetensors"))
            if p.name != "rng.safetensors" for k, v in load_file(p).items()}


def same_output(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    strip = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k and "per_s" not in k} for r in rows]  # noqa: E731
    lines = lambda f: [json.loads(ln) for ln in (f / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert strip(lines(a)) == strip(lines(b))
    if (a / "rollouts.jsonl").is_file():
        assert (a / "rollouts.jsonl").read_text() == (b / "rollouts.jsonl").read_text()
    assert sorted(json.loads((a / "qatctl.json").read_text())["files"]) == \
        sorted(json.loads((b / "qatctl.json").read_text())["files"])


@pytest.fixture(scope="module")
def straight(tiny):
    """Uninterrupted runs to compare with."""
    qatctl(*sft_args(tiny, tiny / "sft-straight"))
    qatctl(*rl_args(tiny, tiny / "rl-straight"))
    return {"sft": tiny / "sft-straight", "rl": tiny / "rl-straight"}


@pytest.mark.parametrize("stage", ["sft", "rl"])
@pytest.mark.parametrize("point", ["trainer_state", "checkpoint", "manifest"])
def test_kill_during_the_final_save_then_rerun_equals_uninterrupted(tiny, straight, tmp_path, stage, point):
    argv = (sft_args if stage == "sft" else rl_args)(tiny, tmp_path / "out")
    killed_at(point, argv)
    assert not (tmp_path / "out").exists() and (tmp_path / "out.partial").is_dir()
    p = qatctl(*argv)
    if point != "trainer_state":  # training had finished: nothing is trained again
        assert "writing the output" in p.stderr
    same_output(straight[stage], tmp_path / "out")


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_a_corrupt_newest_state_never_leaves_the_run_stuck(tiny, straight, tmp_path, stage):
    argv = (sft_args if stage == "sft" else rl_args)(tiny, tmp_path / "out")
    killed_at("step-saved", argv, nth=2)
    root = tmp_path / "out.partial" / "state"
    newest = sorted(root.iterdir())[-1]
    masters = newest / "masters.safetensors"
    masters.write_bytes(masters.read_bytes()[:100])
    p = qatctl(*argv)  # falls back to the older state, and saves over the corrupt one
    assert "trying an older one" in p.stderr
    same_output(straight[stage], tmp_path / "out")


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_another_config_on_a_resumable_out_is_refused_unless_force(tiny, tmp_path, stage):
    argv = (sft_args if stage == "sft" else rl_args)(tiny, tmp_path / "out")
    killed_at("step-saved", argv, nth=1)
    state = tmp_path / "out.partial" / "state"
    before = sorted(p.name for p in state.iterdir())
    p = qatctl(*[a if a != "1e-3" else "2e-3" for a in map(str, argv)], check=False)
    assert_usage_error(p, "out.partial", "resume state", "lr 0.001 -> 0.002", "--force")
    assert sorted(p.name for p in state.iterdir()) == before
    qatctl(*[a if a != "1e-3" else "2e-3" for a in map(str, argv)], "--force")
    assert json.loads((tmp_path / "out" / "qatctl.json").read_text())["config"]["lr"] == 2e-3


def test_a_planted_lock_symlink_truncates_nothing(tiny, tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("the user's data\n")
    (tmp_path / ".int4.qatctl-lock").symlink_to(victim)
    p = qatctl("convert-int4", tiny / "init", "--out", tmp_path / "int4", check=False)
    assert_usage_error(p, ".int4.qatctl-lock", "symlink")
    assert victim.read_text() == "the user's data\n" and not (tmp_path / "int4").exists()
    os.link(victim, tmp_path / ".int4b.qatctl-lock")  # a hard link is refused as well
    assert_usage_error(qatctl("convert-int4", tiny / "init", "--out", tmp_path / "int4b", check=False),
                       "not a lock file qatctl made")
    assert victim.read_text() == "the user's data\n"


def test_a_symlinked_file_inside_an_input_is_refused(tiny, tmp_path):
    import shutil

    src = tmp_path / "ckpt"
    shutil.copytree(tiny / "init", src)
    secret = tmp_path / "secret"
    secret.write_text("{}")
    (src / "tokenizer_config.json").rename(tmp_path / "moved")
    (src / "tokenizer_config.json").symlink_to(secret)
    assert_usage_error(qatctl("convert-int4", src, "--out", tmp_path / "int4", check=False),
                       "tokenizer_config.json", "symlink")
    assert not (tmp_path / "int4").exists()


# ---------------------------------------------------------------- serve

@pytest.mark.parametrize("argv, fragment", [
    (["--apikey", "KEY"], "--apikey"),
    (["--max-bacth", "8"], "--max-bacth"),
    (["--threads", "0"], "--threads 0"),
    (["--threads", "-1"], "--threads -1"),
    (["--", "--tp-size", "2"], "need --backend sglang"),
])
def test_serve_refuses_unknown_options_before_anything_loads(tiny_pairs, argv, fragment):
    p = qatctl("serve", tiny_pairs["tiny-llama"][1], "--port", "1", *argv, check=False, timeout=60)
    assert_usage_error(p, fragment)


def test_serve_warns_when_listening_beyond_loopback_without_a_key(tmp_path):
    # a folder that is not an artifact: the warning comes first, then the error, nothing binds
    p = qatctl("serve", tmp_path, "--host", "0.0.0.0", check=False, timeout=60)
    assert p.returncode == 2 and "warning:" in p.stderr and "without an API key" in p.stderr
    p = qatctl("serve", tmp_path, "--host", "127.0.0.1", check=False, timeout=60)
    assert p.returncode == 2 and "warning:" not in p.stderr


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def chunked_post(port: int, path: str, total: int, chunk: int = 1 << 16) -> bytes:
    """POST `total` bytes with Transfer-Encoding: chunked (no Content-Length); the response bytes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n".encode())
    piece = f"{chunk:x}\r\n".encode() + b" " * chunk + b"\r\n"
    sent = 0
    try:
        while sent < total:
            sock.sendall(piece)
            sent += chunk
        sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed: read what it said
    data = b""
    try:
        while chunk_ := sock.recv(65536):
            data += chunk_
            if b"\r\n\r\n" in data and b"}" in data:
                break
    except (TimeoutError, ConnectionResetError):
        pass
    sock.close()
    return data


def test_a_chunked_body_over_the_limit_is_413_and_memory_stays_bounded(tiny_pairs):
    s = Served(tiny_pairs["tiny-llama"][1], "--max-request-bytes", str(2**20))
    try:
        assert post(s, "/generate", {"input_ids": [5], "sampling_params": {"max_new_tokens": 1}}).status_code == 200
        before = rss_kb(s.proc.pid)
        answer = chunked_post(s.port, "/generate", 200 * 2**20)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"--max-request-bytes" in answer
        assert rss_kb(s.proc.pid) - before < 64 * 1024  # KiB: far below the 200 MiB sent
        # a chunked body under the limit is read and served as usual
        small = json.dumps({"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}}).encode()
        r = httpx.post(s.url + "/generate", content=iter([small[:10], small[10:]]), timeout=30,
                       headers={"content-type": "application/json"})
        assert r.status_code == 200 and len(r.json()["output_ids"]) == 2
    finally:
        s.stop()


def test_concurrent_weight_updates_get_409_and_the_old_weights_keep_serving(long_int4):
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 32000, "ignore_eos": True}}
    s = Served(long_int4[0])
    try:
        with ThreadPoolExecutor(8) as pool:
            running = pool.submit(post, s, "/generate", {**body, "rid": "long"})
            wait_running(s)
            # the first update waits for the running request; the others are refused at once
            first = pool.submit(post, s, "/update_weights_from_disk", {"model_path": str(long_int4[1])})
            time.sleep(0.5)
            others = [pool.submit(post, s, "/update_weights_from_disk", {"model_path": str(long_int4[1])})
                      for _ in range(6)]
            answers = [f.result() for f in others]
            assert all(r.status_code == 409 and r.json()["success"] is False
                       and "already in progress" in r.json()["message"] for r in answers), [r.text for r in answers]
            assert httpx.get(s.url + "/get_server_info", timeout=10).json()["model_path"] == str(long_int4[0])
            assert post(s, "/abort_request", {"rid": "long"}).status_code == 200
            assert running.result().status_code == 200
            assert first.result().status_code == 200 and first.result().json()["success"]
        assert httpx.get(s.url + "/get_server_info", timeout=10).json()["model_path"] == str(long_int4[1])
    finally:
        s.stop()


# ---------------------------------------------------------------- the low ones, one line each

def test_a_reward_file_with_a_syntax_error_is_one_line(tiny, tmp_path):
    bad = tmp_path / "bad_reward.py"
    bad.write_text("def f(completion, answer):\n    return (\n")
    p = qatctl(*rl_args(tiny, tmp_path / "out")[:-6], "--reward", f"{bad}:f", check=False)
    assert_usage_error(p, "bad_reward.py", "syntax error")


def test_a_module_reward_leaves_sys_path_as_it_was(tmp_path, monkeypatch):
    from qatctl.rl.rewards import load_reward

    (tmp_path / "my_reward_mod.py").write_text("def f(completion, answer):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    assert load_reward("my_reward_mod:f")("x", "y") == 1.0
    assert sys.path == before


def test_inspect_shows_odd_manifest_fields_without_a_traceback(tiny, tmp_path):
    import shutil

    odd = tmp_path / "odd"
    shutil.copytree(tiny / "init", odd)
    m = json.loads((odd / "qatctl.json").read_text())
    m.update(config="not an object", quant=[1, 2], inputs=[7, {"kind": "x"}], files=5, metrics={"a": "[/bold]"})
    (odd / "qatctl.json").write_text(json.dumps(m))
    p = qatctl("inspect", odd)
    assert "not an object" in p.stderr and "[/bold]" in p.stderr and "Traceback" not in p.stderr


def test_plot_out_must_be_a_png(tmp_path):
    (tmp_path / "runs").mkdir()
    assert_usage_error(qatctl("plot", tmp_path / "runs", "--out", tmp_path / "x.txt", check=False), "x.txt", ".png")
    assert not (tmp_path / "x.txt").exists() and not (tmp_path / "x.txt.png").exists()


def test_a_state_with_an_empty_meta_falls_back_to_the_older_one(tiny, straight, tmp_path):
    argv = sft_args(tiny, tmp_path / "out")
    killed_at("step-saved", argv, nth=2)
    newest = sorted((tmp_path / "out.partial" / "state").iterdir())[-1]
    s = json.loads((newest / "state.json").read_text())
    s["meta"] = {}
    (newest / "state.json").write_text(json.dumps(s))
    p = qatctl(*argv)
    assert "meta lacks" in p.stderr and "trying an older one" in p.stderr
    same_output(straight["sft"], tmp_path / "out")


def test_a_tokenizer_larger_than_the_embedding_is_refused(tiny, tmp_path):
    import shutil

    src = tmp_path / "ckpt"
    shutil.copytree(tiny / "init", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["vocab_size"] = 16  # fewer rows than the tokenizer has ids
    (src / "config.json").write_text(json.dumps(cfg))
    redigest(src)
    for argv in (["convert-int4", src, "--out", tmp_path / "o1"], sft_args(tiny, tmp_path / "o2")[:1] + [src] +
                 sft_args(tiny, tmp_path / "o2")[2:], ["accuracy", src, "--prompts", ARITH, "--limit", "1"]):
        assert_usage_error(qatctl(*argv, check=False), "the tokenizer has", "vocab_size is 16")


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("stage", ["convert-int4", "init-qat"])
def test_a_full_disk_is_one_line_naming_the_output(tiny, small_disk, stage):
    src = tiny / "init" if stage == "convert-int4" else "tiny-llama"
    p = qatctl(stage, src, "--out", small_disk / "out", check=False)
    assert_usage_error(p, f"--out {small_disk / 'out'}")
    assert sorted(x.name for x in small_disk.iterdir()) == []  # nothing half-written stays


def test_threads_default_to_the_cores_this_process_may_use(tiny, tmp_path, monkeypatch):
    import shutil

    from qatctl.cli import _usable_cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert _usable_cores(quota) == 2
    quota.write_text("max 100000\n")
    assert _usable_cores(quota) == 8
    assert _usable_cores(tmp_path / "absent") == 8
    if shutil.which("taskset") is None:
        pytest.skip("no taskset")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    argv = [str(a) for a in rl_args(tiny, tmp_path / "rl")][:-4]  # without --iterations 3 --save-every 1
    p = subprocess.run(["taskset", "-c", "0", sys.executable, "-m", "qatctl.cli", *argv, "--iterations", "1", "--json"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout)["metrics"]["threads"] == 1


def test_sigterm_during_a_weight_update_answers_it_then_exits(long_int4):
    import signal

    s = Served(long_int4[0])
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(post, s, "/generate", body)
        wait_running(s)
        update = pool.submit(post, s, "/update_weights_from_disk", {"model_path": str(long_int4[1])})
        time.sleep(0.3)  # the update waits for the running request
        s.proc.send_signal(signal.SIGTERM)
        assert running.result().status_code == 200
        r = update.result()
        assert r.status_code == 200 and r.json()["success"], r.text
    assert s.proc.wait(90) == 0
