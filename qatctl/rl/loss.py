"""GRPO's loss maths on per-token tensors (DESIGN §6): group-normalized advantages, truncated
importance weights, the k3 KL and the PPO-clip loss. Pure functions, checked on hand-computed
examples; the loop (qatctl/rl/loop.py) wires them to the engine and the trainer."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6):
    """GRPO advantages for rewards [groups, samples]: (r - mean) / (std + eps) within each group.

    std is the unbiased sample std (as verl and TRL compute it). A group whose rewards are all
    equal gets advantage exactly 0, so it contributes no policy gradient. Returns
    (advantages [groups, samples], mask of groups that carry signal [groups]).
    """
    rewards = rewards.double()
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    informative = (rewards.max(dim=1).values - rewards.min(dim=1).values) > 0
    if scale_by_std and rewards.shape[1] > 1:
        centered = centered / (rewards.std(dim=1, keepdim=True) + eps)
    centered[~informative] = 0.0
    return centered.float(), informative


def tis_weights(logp_old_train: torch.Tensor, logp_rollout: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights min(exp(logp_train - logp_rollout), cap); cap 0 disables (1)."""
    if cap <= 0:
        return torch.ones_like(logp_old_train)
    return torch.exp(logp_old_train - logp_rollout).clamp(max=cap)


def k3_kl(logp_p: torch.Tensor, logp_q: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(q || p) on tokens sampled from q: r - 1 - log r, r = p/q."""
    log_ratio = logp_p - logp_q
    return torch.exp(log_ratio) - 1 - log_ratio


def ppo_clip_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  clip_eps: float, weights: torch.Tensor | None = None, normalizer: float | None = None):
    """Token-level PPO-clip policy loss, per-token weights (TIS) applied to each token's term.

    logp, logp_old, weights, mask: [B, T]; advantages: [B] (one per sequence). The loss is the
    sum over masked tokens divided by `normalizer` (default: the mask's token count), so a
    step's micro-batches add up to the token mean of the whole step. Returns (loss, clipped
    token count).
    """
    ratio = torch.exp(logp - logp_old)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if weights is not None:
        per_token = per_token * weights
    n = float(mask.sum()) if normalizer is None else normalizer
    was_clipped = ((clipped < unclipped) & mask.bool()).sum()
    return (per_token * mask).sum() / max(n, 1.0), int(was_clipped)
