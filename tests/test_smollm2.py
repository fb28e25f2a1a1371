"""The real SmolLM2-135M-Instruct through the CLI: init-qat -> convert-int4, read back by
transformers + compressed-tensors, and a kill -9 mid-conversion."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, qatctl
from qatctl import models
from qatctl.artifacts import MANIFEST, read_artifact
from qatctl.quant import QuantScheme

pytestmark = pytest.mark.slow


def test_chain_manifests(smollm2_pair):
    ckpt, int4 = smollm2_pair
    m = read_artifact(ckpt, "qat-checkpoint").manifest
    assert m["inputs"][0]["kind"] == "preset" and m["inputs"][0]["path"].endswith(".gguf")
    assert m["metrics"]["quantized_tensors"] == 210 and len(m["metrics"]["sqnr_db_per_tensor"]) == 210
    assert 15 < m["metrics"]["sqnr_db"] < 30  # INT4 g32 on real weights is ~20 dB
    cfg = json.loads((ckpt / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16" and cfg["model_type"] == "llama"
    c = read_artifact(int4, "int4-checkpoint").manifest["metrics"]
    assert c["quantized_tensors"] == 210 and c["bytes_out"] < c["bytes_in"] / 2 and c["seconds"] > 0
    assert c["ignore"] == ["lm_head"]


def test_int4_greedy_tokens_and_logits_match_fake_quant(smollm2_pair):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    ckpt, int4 = smollm2_pair
    scheme = QuantScheme.from_manifest(read_artifact(ckpt).manifest["quant"])
    ref, tok = models.load_checkpoint(ckpt)
    assert models.materialize_fake_quant(ref, scheme) == 210
    dec = AutoModelForCausalLM.from_pretrained(int4, dtype=torch.bfloat16,
                                               quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    got = dec.state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(v.to(torch.bfloat16), got[k]), k
    dec = dec.float()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = prompt["input_ids"]
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, dec(ids).logits)
        a = ref.generate(ids, max_new_tokens=16, do_sample=False, attention_mask=prompt["attention_mask"])
        b = dec.generate(ids, max_new_tokens=16, do_sample=False, attention_mask=prompt["attention_mask"])
    assert a.shape[1] == ids.shape[1] + 16 or tok.eos_token_id in a[0, ids.shape[1]:]
    assert torch.equal(a, b), (tok.decode(a[0, ids.shape[1]:]), tok.decode(b[0, ids.shape[1]:]))


def test_kill_9_during_convert_leaves_no_complete_looking_folder(smollm2_pair, tmp_path):
    ckpt, _ = smollm2_pair
    out = tmp_path / "int4"
    partial = tmp_path / "int4.partial"
    proc = subprocess.Popen([sys.executable, "-m", "qatctl.cli", "convert-int4", str(ckpt), "--out", str(out)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not partial.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert partial.exists(), "conversion never started building its partial folder"
    time.sleep(0.5)  # mid-conversion: the 135M model takes seconds
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert not (partial / MANIFEST).exists()
    qatctl("convert-int4", ckpt, "--out", out)  # a re-run cleans up and completes
    assert read_artifact(out, "int4-checkpoint").manifest["status"] == "complete"
    assert not partial.exists()
