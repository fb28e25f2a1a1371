"""rl-step: K GRPO iterations with INT4 rollouts, the policy updated through fake quant (STE).

Reads:  POLICY, a `qat-checkpoint` (policy N; its `trainer_state/` fp32 masters and AdamW state,
        when present, are continued); --rollout-model, its `int4-checkpoint` (checked by digest;
        optional without --engine-url: the policy is then quantized in memory by the shared
        converter, bit-identical to convert-int4); --prompts FILE.jsonl with `prompt` |
        `messages` and `answer`.
Writes: a `qat-checkpoint` (policy N+K): BF16 weights, `trainer_state/` (fp32 masters + AdamW,
        safetensors), rollouts.jsonl (every drawn group, with its iteration), metrics.jsonl (one
        line per iteration), metrics.json (the last iteration), and the prompt cursor and
        iteration in the manifest's `rl` field.

The loop is qatctl/rl/loop.py. After each update the policy is re-quantized in memory and swapped
into the running embedded engine, or written under OUT.partial/sync/ and pushed to --engine-url
with /update_weights_from_disk and a weight_version, as slime does. Arms, one flag apart:
int4-qat (default), int4-ptq (--no-fake-quant), bf16 (--rollout-precision bf16: the dense BF16
path of the same engine, no fake quant). --save-every N writes the full state atomically under
OUT.partial/state/; rerunning the same command after a kill resumes from it.

    qatctl rl-step runs/demo/sft --prompts recipes/data/arith-train.jsonl --out runs/rl/policy-20 \\
        --iterations 20 --prompts-per-step 8 --samples-per-prompt 8 --lr 2e-6
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from qatctl.artifacts import OutputDir, file_input, read_artifact
from qatctl.engines import ROLLOUT_WIDTH
from qatctl.errors import QatctlError
from qatctl.rl.settings import PROMPT_ORDERS, GRPOSettings

STAGE, KIND = "rl-step", "qat-checkpoint"
ARMS = {("int4", True): "int4-qat", ("int4", False): "int4-ptq", ("bf16", False): "bf16"}


@dataclass(frozen=True, kw_only=True)
class RlStepConfig(GRPOSettings):
    policy: Path  # qat-checkpoint N
    out: Path
    prompts: Path  # JSONL: prompt | messages, answer
    rollout_model: Path | None = None  # int4-checkpoint of POLICY (default: quantized in memory)
    engine_url: str | None = None  # roll out on this server (SGLang or qatctl serve)
    api_key: str | None = None  # for --engine-url (or QATCTL_API_KEY); never recorded
    iterations: int = 1  # GRPO iterations in this process (policy N -> N+K)
    save_every: int = 0  # iterations between resume states under OUT.partial/state (0: none)
    rollout_precision: str = "int4"  # int4 (the 4-bit kernel) or bf16 (dense BF16 baseline arm)
    reward: str = "exact-number"  # exact-number, boxed, or module:function(completion, answer) -> float
    loss: str = "grpo"  # PPO-clip on group-normalized advantages
    reference: Path | None = None  # reference qat-checkpoint for the KL (default: POLICY)
    no_fake_quant: bool = False  # BF16-train baseline (with int4 rollouts: the PTQ arm)
    reset_optimizer: bool = False  # start AdamW fresh instead of POLICY's trainer_state
    allow_stale_rollout_model: bool = False  # accept an int4-checkpoint made from another policy
    deepspeed: Path | None = None  # same DeepSpeed backend as train-sft-qat
    device: str = "auto"
    max_batch: int = ROLLOUT_WIDTH  # rollouts decoding at once on the embedded engine (serve's --max-batch): speed only
    compute_dtype: str = "auto"  # training matmuls: auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16 (autocast)
    resume: bool = True  # continue a killed run from OUT.partial/state
    force: bool = False

    def recorded(self) -> dict:
        d = asdict(self)
        for k in ("out", "force", "resume", "api_key", "max_batch"):  # the engine is batch-invariant: the
            del d[k]  # rollout width changes speed, never a token, so a resumed run may change it
        return d

    @property
    def arm(self) -> str:
        return ARMS[(self.rollout_precision, not self.no_fake_quant and self.rollout_precision == "int4")]


def _validate(c: RlStepConfig) -> None:
    from qatctl.checks import finite

    if c.loss != "grpo":
        raise QatctlError(f"--loss {c.loss!r}: only grpo is available")
    from qatctl.checks import fields_at_least

    fields_at_least(c, 1, "iterations", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "micro_batch",
                    "mini_batches", "max_sampling_rounds")
    if not 1 <= c.max_batch <= 4096:
        raise QatctlError(f"--max-batch {c.max_batch}: must be between 1 and 4096")
    if c.engine_url and c.max_batch != RlStepConfig.max_batch:
        raise QatctlError("--max-batch sets the embedded engine's width: with --engine-url set the server's own "
                          "(qatctl serve --max-batch, SGLang --max-running-requests)")
    if c.samples_per_prompt < 2:
        raise QatctlError("--samples-per-prompt must be >= 2 (GRPO compares samples within a group)")
    if c.save_every < 0 or c.save_every > c.iterations:
        raise QatctlError(f"--save-every {c.save_every}: must be between 0 (off) and --iterations {c.iterations}")
    finite("--temperature", c.temperature, lo=0.0)
    finite("--clip-eps", c.clip_eps, lo=0.0, lo_open=True)
    finite("--tis-cap", c.tis_cap, lo=0.0)
    finite("--kl-coef", c.kl_coef, lo=0.0)
    finite("--lr", c.lr, lo=0.0, lo_open=True, hi=1.0)
    finite("--max-grad-norm", c.max_grad_norm, lo=0.0)
    if c.prompt_order not in PROMPT_ORDERS:
        raise QatctlError(f"--prompt-order {c.prompt_order!r}: expected {' or '.join(PROMPT_ORDERS)}")
    if c.compute_dtype not in ("auto", "fp32", "bf16"):
        raise QatctlError(f"--compute-dtype {c.compute_dtype!r}: expected auto, fp32 or bf16")
    if c.rollout_precision not in ("int4", "bf16"):
        raise QatctlError(f"--rollout-precision {c.rollout_precision!r}: expected int4 or bf16")
    if c.rollout_precision == "bf16" and c.rollout_model is not None:
        raise QatctlError("--rollout-precision bf16 rolls out the policy's own BF16 weights: drop --rollout-model")
    if c.rollout_precision == "bf16" and c.engine_url:
        raise QatctlError("--rollout-precision bf16 runs on the embedded engine: drop --engine-url")
    if c.engine_url and c.rollout_model is None:
        raise QatctlError("--engine-url needs --rollout-model INT4 (the server is first pointed at it)")
    if not Path(c.prompts).is_file():
        raise QatctlError(f"{c.prompts}: no such prompts file")
    if c.true_on_policy:
        _validate_true_on_policy(c)


def _validate_true_on_policy(c: RlStepConfig) -> None:
    """--true-on-policy where it can hold (DESIGN §6a), refused with the reason everywhere else."""
    if c.arm == "int4-ptq":
        raise QatctlError("--true-on-policy with --no-fake-quant and int4 rollouts (the PTQ arm): the trainer computes "
                          "with BF16 weights and the rollouts with their INT4 conversion, so the two can never agree")
    if c.engine_url:
        raise QatctlError("--true-on-policy with --engine-url: a server computes with its own kernels; the mode needs "
                          "the embedded engine, whose forward the trainer runs")
    if c.deepspeed is not None:
        raise QatctlError("--true-on-policy with --deepspeed: not supported (the engine's forward needs the whole "
                          "policy on this process)")
    if c.device == "cuda":
        raise QatctlError("--true-on-policy with --device cuda: the exact forward is the CPU native kernels' "
                          "(a CUDA one would need batch-invariant W4A16 GEMM and attention kernels)")
    from qatctl.engines import kernels

    kernels.require("--true-on-policy")


def _check_rollout_model(policy, int4, allow_stale: bool) -> bool:
    """True when the INT4 checkpoint was converted from another policy (stale)."""
    made_from = [i for i in int4.manifest.get("inputs", []) if i.get("kind") == "qat-checkpoint"]
    if made_from and made_from[0]["digest"] == policy.digest:
        return False
    if not allow_stale:
        src = made_from[0]["path"] if made_from else "unknown"
        raise QatctlError(f"{int4.path}: was converted from {src}, not from {policy.path} (stale rollout model); "
                          "convert the policy or pass --allow-stale-rollout-model")
    return True


def run(config: RlStepConfig) -> dict:
    _validate(config)
    from qatctl.rl import rewards

    reward_fn = rewards.load_reward(config.reward)  # unknown reward fails before anything loads
    policy = read_artifact(config.policy, "qat-checkpoint")
    int4 = read_artifact(config.rollout_model, "int4-checkpoint") if config.rollout_model else None
    stale = _check_rollout_model(policy, int4, config.allow_stale_rollout_model) if int4 else False
    reference = read_artifact(config.reference, "qat-checkpoint") if config.reference else None
    inputs = [policy.as_input()] + ([int4.as_input()] if int4 else []) + ([reference.as_input()] if reference else [])
    inputs.append(file_input(config.prompts, "prompts"))
    out = OutputDir(config.out, stage=STAGE, kind=KIND, config=config.recorded(), inputs=inputs, force=config.force)
    if (done := out.up_to_date()) is not None:
        return {**done, "up_to_date": True}

    from qatctl import data, models
    from qatctl.quant import QuantScheme
    from qatctl.rl import session as rlrun
    from qatctl.trainrun import RankedPartial

    scheme = QuantScheme.from_manifest(policy.manifest.get("quant") or {}, f"{config.policy}/qatctl.json")
    tokenizer = models.load_tokenizer(config.policy)
    prompts = data.load_prompts(config.prompts, tokenizer, need_answer=config.reward in rewards.BUILTIN_REWARDS)
    session = rlrun.Session(config, policy, int4, reference, scheme, tokenizer, prompts, reward_fn)
    with RankedPartial(out, session) as tmp:  # DeepSpeed: rank 0 owns OUT.partial and writes the artifact
        metrics = session.run(tmp)
        t = time.perf_counter()
        trainer_state = session.save_policy(tmp)
        if not session.is_main:
            session.barrier()
            return {"status": "complete", "rank": session.rank}
        metrics["seconds_save"] = round(time.perf_counter() - t, 3)
        metrics["stale_rollout_model"] = stale
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
        manifest = out.commit(tmp, quant=scheme.to_manifest(), metrics=metrics,
                              extra={"rl": session.rl_state(config.prompts), "trainer_state": trainer_state,
                                     "training": {"fake_quant": session.fake_quant, "fake_quant_after": 0,
                                                  "arm": config.arm}})
    session.barrier()
    return manifest
