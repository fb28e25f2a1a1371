"""GRPO math, verifiable rewards and exact-match evaluation (DESIGN §6).

All functions are pure tensor math on per-token arrays so tests can check them on hand-computed
examples; stages/rl_step.py wires them to the engine and the trainer.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qatctl.errors import QatctlError

if TYPE_CHECKING:
    from qatctl.engines import Engine

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")


def _as_number(s: str) -> float | None:
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def exact_number(completion: str, answer: str) -> float:
    """1.0 when the last number in the completion equals the answer (numerically), else 0.0."""
    found = _NUMBER.findall(completion)
    if not found:
        return 0.0
    got, want = _as_number(found[-1]), _as_number(str(answer))
    return float(got is not None and want is not None and got == want)


def boxed(completion: str, answer: str) -> float:
    """1.0 when the last \\boxed{...} equals the answer (as text, or numerically)."""
    found = _BOXED.findall(completion)
    if not found:
        return 0.0
    got, want = found[-1].strip(), str(answer).strip()
    if got == want:
        return 1.0
    a, b = _as_number(got), _as_number(want)
    return float(a is not None and b is not None and a == b)


BUILTIN_REWARDS = {"exact-number": exact_number, "boxed": boxed}


def load_reward(spec: str):
    """A built-in reward name, or `module:function` (a module on sys.path or a path/to/file.py)."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if ":" not in spec:
        raise QatctlError(f"--reward {spec!r}: unknown (built-in: {', '.join(BUILTIN_REWARDS)}; "
                          "or module:function)")
    module_name, func_name = spec.rsplit(":", 1)
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise QatctlError(f"--reward {spec!r}: {path} does not exist")
            spec_ = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(module)
        else:
            # the current folder is searched for this import only, not for the rest of the process
            sys.path.insert(0, ".")
            try:
                module = importlib.import_module(module_name)
            finally:
                sys.path.remove(".")
    except ImportError as e:
        raise QatctlError(f"--reward {spec!r}: cannot import {module_name} ({e})") from None
    except SyntaxError as e:
        raise QatctlError(f"--reward {spec!r}: {e.filename}:{e.lineno}: syntax error ({e.msg})") from None
    except Exception as e:  # the reward file's own code failed while it was imported
        raise QatctlError(f"--reward {spec!r}: importing {module_name} raised {type(e).__name__}: {e}") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise QatctlError(f"--reward {spec!r}: {module_name} has no function {func_name!r}")
    return fn


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


def exact_match_accuracy(engine: Engine, prompts, reward=exact_number, max_new_tokens: int = 32) -> dict:
    """Greedy accuracy of an engine on prompts with answers: {accuracy, correct, total, samples}."""
    from qatctl.engines import sample

    outs = sample(engine, [(p.prompt_ids, None) for p in prompts], 0.0, max_new_tokens)
    correct, samples = 0, []
    for p, o in zip(prompts, outs, strict=True):
        ok = reward(o.text, p.answer)
        correct += ok
        samples.append({"index": p.index, "answer": p.answer, "completion": o.text, "reward": ok})
    return {"accuracy": correct / len(prompts), "correct": int(correct), "total": len(prompts), "samples": samples}
