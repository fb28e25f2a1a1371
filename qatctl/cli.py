"""The `qatctl` command line: one thin command per stage.

Each command parses options, builds its stage's config, calls `run(config)` and prints the
result. Expected errors (QatctlError) print one red line and exit with the error's code (2 for
bad input); `--debug` shows the traceback. Torch is imported by the stages, never here, so
`qatctl --help` is instant.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from qatctl import __version__
from qatctl.errors import QatctlError
from stages.convert_int4 import ConvertInt4Config
from stages.eval_consistency import EvalConsistencyConfig
from stages.init_qat import InitQatConfig
from stages.rl_step import RlStepConfig
from stages.serve import ServeConfig
from stages.train_sft_qat import TrainSftQatConfig

app = typer.Typer(help="INT4 QAT -> INT4 checkpoint -> INT4 rollout -> RL update, one stage at a time.",
                  context_settings={"help_option_names": ["-h", "--help"]},
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
_state = {"debug": False}

Out = Annotated[Path, typer.Option("--out", "-o", help="Output artifact folder (written atomically).")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output made with other config/inputs.")]
Json = Annotated[bool, typer.Option("--json", help="Print the manifest as JSON on stdout.")]
ComputeDtype = Annotated[str, typer.Option(help="Training matmuls: auto (bf16 on CUDA, fp32 on CPU), fp32, or bf16 "
                                                "(autocast over fp32 masters; ~1.7x faster on AVX512-BF16 CPUs).")]
# Options that several commands share, declared once (each command keeps its own default, from its config).
Device = Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")]
ClientKey = Annotated[Optional[str], typer.Option("--api-key", envvar="QATCTL_API_KEY", show_envvar=True,
                                                  help="Bearer key for --engine-url.")]
DeepSpeed = Annotated[Optional[Path], typer.Option(help="DeepSpeed JSON config (ZeRO 0-3) for the update; launch with "
                                                        "deepspeed or torchrun.")]
Reward = Annotated[str, typer.Option(help="exact-number, boxed, or module:function(completion, answer) -> float.")]


def _resume(what: str):
    return Annotated[bool, typer.Option("--resume/--no-resume", help=f"Continue a killed run from its last {what} "
                                                                      "(default) or start over.")]


def _version(value: bool):
    if value:
        typer.echo(f"qatctl {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for expected errors.")] = False,
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
):
    _state["debug"] = debug


def _run(stage_run, config):
    """Call a stage, turning expected errors into one line and an exit code.

    Stdout is reserved for data (--json): whatever libraries print while the stage runs
    (DeepSpeed logs to stdout on import, for one) goes to stderr.
    """
    import contextlib
    import os

    from qatctl.ui import console

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub
    # torch and the native kernels run OMP_NUM_THREADS threads; torch's own default follows the
    # affinity mask but not a container's CPU quota, which oversubscribes the cores it has
    # Two OpenMP runtimes share this process (torch's and the native kernels'); with the default
    # spin-wait one's idle threads burn the cores the other (or another process) needs: measured
    # 2x slower decode beside one busy process (bench/shared_cores.py). Set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    cores = _usable_cores()
    if "OMP_NUM_THREADS" not in os.environ and cores < (os.cpu_count() or cores):
        os.environ["OMP_NUM_THREADS"] = str(cores)
    if not Path("/dev/nvidia0").exists() and not Path("/dev/kfd").exists():
        # transformers imports DeepSpeed when it is installed; told it is on CPU, it does not
        # print a warning line on every stage run (its detection finds the same accelerator)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        with contextlib.redirect_stdout(sys.stderr):
            result = stage_run(config)
        if "torch.distributed" in sys.modules:  # a DeepSpeed run's process group ends with it
            from qatctl.train import end_distributed

            end_distributed()
        return result
    except QatctlError as e:
        if _state["debug"]:
            raise
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except OSError as e:  # an unwritable, full or missing path: the user's environment, not a bug
        if _state["debug"]:
            raise
        import errno

        out = getattr(config, "out", None)
        if e.errno in (errno.ENOSPC, errno.EDQUOT) and out is not None:  # the output's disk, whichever file
            message = f"--out {out}: no space left on the device while writing it (nothing was replaced)"
        else:
            message = (f"{e.filename}: " if e.filename else "") + str(e.strerror or e)
        console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except Exception as e:
        # safetensors reports a failed write (a full disk) as its own error type, not OSError
        if type(e).__name__ != "SafetensorError" or _state["debug"]:
            raise
        out = getattr(config, "out", None)
        where = f"--out {out}: " if out is not None else ""
        console.print(f"[bold red]error:[/] {where}writing safetensors failed ({str(e).splitlines()[0][:200]})",
                      highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]")
        raise typer.Exit(130) from None


def _usable_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a
    container limited to 1.5 CPUs gets 2 threads on a 64-core host, not 64)."""
    import math
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def _config(cls, scope: dict, **overrides):
    """The stage's config from a command's parameters: each option is named once (the field's
    name is the parameter's), its default lives on the field (the parameter reads it there), and
    its help on the parameter. `overrides` are the values the command converts (lists to tuples)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in scope.items() if k in names and k not in overrides}, **overrides)


def _report(manifest: dict, as_json: bool, extra_tables=()) -> None:
    from qatctl import ui

    if as_json:
        ui.emit_json(manifest)
        return
    status = "up to date" if manifest.get("up_to_date") else manifest["status"]
    rows = [("stage", manifest["stage"]), ("kind", manifest["kind"]), ("status", status),
            ("inputs", [i.get("path", i.get("name")) for i in manifest.get("inputs", [])])]
    ui.show(ui.table(manifest.get("path", "result"), rows), *extra_tables)
    metrics = {k: v for k, v in manifest.get("metrics", {}).items()
               if not isinstance(v, dict) and not (isinstance(v, list) and len(v) > 8)}
    if metrics:
        ui.show(ui.table("metrics", metrics.items(), ("metric", "value")))


@app.command("init-qat")
def init_qat(
    model: Annotated[str, typer.Argument(help="HF folder, .gguf file, or preset: smollm2-135m, tiny-llama, "
                                              "tiny-qwen3, tiny-qwen3-moe.")],
    out: Out,
    group_size: Annotated[int, typer.Option(help="Input elements per scale: 32, 64 or 128.")] = InitQatConfig.group_size,
    scale_rule: Annotated[str, typer.Option(help="kimi (amax/7, 15 levels) or minmax (amax/7.5, 16 levels).")] = InitQatConfig.scale_rule,
    ignore: Annotated[Optional[list[str]], typer.Option(help="Module left in BF16 (name, prefix or re:regex); repeatable.")] = None,
    preset_targets: Annotated[Optional[str], typer.Option(help="kimi-experts: quantize routed experts only.")] = InitQatConfig.preset_targets,
    seed: Annotated[int, typer.Option(help="Seed for the tiny random presets.")] = InitQatConfig.seed,
    force: Force = False,
    json_: Json = False,
):
    """Make a qat-checkpoint (BF16 masters + INT4 scheme) from a pretrained model; reports PTQ SQNR."""
    from stages import init_qat as stage

    config = _config(InitQatConfig, locals(), ignore=tuple(ignore or ()))
    manifest = _run(stage.run, config)
    from qatctl import ui

    per_tensor = manifest.get("metrics", {}).get("sqnr_db_per_tensor", {})
    sqnr = ui.table("PTQ error by weight role (per-tensor values in qatctl.json)", stage.sqnr_rows(per_tensor),
                    ("role", "tensors", "mean SQNR dB", "min SQNR dB", "worst tensor"))
    _report({**manifest, "path": str(out)}, json_, [sqnr] if per_tensor else [])


@app.command("convert-int4")
def convert_int4(
    ckpt: Annotated[Path, typer.Argument(help="A qat-checkpoint folder.")],
    out: Out,
    format: Annotated[str, typer.Option("--format", help="compressed-tensors (SGLang / vLLM) or gguf (one llama.cpp file, Q4_0 blocks of the same integers and scales).")] = "compressed-tensors",
    gguf_pre: Annotated[Optional[str], typer.Option(help="--format gguf: llama.cpp's tokenizer.ggml.pre (default: from tokenizer.json).")] = None,
    force: Force = False,
    json_: Json = False,
):
    """Write the INT4 checkpoint (compressed-tensors pack-quantized) that SGLang and vLLM load."""
    from stages import convert_int4 as stage

    manifest = _run(stage.run, _config(ConvertInt4Config, locals()))
    _report({**manifest, "path": str(out)}, json_)


T = TrainSftQatConfig


@app.command("train-sft-qat")
def train_sft_qat(
    ckpt: Annotated[Path, typer.Argument(help="A qat-checkpoint folder.")],
    data: Annotated[Path, typer.Option(help="JSONL: {messages} or {prompt, completion} per line.")],
    out: Out,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (default: one epoch).")] = T.steps,
    epochs: Annotated[Optional[float], typer.Option(help="Passes over the data, when --steps is not given.")] = T.epochs,
    batch_size: Annotated[int, typer.Option(help="Sequences per optimizer step, over all ranks.")] = T.batch_size,
    micro_batch: Annotated[int, typer.Option(help="Sequences per forward/backward (gradient accumulation).")] = T.micro_batch,
    max_seq_len: Annotated[int, typer.Option(help="Truncate longer examples (counted in the metrics).")] = T.max_seq_len,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate.")] = T.lr,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = T.weight_decay,
    warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps before cosine decay.")] = T.warmup_steps,
    min_lr_ratio: Annotated[float, typer.Option(help="Final LR as a fraction of --lr.")] = T.min_lr_ratio,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping norm (0: off).")] = T.max_grad_norm,
    seed: Annotated[int, typer.Option(help="Data order and RNG seed.")] = T.seed,
    fake_quant_after: Annotated[int, typer.Option(help="Train this many steps before fake quant switches on.")] = T.fake_quant_after,
    no_fake_quant: Annotated[bool, typer.Option("--no-fake-quant", help="Plain BF16 baseline (no fake quant).")] = T.no_fake_quant,
    save_every: Annotated[int, typer.Option(help="Steps between resumable checkpoints.")] = T.save_every,
    deepspeed: DeepSpeed = T.deepspeed,
    device: Device = T.device,
    compute_dtype: ComputeDtype = T.compute_dtype,
    reset_optimizer: Annotated[bool, typer.Option("--reset-optimizer", help="Start AdamW fresh instead of CKPT's trainer_state moments.")] = T.reset_optimizer,
    resume: _resume("checkpoint") = T.resume,
    force: Force = False,
    json_: Json = False,
):
    """Fine-tune a qat-checkpoint through fake INT4 weights (STE); resumes after a kill by default."""
    from stages import train_sft_qat as stage

    config = _config(TrainSftQatConfig, locals())
    manifest = _run(stage.run, config)
    if manifest.get("rank", 0) != 0:
        return
    _report({**manifest, "path": str(out)}, json_)


R = RlStepConfig


@app.command("rl-step")
def rl_step(
    policy: Annotated[Path, typer.Argument(help="The policy qat-checkpoint (N).")],
    prompts: Annotated[Path, typer.Option(help="JSONL with prompt or messages, and answer.")],
    out: Out,
    iterations: Annotated[int, typer.Option(help="GRPO iterations in this process (policy N -> N+K).")] = R.iterations,
    rollout_model: Annotated[Optional[Path], typer.Option(help="POLICY's int4-checkpoint (default: POLICY quantized in memory).")] = R.rollout_model,
    rollout_precision: Annotated[str, typer.Option(help="int4 (4-bit kernel) or bf16 (dense BF16 rollouts, no fake quant: the BF16 RL arm).")] = R.rollout_precision,
    engine_url: Annotated[Optional[str], typer.Option(help="Roll out on this server, after pointing it at --rollout-model.")] = R.engine_url,
    api_key: ClientKey = R.api_key,
    prompts_per_step: Annotated[int, typer.Option(help="Informative groups per iteration (the cursor carries over).")] = R.prompts_per_step,
    samples_per_prompt: Annotated[int, typer.Option(help="GRPO group size.")] = R.samples_per_prompt,
    dynamic_sampling: Annotated[bool, typer.Option("--dynamic-sampling/--no-dynamic-sampling", help="Drop all-equal groups and draw more prompts (DAPO).")] = R.dynamic_sampling,
    max_sampling_rounds: Annotated[int, typer.Option(help="Rollout rounds per iteration at most, the first included.")] = R.max_sampling_rounds,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per rollout.")] = R.max_new_tokens,
    temperature: Annotated[float, typer.Option(help="Rollout sampling temperature.")] = R.temperature,
    seed: Annotated[int, typer.Option(help="Sets the prompt order (with --prompt-order shuffle) and the rollout sampling.")] = R.seed,
    prompt_order: Annotated[str, typer.Option(help="shuffle (a per-seed permutation per pass over the prompts) or file (file order).")] = R.prompt_order,
    reward: Reward = R.reward,
    loss: Annotated[str, typer.Option(help="grpo (PPO-clip on group-normalized advantages).")] = R.loss,
    clip_eps: Annotated[float, typer.Option(help="PPO clip range.")] = R.clip_eps,
    tis_cap: Annotated[float, typer.Option(help="Truncated importance weight cap (0: off).")] = R.tis_cap,
    kl_coef: Annotated[float, typer.Option(help="k3 KL to the reference policy.")] = R.kl_coef,
    reference: Annotated[Optional[Path], typer.Option(help="Reference qat-checkpoint for the KL (default: POLICY).")] = R.reference,
    scale_by_std: Annotated[bool, typer.Option("--scale-by-std/--no-scale-by-std", help="Divide advantages by the group std.")] = R.scale_by_std,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (constant).")] = R.lr,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping (0: off).")] = R.max_grad_norm,
    micro_batch: Annotated[int, typer.Option(help="Sequences per forward/backward.")] = R.micro_batch,
    mini_batches: Annotated[int, typer.Option(help="Optimizer steps per iteration.")] = R.mini_batches,
    no_fake_quant: Annotated[bool, typer.Option("--no-fake-quant", help="Train the BF16 masters (with int4 rollouts: the PTQ arm).")] = R.no_fake_quant,
    true_on_policy: Annotated[bool, typer.Option("--true-on-policy", help="The update's logprobs come from the engine's own native forward on the policy's weights: equal to the rollout's bit for bit (checked; exit 1 if not), no scoring pass, TIS weights exactly 1. int4-qat and bf16 arms (not int4-ptq), embedded native engine.")] = R.true_on_policy,
    reset_optimizer: Annotated[bool, typer.Option("--reset-optimizer", help="Start AdamW fresh instead of POLICY's trainer_state.")] = R.reset_optimizer,
    save_every: Annotated[int, typer.Option(help="Iterations between resume states in OUT.partial (0: none).")] = R.save_every,
    allow_stale_rollout_model: Annotated[bool, typer.Option("--allow-stale-rollout-model", help="Accept an INT4 model made from another policy.")] = R.allow_stale_rollout_model,
    deepspeed: DeepSpeed = R.deepspeed,
    device: Device = R.device,
    max_batch: Annotated[int, typer.Option(help="Rollouts decoding at once on the embedded engine (as serve's --max-batch); speed only.")] = R.max_batch,
    compute_dtype: ComputeDtype = R.compute_dtype,
    resume: _resume("saved iteration") = R.resume,
    force: Force = False,
    json_: Json = False,
):
    """GRPO iterations: INT4 rollouts, rewards, fake-quant policy update (TIS), in-memory weight sync; policy N+K."""
    from stages import rl_step as stage

    config = _config(RlStepConfig, locals())
    manifest = _run(stage.run, config)
    if manifest.get("rank", 0) != 0:
        return
    _report({**manifest, "path": str(out)}, json_)


@app.command("plot")
def plot(
    run_dirs: Annotated[list[Path], typer.Argument(help="Folders holding rl-step outputs (any depth), or rl-step outputs.")],
    out: Annotated[Optional[Path], typer.Option(help="PNG path (default: RUN_DIR/rl-metrics.png, or beside RUN_DIR when it is an artifact).")] = None,
):
    """Plot reward and train/rollout mismatch per iteration of one or several RL runs, side by side."""

    def draw(_):
        from qatctl.consistency import plot_rl_history

        for d in run_dirs:
            if not d.is_dir():
                raise QatctlError(f"{d}: no such folder")
        if out is not None and out.suffix.lower() != ".png":
            raise QatctlError(f"--out {out}: the plot is a PNG; give a path ending in .png")
        first = run_dirs[0]
        # Never inside an artifact (its files are digested in its manifest): beside it instead.
        default = (first.parent / f"{first.name}-rl-metrics.png" if (first / "qatctl.json").is_file()
                   else first / "rl-metrics.png")
        return plot_rl_history(run_dirs, out or default)

    path = _run(draw, None)
    from qatctl import ui

    ui.console.print(f"wrote {path}")


E = EvalConsistencyConfig


@app.command("eval-consistency")
def eval_consistency(
    train_ckpt: Annotated[Path, typer.Argument(help="The qat-checkpoint training sees.")],
    infer_ckpt: Annotated[Optional[Path], typer.Argument(help="Its int4-checkpoint (or a qat-checkpoint for BF16 rollouts); optional with --ablation.")] = None,
    prompts: Annotated[Path, typer.Option(help="JSONL with prompt or messages.")] = ...,
    out: Out = ...,
    rollouts: Annotated[Optional[Path], typer.Option(help="Score these rollouts (rollouts.jsonl) instead of generating.")] = E.rollouts,
    engine_url: Annotated[Optional[str], typer.Option(help="Generate on a running SGLang / qatctl serve (first pointed at INFER_CKPT).")] = E.engine_url,
    api_key: ClientKey = E.api_key,
    train_view: Annotated[str, typer.Option(help="auto (from the manifest), fake-int4 or bf16.")] = E.train_view,
    ablation: Annotated[bool, typer.Option("--ablation", help="{fake-int4, bf16} x {int4, bf16} grid + engine floor.")] = E.ablation,
    limit: Annotated[int, typer.Option(help="Use the first N prompts.")] = E.limit,
    samples_per_prompt: Annotated[int, typer.Option(help="Completions per prompt.")] = E.samples_per_prompt,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per completion.")] = E.max_new_tokens,
    temperature: Annotated[float, typer.Option(help="Inference-side sampling temperature.")] = E.temperature,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = E.seed,
    max_abs_diff: Annotated[Optional[float], typer.Option(help="Exit 1 when the mean |dlogp| exceeds this.")] = E.max_abs_diff,
    true_on_policy: Annotated[bool, typer.Option("--true-on-policy", help="Score the train side with the engine's exact forward on the training weights, as rl-step --true-on-policy trains (fake-int4 view with an int4-checkpoint, bf16 view with a BF16 one on the W16A16 path); with --ablation a matched cell per arm.")] = E.true_on_policy,
    force: Force = False,
    json_: Json = False,
):
    """Measure train <-> inference mismatch (|dlogp| per token, KL, agreement, weight bit-identity)."""
    from stages import eval_consistency as stage

    config = _config(EvalConsistencyConfig, locals())
    manifest = _run(stage.run, config)
    if not json_ and (out / "report.json").is_file():
        import json

        from qatctl import ui

        report = json.loads((out / "report.json").read_text())
        arms = {**report["arms"], **({"engine floor (batched vs alone)": report["floor"]} if "floor" in report else {})}
        cols = ("mean_abs_diff", "p99_abs_diff", "max_abs_diff", "k3_kl", "greedy_agreement", "tokens")
        ui.show(ui.table(f"train <-> inference mismatch ({out}/report.md)",
                         [(arm, *(m.get(c) for c in cols)) for arm, m in arms.items()], ("arm", *cols)))
    _report({**manifest, "path": str(out)}, json_)


S = ServeConfig


# Unknown options are usage errors (a typo such as --apikey must not start a server without a
# key); only what follows `--` is passed through, to sglang.launch_server.
@app.command("serve", context_settings={"allow_extra_args": True})
def serve(
    ctx: typer.Context,
    ckpt: Annotated[Path, typer.Argument(help="An int4-checkpoint folder.")],
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = S.host,
    port: Annotated[int, typer.Option(help="TCP port.")] = S.port,
    api_key: Annotated[Optional[str], typer.Option(envvar="QATCTL_API_KEY", show_envvar=True, help="Require 'Authorization: Bearer KEY' (prefer the env var or --api-key-file: a flag shows in ps).")] = S.api_key,
    api_key_file: Annotated[Optional[Path], typer.Option(help="Read the API key from this file's first line.")] = S.api_key_file,
    backend: Annotated[str, typer.Option(help="embedded (int4 kernel, this process) or sglang (GPU).")] = S.backend,
    weights: Annotated[str, typer.Option(help="embedded: int4, or fp32/bf16 dense baselines.")] = S.weights,
    device: Annotated[str, typer.Option(help="embedded: auto (CUDA when present), cpu or cuda.")] = S.device,
    max_batch: Annotated[int, typer.Option(help="Requests running at once (continuous batching); more wait.")] = S.max_batch,
    max_queue: Annotated[int, typer.Option(help="Requests waiting to join; beyond it 503.")] = S.max_queue,
    max_prompts_per_request: Annotated[int, typer.Option(help="Prompts x n in one request.")] = S.max_prompts_per_request,
    max_new_tokens_cap: Annotated[Optional[int], typer.Option(help="Largest max_new_tokens a request may ask (default: the context).")] = S.max_new_tokens_cap,
    max_request_bytes: Annotated[int, typer.Option(help="Largest request body; larger gets 413.")] = S.max_request_bytes,
    threads: Annotated[Optional[int], typer.Option(help="Torch threads for the engine.")] = S.threads,
    model_name: Annotated[Optional[str], typer.Option(help="Model id reported by /v1/models.")] = S.model_name,
):
    """Serve an INT4 checkpoint over HTTP (SGLang-native /generate + OpenAI routes). Extra
    arguments after `--` go to sglang.launch_server with --backend sglang."""
    from stages import serve as stage

    config = _config(ServeConfig, locals(), sglang_args=tuple(ctx.args))
    _run(stage.run, config)


@app.command("accuracy")
def accuracy(
    model: Annotated[Path, typer.Argument(help="An int4-checkpoint (INT4 kernel) or a qat-checkpoint (dense fp32).")],
    prompts: Annotated[Path, typer.Option(help="JSONL with prompt or messages, and answer.")],
    limit: Annotated[Optional[int], typer.Option(help="Only the first N prompts.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens per answer.")] = 32,
    reward: Reward = "exact-number",
    device: Device = "auto",
    json_: Json = False,
):
    """Greedy exact-match accuracy of a checkpoint on a prompt set, with the embedded engine."""

    def measure(_):
        from qatctl import data
        from qatctl.artifacts import read_artifact
        from qatctl.checks import at_least, finite
        from qatctl.engines import load_engine
        from qatctl.rl import rewards

        at_least(1, limit=limit)

        finite("--max-new-tokens", max_new_tokens, lo=1, hi=4096)
        art = read_artifact(model, ("int4-checkpoint", "qat-checkpoint"))
        score = rewards.load_reward(reward)
        engine = load_engine(model, weights="int4" if art.kind == "int4-checkpoint" else "fp32", device=device)
        rows = data.load_prompts(prompts, engine.tokenizer)[:limit]
        result = rewards.exact_match_accuracy(engine, rows, score, max_new_tokens=max_new_tokens)
        from qatctl.artifacts import sha256_file

        # what `qatctl compare` needs to pair two scorings: the problems they are over
        return {"model": str(model), "kind": art.kind, "kernel": engine.kernel, "device": engine.info()["device"],
                "prompts": str(prompts), "prompts_digest": sha256_file(prompts), "limit": limit,
                "max_new_tokens": max_new_tokens, "reward_name": reward, **result}

    result = _run(measure, None)
    from qatctl import ui

    if json_:
        ui.emit_json(result)
        return
    ui.show(ui.table(f"accuracy of {model}", [(k, result[k]) for k in ("kind", "kernel", "correct", "total",
                                                                      "accuracy")]))


@app.command("compare")
def compare(
    a: Annotated[Path, typer.Argument(help="`qatctl accuracy --json` output of the baseline (A).")],
    b: Annotated[Path, typer.Argument(help="The same for the other model (B), on the same prompts.")],
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CI.")] = 10000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed (fixed: a table regenerates exactly).")] = 0,
    json_: Json = False,
):
    """Paired difference B - A of two scorings of the same problems: bootstrap 95% CI and McNemar's exact p."""

    def run_compare(_):
        from qatctl.checks import finite
        from qatctl.stats import compare_files

        finite("--bootstrap", bootstrap, lo=100, hi=1_000_000)
        return compare_files(a, b, bootstrap, seed)

    r = _run(run_compare, None)
    from qatctl import ui

    if json_:
        ui.emit_json(r)
        return
    pts = lambda v: f"{100 * v:+.1f}"  # noqa: E731
    rows = [("A", f"{r['a']}: {100 * r['a_mean']:.1f}%"), ("B", f"{r['b']}: {100 * r['b_mean']:.1f}%"),
            ("problems", r["n"]), ("B - A (points)", pts(r["difference"])),
            ("95% CI (paired bootstrap)", f"[{pts(r['ci95'][0])}, {pts(r['ci95'][1])}]"),
            ("paired SE (points)", f"{100 * r['paired_se']:.2f}"),
            ("A right, B wrong / A wrong, B right", f"{r['a_only']} / {r['b_only']}"),
            ("McNemar exact p", r["mcnemar_p"])]
    ui.show(ui.table("paired comparison", rows))


@app.command("inspect")
def inspect(
    artifact: Annotated[Path, typer.Argument(help="An artifact folder (or its qatctl.json).")],
    json_: Json = False,
):
    """Print an artifact's manifest."""
    from qatctl import ui
    from qatctl.artifacts import MANIFEST, read_manifest

    path = artifact.parent if artifact.name == MANIFEST else artifact
    m = _run(read_manifest, path)
    if json_:
        ui.emit_json(m)
        return
    def items(field):  # a manifest edited by hand may hold anything: shown as it is, never a crash
        v = m.get(field)
        return v.items() if isinstance(v, dict) else ([] if v is None else [("", v)])

    def described(x) -> str:
        if not isinstance(x, dict):
            return repr(x)
        return f"{x.get('kind', '?')} {x.get('path', x.get('name', '?'))} sha256:{str(x.get('digest', '?'))[:12]}"

    inputs = m.get("inputs") if isinstance(m.get("inputs"), list) else []
    files = m.get("files")
    rows = [(k, m.get(k)) for k in ("stage", "kind", "status", "qatctl_version", "created")]
    rows += [(f"config.{k}" if k else "config", v) for k, v in items("config")]
    rows += [(f"quant.{k}" if k else "quant", v) for k, v in items("quant")]
    rows += [(f"input[{i}]", described(x)) for i, x in enumerate(inputs)]
    rows += [("files", f"{len(files)} files" if isinstance(files, (dict, list)) else repr(files))]
    ui.show(ui.table(str(path), rows))
    mrows = [(k or "metrics", v if not isinstance(v, dict) else f"{len(v)} entries") for k, v in items("metrics")]
    if mrows:
        ui.show(ui.table("metrics", mrows, ("metric", "value")))


def run() -> None:
    """The console script: typer's usage errors become one `error:` line and exit 2 as well."""
    from qatctl.ui import console

    # typer >= 0.26 vendors click; the usage errors are BadParameter's bases either way.
    usage_error = typer.BadParameter.__mro__[1]
    no_args = getattr(__import__(usage_error.__module__, fromlist=["x"]), "NoArgsIsHelpError", ())
    try:
        rc = app(standalone_mode=False)
    except no_args as e:  # `qatctl` or `qatctl STAGE` alone: the help
        console.print(e.ctx.get_help() if e.ctx else str(e), highlight=False, markup=False)
        sys.exit(0 if e.ctx is None or e.ctx.parent is None else 2)
    except usage_error as e:
        where = f"qatctl {e.ctx.command.name}: " if e.ctx is not None and e.ctx.parent is not None else ""
        console.print(f"[bold red]error:[/] {where}{e.format_message()} (see -h)", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        console.print("[bold red]interrupted[/]")
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    run()
