"""Paired statistics for two scorings of the same problems (`qatctl compare`).

Two accuracies measured on the same problems are not independent: their difference's error
comes only from the problems where they disagree. So a difference is reported as

- the paired difference in points, B - A, with a percentile bootstrap 95% CI (problems resampled
  with replacement, the same resample for both sides; seeded, so a table regenerates exactly),
- McNemar's exact test on the discordant pairs (b: A right and B wrong, c: A wrong and B right;
  two-sided binomial p with n = b + c, 1 when there are none),
- the paired SE, sqrt(sum((x_B - x_A - d)^2) / (n (n - 1))).

Rewards must be 0/1 for McNemar (exact match); other rewards get the bootstrap CI only.
"""

from __future__ import annotations

import math
from pathlib import Path

from qatctl.errors import QatctlError


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p: 2 * P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2), capped at 1."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_compare(a: list[float], b: list[float], bootstrap: int = 10000, seed: int = 0) -> dict:
    """B - A on the same problems (lists in the same problem order)."""
    import numpy as np

    if len(a) != len(b) or not a:
        raise QatctlError(f"paired comparison needs the same non-empty problems on both sides ({len(a)} vs {len(b)})")
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = len(x)
    d = y - x
    mean = float(d.mean())
    se = float(math.sqrt(((d - mean) ** 2).sum() / (n * (n - 1)))) if n > 1 else float("nan")
    rng = np.random.default_rng(seed)
    boots = np.empty(bootstrap)
    for start in range(0, bootstrap, 1000):  # 1000 resamples at a time: bounded memory
        idx = rng.integers(0, n, size=(min(1000, bootstrap - start), n))
        boots[start:start + len(idx)] = d[idx].mean(axis=1)
    lo, hi = (float(v) for v in np.quantile(boots, [0.025, 0.975]))
    binary = bool(np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all())
    disc_b = int(((x == 1) & (y == 0)).sum())
    disc_c = int(((x == 0) & (y == 1)).sum())
    return {"n": n, "a_mean": float(x.mean()), "b_mean": float(y.mean()), "difference": mean,
            "ci95": [lo, hi], "paired_se": se, "bootstrap": bootstrap, "seed": seed,
            "a_only": disc_b if binary else None, "b_only": disc_c if binary else None,
            "mcnemar_p": mcnemar_exact(disc_b, disc_c) if binary else None}


def read_scored(path: Path) -> dict:
    """An `qatctl accuracy --json` output: {index: reward} of its per-problem samples, and its prompt set."""
    from qatctl.safeio import read_json

    obj = read_json(Path(path))
    samples = obj.get("samples") if isinstance(obj, dict) else None
    if not isinstance(samples, list) or not samples:
        raise QatctlError(f"{path}: has no per-problem 'samples' (write it with `qatctl accuracy --json`)")
    scores = {}
    for i, s in enumerate(samples):
        if not isinstance(s, dict) or "index" not in s or "reward" not in s:
            raise QatctlError(f"{path}: samples[{i}] lacks 'index' or 'reward'")
        r = s["reward"]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
            raise QatctlError(f"{path}: samples[{i}].reward is {r!r}, expected a finite number")
        if s["index"] in scores:
            raise QatctlError(f"{path}: problem {s['index']} is scored twice")
        scores[s["index"]] = float(r)
    return {"scores": scores, "prompts": obj.get("prompts"), "prompts_digest": obj.get("prompts_digest"),
            "model": obj.get("model")}


def compare_files(a_path: Path, b_path: Path, bootstrap: int = 10000, seed: int = 0) -> dict:
    a, b = read_scored(a_path), read_scored(b_path)
    if a["prompts_digest"] and b["prompts_digest"] and a["prompts_digest"] != b["prompts_digest"]:
        raise QatctlError(f"{a_path} and {b_path}: scored on different prompt files ({a['prompts']} vs "
                          f"{b['prompts']}); a paired comparison needs the same problems")
    if set(a["scores"]) != set(b["scores"]):
        only = sorted(set(a["scores"]) ^ set(b["scores"]))[:3]
        raise QatctlError(f"{a_path} and {b_path}: not the same problems (e.g. index {only}); "
                          "score both on the same prompts and --limit")
    order = sorted(a["scores"])
    result = paired_compare([a["scores"][i] for i in order], [b["scores"][i] for i in order], bootstrap, seed)
    return {"a": str(a_path), "b": str(b_path), "a_model": a["model"], "b_model": b["model"],
            "prompts": a["prompts"] or b["prompts"], **result}
