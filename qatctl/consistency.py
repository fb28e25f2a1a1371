"""Train <-> inference mismatch: train-side scoring, token metrics, the weight-level check, plots.

Used by eval-consistency (the report) and rl-step (its per-step mismatch metrics).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from qatctl.data import collate_completions
from qatctl.errors import QatctlError


def completion_logprobs(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int, device):
    """The trainer's logprobs of completion tokens, the one train-side scoring of the project
    (rl-step's loss and scoring pass, eval-consistency's train side): right-padded rows through the
    HF model as the caller prepared it (fake-int4 view, plain masters, autocast or not).
    Returns (logp [B, T'], log_softmax [B, T', V], completion mask [B, T'], start): column j of the
    T' columns predicts token start + j + 1. Only positions from the earliest completion on get
    logits (HF's logits_to_keep): the prompt positions' log-softmax is work nobody reads.
    """
    ids, mask, comp = collate_completions(prompts, completions, pad_id)
    ids, mask, comp = ids.to(device), mask.to(device), comp.to(device)
    T = ids.shape[1]
    start = min(len(p) for p in prompts) - 1
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=T - start).logits[:, :-1].float()
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, ids[:, start + 1:].unsqueeze(-1)).squeeze(-1)
    return logp, logp_all, comp[:, start:], start


@torch.no_grad()
def train_logprobs(model, prompts: list[list[int]], completions: list[list[int]], batch: int = 8, pad_id: int = 0):
    """Per-token logprobs of each completion (completion_logprobs, in batches of `batch`) and its
    greedy (argmax) tokens, as (logprobs, argmax) lists per sequence."""
    lps, tops = [], []
    device = next(model.parameters()).device
    for i in range(0, len(prompts), batch):
        ps, cs = prompts[i:i + batch], completions[i:i + batch]
        logp, logp_all, _, start = completion_logprobs(model, ps, cs, pad_id, device)
        for j, (p, c) in enumerate(zip(ps, cs, strict=True)):
            a = len(p) - 1 - start
            lps.append(logp[j, a:a + len(c)].tolist())
            tops.append(logp_all[j, a:a + len(c)].argmax(-1).tolist())
    return lps, tops


def _quantile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = (len(sorted_vals) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def mismatch_metrics(train: list[list[float]], infer: list[list[float]], train_top=None, infer_top=None) -> dict:
    """Token-level |logp_train - logp_infer| statistics over completion tokens.

    k3_kl estimates KL(infer || train) on tokens sampled by the inference side; log_ppl_diff is
    mean(-logp_infer) - mean(-logp_train) (> 0: the trainer finds the rollouts likelier).
    """
    diffs, seq_means, k3, n_big = [], [], 0.0, 0
    sum_t = sum_i = 0.0
    for t, i in zip(train, infer, strict=True):
        if len(t) != len(i):
            raise QatctlError(f"mismatch: {len(t)} train vs {len(i)} inference logprobs for one sequence")
        d = [abs(a - b) for a, b in zip(t, i, strict=True)]
        diffs += d
        if d:
            seq_means.append(sum(d) / len(d))
        for a, b in zip(t, i, strict=True):
            r = a - b
            k3 += math.exp(r) - 1 - r
            sum_t, sum_i = sum_t + a, sum_i + b
        n_big += sum(x > 0.1 for x in d)
    n = len(diffs)
    if n == 0:
        raise QatctlError("mismatch: no completion tokens to compare")
    s = sorted(diffs)
    out = {"tokens": n, "sequences": len(seq_means), "mean_abs_diff": sum(diffs) / n, "p50_abs_diff": _quantile(s, 0.5),
           "p99_abs_diff": _quantile(s, 0.99), "max_abs_diff": s[-1],
           "seq_mean_abs_diff": sum(seq_means) / len(seq_means), "k3_kl": k3 / n,
           "log_ppl_diff": (-sum_i + sum_t) / n, "frac_abs_diff_gt_0.1": n_big / n}
    if train_top is not None and infer_top is not None:
        pairs = [(a, b) for ta, ib in zip(train_top, infer_top, strict=True) for a, b in zip(ta, ib, strict=True)]
        out["greedy_agreement"] = sum(a == b for a, b in pairs) / len(pairs) if pairs else None
    return out


def per_position(train: list[list[float]], infer: list[list[float]]) -> list[float]:
    """Mean |Δlogp| at each completion position (over the sequences that reach it)."""
    sums, counts = [], []
    for t, i in zip(train, infer, strict=True):
        for k, (a, b) in enumerate(zip(t, i, strict=True)):
            if k == len(sums):
                sums.append(0.0)
                counts.append(0)
            sums[k] += abs(a - b)
            counts[k] += 1
    return [s / c for s, c in zip(sums, counts, strict=True)]


def weight_check(train_ckpt: Path, infer_ckpt: Path, view: str, scheme) -> dict:
    """Compare, tensor by tensor, the weights the trainer computes with against the inference ones.

    view 'fake-int4': fake_quant(master) vs the INT4 checkpoint's dequant(unpack(packed)) (or the
    inference BF16 weight). view 'bf16': the BF16 master itself. Reads the on-disk tensors, so
    fused MoE experts are compared per expert (the on-disk layout, which convert-int4 writes).
    """
    from qatctl.int4format import Int4Reader
    from qatctl.quant import fake_quant_value, is_target

    train, infer = Int4Reader.from_folder(train_ckpt), Int4Reader.from_folder(infer_ckpt)
    checked, different = 0, []
    for key in sorted(train.keys):
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        if module is None or not is_target(module, scheme):
            continue
        w = train.tensor(key)
        if w.ndim != 2:
            continue
        mine = fake_quant_value(w.to(torch.bfloat16), scheme) if view == "fake-int4" else w.to(torch.bfloat16)
        checked += 1
        if not infer.is_quantized(module) and not infer.has(key):
            different.append(f"{module} (missing in {infer_ckpt})")
            continue
        theirs = infer.weight(module).to(torch.bfloat16)
        if mine.shape != theirs.shape or not torch.equal(mine, theirs):
            different.append(module)
    return {"tensors": checked, "identical": checked - len(different),
            "identical_fraction": (checked - len(different)) / checked if checked else None,
            "different": different[:50], "different_count": len(different)}


def plots(folder: Path, diffs_by_arm: dict, positions_by_arm: dict, grid: dict | None = None) -> list[str]:
    """PNG plots: |Δlogp| histogram, |Δlogp| by position, and the ablation grid if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(name: str, fig) -> None:
        fig.tight_layout()
        fig.savefig(folder / name, dpi=100)
        plt.close(fig)
        written.append(name)

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, d in diffs_by_arm.items():
        vals = [max(x, 1e-9) for x in d]
        bins = [10 ** (k / 4) for k in range(-36, 5)]
        ax.hist(vals, bins=bins, histtype="step", label=arm)
    ax.set_xscale("log")
    ax.set_xlabel("|logp_train - logp_infer| (values < 1e-9 shown at 1e-9)")
    ax.set_ylabel("tokens")
    ax.legend(fontsize=7)
    save("abs_diff_hist.png", fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, pos in positions_by_arm.items():
        ax.plot(range(len(pos)), pos, label=arm)
    ax.set_xlabel("completion position")
    ax.set_ylabel("mean |Δlogp|")
    ax.legend(fontsize=7)
    save("abs_diff_by_position.png", fig)

    if grid:
        views, rollouts = ["fake-int4", "bf16"], ["int4", "bf16"]
        vals = [[grid[(v, r)] for r in rollouts] for v in views]
        fig, ax = plt.subplots(figsize=(4.5, 4))
        im = ax.imshow(vals, cmap="viridis")
        ax.set_xticks(range(2), [f"rollout {r}" for r in rollouts])
        ax.set_yticks(range(2), [f"train {v}" for v in views])
        for a in range(2):
            for b in range(2):
                ax.text(b, a, f"{vals[a][b]:.2e}", ha="center", va="center", color="w")
        ax.set_title("mean |Δlogp|")
        fig.colorbar(im)
        save("ablation_grid.png", fig)
    return written


def rl_series(run_dir: Path) -> dict[str, list[dict]]:
    """Per-iteration metrics of every rl-step series under run_dir: one series per folder holding
    rl-step outputs (a chain of single steps, or multi-iteration outputs with metrics.jsonl),
    ordered by global iteration. run_dir may itself be one rl-step output."""
    import json

    run_dir = Path(run_dir)
    series: dict[str, dict[int, dict]] = {}
    for m in sorted(run_dir.rglob("qatctl.json")):
        try:
            manifest = json.loads(m.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # not ours to judge here; inspect reports it
        if manifest.get("stage") != "rl-step" or manifest.get("status") != "complete" \
                or manifest.get("kind") != "qat-checkpoint":
            continue
        folder = m.parent
        rows = ([json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines() if ln.strip()]
                if (folder / "metrics.jsonl").is_file() else [manifest["metrics"]])
        name = run_dir.name if folder == run_dir else str(folder.parent.relative_to(run_dir.parent))
        for r in rows:
            series.setdefault(name, {})[int(r["iteration"])] = r
    if not series:
        raise QatctlError(f"{run_dir}: no complete rl-step outputs found")
    return {k: [v[i] for i in sorted(v)] for k, v in series.items()}


def plot_rl_history(run_dirs, png: Path) -> Path:
    """Reward and mismatch curves of the rl-step series under one or several run folders, side by
    side (one line per series)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for d in [run_dirs] if isinstance(run_dirs, (str, Path)) else run_dirs:
        series.update(rl_series(Path(d)))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, ms in series.items():
        its = [x["iteration"] for x in ms]
        axes[0].plot(its, [x["reward_mean"] for x in ms], marker=".", label=name)
        axes[1].plot(its, [x["train_rollout_logprob_abs_diff_mean"] for x in ms], marker=".", label=name)
    axes[0].set(xlabel="iteration", ylabel="reward mean (all rollouts)", title="reward")
    axes[1].set(xlabel="iteration", ylabel="mean |logp_train - logp_rollout|", title="train/rollout mismatch",
                yscale="log")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
