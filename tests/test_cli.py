"""The CLI through real subprocesses: instant help, inspect, and bad input -> one line, exit 2."""

import json
import subprocess
import sys

import torch

from conftest import qatctl, redigest


def hf_folder(path, hidden=128, nan=False):
    """A plain HF Llama folder (not a qatctl artifact), optionally broken."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qatctl.models import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32, head_dim=32)
    model = LlamaForCausalLM(cfg)
    if nan:
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_help_is_instant_and_imports_no_torch():
    code = "import sys, qatctl.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    for flag in ("-h", "--help"):
        p = qatctl(flag)
        assert "init-qat" in p.stdout and "convert-int4" in p.stdout and "inspect" in p.stdout
    assert qatctl("--version").stdout.strip().startswith("qatctl ")
    assert "--group-size" in qatctl("init-qat", "-h").stdout


def test_quant_defaults_are_written_once():
    """init-qat's --group-size/--scale-rule defaults are QuantScheme's fields (qatctl/scheme.py,
    torch-free: the CLI reads them at start-up), the class the quantizer re-exports."""
    from qatctl import quant, scheme
    from stages.init_qat import InitQatConfig

    assert quant.QuantScheme is scheme.QuantScheme
    d = scheme.QuantScheme()
    assert (InitQatConfig.group_size, InitQatConfig.scale_rule) == (d.group_size, d.scale_rule)


def assert_usage_error(p, *fragments, absent=()):
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    for path in absent:
        assert not path.exists() and not path.with_name(path.name + ".partial").exists()


def test_bad_inputs_exit_2_one_line_nothing_written(tmp_path, tiny_pairs):
    out = tmp_path / "out"
    assert_usage_error(qatctl("convert-int4", tmp_path / "nope", "--out", out, check=False),
                       "nope: no such file or directory", absent=[out])
    _, int4 = tiny_pairs["tiny-llama"]
    assert_usage_error(qatctl("convert-int4", int4, "--out", out, check=False),
                       "is a 'int4-checkpoint'", "expected a 'qat-checkpoint'", absent=[out])
    assert_usage_error(qatctl("init-qat", "llama-9000b", "--out", out, check=False),
                       "llama-9000b: unknown preset", "smollm2-135m", absent=[out])
    assert_usage_error(qatctl("init-qat", "tiny-llama", "--out", out, "--group-size", "48", check=False),
                       "group_size=48", absent=[out])
    assert_usage_error(qatctl("init-qat", "tiny-llama", "--out", out, "--scale-rule", "absmax", check=False),
                       "scale_rule='absmax'", absent=[out])
    assert_usage_error(qatctl("init-qat", "tiny-llama", "--out", out, "--preset-targets", "nope", check=False),
                       "--preset-targets 'nope'", absent=[out])
    odd = hf_folder(tmp_path / "hidden96", hidden=96)
    assert_usage_error(qatctl("init-qat", odd, "--out", out, "--group-size", "64", check=False),
                       "model.layers.0.self_attn.q_proj: input dimension 96", "group_size 64", absent=[out])
    broken = hf_folder(tmp_path / "nan", nan=True)
    assert_usage_error(qatctl("init-qat", broken, "--out", out, check=False),
                       "model.layers.0.mlp.up_proj: 1 NaN/Inf", absent=[out])


def test_nan_in_qat_checkpoint_stops_convert(tmp_path, tiny_pairs):
    import shutil

    from safetensors.torch import load_file, save_file

    ckpt, _ = tiny_pairs["tiny-llama"]
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("inf")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    redigest(bad)
    out = tmp_path / "int4"
    assert_usage_error(qatctl("convert-int4", bad, "--out", out, check=False),
                       "model.layers.1.self_attn.o_proj.weight: NaN/Inf", absent=[out])


def test_debug_shows_traceback(tmp_path):
    p = qatctl("--debug", "convert-int4", tmp_path / "nope", "--out", tmp_path / "o", check=False)
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_rerun_is_up_to_date_and_inspect(tmp_path):
    out = tmp_path / "ckpt"
    first = json.loads(qatctl("init-qat", "tiny-llama", "--out", out, "--json").stdout)
    again = qatctl("init-qat", "tiny-llama", "--out", out)
    assert "up to date" in again.stderr
    assert json.loads((out / "qatctl.json").read_text())["created"] == first["created"]
    p = qatctl("init-qat", "tiny-llama", "--out", out, "--group-size", "64", check=False)
    assert_usage_error(p, "--force")
    qatctl("init-qat", "tiny-llama", "--out", out, "--group-size", "64", "--force")
    m = json.loads(qatctl("inspect", out, "--json").stdout)
    assert m["kind"] == "qat-checkpoint" and m["quant"]["group_size"] == 64
    table = qatctl("inspect", out).stderr
    assert "quant.group_size" in table and "sqnr_db" in table


def test_every_option_is_a_config_field_with_its_default():
    """Each option is written once: the parameter is named after its stage config's field and
    takes the field's default; every field a user may set has an option."""
    import dataclasses
    import inspect

    from qatctl import cli

    commands = {"init_qat": cli.InitQatConfig, "convert_int4": cli.ConvertInt4Config,
                "train_sft_qat": cli.TrainSftQatConfig, "rl_step": cli.RlStepConfig,
                "eval_consistency": cli.EvalConsistencyConfig, "serve": cli.ServeConfig}
    internal = {"sglang_args"}  # filled from the arguments after `--`
    for name, cls in commands.items():
        params = {p.name: p for p in inspect.signature(getattr(cli, name)).parameters.values()}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        extra = set(params) - set(fields) - {"json_", "ctx"}
        assert not extra, (name, extra)
        assert not set(fields) - set(params) - internal, (name, set(fields) - set(params))
        for field in fields.values():
            p = params.get(field.name)
            if p is None or p.default is inspect.Parameter.empty or p.default is ...:
                continue
            want = field.default if field.default is not dataclasses.MISSING else None
            if field.name in ("ignore",):  # a list option for a tuple field
                want = None if not want else list(want)
            assert p.default == want, (name, field.name, p.default, want)


def test_a_distributed_stage_ends_its_process_group(tmp_path):
    """A stage that ran under a process group destroys it before the process exits (gloo's threads
    alive at interpreter finalization abort a rank: SIGABRT after a resumed ZeRO-3 run in CI)."""
    script = f"""
import torch.distributed as dist
from qatctl import cli
dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0, world_size=1)
def stage(config):
    dist.barrier()
    return {{"status": "complete"}}
assert cli._run(stage, None) == {{"status": "complete"}}
print("initialized after the stage:", dist.is_initialized())
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "initialized after the stage: False" in p.stdout
