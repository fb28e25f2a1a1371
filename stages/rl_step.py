"""rl-step: one GRPO iteration with INT4 rollouts, train/rollout mismatch metrics and TIS.

Reads:  POLICY, a `qat-checkpoint` (policy N); --rollout-model, its `int4-checkpoint` (made from
        POLICY: checked by digest) or --engine-url, a server (SGLang or qatctl serve) that is
        first pointed at --rollout-model via /update_weights_from_disk; --prompts FILE.jsonl
        with `prompt` | `messages` and `answer`.
Writes: a `qat-checkpoint` (policy N+1) with rollouts.jsonl, metrics.json, and a manifest
        carrying the metrics and the prompt cursor (step N+1 continues where N stopped).

1. Rollout: --samples-per-prompt completions of each of --prompts-per-step prompts on the INT4
   engine, keeping token ids and rollout logprobs.  2. Rewards (exact-number, boxed or
   module:function).  3. GRPO advantages within each prompt's group (all-equal groups carry no
   gradient and are left out of the update).  4. Train-side logprobs of the same tokens through
   the fake-INT4 policy: mismatch metrics and TIS weights min(exp(logp_train - logp_rollout), C).
5. PPO-clip update (AdamW, clipping, optional k3 KL to a reference), fake quant once per step.
Departure from long-running trainers: each rl-step is its own process, so AdamW's moments
start fresh every iteration (its state is not carried between policy artifacts).

    qatctl rl-step runs/loop/policy-0 --rollout-model runs/loop/int4-0 \\
        --prompts recipes/data/arith-train.jsonl --out runs/loop/policy-1
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from qatctl.artifacts import OutputDir, read_artifact, sha256_file
from qatctl.errors import QatctlError

STAGE, KIND = "rl-step", "qat-checkpoint"


@dataclass(frozen=True)
class RlStepConfig:
    policy: Path  # qat-checkpoint N
    out: Path
    prompts: Path  # JSONL: prompt | messages, answer
    rollout_model: Path | None = None  # int4-checkpoint of POLICY
    engine_url: str | None = None  # roll out on this server (after update_weights_from_disk)
    prompts_per_step: int = 8
    samples_per_prompt: int = 4  # GRPO group size
    max_new_tokens: int = 64
    temperature: float = 1.0
    seed: int = 0
    reward: str = "exact-number"  # exact-number, boxed, or module:function(completion, answer) -> float
    loss: str = "grpo"  # PPO-clip on group-normalized advantages
    clip_eps: float = 0.2
    tis_cap: float = 2.0  # truncated importance weight cap on the train/rollout ratio; 0 disables
    kl_coef: float = 0.0  # k3 KL to the reference policy
    reference: Path | None = None  # reference qat-checkpoint for the KL (default: POLICY)
    scale_by_std: bool = True  # GRPO's (r - mean) / std; off: Dr.GRPO-style mean-centering only
    lr: float = 1e-6
    max_grad_norm: float = 1.0
    micro_batch: int = 8  # sequences per forward/backward
    mini_batches: int = 1  # optimizer steps per rl-step (>1: later ones are off-policy, PPO clip acts)
    no_fake_quant: bool = False  # BF16-train baseline (rollouts still INT4)
    allow_stale_rollout_model: bool = False  # accept an int4-checkpoint made from another policy
    deepspeed: Path | None = None  # same DeepSpeed backend as train-sft-qat
    device: str = "auto"
    force: bool = False

    def recorded(self) -> dict:
        d = asdict(self)
        del d["out"], d["force"]
        return d


def _validate(c: RlStepConfig) -> None:
    if c.rollout_model is None:
        raise QatctlError("give --rollout-model INT4 (and optionally --engine-url URL to roll out on a server)")
    if c.loss != "grpo":
        raise QatctlError(f"--loss {c.loss!r}: only grpo is available")
    for name in ("prompts_per_step", "samples_per_prompt", "max_new_tokens", "micro_batch", "mini_batches"):
        if getattr(c, name) < 1:
            raise QatctlError(f"--{name.replace('_', '-')} {getattr(c, name)}: must be >= 1")
    if c.samples_per_prompt < 2:
        raise QatctlError("--samples-per-prompt must be >= 2 (GRPO compares samples within a group)")
    if c.tis_cap < 0 or c.kl_coef < 0 or c.clip_eps <= 0 or c.lr <= 0:
        raise QatctlError("--tis-cap and --kl-coef must be >= 0, --clip-eps and --lr > 0")
    if not Path(c.prompts).is_file():
        raise QatctlError(f"{c.prompts}: no such prompts file")
    if c.deepspeed is not None and c.mini_batches != 1:
        raise QatctlError("--deepspeed supports --mini-batches 1 (DeepSpeed fixes the accumulation steps)")


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
    from qatctl import rl

    reward_fn = rl.load_reward(config.reward)  # unknown reward fails before anything loads
    policy = read_artifact(config.policy, "qat-checkpoint")
    int4 = read_artifact(config.rollout_model, "int4-checkpoint") if config.rollout_model else None
    stale = _check_rollout_model(policy, int4, config.allow_stale_rollout_model) if int4 else False
    reference = read_artifact(config.reference, "qat-checkpoint") if config.reference else None
    inputs = [policy.as_input()] + ([int4.as_input()] if int4 else []) + ([reference.as_input()] if reference else [])
    inputs.append({"path": str(config.prompts), "kind": "prompts", "digest": sha256_file(Path(config.prompts))})
    out = OutputDir(config.out, stage=STAGE, kind=KIND, config=config.recorded(), inputs=inputs, force=config.force)
    if (done := out.up_to_date()) is not None:
        return {**done, "up_to_date": True}

    from transformers import AutoTokenizer

    from qatctl import data
    from qatctl.quant import QuantScheme

    scheme = QuantScheme.from_manifest(policy.manifest.get("quant") or {}, f"{config.policy}/qatctl.json")
    tokenizer = AutoTokenizer.from_pretrained(config.policy)
    need_answer = config.reward in rl.BUILTIN_REWARDS
    prompts = data.load_prompts(config.prompts, tokenizer, need_answer=need_answer)
    prev = policy.manifest.get("rl") or {}
    cursor, iteration = int(prev.get("cursor", 0)), int(prev.get("iteration", 0))
    chosen = [prompts[(cursor + i) % len(prompts)] for i in range(config.prompts_per_step)]

    timings = {}
    t = time.perf_counter()
    rows, rollout_tokens_per_s, engine_info = _rollout(config, int4, chosen, iteration)
    timings["rollout"] = time.perf_counter() - t
    for r in rows:
        r["reward"] = float(reward_fn(r["text"], r["answer"]))

    import torch

    advantages, informative = rl.group_advantages(  # rows are grouped by prompt, samples in order
        torch.tensor([r["reward"] for r in rows]).view(len(chosen), config.samples_per_prompt),
        scale_by_std=config.scale_by_std)
    for r, a in zip(rows, advantages.flatten().tolist(), strict=True):
        r["advantage"] = a

    metrics, model, trainer = _train(config, policy, reference, scheme, rows, informative, timings)
    from qatctl.train import dist_env

    rank, _ = dist_env()
    if trainer is not None and not trainer.is_main:  # DeepSpeed: rank 0 writes the artifact
        trainer.barrier()
        return {"status": "complete", "rank": rank}
    with out.building() as tmp:
        t = time.perf_counter()
        from qatctl import models

        models.remove_fake_quant(model)
        models.save_checkpoint(model, tokenizer, tmp)
        with open(tmp / "rollouts.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        timings["save"] = time.perf_counter() - t
        rewards = torch.tensor([r["reward"] for r in rows])
        lengths = [len(r["output_ids"]) for r in rows]
        metrics.update({
            "iteration": iteration + 1, "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            "accuracy": float((rewards > 0).float().mean()), "response_length_mean": sum(lengths) / len(lengths),
            "groups": len(chosen), "groups_without_signal": int((~informative).sum()),
            "rollout_tokens_per_s": rollout_tokens_per_s, "stale_rollout_model": stale,
            "rollout_engine": engine_info, **{f"seconds_{k}": round(v, 3) for k, v in timings.items()}})
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
        rl_state = {"iteration": iteration + 1, "cursor": (cursor + config.prompts_per_step) % len(prompts),
                    "prompts": str(config.prompts)}
        manifest = out.commit(tmp, quant=scheme.to_manifest(), metrics=metrics,
                              extra={"rl": rl_state, "training": {"fake_quant": not config.no_fake_quant,
                                                                  "fake_quant_after": 0}})
    if trainer is not None:
        trainer.barrier()
    return manifest


def _rollout(config: RlStepConfig, int4, chosen, iteration: int):
    from qatctl.engines import SamplingParams

    if config.engine_url:
        from qatctl.engines.remote import RemoteEngine

        engine = RemoteEngine(config.engine_url)
        engine.update_weights_from_disk(str(Path(config.rollout_model).resolve()))
        info = {"engine": "remote", "url": config.engine_url}
    else:
        from qatctl.engines import load_engine

        engine = load_engine(int4.path)
        info = {"engine": "embedded", "kernel": engine.kernel}
    n = config.samples_per_prompt
    todo = [(p, k) for p in chosen for k in range(n)]
    params = [SamplingParams(temperature=config.temperature, max_new_tokens=config.max_new_tokens,
                             seed=rollout_seed(config.seed, iteration, p.index, k)) for p, k in todo]
    t = time.perf_counter()
    outs = []
    for s in range(0, len(todo), 32):
        outs += engine.generate([p.prompt_ids for p, _ in todo[s:s + 32]], params[s:s + 32])
    dt = time.perf_counter() - t
    rows = [{"prompt_index": p.index, "sample": k, "answer": p.answer, "prompt_ids": o.prompt_ids,
             "output_ids": o.output_ids, "rollout_logprobs": o.logprobs, "text": o.text,
             "finish_reason": o.finish_reason} for (p, k), o in zip(todo, outs, strict=True)]
    return rows, sum(len(o.output_ids) for o in outs) / dt, info


def rollout_seed(seed: int, iteration: int, prompt_index: int, sample: int) -> int:
    return (seed * 1_000_003 + iteration * 10_007 + prompt_index * 101 + sample) % (2**63)


def _batch(rows, pad_id: int, device):
    from qatctl.data import collate_completions

    ids, mask, completion = collate_completions([r["prompt_ids"] for r in rows], [r["output_ids"] for r in rows],
                                                pad_id)
    return ids.to(device), mask.to(device), completion.to(device)


def _token_logprobs(model, ids, mask):
    import torch

    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    logp_all = torch.log_softmax(logits, dim=-1)
    return logp_all.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1), logp_all


def _padded(values: list[list[float]], rows, T: int):
    """Per-token values of each row's completion placed at its completion positions [B, T-1]."""
    import torch

    out = torch.zeros((len(rows), T - 1))
    for i, (r, v) in enumerate(zip(rows, values, strict=True)):
        start = len(r["prompt_ids"]) - 1
        out[i, start:start + len(v)] = torch.tensor(v, dtype=torch.float32)
    return out


def _train(config: RlStepConfig, policy, reference, scheme, rows, informative, timings):
    import torch
    from torch.nn.utils import parametrize

    from qatctl import models, rl
    from qatctl.consistency import mismatch_metrics, train_logprobs
    from qatctl.train import OptimSettings, device_and_dtype, dist_env, make_trainer

    device, dtype = device_and_dtype(config.device)
    model, tok = models.load_checkpoint(policy.path, dtype=dtype)
    model.to(device)
    if not config.no_fake_quant:
        models.apply_fake_quant(model, scheme)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # Score: the policy's own (fake-quant) logprobs of the rollout tokens.
    t = time.perf_counter()
    P, C = [r["prompt_ids"] for r in rows], [r["output_ids"] for r in rows]
    with parametrize.cached():
        old, _ = train_logprobs(model, P, C)
    for r, lp in zip(rows, old, strict=True):
        r["train_logprobs"] = lp
    ref = old
    if config.kl_coef > 0 and reference is not None:
        ref_model, _ = models.load_checkpoint(reference.path, dtype=dtype)
        if not config.no_fake_quant:
            models.materialize_fake_quant(ref_model, scheme)
        ref, _ = train_logprobs(ref_model.to(device), P, C)
        del ref_model
    timings["score"] = time.perf_counter() - t
    scored = [(r, o, f) for r, o, f in zip(rows, old, ref, strict=True) if r["output_ids"]]
    mismatch = mismatch_metrics([o for _, o, _ in scored], [r["rollout_logprobs"] for r, _, _ in scored])
    train_t = torch.tensor([x for _, o, _ in scored for x in o])
    rollout_t = torch.tensor([x for r, _, _ in scored for x in r["rollout_logprobs"]])
    tis_all = rl.tis_weights(train_t, rollout_t, config.tis_cap)
    raw = torch.exp(train_t - rollout_t)

    # Update: sequences of informative groups only (the others have advantage 0 everywhere).
    n = config.samples_per_prompt
    keep = [(r, o, f) for i, (r, o, f) in enumerate(zip(rows, old, ref, strict=True))
            if r["output_ids"] and (bool(informative[i // n]) or config.kl_coef > 0)]
    t = time.perf_counter()
    clipped = tokens_total = 0
    entropy_sum, grad_norms, train_tokens = 0.0, [], 0
    if keep:
        world = dist_env()[1] if config.deepspeed else 1
        per_mini = -(-len(keep) // config.mini_batches)
        minis = [keep[i:i + per_mini] for i in range(0, len(keep), per_mini)]
        # Micro-batches per optimizer step: enough for --micro-batch, a multiple of the ranks.
        n_micro = world * math.ceil(math.ceil(per_mini / config.micro_batch) / world)
        if per_mini < n_micro:
            raise QatctlError(f"{per_mini} sequences to train cannot feed {world} DeepSpeed ranks")
        settings = OptimSettings(lr=config.lr, max_grad_norm=config.max_grad_norm, min_lr_ratio=1.0)
        trainer = make_trainer(model, settings, total_steps=len(minis), batch_size=n_micro, micro_batch=1,
                               deepspeed_config=config.deepspeed)
        for mini in minis:
            n_tokens = sum(len(r["output_ids"]) for r, _, _ in mini)
            k = min(n_micro, len(mini))
            mbs = [mini[j * len(mini) // k:(j + 1) * len(mini) // k] for j in range(k)]

            def loss_fn(m, mb, n_tokens=n_tokens):
                rs = [r for r, _, _ in mb]
                ids, mask, comp = _batch(rs, pad_id, device)
                logp, logp_all = _token_logprobs(m, ids, mask)
                T = ids.shape[1]
                old_t = _padded([o for _, o, _ in mb], rs, T).to(device)
                roll_t = _padded([r["rollout_logprobs"] for r in rs], rs, T).to(device)
                w = rl.tis_weights(old_t, roll_t, config.tis_cap) * comp
                adv = torch.tensor([r["advantage"] for r in rs], device=device)
                loss, n_clip = rl.ppo_clip_loss(logp, old_t, adv, comp, config.clip_eps, w, normalizer=n_tokens)
                if config.kl_coef > 0:
                    ref_t = _padded([f for _, _, f in mb], rs, T).to(device)
                    loss = loss + config.kl_coef * (rl.k3_kl(ref_t, logp) * comp).sum() / n_tokens
                with torch.no_grad():
                    ent = -(logp_all.exp() * logp_all).sum(-1)
                return loss, {"clipped": n_clip, "entropy": float((ent * comp).sum()), "tokens": int(comp.sum()),
                              "all_tokens": int(mask.sum())}

            stats = trainer.step(mbs, loss_fn)
            grad_norms.append(stats["grad_norm"])
            for info in stats["infos"]:
                clipped += info["clipped"]
                entropy_sum += info["entropy"]
                tokens_total += info["tokens"]
                train_tokens += info["all_tokens"]
        model = trainer.gather_weights()
        # Each DeepSpeed rank ran its share of the micro-batches: sum the counts over ranks.
        clipped, tokens_total = int(trainer.reduce_sum(clipped)), int(trainer.reduce_sum(tokens_total))
        entropy_sum, train_tokens = trainer.reduce_sum(entropy_sum), trainer.reduce_sum(train_tokens)
    else:
        trainer = None
    timings["update"] = time.perf_counter() - t
    return {
        "train_rollout_logprob_abs_diff_mean": mismatch["mean_abs_diff"],
        "train_rollout_logprob_abs_diff_max": mismatch["max_abs_diff"],
        "k3_kl_rollout_train": mismatch["k3_kl"],
        "tis_mean": float(tis_all.mean()), "tis_clip_fraction": float((raw > config.tis_cap).float().mean())
        if config.tis_cap > 0 else 0.0,
        "ppo_clip_fraction": clipped / tokens_total if tokens_total else 0.0,
        "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else 0.0,
        "entropy": entropy_sum / tokens_total if tokens_total else None,
        "update_sequences": len(keep), "update_skipped": not keep, "optimizer_steps": len(grad_norms),
        "train_tokens_per_s": train_tokens / timings["update"] if keep and timings["update"] > 0 else None,
        "fake_quant": not config.no_fake_quant, "backend": trainer.backend if trainer else None,
    }, model, trainer
