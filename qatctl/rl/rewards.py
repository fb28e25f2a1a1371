"""Verifiable rewards (exact-number, boxed, a user's module:function) and greedy exact-match
accuracy on an engine (DESIGN §6)."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

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
