"""eval-consistency: matched vs mismatched pairs, the ablation grid and plots, the CI gate,
and scoring rollouts from a file."""

import json

import pytest

from conftest import REPO, make_pair, qatctl

PROMPTS = REPO / "recipes/data/arith-test.jsonl"
ARGS = ["--prompts", PROMPTS, "--limit", "6", "--max-new-tokens", "24"]


@pytest.fixture(scope="module")
def stranger_int4(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("stranger"), seed=7)[1]


def run_json(*args):
    return json.loads(qatctl("eval-consistency", *args, "--json").stdout)


def test_matched_pair_is_bit_identical_and_close(tiny_pairs, tmp_path):
    """A checkpoint and its own conversion: every quantized tensor bit-identical, and the mean
    |Δlogp| is only the CPU int4 kernel's BF16 activation rounding (measured ~5e-4 on tiny-llama;
    bound 5e-3)."""
    ckpt, int4 = tiny_pairs["tiny-llama"]
    m = run_json(ckpt, int4, *ARGS, "--out", tmp_path / "r")
    assert m["kind"] == "report" and m["train_view"] == "fake-int4"
    assert m["metrics"]["weights_identical_fraction"] == 1.0 and m["metrics"]["weights_different"] == 0
    assert 0 < m["metrics"]["mean_abs_diff"] < 5e-3 and m["metrics"]["greedy_agreement"] > 0.95
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["weight_check"]["tensors"] == 14 and "bit-identical" in (tmp_path / "r" / "report.md").read_text()


def test_mismatched_pair_is_detected(tiny_pairs, stranger_int4, tmp_path):
    ckpt, _ = tiny_pairs["tiny-llama"]
    m = run_json(ckpt, stranger_int4, *ARGS, "--out", tmp_path / "r")
    assert m["metrics"]["weights_identical_fraction"] == 0.0 and m["metrics"]["weights_different"] == 14
    assert m["metrics"]["mean_abs_diff"] > 0.05
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert "model.layers.0.self_attn.q_proj" in report["weight_check"]["different"]


def test_ablation_grid_floor_and_plots(tiny_pairs, tmp_path):
    import matplotlib.image

    ckpt, _ = tiny_pairs["tiny-qwen3"]
    m = run_json(ckpt, "--ablation", *ARGS, "--out", tmp_path / "r")
    grid = m["metrics"]["grid_mean_abs_diff"]
    assert set(grid) == {f"train {v} / rollout {r}" for v in ("fake-int4", "bf16") for r in ("int4", "bf16")}
    # Matched arms are close; both off-diagonal arms mismatch by far more.
    assert max(grid["train fake-int4 / rollout int4"], grid["train bf16 / rollout bf16"]) * 5 < min(
        grid["train bf16 / rollout int4"], grid["train fake-int4 / rollout bf16"])
    assert m["metrics"]["engine_floor_max_abs_diff"] == 0.0  # batch-invariant engine: no floor at all
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["floor"]["same_tokens"] is True and m["metrics"]["weights_identical_fraction"] == 1.0
    for png in ("abs_diff_hist.png", "abs_diff_by_position.png", "ablation_grid.png"):
        img = matplotlib.image.imread(tmp_path / "r" / png)
        assert img.ndim == 3 and img.shape[0] > 100
    assert not (tmp_path / "r" / "_arms").exists()


def test_gate_exits_1_over_threshold_0_under(tiny_pairs, tmp_path):
    ckpt, int4 = tiny_pairs["tiny-llama"]
    over = qatctl("eval-consistency", ckpt, int4, *ARGS, "--out", tmp_path / "r", "--max-abs-diff", "1e-9",
                  check=False)
    assert over.returncode == 1 and "exceeds --max-abs-diff" in over.stderr and "Traceback" not in over.stderr
    assert (tmp_path / "r" / "report.json").is_file()  # the report is written before the gate
    under = qatctl("eval-consistency", ckpt, int4, *ARGS, "--out", tmp_path / "r", "--max-abs-diff", "0.1",
                   check=False)
    assert under.returncode == 0, under.stderr


def test_scoring_rollouts_from_file_equals_generating(tiny_pairs, tmp_path):
    from qatctl import data
    from qatctl.ablation import generate, jobs
    from qatctl.engines import load_engine
    from stages.eval_consistency import EvalConsistencyConfig

    ckpt, int4 = tiny_pairs["tiny-llama"]
    generated = run_json(ckpt, int4, *ARGS, "--out", tmp_path / "g", "--seed", "5")
    engine = load_engine(int4)
    prompts = data.load_prompts(PROMPTS, engine.tokenizer, need_answer=False)[:6]
    config = EvalConsistencyConfig(train_ckpt=ckpt, infer_ckpt=int4, prompts=PROMPTS, out=tmp_path / "x",
                                   max_new_tokens=24, seed=5)
    rows = generate(engine, jobs([p.prompt_ids for p in prompts], config), config)
    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from_file = run_json(ckpt, int4, *ARGS, "--out", tmp_path / "f", "--rollouts", path)
    keys = ("mean_abs_diff", "max_abs_diff", "k3_kl", "tokens", "greedy_agreement")
    assert {k: from_file["metrics"][k] for k in keys} == {k: generated["metrics"][k] for k in keys}


def test_bad_input(tiny_pairs, tmp_path):
    from test_cli import assert_usage_error

    ckpt, int4 = tiny_pairs["tiny-llama"]
    out = tmp_path / "r"
    assert_usage_error(qatctl("eval-consistency", int4, int4, *ARGS, "--out", out, check=False),
                       "expected a 'qat-checkpoint'", absent=[out])
    assert_usage_error(qatctl("eval-consistency", ckpt, *ARGS, "--out", out, check=False),
                       "INFER_CKPT is required", absent=[out])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_ids": [1, 2], "output_ids": "x"}\n')
    assert_usage_error(qatctl("eval-consistency", ckpt, int4, *ARGS, "--out", out, "--rollouts", bad, check=False),
                       "bad.jsonl:1: 'output_ids' must be a list of token ids", absent=[out])
