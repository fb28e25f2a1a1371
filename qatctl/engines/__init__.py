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
from typing import Any, Protocol, runtime_checkable

ROLLOUT_WIDTH = 64  # sequences decoding at once in an embedded engine's generate() (rl-step --max-batch)


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
    # SGLang's further sampling parameters. They shape which token is sampled; the logprobs
    # reported stay those of the model's own distribution (see the module docstring).
    min_new_tokens: int = 0  # EOS and stop ids masked, stop strings not checked, before this many
    no_stop_trim: bool = False  # keep the matched stop string / stop token's text in `text`
    skip_special_tokens: bool = True  # decode options for `text`
    spaces_between_special_tokens: bool = True
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    frequency_penalty: float = 0.0  # [-2, 2]: minus penalty x count of the token in the output so far
    presence_penalty: float = 0.0  # [-2, 2]: minus penalty once the token is in the output
    repetition_penalty: float = 1.0  # (0, 2]: CTRL's: logits of prompt and output tokens / p (if > 0) or x p
    top_logprobs: int = 0  # [0, 20]: also return the N most likely tokens and logprobs at each step

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
        if not 0 <= self.min_new_tokens <= max(self.max_new_tokens, 0):
            raise QatctlError(f"sampling: min_new_tokens={self.min_new_tokens} must be in [0, max_new_tokens]")
        finite("sampling: frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        finite("sampling: presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        finite("sampling: repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True, hi=2.0)
        for tok, bias in self.logit_bias:
            finite(f"sampling: logit_bias[{tok}]", bias, lo=-100.0, hi=100.0)
            if tok < 0:
                raise QatctlError(f"sampling: logit_bias token id {tok} must be >= 0")
        if not 0 <= self.top_logprobs <= 20:
            raise QatctlError(f"sampling: top_logprobs={self.top_logprobs} must be in [0, 20]")

    @property
    def shapes_logits(self) -> bool:
        """Whether anything but temperature / top-k / top-p acts on the logits before sampling."""
        return bool(self.logit_bias or self.frequency_penalty or self.presence_penalty
                    or self.repetition_penalty != 1.0 or self.min_new_tokens)


@dataclass
class Completion:
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # of each sampled token
    finish_reason: str = "length"  # "stop" (EOS, stop id or stop string), "length" or "abort"
    text: str = ""
    matched: int | str | None = None  # what stopped it: the EOS/stop token id or the stop string
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per step, if asked


@runtime_checkable
class Engine(Protocol):
    """What every rollout/inference engine offers (embedded: qatctl/engines/embedded.py; a server:
    qatctl/engines/remote.py). Stages use only this."""

    tokenizer: Any  # an HF tokenizer (None for a remote engine not given one)
    kernel: str  # which kernel runs the linears ("remote" for a server)

    @property
    def vocab_size(self) -> int: ...

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Completions with token ids, the logprob of each sampled token and the finish reason."""

    def score(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        """Per-token logprobs of each completion given its prompt."""

    def score_argmax(self, prompts: list[list[int]], completions: list[list[int]]) -> tuple[list, list | None]:
        """(score's logprobs, the greedy token at each position, or None where the engine cannot tell)."""

    def update_weights(self, tensors: dict) -> None:
        """Swap weights in memory from the shared converter's tensors (bit-identical to a reload)."""

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None) -> str:
        """Load a checkpoint from disk in place (SGLang's route of that name); a status message."""

    def info(self) -> dict:
        """What runs it: engine, kernel, device, lm_head_kernel, threads (what a server reports)."""


@runtime_checkable
class BatchingEngine(Engine, Protocol):
    """What the continuous-batching scheduler and the server need beyond Engine (the embedded
    engine offers it; a remote engine does its own batching)."""

    device: Any  # torch.device
    model_type: str
    max_pos: int  # the longest prompt + completion, in tokens

    def open_batch(self) -> Any:
        """A decode batch (qatctl.engines.batch.Batch) that sequences join and leave step by step."""

    def flush_cache(self) -> None:
        """Drop every cached prompt prefix (weights changed, or a client asked)."""

    def prompt_logprobs(self, ids: list[int], top_n: int = 0) -> tuple[list, list]:
        """Per-position logprobs of a prompt's tokens (and top-N alternatives), as SGLang's
        input_token_logprobs report them."""


def sample(engine: Engine, jobs: list[tuple[list[int], int | None]], temperature: float, max_new_tokens: int,
           **sampling) -> list[Completion]:
    """The one seeded-generation helper: completion j is jobs[j]'s prompt sampled with jobs[j]'s
    seed (None: unseeded), all in one generate call (the engine batches continuously, and its
    batch invariance makes each completion depend on its prompt and seed only)."""
    params = [SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, **sampling)
              for _, seed in jobs]
    return engine.generate([list(p) for p, _ in jobs], params)


def resolve_device(device: str):
    """'auto' (CUDA when present), 'cpu' or 'cuda' -> a torch.device; an unavailable one is an error."""
    import torch

    from qatctl.errors import QatctlError

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise QatctlError("--device cuda: no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise QatctlError(f"--device {device!r}: expected auto, cpu or cuda")
    return torch.device(device)


def connect(url: str, model_path=None, api_key: str | None = None, tokenizer=None):
    """A server (SGLang or qatctl serve) as an Engine; pointed at `model_path` (a checkpoint on its
    disk) first when given, so what it serves is what the caller reports on."""
    from pathlib import Path

    from qatctl.engines.remote import RemoteEngine

    engine = RemoteEngine(url, tokenizer=tokenizer, api_key=api_key)
    if model_path is not None:
        engine.update_weights_from_disk(str(Path(model_path).resolve()))
    return engine


def load_engine(path, **options):
    """The embedded engine on an int4-checkpoint (or a dense HF folder, for baselines)."""
    from qatctl.engines.embedded import EmbeddedEngine

    return EmbeddedEngine.load(path, **options)
