"""Datasets: JSONL readers, chat-template tokenization with loss masks, and batching.

SFT lines are `{"messages": [...]}` (loss on assistant turns) or `{"prompt", "completion"}`
(loss on the completion, which gets the EOS token appended). Prompt lines for rollouts are
`{"prompt" | "messages", "answer"}`; a trailing assistant turn in `messages` is dropped so the
same file can feed SFT and RL.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from qatctl.errors import QatctlError

IGNORE = -100  # label of a token that carries no loss (HF convention)


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a malformed line is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise QatctlError(f"{path}: no such file")
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise QatctlError(f"{path}:{n}: not UTF-8 text (byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise QatctlError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise QatctlError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            rows.append((n, obj))
    if not rows:
        raise QatctlError(f"{path}: no examples")
    return rows


def _check_messages(where: str, messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise QatctlError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise QatctlError(f"{where}: messages[{i}] needs string 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise QatctlError(f"{where}: messages[{i}].role {m['role']!r} (expected system, user or assistant)")
    return messages


def _ids(tokenizer, text: str) -> list[int]:
    # Templates spell special tokens as text; plain prompts get the tokenizer's own specials.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _ids(tokenizer, text)


@dataclass(frozen=True)
class Example:
    """One tokenized SFT example: labels are IGNORE outside the trained tokens."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def tokenize_sft(tokenizer, where: str, obj: dict, max_seq_len: int) -> Example:
    if "messages" in obj:
        messages = _check_messages(where, obj["messages"])
        if not any(m["role"] == "assistant" for m in messages):
            raise QatctlError(f"{where}: no assistant message to train on")
        ids, labels = [], []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            # The template of a prefix must be a prefix of the template of the whole: then
            # the assistant span is exactly the tokens the turn added.
            prompt = chat_prompt_ids(tokenizer, messages[:i])
            full = _ids(tokenizer, tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
            if full[: len(prompt)] != prompt or full[: len(ids)] != ids:
                raise QatctlError(f"{where}: the chat template does not extend turn by turn; cannot mask turns")
            labels += [IGNORE] * (len(prompt) - len(ids)) + full[len(prompt):]
            ids = full
    elif "prompt" in obj and "completion" in obj:
        if not isinstance(obj["prompt"], str) or not isinstance(obj["completion"], str):
            raise QatctlError(f"{where}: 'prompt' and 'completion' must be strings")
        prompt = tokenizer(obj["prompt"])["input_ids"]
        completion = _ids(tokenizer, obj["completion"]) + [tokenizer.eos_token_id]
        ids, labels = prompt + completion, [IGNORE] * len(prompt) + completion
    else:
        raise QatctlError(f"{where}: expected 'messages' or 'prompt' + 'completion' (keys: {sorted(obj)})")
    truncated = len(ids) > max_seq_len
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    if all(t == IGNORE for t in labels[1:]):
        raise QatctlError(f"{where}: no trained token left within max_seq_len={max_seq_len}")
    return Example(ids, labels, truncated)


def load_sft(path: Path, tokenizer, max_seq_len: int) -> list[Example]:
    return [tokenize_sft(tokenizer, f"{path}:{n}", obj, max_seq_len) for n, obj in read_jsonl(path)]


@dataclass(frozen=True)
class Prompt:
    index: int  # position in the file (0-based), the cursor rl-step carries
    prompt_ids: list[int]
    answer: str | None
    text: str  # the prompt as the model sees it (template applied)


def load_prompts(path: Path, tokenizer, need_answer: bool = True) -> list[Prompt]:
    out = []
    for i, (n, obj) in enumerate(read_jsonl(path)):
        where = f"{path}:{n}"
        if "messages" in obj:
            messages = _check_messages(where, obj["messages"])
            while messages and messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            if not messages:
                raise QatctlError(f"{where}: 'messages' has no prompt turn")
            ids = chat_prompt_ids(tokenizer, messages)
        elif "prompt" in obj:
            if not isinstance(obj["prompt"], str):
                raise QatctlError(f"{where}: 'prompt' must be a string")
            ids = tokenizer(obj["prompt"])["input_ids"]
        else:
            raise QatctlError(f"{where}: expected 'prompt' or 'messages' (keys: {sorted(obj)})")
        answer = obj.get("answer")
        if need_answer and answer is None:
            raise QatctlError(f"{where}: missing 'answer' (the reward needs it)")
        out.append(Prompt(i, ids, None if answer is None else str(answer), tokenizer.decode(ids)))
    return out


def collate(examples: list[Example], pad_id: int):
    """Right-padded (input_ids, labels, attention_mask) tensors; labels are aligned with input_ids
    (the loss shifts them by one)."""
    import torch

    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return ids, labels, mask


def collate_completions(prompts: list[list[int]], completions: list[list[int]], pad_id: int = 0):
    """Right-padded prompt + completion (input_ids, attention_mask) and a completion mask
    [B, T-1] aligned with the next-token logits (position t predicts token t+1)."""
    import torch

    seqs = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    completion = torch.zeros((len(seqs), T - 1))
    for i, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        completion[i, len(p) - 1:len(s) - 1] = 1
    return ids, mask, completion


def step_examples(n_examples: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Indices of the examples optimizer step `step` trains on.

    The stream is one seeded permutation per epoch, concatenated; a step's examples depend on
    (seed, step) only, so a resumed run sees exactly the batches an uninterrupted one would.
    """
    out = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(i, n_examples)
        out.append(_epoch_order(n_examples, seed, epoch)[pos])
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n_examples, generator=g).tolist()


def sft_step_batches(examples, step: int, batch_size: int, micro_batch: int, seed: int, pad_id: int, device):
    """Optimizer step `step`'s micro-batches (ids, labels, mask, trained tokens of the whole step)."""
    chosen = [examples[i] for i in step_examples(len(examples), step, batch_size, seed)]
    step_tokens = sum(sum(t != IGNORE for t in e.labels[1:]) for e in chosen)
    mbs = []
    for i in range(0, len(chosen), micro_batch):
        ids, labels, mask = collate(chosen[i:i + micro_batch], pad_id)
        mbs.append((ids.to(device), labels.to(device), mask.to(device), step_tokens))
    return mbs
