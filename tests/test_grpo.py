"""The multi-iteration GRPO loop (qatctl/rl/loop.py, qatctl/rl/session.py): in-memory weight sync equals
convert-int4 bit for bit, masters and AdamW carried across artifacts, kill -9 resume, dynamic
sampling, the BF16 arm, --engine-url with a weight version per iteration, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import assert_usage_error

from conftest import REPO, make_int4, make_tiny, qatctl, redigest

ARITH = REPO / "recipes/data/arith-train.jsonl"
REWARDS = '''
def odd_length(completion, answer):
    return float(len(completion) % 2)

def even_answers_only(completion, answer):
    """Groups of odd answers are all 0 (no signal); even answers score the completion's parity."""
    return float(int(answer) % 2 == 0) * float(len(completion) % 2)
'''


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    make_tiny("tiny-llama", root / "llama")
    make_tiny("tiny-qwen3-moe", root / "moe")
    (root / "rw.py").write_text(REWARDS)
    return root


def args(root, policy, out, *extra, reward="odd_length"):
    return [policy, "--prompts", ARITH, "--out", out, "--reward", f"{root / 'rw.py'}:{reward}",
            "--prompts-per-step", "4", "--samples-per-prompt", "4", "--max-new-tokens", "10", "--lr", "1e-3",
            "--micro-batch", "8", *extra]


def rows_of(folder):
    return [json.loads(ln) for ln in (folder / "rollouts.jsonl").read_text().splitlines()]


def metrics_of(folder):
    return [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines()]


def tensors_equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("preset", ["llama", "moe"])
def test_in_memory_sync_equals_convert_int4(root, tmp_path, preset, monkeypatch):
    """After 2 iterations the engine holds exactly convert-int4 of the policy at iteration 2:
    the pushed tensors equal the converted files, and the engine's repacked kernels are equal
    to those of an engine loaded from them."""
    from qatctl.engines import load_engine
    from qatctl.engines.embedded import EmbeddedEngine
    from stages.rl_step import RlStepConfig, run

    pushed = []
    real = EmbeddedEngine.update_weights
    monkeypatch.setattr(EmbeddedEngine, "update_weights", lambda self, t: (pushed.append(t), real(self, t))[1])
    common = dict(policy=root / preset, prompts=ARITH, reward=f"{root / 'rw.py'}:odd_length", prompts_per_step=4,
                  samples_per_prompt=4, max_new_tokens=10, lr=1e-3, micro_batch=8)
    run(RlStepConfig(out=tmp_path / "three", iterations=3, **common))
    assert len(pushed) == 2  # after iterations 1 and 2; the last iteration's weights are written, not pushed
    after_two = pushed[-1]
    run(RlStepConfig(out=tmp_path / "two", iterations=2, **common))
    make_int4(tmp_path / "two", tmp_path / "two-int4")
    assert tensors_equal(after_two, load_file(tmp_path / "two-int4" / "model.safetensors"))
    synced, disk = load_engine(tmp_path / "two-int4"), load_engine(tmp_path / "two-int4")
    synced.update_weights(after_two)
    for la, lb in zip(synced.layers, disk.layers, strict=True):
        for key in ("qkv", "o", "gate_up", "down"):
            if key in la:
                assert all(torch.equal(a, b) for a, b in zip(la[key].parts, lb[key].parts, strict=True))
        for (a1, a2), (b1, b2) in zip(la.get("experts", ()), lb.get("experts", ()), strict=True):
            assert all(torch.equal(a, b) for a, b in zip(a1.parts + a2.parts, b1.parts + b2.parts, strict=True))
    assert torch.equal(synced.embed, disk.embed) and torch.equal(synced.lm_head.tensor, disk.lm_head.tensor)


def test_optimizer_state_carried_across_artifacts(root, tmp_path):
    """Two chained rl-steps (each its own artifact) equal one --iterations 2 run bit for bit, at
    an lr whose update BF16 alone would round away; --reset-optimizer differs."""
    lr = ["--lr", "1e-5"]
    qatctl("rl-step", *args(root, root / "llama", tmp_path / "two", "--iterations", "2", *lr))
    one = json.loads(qatctl("rl-step", *args(root, root / "llama", tmp_path / "one", *lr), "--json").stdout)
    assert one["trainer_state"]["optimizer"] == "AdamW" and one["trainer_state"]["optimizer_step"] == 1
    make_int4(tmp_path / "one", tmp_path / "one-int4")
    chained = json.loads(qatctl("rl-step", *args(root, tmp_path / "one", tmp_path / "chained", *lr),
                                "--rollout-model", tmp_path / "one-int4", "--json").stdout)
    assert chained["metrics"]["continued_from"] == {"masters": True, "optimizer": True}
    assert chained["rl"]["iteration"] == 2 and chained["trainer_state"]["optimizer_step"] == 2
    a = load_file(tmp_path / "two" / "trainer_state" / "masters.safetensors")
    b = load_file(tmp_path / "chained" / "trainer_state" / "masters.safetensors")
    assert tensors_equal(a, b)
    assert tensors_equal(load_file(tmp_path / "two" / "trainer_state" / "optimizer.safetensors"),
                         load_file(tmp_path / "chained" / "trainer_state" / "optimizer.safetensors"))
    assert tensors_equal(load_file(tmp_path / "two" / "model.safetensors"),
                         load_file(tmp_path / "chained" / "model.safetensors"))
    assert [r["output_ids"] for r in rows_of(tmp_path / "two") if r["iteration"] == 2] == \
        [r["output_ids"] for r in rows_of(tmp_path / "chained")]
    # The small update lives in the masters: most of it rounds away in the BF16 weights.
    start = load_file(root / "llama" / "model.safetensors")
    w = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(a[w], start[w].float())
    assert (a[w].bfloat16() == start[w]).float().mean() > 0.5
    qatctl("rl-step", *args(root, tmp_path / "one", tmp_path / "reset", *lr), "--rollout-model",
           tmp_path / "one-int4", "--reset-optimizer")
    c = load_file(tmp_path / "reset" / "trainer_state" / "masters.safetensors")
    assert not tensors_equal(a, c)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_iterations_and_carried_state_on_cuda(root, tmp_path):
    """Both found on an H100 (docs/results.md, GPU run): the in-memory sync handed the tinygemm
    linears CUDA tensors (their load-time check mixed devices), and an rl-step continuing a
    trainer_state on CUDA left the AdamW moments on the CPU."""
    cuda = ["--lr", "1e-5", "--device", "cuda"]
    first = json.loads(qatctl("rl-step", *args(root, root / "llama", tmp_path / "one", "--iterations", "2", *cuda),
                              "--json").stdout)
    assert first["trainer_state"]["optimizer_step"] == 2
    chained = json.loads(qatctl("rl-step", *args(root, tmp_path / "one", tmp_path / "two", *cuda), "--json").stdout)
    assert chained["metrics"]["continued_from"] == {"masters": True, "optimizer": True}
    assert chained["rl"]["iteration"] == 3 and chained["trainer_state"]["optimizer_step"] == 3
    assert "tinygemm" in chained["metrics"]["rollout_engine"]["kernel"]


def test_kill_9_during_iterations_then_rerun_is_identical(root, tmp_path):
    extra = ["--iterations", "4", "--save-every", "1"]
    qatctl("rl-step", *args(root, root / "llama", tmp_path / "straight", *extra))
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "qatctl.cli", "rl-step", *map(str, args(root, root / "llama", killed, *extra))]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed.with_name("killed.partial") / "state"
    deadline = time.time() + 300
    while not (state / "iter-000002").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not killed.exists()
    p = qatctl("rl-step", *args(root, root / "llama", killed, *extra))
    assert "resuming from" in p.stderr
    for name in ("model.safetensors", "trainer_state/masters.safetensors", "trainer_state/optimizer.safetensors"):
        assert tensors_equal(load_file(tmp_path / "straight" / name), load_file(killed / name)), name
    strip = lambda ms: [{k: v for k, v in m.items() if not k.startswith("seconds_") and "per_s" not in k}  # noqa: E731
                        for m in ms]
    assert strip(metrics_of(killed)) == strip(metrics_of(tmp_path / "straight"))
    assert rows_of(killed) == rows_of(tmp_path / "straight")


def test_dynamic_sampling_drops_groups_without_signal(root, tmp_path):
    m = json.loads(qatctl("rl-step", *args(root, root / "llama", tmp_path / "o", reward="even_answers_only"),
                          "--max-sampling-rounds", "6", "--json").stdout)["metrics"]
    rows = rows_of(tmp_path / "o")
    groups = {}
    for r in rows:
        groups.setdefault(r["slot"], []).append(r)
    flat = [g for g in groups.values() if len({r["reward"] for r in g}) == 1]
    assert any(int(g[0]["answer"]) % 2 for g in groups.values())  # odd answers were drawn ...
    assert m["groups_drawn"] == len(groups) and m["groups_dropped"] == len(flat) > 0  # ... and dropped
    used = [g for g in groups.values() if g[0]["used"]]
    assert len(used) == m["informative_groups"] == 4
    assert all(len({r["reward"] for r in g}) > 1 and int(g[0]["answer"]) % 2 == 0 for g in used)
    assert all(not r["used"] for g in flat for r in g)
    assert m["update_sequences"] == sum(1 for g in used for r in g if r["output_ids"] and r["advantage"] != 0)
    assert m["sampling_rounds"] > 1
    # Without dynamic sampling the flat groups are kept (and carry no gradient).
    m2 = json.loads(qatctl("rl-step", *args(root, root / "llama", tmp_path / "plain", reward="even_answers_only"),
                           "--no-dynamic-sampling", "--json").stdout)["metrics"]
    assert m2["groups_drawn"] == 4 and m2["groups_dropped"] == 0 and m2["sampling_rounds"] == 1


def test_bf16_arm_rolls_out_dense_bf16(root, tmp_path):
    m = json.loads(qatctl("rl-step", *args(root, root / "llama", tmp_path / "o"), "--rollout-precision", "bf16",
                          "--iterations", "2", "--json").stdout)
    assert m["training"] == {"fake_quant": False, "fake_quant_after": 0, "arm": "bf16"}
    assert m["metrics"]["rollout_engine"]["kernel"] == "dense bfloat16 matmul"
    assert m["metrics"]["fake_quant"] is False and m["metrics"]["arm"] == "bf16"
    qat = json.loads(qatctl("rl-step", *args(root, root / "llama", tmp_path / "q"), "--json").stdout)
    from qatctl.engines import kernels

    assert qat["metrics"]["rollout_engine"]["kernel"].startswith("native W4A16") if kernels.available() else \
        qat["metrics"]["rollout_engine"]["kernel"] == "aten._weight_int4pack_mm_for_cpu"
    assert qat["training"]["arm"] == "int4-qat"


def test_engine_url_pushes_every_iteration(root, tmp_path):
    """With --engine-url each iteration's INT4 checkpoint is written and pushed with a
    weight_version; the rollouts equal the in-process run's."""
    import httpx
    from test_serve import Served

    make_int4(root / "llama", tmp_path / "int4")
    local = tmp_path / "local"
    qatctl("rl-step", *args(root, root / "llama", local, "--iterations", "2"))
    server = Served(tmp_path / "int4")
    try:
        remote = tmp_path / "remote"
        qatctl("rl-step", *args(root, root / "llama", remote, "--iterations", "2"), "--engine-url", server.url,
               "--rollout-model", tmp_path / "int4")
        info = httpx.get(server.url + "/get_model_info").json()
    finally:
        server.stop()
    assert info["model_path"].endswith("remote.partial/sync/iter-000001")  # pushed after iteration 1
    assert info["weight_version"] == "1"
    assert [(r["output_ids"], r["rollout_logprobs"]) for r in rows_of(local)] == \
        [(r["output_ids"], r["rollout_logprobs"]) for r in rows_of(remote)]
    assert not (tmp_path / "remote.partial").exists()


def test_bad_input(root, tmp_path):
    out = tmp_path / "o"
    base = args(root, root / "llama", out)
    assert_usage_error(qatctl("rl-step", *base, "--iterations", "0", check=False), "--iterations 0", absent=[out])
    assert_usage_error(qatctl("rl-step", *base, "--iterations", "2", "--save-every", "3", check=False),
                       "--save-every 3", absent=[out])
    assert_usage_error(qatctl("rl-step", *base, "--rollout-precision", "fp8", check=False),
                       "--rollout-precision", absent=[out])
    assert_usage_error(qatctl("rl-step", *base, "--lr", "nan", check=False), "--lr nan", absent=[out])
    assert_usage_error(qatctl("rl-step", *base, "--clip-eps", "inf", check=False), "--clip-eps", absent=[out])
    # Optimizer state of another shape in the input's trainer_state.
    qatctl("rl-step", *args(root, root / "llama", tmp_path / "p1"))
    opt = tmp_path / "p1" / "trainer_state" / "optimizer.safetensors"
    state = load_file(opt)
    key = next(k for k in state if k.endswith("q_proj.weight.exp_avg"))
    state[key] = state[key][:, :64].contiguous()
    save_file(state, opt)
    redigest(tmp_path / "p1")
    assert_usage_error(qatctl("rl-step", *args(root, tmp_path / "p1", out), check=False), "optimizer.safetensors",
                       "another model", absent=[out])
    # A reward function that raises is the user's error, reported on one line.
    (tmp_path / "bad.py").write_text("def boom(c, a):\n    raise ValueError('nope')\n")
    p = qatctl("rl-step", root / "llama", "--prompts", ARITH, "--out", out, "--reward", f"{tmp_path / 'bad.py'}:boom",
               "--max-new-tokens", "4", check=False)
    assert_usage_error(p, "reward function raised ValueError: nope", absent=[out])


@pytest.mark.parametrize("precision, fake_quant", [("bf16", False), ("int4", False), ("int4", True)])
def test_trainer_computes_with_the_weights_the_engine_holds(root, precision, fake_quant, tmp_path):
    """After an update the fp32 masters are no longer BF16 values; the trainer's forward must
    still see exactly the BF16 weights synced to the engine (their fake-quant view when QAT), or
    train/rollout mismatch grows with every iteration (measured on SmolLM2's BF16 arm: 0.0025 ->
    0.05-0.25 mean |dlogp| before the BF16 view)."""
    from qatctl import data, models
    from qatctl.artifacts import read_artifact
    from qatctl.int4format import Int4Reader
    from qatctl.quant import QuantScheme
    from qatctl.rl.rewards import load_reward
    from qatctl.rl.session import Session
    from stages.rl_step import RlStepConfig

    c = RlStepConfig(policy=root / "llama", out=tmp_path / "o", prompts=ARITH, prompts_per_step=4,
                     samples_per_prompt=4, max_new_tokens=8, lr=1e-3, iterations=2, rollout_precision=precision,
                     no_fake_quant=not fake_quant, reward=f"{root / 'rw.py'}:odd_length")
    policy = read_artifact(c.policy)
    scheme = QuantScheme.from_manifest(policy.manifest["quant"])
    tok = models.load_tokenizer(c.policy)
    s = Session(c, policy, None, None, scheme, tok, data.load_prompts(ARITH, tok, need_answer=False),
                load_reward(c.reward))
    received = []  # what the engine is handed at each sync
    real = s.engine.update_weights
    s.engine.update_weights = lambda tensors: (received.append(tensors), real(tensors))[1]
    s.loop.iteration_step()  # one update and one sync
    assert len(received) == 1
    engine_view = Int4Reader.from_tensors(received[0], scheme.group_size)
    assert engine_view.int4 == (precision == "int4")
    checked = 0
    for name, mod in s.model.named_modules():
        w = getattr(mod, "weight", None)
        if w is None or not engine_view.has(f"{name}.weight") and not engine_view.is_quantized(name):
            continue
        seen = w.detach()  # what the trainer's forward computes with (the fake-quant view under QAT)
        held = engine_view.weight(name).float()  # what the engine computes with
        if precision == "int4" and not fake_quant and engine_view.is_quantized(name):
            # the PTQ arm: the trainer sees BF16, the engine its INT4 conversion; they differ by design
            assert not torch.equal(seen, held), name
        else:
            assert torch.equal(seen, held), name
        checked += 1
    assert checked >= 7 * 2  # every linear of both layers at least
    # the masters moved off BF16 values, so equality above is the BF16 view's doing, not a no-op
    assert any(not torch.equal(p.detach().bfloat16().float(), p.detach()) for p in s.model.parameters())


def test_bf16_compute_dtype_autocasts_the_update_and_scoring(root, tmp_path):
    """--compute-dtype bf16: every training-side forward (the update's and scoring-only passes)
    runs its matmuls in BF16 over the fp32 masters, except the CPU lm_head, which stays the fp32
    matmul the CPU engine computes; the context restores the module afterwards."""
    from qatctl import data, models
    from qatctl.artifacts import read_artifact
    from qatctl.quant import QuantScheme
    from qatctl.rl.rewards import load_reward
    from qatctl.rl.session import Session
    from qatctl.train import resolve_compute_dtype
    from stages.rl_step import RlStepConfig

    def session(dtype):
        c = RlStepConfig(policy=root / "llama", out=tmp_path / dtype, prompts=ARITH, prompts_per_step=4,
                         samples_per_prompt=4, max_new_tokens=8, lr=1e-3, mini_batches=2, compute_dtype=dtype,
                         reward=f"{root / 'rw.py'}:odd_length")
        policy = read_artifact(c.policy)
        tok = models.load_tokenizer(c.policy)
        return Session(c, policy, None, None, QuantScheme.from_manifest(policy.manifest["quant"]), tok,
                       data.load_prompts(ARITH, tok, need_answer=False), load_reward(c.reward))

    seen = []
    ids = torch.tensor([[5, 6, 7, 8]])
    s = session("bf16")
    assert s.compute_dtype == "bf16" and s.trainer.compute_dtype == "bf16"
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: seen.append((name, o.dtype)))
             for name, m in s.model.named_modules() if name.endswith(("q_proj", "down_proj", "lm_head"))]
    with s.loop.compute(s.model):
        s.model(input_ids=ids)
    inside, seen[:] = dict(seen), []
    s.model(input_ids=ids)
    outside = dict(seen)
    for h in hooks:
        h.remove()
    assert inside["model.layers.0.self_attn.q_proj"] == inside["model.layers.1.mlp.down_proj"] == torch.bfloat16
    assert inside["lm_head"] == torch.float32
    assert set(outside.values()) == {torch.float32} and "forward" not in s.model.lm_head.__dict__
    # scoring-only passes (old-policy logprobs for later mini-batches) equal the update's forward
    from qatctl.rl.loop import _completion_logprobs

    rows = [{"prompt_ids": [5, 6, 7], "output_ids": [8, 9, 10, 11]}, {"prompt_ids": [12, 13], "output_ids": [14]}]
    s.loop._score_only([rows])
    with s.trainer.compute():
        logp, *_ = _completion_logprobs(s.model, rows, s.loop.pad_id, s.device)
    assert [r["train_logprobs"] for r in rows] == [logp[0, 1:5].tolist(), logp[1, :1].tolist()]
    plain, *_ = _completion_logprobs(s.model, rows, s.loop.pad_id, s.device)
    assert not torch.equal(plain, logp)
    # eval-consistency's train side is the same scoring: the same rows in one batch, the same bits
    from qatctl.consistency import train_logprobs

    with s.trainer.compute():
        lps, _ = train_logprobs(s.model, [r["prompt_ids"] for r in rows], [r["output_ids"] for r in rows],
                                batch=len(rows), pad_id=s.loop.pad_id)
    assert lps == [r["train_logprobs"] for r in rows]
    _, bf16_metrics = s.loop.iteration_step()
    _, fp32_metrics = session("fp32").loop.iteration_step()
    assert bf16_metrics["optimizer_steps"] == 2 and bf16_metrics["grad_norm"] != fp32_metrics["grad_norm"]
    assert bf16_metrics["train_rollout_logprob_abs_diff_mean"] < 0.05
    assert resolve_compute_dtype("auto", torch.device("cpu")) == "fp32"
    assert resolve_compute_dtype("auto", torch.device("cuda")) == "bf16"
    with pytest.raises(Exception, match="--compute-dtype fp32"):
        resolve_compute_dtype("fp32", torch.device("cuda"))


def test_compute_dtype_bad_input_and_manifest(root, tmp_path):
    out = tmp_path / "o"
    assert_usage_error(qatctl("rl-step", *args(root, root / "llama", out), "--compute-dtype", "fp16", check=False),
                       "--compute-dtype 'fp16'", absent=[out])
    qatctl("rl-step", *args(root, root / "llama", out), "--compute-dtype", "bf16")
    assert json.loads((out / "qatctl.json").read_text())["config"]["compute_dtype"] == "bf16"


def test_seeds_draw_independent_prompt_orders_and_a_seed_reproduces(root, tmp_path):
    """--seed sets the prompt order (a per-seed shuffle, not file order) as well as sampling; the
    same seed reproduces a run bit for bit; --prompt-order file keeps file order."""
    from qatctl.rl.settings import prompt_index

    runs = {}
    for name, extra in (("s0", ["--seed", "0"]), ("s0-again", ["--seed", "0"]), ("s1", ["--seed", "1"]),
                        ("s0-width3", ["--seed", "0", "--max-batch", "3"]),
                        ("file", ["--seed", "0", "--prompt-order", "file", "--no-dynamic-sampling"])):
        qatctl("rl-step", *args(root, root / "llama", tmp_path / name, "--iterations", "2", *extra))
        runs[name] = [r["prompt_index"] for r in rows_of(tmp_path / name) if r["sample"] == 0]
    assert runs["s0"] == runs["s0-again"] and runs["s0"] != runs["s1"]
    assert runs["s0"][:4] != [0, 1, 2, 3] and runs["file"] == list(range(8))
    for name in ("model.safetensors", "trainer_state/masters.safetensors", "trainer_state/optimizer.safetensors"):
        assert tensors_equal(load_file(tmp_path / "s0" / name), load_file(tmp_path / "s0-again" / name)), name
        # the rollout width (serve's --max-batch) changes speed only: the engine is batch-invariant
        assert tensors_equal(load_file(tmp_path / "s0" / name), load_file(tmp_path / "s0-width3" / name)), name
    assert runs["s0-width3"] == runs["s0"]
    width = json.loads((tmp_path / "s0-width3" / "qatctl.json").read_text())["metrics"]["rollout_engine"]
    assert width["max_batch"] == 3
    assert_usage_error(qatctl("rl-step", *args(root, root / "llama", tmp_path / "x", "--max-batch", "0"),
                              check=False), "--max-batch 0")
    m = json.loads((tmp_path / "s0" / "qatctl.json").read_text())["metrics"]
    assert m["prompt_order"] == "shuffle" and m["threads"] >= 1 and m["compute_dtype"]
    # every pass over the prompts is a new permutation of all of them
    n = 50
    passes = [[prompt_index(e * n + i, n, 3, "shuffle") for i in range(n)] for e in range(2)]
    assert sorted(passes[0]) == sorted(passes[1]) == list(range(n)) and passes[0] != passes[1]
    assert_usage_error(qatctl("rl-step", *args(root, root / "llama", tmp_path / "x", "--prompt-order", "random"),
                              check=False), "--prompt-order 'random'")


def test_sft_data_order_follows_the_seed():
    from qatctl.data import step_examples

    orders = {seed: [step_examples(100, step, 8, seed) for step in range(3)] for seed in (0, 1)}
    assert orders[0] != orders[1]
    assert orders[0] == [step_examples(100, step, 8, 0) for step in range(3)]
