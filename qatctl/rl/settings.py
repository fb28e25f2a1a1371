"""The GRPO loop's settings, importable without torch (the CLI reads their defaults)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class GRPOSettings:
    """The algorithm's knobs (rl-step's options of the same names)."""

    prompts_per_step: int = 8  # informative groups per iteration (dynamic sampling fills up to this)
    samples_per_prompt: int = 8  # GRPO group size
    max_new_tokens: int = 64  # tokens per rollout
    temperature: float = 1.0  # rollout sampling temperature
    seed: int = 0  # sets the prompt order (shuffle) and every rollout's sampling seed
    prompt_order: str = "shuffle"  # shuffle: a per-seed permutation per pass over the prompts; file: file order
    dynamic_sampling: bool = True  # drop all-equal groups and draw more prompts (DAPO)
    max_sampling_rounds: int = 4  # rollout rounds per iteration at most (the first included)
    clip_eps: float = 0.2  # PPO clip range
    tis_cap: float = 2.0  # truncated importance weight cap on the train/rollout ratio; 0 disables
    kl_coef: float = 0.0  # k3 KL to the reference policy
    scale_by_std: bool = True  # GRPO's (r - mean) / std; off: Dr.GRPO-style mean-centering only
    lr: float = 1e-6  # AdamW learning rate (constant)
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables
    micro_batch: int = 8  # sequences per forward/backward
    mini_batches: int = 1  # optimizer steps per iteration (>1: later ones are off-policy, PPO clip acts)
    true_on_policy: bool = False  # the update's logprobs are the engine's own forward (== the rollout's, bit for bit)


PROMPT_ORDERS = ("shuffle", "file")


def prompt_index(cursor: int, n: int, seed: int, order: str) -> int:
    """The prompt drawn at position `cursor` of the prompt stream (cursor counts every draw since
    the first iteration, across chained rl-steps). shuffle: pass e = cursor // n over the n
    prompts reads them in a permutation drawn from (seed, e), so two seeds see different prompt
    orders, each pass a new one, and a chained or resumed run continues the same stream."""
    if order == "file":
        return cursor % n
    return _permutation(n, seed, cursor // n)[cursor % n]


_PERMS: dict = {}


def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    import random

    key = (n, seed, epoch)
    if key not in _PERMS:
        if len(_PERMS) > 8:
            _PERMS.clear()
        order = list(range(n))
        random.Random(f"qatctl-prompts:{seed}:{epoch}").shuffle(order)  # string seeds hash stably (sha512)
        _PERMS[key] = order
    return _PERMS[key]
