"""Continuous batching for the embedded engine: sequences join and leave a running batch at
decode steps, and identical prompts share one prefill through a prefix cache.

    batch = engine.open_batch()
    seq = batch.add(prompt_ids, SamplingParams(...))      # prefill now (or copy a cached prompt's KV)
    while batch.running:
        for done in batch.step():                       # sample one token for every running row,
            done.completion                             # then one decode forward for those still going

A DecodeBatch owns a KV pool: per layer one [rows, kv heads, length, head_dim] tensor that grows
(rows and length) when a sequence needs more, with finished rows reused. Batch invariance holds
whenever a sequence joins: its prompt is prefilled alone (or its KV copied from the identical
prompt's prefill), every linear is row-invariant, attention runs over each row's own length, and
sampling uses the row's own generator. So a sequence's tokens and logprobs are bit-identical
whether it runs alone, in a batch from the start, or joins one mid-flight (tests/test_batch.py).

The prefix cache keeps, per distinct prompt, its KV and last hidden state (LRU within a byte
budget). Only whole prompts are shared: prefilling a prompt's suffix over a cached prefix would
run attention with a different kernel shape, and its bits could differ from a prefill alone.
It is flushed by engine.flush_cache() and by every weight update.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from qatctl.engines import Completion, SamplingParams
from qatctl.errors import QatctlError

if TYPE_CHECKING:
    from qatctl.engines import BatchingEngine

PREFIX_CACHE_BYTES = 256 * 2**20  # default budget of the prefix cache


class PrefixCache:
    """Whole-prompt KV cache: tuple(prompt ids) -> (per-layer K, V [kv heads, T, head_dim], the
    next-token logits after the prompt)."""

    def __init__(self, budget_bytes: int = PREFIX_CACHE_BYTES):
        self.budget = budget_bytes
        self.entries: OrderedDict[tuple, tuple] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def get(self, key: tuple):
        hit = self.entries.get(key)
        if hit is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return hit

    def put(self, key: tuple, kv: list, last: torch.Tensor) -> None:
        size = sum(k.numel() * k.element_size() * 2 for k, _ in kv) + last.numel() * last.element_size()
        if size > self.budget or key in self.entries:
            return
        while self.bytes + size > self.budget:
            _, (old_kv, old_h, old_size) = self.entries.popitem(last=False)
            self.bytes -= old_size
        self.entries[key] = (kv, last, size)
        self.bytes += size

    def flush(self) -> int:
        n = len(self.entries)
        self.entries.clear()
        self.bytes = 0
        return n


@dataclass(eq=False)
class Sequence:
    """One request in a DecodeBatch. `completion` fills in as tokens are sampled."""

    params: SamplingParams
    completion: Completion
    generator: torch.Generator
    on_token: object = None  # on_token(token_id, logprob, top logprobs or None), as each token is sampled
    tag: object = None  # the caller's handle (the server's request)
    row: int = -1  # KV pool row while running
    length: int = 0  # tokens in this row's KV
    logits: torch.Tensor | None = None  # next-token logits (CPU, fp32)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    done: bool = False


class DecodeBatch:
    def __init__(self, engine: BatchingEngine):
        self.engine = engine
        self.running: list[Sequence] = []
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.rows = self.capacity = 0
        self.free: list[int] = []
        self.pool = None  # the fused decode step's view of the KV pool (engine.decode_plan), per pool

    # -------------------------------------------------------------- KV pool
    def _ensure(self, rows: int, length: int) -> None:
        """Grow the pool to at least `rows` rows of `length` positions (copying what is there)."""
        eng = self.engine
        if rows <= self.rows and length <= self.capacity:
            return
        new_rows = max(rows, self.rows, min(2 * self.rows, rows + 8)) if self.rows else rows
        new_len = max(length, self.capacity)
        if new_len > self.capacity and self.capacity:
            new_len = min(max(new_len, 2 * self.capacity), eng.max_pos)
        shape = (new_rows, eng.n_kv, new_len, eng.head_dim)
        grown = []
        for K, V in self.cache or [(None, None)] * len(eng.layers):
            K2, V2 = torch.zeros(shape, device=eng.device), torch.zeros(shape, device=eng.device)
            if K is not None:
                K2[:self.rows, :, :self.capacity] = K
                V2[:self.rows, :, :self.capacity] = V
            grown.append((K2, V2))
        self.free += list(range(self.rows, new_rows))
        self.cache, self.rows, self.capacity = grown, new_rows, new_len
        self.pool = None

    def _take_row(self, length: int) -> int:
        if not self.free:
            self._ensure(self.rows + 1, length)
        self._ensure(self.rows, length)
        self.free.sort()
        return self.free.pop(0)

    # -------------------------------------------------------------- joining and leaving
    def add(self, prompt_ids: list[int], params: SamplingParams, on_token=None, tag=None) -> Sequence:
        """Prefill `prompt_ids` (or copy the KV of the identical prompt from the prefix cache) into a
        free row; the sequence samples its first token at the next step()."""
        eng = self.engine
        if not prompt_ids:
            raise QatctlError("generate: a prompt is empty")
        if len(prompt_ids) + params.max_new_tokens > eng.max_pos:
            raise QatctlError(f"generate: prompt ({len(prompt_ids)} tokens) + max_new_tokens {params.max_new_tokens} "
                              f"exceeds the model's {eng.max_pos} positions")
        seq = Sequence(params, Completion(prompt_ids=list(prompt_ids)), _generator(params.seed), on_token, tag)
        if params.max_new_tokens == 0:
            seq.done = True
            seq.completion.finish_reason = "length"
            return seq
        row = self._take_row(len(prompt_ids) + params.max_new_tokens)
        key = tuple(prompt_ids)
        hit = eng.prefix_cache.get(key)
        T = len(prompt_ids)
        if hit is not None:
            kv, last, _ = hit
            for (K, V), (k, v) in zip(self.cache, kv, strict=True):
                K[row, :, :T] = k
                V[row, :, :T] = v
            seq.cached_tokens = T
        else:
            last = eng._prefill(prompt_ids, self.cache, row, T - 1).cpu()[0]
            eng.prefix_cache.put(key, [(K[row, :, :T].clone(), V[row, :, :T].clone()) for K, V in self.cache],
                                 last.clone())
        seq.row, seq.length = row, T
        seq.logits = last
        self.running.append(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """End a running sequence now with finish_reason 'abort' (tokens so far are kept)."""
        if seq in self.running:
            self.running.remove(seq)
            self._finish(seq, "abort")

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.done = True
        seq.completion.finish_reason = reason
        if seq.row >= 0:
            self.free.append(seq.row)
            seq.row = -1
        seq.logits = None
        seq.completion.text = completion_text(self.engine.tokenizer, seq.completion, seq.params)

    # -------------------------------------------------------------- one decode step
    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Sample one token for every running sequence; those that end leave the batch (returned);
        the rest run one decode forward together."""
        eng = self.engine
        finished, still = [], []
        for seq in self.running:
            o, sp = seq.completion, seq.params
            tok, lp = _sample(seq.logits, sp, seq.generator, seq, eng.eos_ids)
            if sp.top_logprobs:
                top = token_logprobs(seq.logits).topk(sp.top_logprobs)
                o.top_logprobs.append(list(zip(top.indices.tolist(), top.values.tolist(), strict=True)))
            o.output_ids.append(tok)
            o.logprobs.append(lp)
            if seq.on_token is not None:
                seq.on_token(tok, lp, o.top_logprobs[-1] if sp.top_logprobs else None)
            if len(o.output_ids) < sp.min_new_tokens:
                still.append(seq)
            elif (not sp.ignore_eos and tok in eng.eos_ids) or tok in sp.stop_token_ids:
                o.matched = tok
                self._finish(seq, "stop")
                finished.append(seq)
            elif sp.stop and (hit := _hit_stop(eng.tokenizer, o, sp.stop)) is not None:
                o.matched = hit
                self._finish(seq, "stop")
                finished.append(seq)
            elif len(o.output_ids) >= sp.max_new_tokens:
                self._finish(seq, "length")
                finished.append(seq)
            else:
                still.append(seq)
        self.running = still
        if still:
            if self.pool is None and eng.decode_plan is not None:
                self.pool = eng.decode_plan.pool(self.cache)
            logits = eng._decode([s.completion.output_ids[-1] for s in still], self.cache, self.pool,
                                 [s.row for s in still], [s.length for s in still]).cpu()
            for i, s in enumerate(still):
                s.length += 1
                s.logits = logits[i]
        return finished


def _generator(seed):
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else torch.randint(0, 2**62, ()).item())
    return g


def token_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """The raw log-softmax of one position's logits [V]: the one call that gives a sampled token's
    logprob and a scored token's (score, prompt_logprobs), so equal logits give equal bits."""
    return torch.log_softmax(logits, dim=-1)


def token_logprob(logits: torch.Tensor, tok: int) -> float:
    return float(token_logprobs(logits)[tok])


def _sample(logits: torch.Tensor, sp: SamplingParams, gen: torch.Generator, seq: Sequence | None = None,
            eos_ids=()) -> tuple[int, float]:
    """One token from `logits` (raw, fp32) under `sp`; returns it with its raw logprob."""
    logprobs = token_logprobs(logits)
    if seq is not None and sp.shapes_logits:
        logits = _shape(logits.clone(), sp, seq, eos_ids)
    if sp.temperature == 0:
        tok = int(torch.argmax(logits))
        return tok, float(logprobs[tok])
    scaled = logits / sp.temperature
    if sp.top_k:
        kth = torch.topk(scaled, min(sp.top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    if sp.top_p < 1:
        sorted_l, idx = torch.sort(scaled, descending=True)
        cum = torch.softmax(sorted_l, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_l, -1) >= sp.top_p  # keep the smallest prefix reaching top_p
        scaled = scaled.scatter(0, idx, sorted_l.masked_fill(drop, -math.inf))
    tok = int(torch.multinomial(torch.softmax(scaled, -1), 1, generator=gen))
    return tok, float(logprobs[tok])


def _shape(logits: torch.Tensor, sp: SamplingParams, seq: Sequence, eos_ids) -> torch.Tensor:
    """SGLang's/vLLM's logit processors, in their order: repetition penalty (prompt and output
    tokens), frequency and presence penalties (output tokens), logit bias, min_new_tokens."""
    out = seq.completion.output_ids
    V = logits.numel()
    if sp.repetition_penalty != 1.0:
        ids = torch.tensor(sorted({t for t in seq.completion.prompt_ids + out if t < V}), dtype=torch.long)
        if ids.numel():
            v = logits[ids]
            logits[ids] = torch.where(v > 0, v / sp.repetition_penalty, v * sp.repetition_penalty)
    if out and (sp.frequency_penalty or sp.presence_penalty):
        counts = torch.bincount(torch.tensor([t for t in out if t < V], dtype=torch.long), minlength=V)[:V].float()
        logits -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0).float()
    for tok, bias in sp.logit_bias:
        if tok < V:
            logits[tok] += bias
    if len(out) < sp.min_new_tokens:
        banned = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(eos_ids))
        for tok in banned:
            if tok < V:
                logits[tok] = -math.inf
    return logits


def _hit_stop(tokenizer, o: Completion, stops) -> str | None:
    """The stop string found in the decoded tail of the completion, if any."""
    tail = tokenizer.decode(o.output_ids[-16:], skip_special_tokens=True)
    return next((s for s in stops if s in tail), None)


def completion_text(tokenizer, o: Completion, sp: SamplingParams) -> str:
    """The completion's text as SGLang reports it: a matched stop token's text and everything
    from a matched stop string on are trimmed, unless no_stop_trim."""
    ids = o.output_ids
    if isinstance(o.matched, int) and not sp.no_stop_trim:
        ids = ids[:-1]
    text = tokenizer.decode(ids, skip_special_tokens=sp.skip_special_tokens,
                            spaces_between_special_tokens=sp.spaces_between_special_tokens)
    if isinstance(o.matched, str) and not sp.no_stop_trim:
        cut = text.find(o.matched)
        text = text[:cut] if cut >= 0 else text
    return text
