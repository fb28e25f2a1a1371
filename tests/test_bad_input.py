"""Every bad input is exit 2 and one `error:` line naming the file or option, with no traceback
and nothing written (table-driven: add a row whenever a stage reads a new input); outputs are
safe (no overlap with inputs, strangers' folders kept, one run per --out); resume state holds no
pickle and falls back to the older state when the newest is corrupt."""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
from test_cli import assert_usage_error, hf_folder

from conftest import REPO, make_int4, make_tiny, qatctl

ARITH = REPO / "recipes/data/arith-train.jsonl"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Good tiny artifacts and broken copies of them."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("bad")
    good = root / "good"
    make_tiny("tiny-llama", good)
    make_int4(good, root / "int4")
    weights = good / "model.safetensors"

    def broken(name, fix):
        folder = root / name
        shutil.copytree(good if not name.startswith("int4") else root / "int4", folder)
        fix(folder)
        if name != "swapped":  # a manifest that agrees with the broken files: the readers' own checks
            from qatctl.artifacts import sha256_file

            m = json.loads((folder / "qatctl.json").read_text())
            m["files"] = {n: sha256_file(folder / n) for n in m["files"]}
            (folder / "qatctl.json").write_text(json.dumps(m))
        return folder

    raw = weights.read_bytes()
    broken("trunc", lambda f: (f / "model.safetensors").write_bytes(raw[: len(raw) // 2]))
    broken("empty", lambda f: (f / "model.safetensors").write_bytes(b""))
    broken("garbage", lambda f: (f / "model.safetensors").write_bytes(os.urandom(4096)))
    broken("badcfg", lambda f: (f / "config.json").write_text("{not json"))
    broken("badtok", lambda f: (f / "tokenizer.json").write_text("garbage"))
    int4_raw = (root / "int4" / "model.safetensors").read_bytes()
    broken("int4-trunc", lambda f: (f / "model.safetensors").write_bytes(int4_raw[:1000]))

    def nan(f):
        sd = load_file(f / "model.safetensors")
        sd["model.layers.0.mlp.up_proj.weight"][1, 2] = float("nan")
        save_file(sd, f / "model.safetensors", metadata={"format": "pt"})

    broken("nan", nan)
    broken("swapped", nan)  # a weight file changed after the manifest was written
    (root / "nonutf8.jsonl").write_bytes(b'{"prompt": "caf\xe9", "answer": "1"}\n')
    (root / "rollouts.jsonl").write_text(json.dumps({"prompt_ids": [1, 2], "output_ids": [3, 10**9]}) + "\n")
    (root / "afile").write_text("x")
    hf = hf_folder(root / "hf")
    (root / "hf-trunc").mkdir()
    for p in hf.iterdir():
        shutil.copy(p, root / "hf-trunc" / p.name)
    (root / "hf-trunc" / "model.safetensors").write_bytes((hf / "model.safetensors").read_bytes()[:2000])
    return root


def sft(ckpt, *extra, data=ARITH):
    return ["train-sft-qat", ckpt, "--data", data, "--steps", "1", "--batch-size", "2", "--micro-batch", "2", *extra]


def rl(ckpt, *extra, prompts=ARITH):
    return ["rl-step", ckpt, "--prompts", prompts, "--max-new-tokens", "4", "--samples-per-prompt", "2",
            "--prompts-per-step", "1", *extra]


# (case id, argv builder given the fixture root, fragments of the one error line)
CASES = [
    ("convert truncated safetensors", lambda r: ["convert-int4", r / "trunc"], ["trunc/model.safetensors",
                                                                                  "not a readable safetensors"]),
    ("convert swapped weight file", lambda r: ["convert-int4", r / "swapped"],
     ["swapped/model.safetensors", "sha256 differs from the one in qatctl.json"]),
    ("rl swapped weight file", lambda r: rl(r / "swapped"), ["sha256 differs"]),
    ("convert empty safetensors", lambda r: ["convert-int4", r / "empty"], ["not a readable safetensors"]),
    ("convert corrupt safetensors", lambda r: ["convert-int4", r / "garbage"], ["not a readable safetensors"]),
    ("convert garbage config", lambda r: ["convert-int4", r / "badcfg"], ["config.json: not valid JSON"]),
    ("init-qat truncated HF folder", lambda r: ["init-qat", r / "hf-trunc"], ["not a readable safetensors"]),
    ("sft truncated safetensors", lambda r: sft(r / "trunc"), ["not a readable safetensors"]),
    ("sft garbage tokenizer", lambda r: sft(r / "badtok"), ["badtok: the tokenizer does not load"]),
    ("sft non-UTF-8 data", lambda r: sft(r / "good", data=r / "nonutf8.jsonl"), ["nonutf8.jsonl:1: not UTF-8"]),
    ("sft NaN in the checkpoint", lambda r: sft(r / "nan"), ["mlp.up_proj.weight: 1 NaN/Inf"]),
    ("sft epochs nan", lambda r: ["train-sft-qat", r / "good", "--data", ARITH, "--epochs", "nan"], ["--epochs nan"]),
    ("sft lr inf", lambda r: sft(r / "good", "--lr", "inf"), ["--lr inf"]),
    ("sft negative warmup", lambda r: sft(r / "good", "--warmup-steps", "-3"), ["--warmup-steps -3"]),
    ("sft negative min lr ratio", lambda r: sft(r / "good", "--min-lr-ratio", "-1"), ["--min-lr-ratio -1"]),
    ("sft grad norm nan", lambda r: sft(r / "good", "--max-grad-norm", "nan"), ["--max-grad-norm nan"]),
    ("rl truncated safetensors", lambda r: rl(r / "trunc"), ["not a readable safetensors"]),
    ("rl garbage tokenizer", lambda r: rl(r / "badtok"), ["the tokenizer does not load"]),
    ("rl non-UTF-8 prompts", lambda r: rl(r / "good", prompts=r / "nonutf8.jsonl"), ["not UTF-8"]),
    ("rl NaN in the policy", lambda r: rl(r / "nan"), ["NaN/Inf"]),
    ("rl lr inf", lambda r: rl(r / "good", "--lr", "inf"), ["--lr inf"]),
    ("rl clip nan", lambda r: rl(r / "good", "--clip-eps", "nan"), ["--clip-eps nan"]),
    ("rl tis nan", lambda r: rl(r / "good", "--tis-cap", "nan"), ["--tis-cap nan"]),
    ("rl temperature nan", lambda r: rl(r / "good", "--temperature", "nan"), ["--temperature nan"]),
    ("eval truncated train side", lambda r: ["eval-consistency", r / "trunc", r / "int4", "--prompts", ARITH],
     ["not a readable safetensors"]),
    ("eval rollout ids out of range", lambda r: ["eval-consistency", r / "good", r / "int4", "--prompts", ARITH,
                                                 "--rollouts", r / "rollouts.jsonl"], ["rollouts.jsonl:1", "outside"]),
    ("eval temperature nan", lambda r: ["eval-consistency", r / "good", r / "int4", "--prompts", ARITH,
                                        "--temperature", "nan"], ["--temperature nan"]),
    ("accuracy truncated int4", lambda r: ["accuracy", r / "int4-trunc", "--prompts", ARITH],
     ["not a readable safetensors"]),
    ("accuracy limit 0", lambda r: ["accuracy", r / "int4", "--prompts", ARITH, "--limit", "0"], ["--limit 0"]),
    ("accuracy limit -1", lambda r: ["accuracy", r / "int4", "--prompts", ARITH, "--limit", "-1"], ["--limit -1"]),
    ("accuracy unknown device", lambda r: ["accuracy", r / "int4", "--prompts", ARITH, "--device", "tpu"],
     ["--device 'tpu'", "auto, cpu or cuda"]),
    ("serve truncated int4", lambda r: ["serve", r / "int4-trunc", "--port", "1"], ["not a readable safetensors"]),
    ("usage: missing argument", lambda r: ["convert-int4"], ["Missing argument"]),
    ("usage: not an integer", lambda r: ["init-qat", "tiny-llama", "--group-size", "abc"], ["--group-size"]),
    ("usage: unknown option", lambda r: ["inspect", r / "good", "--bogus"], ["--bogus"]),
    ("out under a file", lambda r: ["convert-int4", r / "good", "--out", r / "afile" / "x"], ["afile is a file"]),
    ("out empty", lambda r: ["convert-int4", r / "good", "--out", ""], ["give a folder to create"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_table(inputs, tmp_path, case):
    _, argv, fragments = case
    args = [str(a) for a in argv(inputs)]
    out = tmp_path / "out"
    if "--out" not in args and args[0] not in ("serve", "accuracy", "inspect") and len(args) > 1:
        args += ["--out", str(out)]
    before = sorted(p.name for p in tmp_path.iterdir())
    p = qatctl(*args, check=False)
    assert_usage_error(p, *fragments, absent=[out])
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written beside it either


def test_out_equal_to_input_is_refused(inputs, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(inputs / "good", ckpt)
    before = (ckpt / "model.safetensors").read_bytes()
    for out in (ckpt, ckpt / "inside"):
        assert_usage_error(qatctl("convert-int4", ckpt, "--out", out, "--force", check=False), "or overlaps, the input")
    assert (ckpt / "model.safetensors").read_bytes() == before and (ckpt / "qatctl.json").is_file()


def test_strangers_partial_and_old_survive(inputs, tmp_path):
    out = tmp_path / "int4"
    for name in ("int4.partial", ".int4.qatctl-replaced"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "mine.txt").write_text("keep")
        assert_usage_error(qatctl("convert-int4", inputs / "good", "--out", out, check=False),
                           f"{name}: exists and was not made by qatctl")
        assert (tmp_path / name / "mine.txt").read_text() == "keep"
        shutil.rmtree(tmp_path / name)
    qatctl("convert-int4", inputs / "good", "--out", out)  # with the way clear it runs


def test_force_never_touches_the_users_own_old_folder(inputs, tmp_path):
    """--force swaps the replaced artifact through a hidden name of qatctl's own: a complete
    artifact the user keeps as OUT.old survives (it was deleted before)."""
    out = tmp_path / "int4"
    qatctl("convert-int4", inputs / "good", "--out", out)
    shutil.copytree(out, tmp_path / "int4.old")
    qatctl("init-qat", "tiny-llama", "--out", out, "--force")
    assert json.loads((tmp_path / "int4.old" / "qatctl.json").read_text())["stage"] == "convert-int4"
    assert json.loads((out / "qatctl.json").read_text())["stage"] == "init-qat"
    assert not (tmp_path / ".int4.qatctl-replaced").exists()


def test_second_run_on_one_out_fails_naming_the_holder(inputs, tmp_path):
    from qatctl.artifacts import _lock

    out = tmp_path / "int4"
    release = _lock(out)  # as a running qatctl holds it
    try:
        p = qatctl("convert-int4", inputs / "good", "--out", out, check=False)
        assert_usage_error(p, "in use by another qatctl run", f"pid {os.getpid()}", absent=[out])
    finally:
        release()
    qatctl("convert-int4", inputs / "good", "--out", out)


class _Payload:
    """Unpickling this writes a marker file: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path(self.marker).write_text, ("pwned",))


def test_crafted_pickle_in_resume_state_is_never_loaded(inputs, tmp_path):
    from qatctl import models, state
    from qatctl.train import OptimSettings, make_trainer

    model, _ = models.load_checkpoint(inputs / "good")
    trainer = make_trainer(model, OptimSettings(), 4, 1, 1)
    folder = tmp_path / "step-000001"
    trainer.save_state(folder, {"step": 1})
    marker = tmp_path / "marker"
    for name in ("optimizer.pt", "rng.pt", "model.pt"):  # what the old format held, now crafted
        (folder / name).write_bytes(pickle.dumps(_Payload(marker)))
    assert trainer.load_state(folder) == {"step": 1}
    assert not marker.exists()
    sources = [p for d in ("qatctl", "stages") for p in (REPO / d).rglob("*.py")]
    for p in sources:
        text = p.read_text()
        assert "pickle.load" not in text and "torch.load(" not in text, p
    assert state.read_json(folder / "state.json")["meta"] == {"step": 1}


def test_deepspeed_state_is_safetensors_and_a_crafted_pickle_is_never_loaded(tmp_path):
    """DeepSpeed's ZeRO checkpoints go through qatctl/dscheckpoint.py: its state dicts round-trip
    through safetensors + JSON exactly, and a pickle put where DeepSpeed's file was is refused
    with a one-line error naming --no-resume, never unpickled."""
    pytest.importorskip("deepspeed")
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from qatctl import dscheckpoint
    from qatctl.errors import QatctlError

    scaler = LossScaler(scale=1.0)
    sd = {"module": {"w": torch.randn(3, 4), "b": torch.arange(3)}, "zero_stage": ZeroStageEnum.weights,
          "state": {0: {"exp_avg": torch.ones(2), "step": torch.tensor(3.0)}}, "shape": torch.Size([3, 4]),
          "groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0, 1], "eps": float("inf")}],
          "dtype": torch.bfloat16, "loss_scaler": scaler, "ds_version": "0.19", "none": None}
    path = str(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    dscheckpoint.save(sd, path)
    back = dscheckpoint.load(path, map_location=torch.device("cpu"))
    assert torch.equal(back["module"]["w"], sd["module"]["w"]) and back["module"]["b"].dtype == torch.int64
    assert back["zero_stage"] is ZeroStageEnum.weights and back["state"][0]["step"].item() == 3.0
    assert back["groups"][0]["betas"] == (0.9, 0.95) and back["groups"][0]["eps"] == float("inf")
    assert back["shape"] == torch.Size([3, 4]) and back["dtype"] is torch.bfloat16
    assert isinstance(back["loss_scaler"], LossScaler) and back["loss_scaler"].cur_scale == 1.0
    with pytest.raises(QatctlError, match="without pickle"):
        dscheckpoint.save({"x": object()}, str(tmp_path / "bad.pt"))
    marker = tmp_path / "marker"
    Path(path).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(QatctlError, match="--no-resume"):
        dscheckpoint.load(path)
    assert not marker.exists()


def test_corrupt_newest_state_falls_back_then_names_no_resume(inputs, tmp_path, capsys):
    from qatctl import models, state
    from qatctl.errors import QatctlError
    from qatctl.train import OptimSettings, make_trainer
    from qatctl.trainrun import save_step

    model, _ = models.load_checkpoint(inputs / "good")
    trainer = make_trainer(model, OptimSettings(), 4, 1, 1)
    root = tmp_path / "state"
    for step in (1, 2, 3):
        save_step(trainer, root, step, {"step": step})
    assert [p.name for p in state.complete_states(root, "step")] == ["step-000003", "step-000002"]  # two kept
    masters = root / "step-000003" / state.MASTERS
    masters.write_bytes(masters.read_bytes()[:100])
    folder, meta = state.load_newest(root, "step", trainer.load_state)
    assert folder.name == "step-000002" and meta == {"step": 2}
    assert "does not load" in capsys.readouterr().err  # the warning, on stderr
    (root / "step-000002" / state.OPTIMIZER).write_bytes(b"")
    with pytest.raises(QatctlError, match="--no-resume"):
        state.load_newest(root, "step", trainer.load_state)


def test_plot_on_one_rl_step_output(inputs, tmp_path):
    (tmp_path / "rw.py").write_text("def r(c, a):\n    return float(len(c) % 2)\n")
    out = tmp_path / "p1"
    qatctl(*rl(inputs / "good", "--reward", f"{tmp_path / 'rw.py'}:r", "--iterations", "2", "--out", out))
    p = qatctl("plot", out)
    assert (tmp_path / "p1-rl-metrics.png").stat().st_size > 1000 and "wrote" in p.stderr
    assert not (out / "rl-metrics.png").exists()  # an artifact's folder is left as committed
