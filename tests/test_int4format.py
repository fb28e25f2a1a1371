"""qatctl/int4format.py is the one writer and reader of an int4-checkpoint: convert-int4 and the
in-memory writer (rl-step's sync, the ablation) give the same files, the stage that wrote one is
named in its manifest, the reader returns the fake-quant weights to the bit; and the engine
package imports no training module (by import graph)."""

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

from conftest import REPO
from qatctl import models
from qatctl.artifacts import read_artifact
from qatctl.int4format import SIDE_FILES, Int4Reader, int4_tensors, write_int4_checkpoint
from qatctl.quant import QuantScheme, fake_quant_value, is_target


def test_in_memory_writer_equals_convert_int4_file_for_file(tiny_pairs, tmp_path):
    ckpt, int4 = tiny_pairs["tiny-llama"]
    scheme = QuantScheme.from_manifest(read_artifact(ckpt).manifest["quant"])
    model, _ = models.load_checkpoint(ckpt)
    m = write_int4_checkpoint(int4_tensors(models.disk_state_dict(model), scheme), ckpt, tmp_path / "mem", scheme,
                              note={"x": 1}, stage="eval-consistency")
    assert m["stage"] == "eval-consistency" and m["kind"] == "int4-checkpoint"
    disk = read_artifact(int4).manifest
    assert sorted(m["files"]) == sorted(disk["files"])  # one side-file rule
    assert all(f.startswith(SIDE_FILES) or f in ("config.json", "model.safetensors") for f in m["files"])
    a, b = load_file(tmp_path / "mem" / "model.safetensors"), load_file(int4 / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "mem" / "config.json").read_text()) == json.loads((int4 / "config.json").read_text())


def test_reader_returns_the_fake_quant_weights_bit_for_bit(tiny_pairs):
    ckpt, int4 = tiny_pairs["tiny-qwen3"]
    scheme = QuantScheme.from_manifest(read_artifact(ckpt).manifest["quant"])
    train, infer = Int4Reader.from_folder(ckpt), Int4Reader.from_folder(int4)
    assert infer.int4 and infer.group_size == scheme.group_size and not train.int4
    n = 0
    for key in sorted(train.keys):
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and train.tensor(key).ndim == 2 and is_target(module, scheme):
            assert infer.is_quantized(module)
            assert torch.equal(infer.weight(module), fake_quant_value(train.tensor(key).bfloat16(), scheme)), module
            n += 1
    assert n > 0


def test_the_engine_imports_no_training_module(tiny_pairs):
    code = f"""
import sys
from qatctl.engines import SamplingParams, load_engine
e = load_engine({str(tiny_pairs["tiny-llama"][1])!r})
e.generate([[5, 6]], SamplingParams(max_new_tokens=2))
import qatctl.server
print(" ".join(sorted(m for m in sys.modules if m.startswith(("qatctl", "stages")))))
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    loaded = set(p.stdout.split())
    training = {"qatctl.train", "qatctl.state", "qatctl.rl.loop", "qatctl.rl.session", "qatctl.rl.loss", "qatctl.rl.rewards", "qatctl.rl.settings", "qatctl.models",
                "qatctl.dscheckpoint", "qatctl.consistency", "qatctl.ablation"}
    assert "qatctl.engines.embedded" in loaded and not loaded & training, loaded & training
    assert not any(m.startswith("stages") for m in loaded)


def test_stages_are_imported_only_by_the_cli_and_bench():
    import ast

    for path in sorted((REPO / "qatctl").rglob("*.py")):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "stages" or n.startswith("stages.") for n in names), path
