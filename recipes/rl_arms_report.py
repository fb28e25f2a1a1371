"""Tables and curves of a three-arm RL run (recipes/rl-arms.sh), as docs/results.md shows them.

    python recipes/rl_arms_report.py runs/rl3 runs/demo/int4 [docs/rl-arms.png]

Reads RUN/{arm}-s{seed}/metrics.jsonl and RUN/{arm}-s{seed}-accuracy.json for every arm and
seed present, the starting policy's INT4 accuracy (BASE-accuracy.json or a fresh `qatctl
accuracy` of BASE), and prints markdown: held-out accuracy before/after, reward over the first
and last five iterations, mismatch, and seconds per phase; draws reward (mean over seeds, each
seed thin) and mismatch per iteration.
"""

import json
import statistics
import subprocess
import sys
from pathlib import Path

ARMS = ("int4-qat", "int4-ptq", "bf16")
PHASES = ("rollout", "reward", "score", "update", "sync", "iteration")


def load(run: Path):
    out = {}
    for arm in ARMS:
        for folder in sorted(run.glob(f"{arm}-s[0-9]*")):
            if not folder.is_dir() or folder.name.endswith("-int4") or not (folder / "qatctl.json").is_file():
                continue
            seed = int(folder.name.rsplit("-s", 1)[1])
            rows = [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines()]
            manifest = json.loads((folder / "qatctl.json").read_text())
            if manifest["config"].get("policy", "").startswith("runs/pilot"):  # chained from the pilot
                pilot = Path(manifest["config"]["policy"]) / "metrics.jsonl"
                rows = [json.loads(ln) for ln in pilot.read_text().splitlines()] + rows
            acc_file = run / f"{folder.name}-accuracy.json"
            acc = json.loads(acc_file.read_text()) if acc_file.is_file() else None
            out[(arm, seed)] = {"rows": rows, "acc": acc}
    return out


def base_accuracy(base: Path) -> dict:
    cached = base.with_name(base.name + "-accuracy.json")
    if not cached.is_file():
        p = subprocess.run(["qatctl", "accuracy", str(base), "--prompts", "recipes/data/arith-test.jsonl", "--json"],
                           capture_output=True, text=True, check=True)
        cached.write_text(p.stdout)
    return json.loads(cached.read_text())


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def main() -> None:
    run, base = Path(sys.argv[1]), Path(sys.argv[2])
    png = Path(sys.argv[3]) if len(sys.argv) > 3 else run / "rl-arms.png"
    runs = load(run)
    before = base_accuracy(base)
    print(f"Starting policy {base}: {before['correct']}/{before['total']} held-out.\n")
    print("| arm | seed | iterations | held-out after (of 200) | change | reward, iters 1-5 | reward, last 5 "
          "| mean \\|Δlogp\\| | max \\|Δlogp\\| | TIS clip frac | groups dropped/drawn |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (arm, seed), r in sorted(runs.items()):
        rows, acc = r["rows"], r["acc"]
        after = f"{acc['correct']}" if acc else "-"
        delta = f"{(acc['correct'] - before['correct']) / 2:+.1f} pts" if acc else "-"
        print(f"| {arm} | {seed} | {len(rows)} | {after} | {delta} | {mean([x['reward_mean'] for x in rows[:5]]):.3f} "
              f"| {mean([x['reward_mean'] for x in rows[-5:]]):.3f} "
              f"| {mean([x['train_rollout_logprob_abs_diff_mean'] for x in rows]):.4f} "
              f"| {max(x['train_rollout_logprob_abs_diff_max'] or 0 for x in rows):.3f} "
              f"| {mean([x['tis_clip_fraction'] for x in rows]):.4f} "
              f"| {sum(x['groups_dropped'] for x in rows)}/{sum(x['groups_drawn'] for x in rows)} |")
    print("\nSeconds per iteration by phase (mean over iterations and seeds; 1 thread per run, two runs at once):\n")
    print("| arm | " + " | ".join(PHASES) + " | rollout tok/s | train tok/s |")
    print("|---|" + "---:|" * (len(PHASES) + 2))
    for arm in ARMS:
        rows = [x for (a, _), r in runs.items() if a == arm for x in r["rows"] if x.get("synced", True)]
        if rows:
            cells = [f"{mean([x[f'seconds_{p}'] for x in rows]):.1f}" for p in PHASES]
            print(f"| {arm} | " + " | ".join(cells) + f" | {mean([x['rollout_tokens_per_s'] for x in rows]):.0f} "
                  f"| {mean([x['train_tokens_per_s'] for x in rows]):.0f} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"int4-qat": "tab:blue", "int4-ptq": "tab:red", "bf16": "tab:green"}
    for arm in ARMS:
        seeds = [r["rows"] for (a, _), r in sorted(runs.items()) if a == arm]
        if not seeds:
            continue
        n = min(len(s) for s in seeds)
        for s in seeds:
            axes[0].plot([x["iteration"] for x in s], [x["reward_mean"] for x in s], color=colors[arm], alpha=0.25,
                         lw=0.8)
            axes[1].plot([x["iteration"] for x in s], [x["train_rollout_logprob_abs_diff_mean"] for x in s],
                         color=colors[arm], alpha=0.6, lw=0.8)
        avg = [statistics.mean(s[i]["reward_mean"] for s in seeds) for i in range(n)]
        axes[0].plot(range(1, n + 1), avg, color=colors[arm], lw=2, label=f"{arm} (mean of {len(seeds)} seeds)")
        axes[1].plot([], [], color=colors[arm], label=arm)
    axes[0].set(xlabel="iteration", ylabel="reward (all rollouts of the iteration)", title="raw reward")
    axes[1].set(xlabel="iteration", ylabel="mean |logp_train - logp_rollout|", yscale="log",
                title="train/rollout mismatch")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    print(f"\n![reward and mismatch per iteration]({png.name})")


if __name__ == "__main__":
    main()
