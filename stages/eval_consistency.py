"""eval-consistency: how far the policy training sees is from the model that rolls out.

Reads:  TRAIN_CKPT, a `qat-checkpoint` (scored through fake INT4 weights, or its BF16 masters
        when its manifest says it trained without fake quant, or as --train-view says);
        INFER_CKPT, an `int4-checkpoint` (or a `qat-checkpoint` for a BF16-rollout arm), run by
        the embedded engine or a server at --engine-url; --prompts FILE.jsonl.
Writes: a `report`: report.json, report.md, PNG plots (|Δlogp| histogram, |Δlogp| by position,
        the ablation grid), with token metrics and the weight-level check in the manifest.

The inference side generates (seeded) completions and reports the logprob of each sampled
token; the training side scores the same tokens. `--rollouts FILE` scores existing rollouts
(rl-step's rollouts.jsonl) instead. `--ablation` measures, from TRAIN_CKPT alone, the grid
{train view fake-int4, bf16} x {rollout int4, bf16} and the engine's own floor (the same INT4
rollouts regenerated one prompt at a time instead of batched). `--max-abs-diff X` exits 1 when
the mean |Δlogp| of the main arm exceeds X, after writing the report.

    qatctl eval-consistency runs/demo/sft runs/demo/int4 --prompts recipes/data/arith-test.jsonl \\
        --out runs/demo/consistency --max-abs-diff 0.05
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from qatctl.artifacts import OutputDir, file_input, read_artifact
from qatctl.errors import QatctlError

STAGE, KIND = "eval-consistency", "report"
VIEWS = ("fake-int4", "bf16")


@dataclass(frozen=True)
class EvalConsistencyConfig:
    train_ckpt: Path  # qat-checkpoint
    infer_ckpt: Path | None  # int4-checkpoint (or qat-checkpoint for BF16 rollouts); optional with --ablation
    prompts: Path  # JSONL: prompt or messages (answers not needed)
    out: Path
    rollouts: Path | None = None  # score these rollouts (rollouts.jsonl) instead of generating
    engine_url: str | None = None  # generate on a running server (first pointed at INFER_CKPT)
    api_key: str | None = None  # for --engine-url (or QATCTL_API_KEY); never recorded
    train_view: str = "auto"  # auto (from the manifest), fake-int4 or bf16
    ablation: bool = False  # the 2x2 grid + engine floor, from train_ckpt alone
    limit: int = 32  # prompts used (the first N)
    samples_per_prompt: int = 1
    max_new_tokens: int = 48
    temperature: float = 1.0  # sampling temperature of the inference side
    seed: int = 0  # completion k of prompt i uses seed * 1_000_003 + i * samples + k
    max_abs_diff: float | None = None  # gate: exit 1 when the main arm's mean |Δlogp| exceeds it
    true_on_policy: bool = False  # the train side is the engine's exact forward on the training weights (rl-step's mode)
    force: bool = False

    def recorded(self) -> dict:
        d = asdict(self)
        del d["out"], d["force"], d["max_abs_diff"], d["api_key"]  # the gate does not change the report
        return d


def _validate(c: EvalConsistencyConfig) -> None:
    if c.train_view not in ("auto", *VIEWS):
        raise QatctlError(f"--train-view {c.train_view!r}: expected auto, fake-int4 or bf16")
    if c.infer_ckpt is None and not c.ablation:
        raise QatctlError("INFER_CKPT is required (or pass --ablation to build the arms from TRAIN_CKPT)")
    if c.ablation and (c.rollouts is not None or c.engine_url is not None):
        raise QatctlError("--ablation generates its own rollouts on the embedded engine; drop --rollouts/--engine-url")
    from qatctl.checks import fields_at_least, finite

    fields_at_least(c, 1, "limit", "samples_per_prompt", "max_new_tokens")

    finite("--temperature", c.temperature, lo=0.0, hi=1e4)
    if c.max_abs_diff is not None:
        finite("--max-abs-diff", c.max_abs_diff, lo=0.0)
    if c.true_on_policy:
        if c.engine_url:
            raise QatctlError("--true-on-policy with --engine-url: a server computes with its own kernels, so its "
                              "rollouts cannot be matched bit for bit; drop --engine-url")
        from qatctl.engines import kernels

        kernels.require("--true-on-policy")
    if c.rollouts is not None and not Path(c.rollouts).is_file():
        raise QatctlError(f"{c.rollouts}: no such rollouts file")


def run(config: EvalConsistencyConfig) -> dict:
    _validate(config)
    train = read_artifact(config.train_ckpt, "qat-checkpoint")
    infer = (read_artifact(config.infer_ckpt, ("int4-checkpoint", "qat-checkpoint"))
             if config.infer_ckpt is not None else None)
    inputs = [train.as_input()] + ([infer.as_input()] if infer else [])
    for p, kind in ((config.prompts, "prompts"), (config.rollouts, "rollouts-file")):
        if p is not None:
            inputs.append(file_input(p, kind))
    out = OutputDir(config.out, stage=STAGE, kind=KIND, config=config.recorded(), inputs=inputs, force=config.force)
    if (done := out.up_to_date()) is not None:
        return _gate({**done, "up_to_date": True}, config)

    from qatctl.quant import QuantScheme

    scheme = QuantScheme.from_manifest(train.manifest.get("quant") or {}, f"{config.train_ckpt}/qatctl.json")
    view = config.train_view
    if view == "auto":
        view = "fake-int4" if (train.manifest.get("training") or {}).get("fake_quant", True) else "bf16"

    from qatctl import ablation, data, models

    tokenizer = models.load_tokenizer(config.train_ckpt)
    prompts = data.load_prompts(config.prompts, tokenizer, need_answer=False)[: config.limit]
    rollouts_in = ablation.read_rollouts(config.rollouts, ablation.vocab_size(config.train_ckpt)) if config.rollouts else None

    with out.building() as tmp:
        if config.ablation:
            report = ablation.grid(config, train, prompts, scheme)
        else:
            report = ablation.single(config, train, infer, view, prompts, rollouts_in, scheme)
        main = report["arms"][report["main_arm"]]
        report["plots"] = _plots(tmp, report)
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str))
        (tmp / "report.md").write_text(_markdown(report, config))
        metrics = {"main_arm": report["main_arm"], **{k: v for k, v in main.items() if not isinstance(v, list)},
                   "weights_identical_fraction": report["weight_check"].get("identical_fraction"),
                   "weights_different": report["weight_check"].get("different_count")}
        if config.ablation:
            metrics["grid_mean_abs_diff"] = {k: v["mean_abs_diff"] for k, v in report["arms"].items()}
            metrics["engine_floor_max_abs_diff"] = report["floor"]["max_abs_diff"]
        manifest = out.commit(tmp, quant=scheme.to_manifest(), metrics=metrics, extra={"train_view": view})
    return _gate(manifest, config)


def _gate(manifest: dict, config: EvalConsistencyConfig) -> dict:
    mean = manifest["metrics"].get("mean_abs_diff")
    if config.max_abs_diff is not None and mean is not None and mean > config.max_abs_diff:
        from qatctl import ui

        ui.console.print(f"report: {config.out}/report.md")
        raise QatctlError(f"mean |Δlogp| {mean:.3g} exceeds --max-abs-diff {config.max_abs_diff:g}", exit_code=1)
    return manifest


def _plots(tmp: Path, report: dict) -> list[str]:
    from qatctl.consistency import plots

    diffs = {k: v.pop("abs_diffs") for k, v in report["arms"].items()}
    positions = {k: v.pop("per_position") for k, v in report["arms"].items()}
    grid = ({tuple(report["cells"][k]): v["mean_abs_diff"] for k, v in report["arms"].items() if k in report["cells"]}
            if "cells" in report else None)
    return plots(tmp, diffs, positions, grid)


def _markdown(report: dict, config) -> str:
    cols = ["mean_abs_diff", "p50_abs_diff", "p99_abs_diff", "max_abs_diff", "seq_mean_abs_diff", "k3_kl",
            "log_ppl_diff", "greedy_agreement", "frac_abs_diff_gt_0.1", "tokens"]
    lines = [f"# eval-consistency: {config.train_ckpt}" + (f" vs {config.infer_ckpt}" if config.infer_ckpt else ""), "",
             f"Inference kernel: {report.get('kernel')}; {report['rollouts']} completions "
             f"(temperature {config.temperature}, up to {config.max_new_tokens} tokens).", "",
             "| arm | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    rows = dict(report["arms"])
    if "floor" in report:
        rows["engine floor (batched vs alone)"] = report["floor"]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(c)) for c in cols) + " |")
    wc = report["weight_check"]
    lines += ["", f"Weight check (train view vs inference weights): {wc['identical']}/{wc['tensors']} quantized tensors "
              "bit-identical."]
    if wc["different_count"]:
        lines.append("Different: " + ", ".join(wc["different"]) + (" ..." if wc["different_count"] > 50 else ""))
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)
