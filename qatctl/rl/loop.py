"""The GRPO loop rl-step runs: K iterations in one process over one policy, one optimizer and
one rollout engine (DESIGN §6).

    loop = GRPOLoop(settings, model, pad_id, engine, trainer_for, reward_fn, prompts, sync=push_weights)
    for _ in range(K):
        rows, metrics = loop.iteration_step()

Per iteration:
1. Rollout `samples_per_prompt` completions per prompt on the rollout engine (INT4 kernel, or
   the dense BF16 path for the BF16 arm). Dynamic sampling (DAPO): groups whose rewards are all
   equal carry no gradient and are dropped; more prompts are drawn until `prompts_per_step`
   informative groups are found or `max_sampling_rounds` rounds have run.
2. Train-side logprobs of the same tokens through the (fake-quant) policy: mismatch metrics and
   TIS weights min(exp(logp_train - logp_rollout), C).
3. PPO-clip update on group-normalized advantages (AdamW; the optimizer persists across
   iterations), optional k3 KL to a frozen reference.
4. Weight sync: the fp32 masters are rounded to BF16 and re-quantized with the shared quantizer
   (qatctl.int4format.int4_tensors, the code convert-int4 runs), and swapped into the engine in
   memory (or written and pushed to a server by the `sync` callback).

Rollout seeds depend on (seed, global iteration, draw slot, sample) only, and the training
step is deterministic on CPU, so a resumed or chained run repeats an uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
from torch.nn.utils import parametrize

from qatctl.errors import QatctlError
from qatctl.rl import loss as rl_loss
from qatctl.rl.settings import GRPOSettings, prompt_index  # noqa: F401  (GRPOSettings re-exported)


def rollout_seed(seed: int, iteration: int, slot: int, sample: int) -> int:
    """The sampling seed of one rollout: `slot` is the prompt's draw position in its iteration."""
    return (seed * 1_000_003 + iteration * 10_007 + slot * 101 + sample) % (2**63)


class GRPOLoop:
    def __init__(self, s: GRPOSettings, model, pad_id: int, engine, trainer_for, reward_fn, prompts, *,
                 sync, world: int = 1, iteration: int = 0, cursor: int = 0, reference=None,
                 device=torch.device("cpu"), compute=lambda model: contextlib.nullcontext(), refresh=None):
        """trainer_for(micro_batches_per_step) -> the Trainer (built once; DeepSpeed fixes its
        accumulation steps at construction). sync(model, iteration) pushes the weights.
        compute(model) is the context of a training-side forward (train.compute_context): scoring-only
        passes run in it too, so old-policy logprobs are the update's own numerics.
        refresh(model) (true on-policy mode, between optimizer steps of one iteration) puts the
        policy's current weights into the engine, whose forward then gives the update's logprobs."""
        self.s, self.model, self.pad_id, self.engine, self.trainer_for = s, model, pad_id, engine, trainer_for
        self.world = world
        self.reward_fn, self.prompts, self.sync_fn = reward_fn, prompts, sync
        self.iteration, self.cursor, self.reference, self.device = iteration, cursor, reference, device
        self.compute, self.refresh = compute, refresh

    # ------------------------------------------------------------------ one iteration

    def iteration_step(self) -> tuple[list[dict], dict]:
        """Run the next iteration; returns its rollouts (every drawn group, `used` marks the
        trained ones) and its metrics."""
        timings = {}
        self.iteration += 1
        t0 = time.perf_counter()
        rows, groups, sampling = self._sample_groups(timings)
        used = [r for g in groups for r in g]
        # One on-policy step without DeepSpeed: the update's forward pass is also the scoring pass.
        # Under DeepSpeed the engine's flattened parameter buffers change the last bits of a
        # forward pass, so scoring runs before it exists, on the same micro-batches.
        # True on-policy: the rollout's logprobs are the old policy's (the update's forward checks
        # it), so no scoring pass runs; only a KL's reference is scored.
        true = self.s.true_on_policy
        fused = not true and self.s.mini_batches == 1 and self.s.kl_coef == 0 and self.world == 1
        t = time.perf_counter()
        scored = {} if fused or (true and self.s.kl_coef == 0) else self._score(used, policy=not true)
        timings["score"] = time.perf_counter() - t
        t = time.perf_counter()
        update = self._update(used, fused)
        timings["update"] = time.perf_counter() - t
        if fused:  # the update pass scored the tokens: its detached logprobs are the old policy's
            scored = self._mismatch([r for r in used if r["output_ids"] and "train_logprobs" in r])
        if true:
            scored = self._exact_mismatch([r for r in used if "native_checked" in r])
            timings["update_native_forward"] = update.pop("seconds_native_forward")
        t = time.perf_counter()
        timings.update(self.sync_fn(self.model, self.iteration) or {})  # its parts, where it times them
        timings["sync"] = time.perf_counter() - t
        timings["iteration"] = time.perf_counter() - t0

        rewards = torch.tensor([r["reward"] for r in rows])
        lengths = [len(r["output_ids"]) for r in rows]
        metrics = {
            "iteration": self.iteration, "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()) if len(rows) > 1 else 0.0,
            "accuracy": float((rewards > 0).float().mean()), "response_length_mean": sum(lengths) / len(lengths),
            **sampling, **scored, **update,
            "rollout_tokens_per_s": sum(lengths) / timings["rollout"] if timings["rollout"] > 0 else None,
            **{f"seconds_{k}": round(v, 4) for k, v in timings.items()},
        }
        return rows, metrics

    def _sample_groups(self, timings):
        """Roll out groups until prompts_per_step informative ones (or the round cap)."""
        s, n = self.s, self.s.samples_per_prompt
        rows, groups = [], []
        drawn = dropped = rounds = 0
        timings["rollout"] = timings["reward"] = 0.0
        rounds_cap = s.max_sampling_rounds if s.dynamic_sampling else 1
        while rounds < rounds_cap and len(groups) < s.prompts_per_step:
            want = s.prompts_per_step - len(groups)
            if rounds:  # oversample by the informative rate seen so far, so later rounds stay batched
                want = min(s.prompts_per_step, math.ceil(want * drawn / max(len(groups), 1)))
            chosen = [(drawn + i, self.prompts[prompt_index(self.cursor + i, len(self.prompts), s.seed,
                                                            s.prompt_order)]) for i in range(want)]
            self.cursor += want  # every draw since iteration 0: a pass's permutation follows from it
            drawn += want
            rounds += 1
            t = time.perf_counter()
            new = self._rollout(chosen)
            timings["rollout"] += time.perf_counter() - t
            split = getattr(self.engine, "last_timings", None)  # the embedded engine's prefill / decode
            if split:
                for k in ("prefill", "decode"):
                    timings[f"rollout_{k}"] = timings.get(f"rollout_{k}", 0.0) + split[k]
            t = time.perf_counter()
            for r in new:
                r["reward"] = _checked_reward(self.reward_fn, r)
            timings["reward"] += time.perf_counter() - t
            adv, informative = rl_loss.group_advantages(
                torch.tensor([r["reward"] for r in new]).view(len(chosen), n), scale_by_std=s.scale_by_std)
            for g, ok in enumerate(informative.tolist()):
                group = new[g * n:(g + 1) * n]
                for r, a in zip(group, adv[g].tolist(), strict=True):
                    r["advantage"], r["used"] = a, bool(ok or not s.dynamic_sampling)
                if (ok or not s.dynamic_sampling) and len(groups) < s.prompts_per_step:
                    groups.append(group)
                elif ok:  # informative but beyond prompts_per_step (DAPO truncates the batch too)
                    for r in group:
                        r["used"] = False
                else:
                    dropped += 1
            rows += new
        informative_groups = sum(any(r["advantage"] != 0 for r in g) for g in groups)
        return rows, groups, {"groups_drawn": drawn, "groups_dropped": dropped, "sampling_rounds": rounds,
                              "informative_groups": informative_groups,
                              "groups_surplus": drawn - dropped - len(groups)}

    def _rollout(self, chosen) -> list[dict]:
        from qatctl.engines import sample

        s = self.s
        todo = [(slot, p, k) for slot, p in chosen for k in range(s.samples_per_prompt)]
        outs = sample(self.engine, [(p.prompt_ids, rollout_seed(s.seed, self.iteration, slot, k)) for slot, p, k in todo],
                      s.temperature, s.max_new_tokens)
        return [{"iteration": self.iteration, "slot": slot, "prompt_index": p.index, "sample": k, "answer": p.answer,
                 "prompt_ids": o.prompt_ids, "output_ids": o.output_ids, "rollout_logprobs": o.logprobs,
                 "text": o.text, "finish_reason": o.finish_reason} for (slot, p, k), o in zip(todo, outs, strict=True)]

    def _score(self, rows, policy: bool = True) -> dict:
        """Train-side logprobs of the rollout tokens (old policy) on the update's own micro-batches,
        and, with a KL, the reference's (policy=False: only the reference's)."""
        from qatctl.consistency import train_logprobs

        if policy:
            _, rest, plan, _ = self._plan(rows, world=1)  # the split a single process trains on: scores
            self._score_only([mb for mbs in plan for mb in mbs] + self._chunks(rest))
        rows = [r for r in rows if r["output_ids"]]
        if self.s.kl_coef > 0 and rows:
            with self.compute(self.reference):
                ref, _ = train_logprobs(self.reference, [r["prompt_ids"] for r in rows],
                                        [r["output_ids"] for r in rows], pad_id=self.pad_id)
            for r, lp in zip(rows, ref, strict=True):
                r["ref_logprobs"] = lp
        return self._mismatch(rows) if policy else {}

    def _exact_mismatch(self, rows) -> dict:
        """True on-policy's mismatch metrics: every checked token's train logprob == its rollout's."""
        n = sum(len(r["output_ids"]) for r in rows)
        return {"train_rollout_logprob_abs_diff_mean": 0.0 if n else None,
                "train_rollout_logprob_abs_diff_max": 0.0 if n else None, "k3_kl_rollout_train": 0.0 if n else None,
                "tis_mean": 1.0 if n else None, "tis_clip_fraction": 0.0 if n else None,
                "mismatch_exact": True, "mismatch_checked_tokens": n, "mismatch_tokens_differing": 0}

    def _native_forward(self, mbs, first: bool) -> None:
        """True on-policy: the update's logprob values for this mini-batch's rows, computed by the
        engine's own forward (its exact prefill) on the policy's current weights. Before the
        first optimizer step those weights are the rollout's, so the values must equal the
        rollout's logprobs bit for bit: a difference stops the run (exit 1) naming the token."""
        rows = [r for mb in mbs for r in mb]
        got = self.engine.score([r["prompt_ids"] for r in rows], [r["output_ids"] for r in rows])
        for r, lp in zip(rows, got, strict=True):
            r["native_logprobs"] = lp
            if not first:
                continue
            r["native_checked"] = True
            for j, (a, b) in enumerate(zip(lp, r["rollout_logprobs"], strict=True)):
                if a != b:
                    raise QatctlError(
                        f"--true-on-policy: iteration {self.iteration}, prompt {r['prompt_index']} sample "
                        f"{r['sample']}, completion token {j} (id {r['output_ids'][j]}): the trainer's logprob "
                        f"{a!r} differs from the rollout's {b!r} ({self._divergence(r, j)}; engine "
                        f"{self.engine.kernel}; a bug, please report it)", exit_code=1)

    def _divergence(self, r, j: int) -> str:
        """The layer path where the engine's prefill and decode first differ for token j of row r."""
        trace = getattr(self.engine, "trace_divergence", None)
        ids = list(r["prompt_ids"]) + list(r["output_ids"])
        where = trace(ids, len(r["prompt_ids"]) - 1 + j) if trace else None
        if where is not None:
            return f"prefill and decode first differ at {where}"
        if trace is None or self.engine.decode_plan is None:
            return "layer path not traced: the engine has no native step"
        return ("prefill and decode agree at every layer and the lm_head: the difference is after them "
                "(log-softmax, or weights that changed between the rollout and this forward)")

    def _mismatch(self, rows) -> dict:
        from qatctl.consistency import mismatch_metrics

        if not rows:
            return {"train_rollout_logprob_abs_diff_mean": None, "train_rollout_logprob_abs_diff_max": None,
                    "k3_kl_rollout_train": None, "tis_mean": None, "tis_clip_fraction": None}
        old = [r["train_logprobs"] for r in rows]
        mm = mismatch_metrics(old, [r["rollout_logprobs"] for r in rows])
        train_t = torch.tensor([x for o in old for x in o])
        rollout_t = torch.tensor([x for r in rows for x in r["rollout_logprobs"]])
        cap = self.s.tis_cap
        return {"train_rollout_logprob_abs_diff_mean": mm["mean_abs_diff"],
                "train_rollout_logprob_abs_diff_max": mm["max_abs_diff"], "k3_kl_rollout_train": mm["k3_kl"],
                "tis_mean": float(rl_loss.tis_weights(train_t, rollout_t, cap).mean()),
                "tis_clip_fraction": float((torch.exp(train_t - rollout_t) > cap).float().mean()) if cap > 0 else 0.0}

    def _plan(self, rows, world: int | None = None):
        """(sequences to train, scored-only rest, the update's micro-batches per mini-batch,
        micro-batches per optimizer step). Rows of groups without signal have advantage 0 and
        are trained only for a KL."""
        s, world = self.s, world or self.world
        keep = [r for r in rows if r["output_ids"] and (r["advantage"] != 0 or s.kl_coef > 0)]
        kept = {id(r) for r in keep}
        rest = [r for r in rows if r["output_ids"] and id(r) not in kept]
        if not keep:
            return keep, rest, [], 0
        per_mini = -(-len(keep) // s.mini_batches)
        n_micro = world * math.ceil(math.ceil(per_mini / s.micro_batch) / world)
        plan = []
        for mini in (keep[i:i + per_mini] for i in range(0, len(keep), per_mini)):
            k = min(n_micro, len(mini))
            mbs = [mini[j * len(mini) // k:(j + 1) * len(mini) // k] for j in range(k)]
            if len(mbs) % world:  # DeepSpeed: every rank must run the same number of micro-batches
                raise QatctlError(f"{len(mini)} sequences to train cannot feed {world} DeepSpeed ranks evenly")
            plan.append(mbs)
        return keep, rest, plan, n_micro

    def _chunks(self, rows):
        return [rows[i:i + self.s.micro_batch] for i in range(0, len(rows), self.s.micro_batch)]

    def _update(self, rows, fused: bool) -> dict:
        """PPO-clip steps on the informative groups' sequences (advantage 0 rows add nothing).
        `fused`: one on-policy optimizer step, whose forward pass also gives the old policy's
        logprobs (detached; the ratio is then exactly 1) instead of a separate scoring pass."""
        keep, rest, plan, n_micro = self._plan(rows)
        if fused:  # rows without signal are scored too (forward only) for the mismatch metrics
            self._score_only(self._chunks(rest))
        out = {"update_sequences": len(keep), "optimizer_steps": 0, "grad_norm": None, "ppo_clip_fraction": None,
               "entropy": None, "train_tokens_per_s": None}
        if self.s.true_on_policy:
            out["seconds_native_forward"] = 0.0
        if not keep:
            return out
        t = time.perf_counter()
        trainer = self.trainer_for(n_micro)
        clipped = tokens = all_tokens = 0
        entropy, norms = 0.0, []
        native = 0.0
        true = self.s.true_on_policy
        for k, mbs in enumerate(plan):
            if true:
                t_native = time.perf_counter()
                for r in (r for mb in mbs for r in mb):
                    r["train_logprobs"] = r["rollout_logprobs"]  # the old policy's, exactly (checked below)
                if k:
                    self.refresh(self.model)  # the engine computes with the weights of this step
                self._native_forward(mbs, first=k == 0)
                native += time.perf_counter() - t_native
            n_tokens = sum(len(r["output_ids"]) for mb in mbs for r in mb)
            stats = trainer.step(mbs, lambda m, mb, n_tokens=n_tokens: self._loss(m, mb, n_tokens, fused))
            norms.append(stats["grad_norm"])
            for info in stats["infos"]:
                clipped, tokens = clipped + info["clipped"], tokens + info["tokens"]
                entropy, all_tokens = entropy + info["entropy"], all_tokens + info["all_tokens"]
        clipped, tokens = int(trainer.reduce_sum(clipped)), int(trainer.reduce_sum(tokens))
        entropy, all_tokens = trainer.reduce_sum(entropy), trainer.reduce_sum(all_tokens)
        dt = time.perf_counter() - t
        if true:
            out["seconds_native_forward"] = native
        return {**out, "optimizer_steps": len(norms), "grad_norm": sum(norms) / len(norms),
                "ppo_clip_fraction": clipped / tokens if tokens else 0.0,
                "entropy": entropy / tokens if tokens else None, "train_tokens_per_s": all_tokens / dt if dt else None}

    def _score_only(self, micro_batches) -> None:
        """Train-side logprobs of each micro-batch's rows (no graph), as the update's forward computes them."""
        with torch.no_grad(), parametrize.cached(), self.compute(self.model):
            for mb in micro_batches:
                logp, _, _, start = _completion_logprobs(self.model, mb, self.pad_id, self.device)
                _store_train_logprobs(mb, logp, start)

    def _loss(self, model, mb, n_tokens, fused: bool = False):
        """GRPO's token-level PPO-clip loss with TIS weights (+ k3 KL), normalized by the step's tokens."""
        s, dev = self.s, self.device
        logp, logp_all, comp, start = _completion_logprobs(model, mb, self.pad_id, dev)
        if fused:
            _store_train_logprobs(mb, logp.detach(), start)
        T = logp.shape[1] + start + 1
        if s.true_on_policy:  # the engine's values, the trainer's straight-through gradient
            native = _padded([r["native_logprobs"] for r in mb], mb, T)[:, start:].to(dev)
            logp = ValuesFrom.apply(logp, native, comp.bool())
        old = _padded([r["train_logprobs"] for r in mb], mb, T)[:, start:].to(dev)
        roll = _padded([r["rollout_logprobs"] for r in mb], mb, T)[:, start:].to(dev)
        w = rl_loss.tis_weights(old, roll, s.tis_cap) * comp
        adv = torch.tensor([r["advantage"] for r in mb], device=dev)
        loss, n_clip = rl_loss.ppo_clip_loss(logp, old, adv, comp, s.clip_eps, w, normalizer=n_tokens)
        if s.kl_coef > 0:
            ref = _padded([r["ref_logprobs"] for r in mb], mb, T)[:, start:].to(dev)
            loss = loss + s.kl_coef * (rl_loss.k3_kl(ref, logp) * comp).sum() / n_tokens
        with torch.no_grad():
            ent = -(logp_all.exp() * logp_all).sum(-1)
        return loss, {"clipped": n_clip, "entropy": float((ent * comp).sum()), "tokens": int(comp.sum()),
                      "all_tokens": sum(len(r["prompt_ids"]) + len(r["output_ids"]) for r in mb)}


class ValuesFrom(torch.autograd.Function):
    """Forward: `values` where `mask` holds (the engine's exact logprobs), `x` elsewhere; backward:
    the gradient flows to `x` unchanged (the ordinary STE gradient of the trainer's own forward)."""

    @staticmethod
    def forward(ctx, x, values, mask):
        return torch.where(mask, values.to(x.dtype), x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def _checked_reward(fn, row) -> float:
    try:
        value = fn(row["text"], row["answer"])
        value = float(value)
    except Exception as e:  # a user's reward function: its failure is the user's input error
        raise QatctlError(f"--reward: the reward function raised {type(e).__name__}: {e} "
                          f"(prompt {row['prompt_index']})") from None
    if not math.isfinite(value):
        raise QatctlError(f"--reward: the reward function returned {value} (prompt {row['prompt_index']}); "
                          "rewards must be finite")
    return value


def _completion_logprobs(model, rows, pad_id: int, device):
    """The rows' completion logprobs by the project's one train-side scoring (consistency.completion_logprobs)."""
    from qatctl.consistency import completion_logprobs

    return completion_logprobs(model, [r["prompt_ids"] for r in rows], [r["output_ids"] for r in rows], pad_id,
                               device)


def _store_train_logprobs(rows, logp, start: int) -> None:
    for i, r in enumerate(rows):
        a = len(r["prompt_ids"]) - 1 - start
        r["train_logprobs"] = logp[i, a:a + len(r["output_ids"])].tolist()


def _padded(values: list[list[float]], rows, T: int):
    """Per-token values of each row's completion placed at its completion positions [B, T-1]."""
    out = torch.zeros((len(rows), T - 1))
    for i, (r, v) in enumerate(zip(rows, values, strict=True)):
        start = len(r["prompt_ids"]) - 1
        out[i, start:start + len(v)] = torch.tensor(v, dtype=torch.float32)
    return out


# ---------------------------------------------------------------- weight sync

def rollout_tensors(model, scheme, precision: str) -> dict[str, torch.Tensor]:
    """What the rollout engine must hold for the policy as it is now: the BF16 checkpoint tensors
    (rounded from the fp32 masters, exactly what save_checkpoint writes), converted to
    pack-quantized INT4 by the shared converter for the int4 arms."""
    from qatctl.int4format import int4_tensors
    from qatctl.models import disk_state_dict

    state = disk_state_dict(model)
    return int4_tensors(state, scheme) if precision == "int4" else state
