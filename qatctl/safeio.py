"""Reading what artifacts hold, with one-line errors: safetensors files, JSON files, tokenizers.

Generic IO shared by training, conversion and inference (the engine imports this, never the
training modules): a missing, truncated or corrupt file is a QatctlError naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from qatctl.errors import QatctlError


def open_safetensors(path: Path):
    """A safetensors handle whose header and every tensor's shape were read; a truncated, empty
    or corrupt file is a one-line QatctlError naming it (the one place that maps those errors)."""
    if not Path(path).is_file():
        raise QatctlError(f"{path}: missing")
    try:
        handle = safe_open(str(path), "pt")
        for key in handle.keys():
            handle.get_slice(key).get_shape()
    except Exception as e:  # SafetensorError, HeaderTooSmall, ... : safetensors' own error types
        raise QatctlError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:160]})") from None
    return handle


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a missing, truncated or corrupt file is a QatctlError."""
    f = open_safetensors(path)
    try:
        return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise QatctlError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def read_json(path: Path):
    """A JSON file's value; a missing or malformed file is the user's one-line error naming it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise QatctlError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QatctlError(f"{path}: not valid JSON ({e})") from None


def load_tokenizer(path):
    """The tokenizer of an HF folder; an unreadable tokenizer file is a one-line error."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as e:  # what transformers/tokenizers raise on a bad file
        raise QatctlError(f"{path}: the tokenizer does not load ({str(e).splitlines()[0][:200]})") from None
    except Exception as e:  # tokenizers' Rust errors (a garbage tokenizer.json) are plain Exceptions
        raise QatctlError(f"{path}: the tokenizer does not load ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]})") from None
    check_vocab(tok, path)
    return tok


def check_vocab(tokenizer, path) -> None:
    """A tokenizer with ids beyond the model's embedding would index past it (IndexError deep in
    a forward): refused where both are read. Fewer ids than rows is normal (Qwen pads its vocab)."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        return
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return  # the checkpoint's own loader names a broken config.json
    vocab = cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise QatctlError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab} "
                          "(tokenizer files from another model?)")
