"""Rollout and inference engines (DESIGN §5): one small interface.

    engine = load_engine("runs/demo/int4")               # embedded INT4 engine
    out = engine.generate([prompt_ids], SamplingParams(temperature=0, max_new_tokens=16))
    out[0].output_ids, out[0].logprobs, out[0].finish_reason
    engine.score([prompt_ids], [completion_ids])         # per-token logprobs

Logprobs are those of the model's own distribution (log_softmax of the raw logits: no
temperature, top-k or top-p applied), which is what the training side computes for the same
tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's EOS ids
    stop: tuple[str, ...] = ()  # stop strings, checked on the decoded completion
    seed: int | None = None  # same seed + same prompt -> same tokens, whatever the batch
    ignore_eos: bool = False

    def __post_init__(self):
        from qatctl.checks import finite
        from qatctl.errors import QatctlError

        finite("sampling: temperature", self.temperature, lo=0.0, hi=1e4)
        if 0 < self.temperature < 1e-4:  # logits / 1e-40 overflow to inf: treat as a user error, not a NaN
            raise QatctlError(f"sampling: temperature={self.temperature} is too small (use 0 for greedy, or >= 1e-4)")
        finite("sampling: top_p", self.top_p, lo=0.0, lo_open=True, hi=1.0)
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise QatctlError(f"sampling: seed={self.seed} must be in [0, 2**63)")
        if self.top_k < 0:
            raise QatctlError(f"sampling: top_k={self.top_k} must be >= 0")
        if self.max_new_tokens < 0:
            raise QatctlError(f"sampling: max_new_tokens={self.max_new_tokens} must be >= 0")


@dataclass
class Completion:
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # of each sampled token
    finish_reason: str = "length"  # "stop" (EOS, stop id or stop string) or "length"
    text: str = ""


def load_engine(path, **options):
    """The embedded engine on an int4-checkpoint (or a dense HF folder, for baselines)."""
    from qatctl.engines.embedded import EmbeddedEngine

    return EmbeddedEngine.load(path, **options)
