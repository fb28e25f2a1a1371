"""Rebuild the experiment's tables and plots from its committed records (`make results`).

    python recipes/results.py                                  # results/exp, results/exp70 -> docs/results.md + PNGs
    python recipes/results.py --root R --tables T.md --no-plots  # what the test runs on a fixture

Reads each experiment's ROOT/sSEED/ARM/link-J/ (EXPERIMENTS: results/exp, results/exp70) as
recipes/loop.mk writes them (REPORTS) (metrics.jsonl, rl.json, accuracy-{val,test,test-oot}-{int4,dense}.json
with per-problem rewards) and writes:
- the tables between `<!-- results:MARKER -->` markers of docs/results.md (MARKER: exp, exp70; and to
  --tables if given):
  accuracy per arm and link (mean over seeds, min-max), paired comparisons (qatctl.stats: bootstrap
  95% CI and McNemar over (seed, problem) pairs), reward and mismatch per arm;
- docs/MARKER-reward.png (reward per iteration: per-seed lines faint, the seeds' mean of a 5-iteration
  moving average bold, its min-max band), docs/MARKER-accuracy.png (test accuracy per link, 95% CI),
  docs/MARKER-accuracy-val.png (val accuracy, where val has links that test lacks) and,
  where a seed has the int4-qat-exact arm (--true-on-policy), docs/MARKER-on-policy.png (its reward and
  mismatch per iteration beside int4-qat's from the same start and seed);
- the tables between `<!-- results:llama-gap -->` and `<!-- results:llama-moe -->` markers: the
  logprob gap between llama.cpp and qatctl on the same weights, from each record of
  bench/llama_cpp_logprobs.py under results/llama-cpp/same-weights/ and results/llama-cpp/qwen3-moe/
  (bench/llama_cpp_moe.py).
Nothing here is typed by hand: every number comes from the records.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench._report import replace_section  # noqa: E402
from qatctl.stats import paired_compare  # noqa: E402

ARMS = ("int4-qat", "int4-ptq", "bf16", "int4-qat-exact")  # the last: int4-qat with --true-on-policy
SPLITS = ("val", "test", "test-oot")
KINDS = ("int4", "dense")
# The deployable (INT4) view of each arm, and what the bf16 arm's INT4 conversion is called.
LABEL = {("int4-qat", "int4"): "int4-qat", ("int4-ptq", "int4"): "int4-ptq", ("bf16", "dense"): "bf16 (dense)",
         ("bf16", "int4"): "bf16-then-ptq", ("int4-qat", "dense"): "int4-qat (dense)",
         ("int4-ptq", "dense"): "int4-ptq (dense)", ("int4-qat-exact", "int4"): "int4-qat-exact",
         ("int4-qat-exact", "dense"): "int4-qat-exact (dense)"}


def load(root: Path) -> dict:
    """{seed: {arm: {link: {"acc": {(split, kind): {index: reward}}, "metrics": [...], "rl": {...}}}}}"""
    runs: dict = {}
    for link_dir in sorted(root.glob("s*/*/link-*")):
        seed, arm, link = int(link_dir.parts[-3][1:]), link_dir.parts[-2], int(link_dir.name.split("-")[1])
        rec = {"acc": {}, "metrics": [], "rl": None}
        for split in SPLITS:
            for kind in KINDS:
                f = link_dir / f"accuracy-{split}-{kind}.json"
                if f.is_file():
                    rec["acc"][(split, kind)] = {s["index"]: float(s["reward"]) for s in json.loads(f.read_text())["samples"]}
        if (link_dir / "metrics.jsonl").is_file():
            rec["metrics"] = [json.loads(ln) for ln in (link_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        if (link_dir / "rl.json").is_file():
            rec["rl"] = json.loads((link_dir / "rl.json").read_text())
        if rec["acc"] or rec["metrics"]:  # a link still running has no records yet
            runs.setdefault(seed, {}).setdefault(arm, {})[link] = rec
    return runs


def pct(v: float) -> str:
    return f"{100 * v:.1f}"


def accuracy_table(runs: dict) -> list[str]:
    lines = ["| arm | link (iterations) | seeds | " + " | ".join(f"{s} {k}" for k in KINDS for s in SPLITS) + " |",
             "|---|---|---|" + "---|" * (len(SPLITS) * len(KINDS))]
    for arm in ARMS:
        links = sorted({j for s in runs.values() for j in s.get(arm, {})})
        for j in links:
            recs = [runs[s][arm][j] for s in sorted(runs) if j in runs[s].get(arm, {})]
            cells = []
            for kind in KINDS:
                for split in SPLITS:
                    accs = [sum(r["acc"][(split, kind)].values()) / len(r["acc"][(split, kind)])
                            for r in recs if (split, kind) in r["acc"]]
                    if not accs:
                        cells.append("-")
                    elif len(accs) == 1:
                        cells.append(pct(accs[0]))
                    else:
                        cells.append(f"{pct(sum(accs) / len(accs))} [{pct(min(accs))}-{pct(max(accs))}]")
            lines.append(f"| {arm} | {j} | {len(recs)} | " + " | ".join(cells) + " |")
    return lines


def pairs(runs: dict, a: tuple, b: tuple, split: str) -> tuple[list, list, int]:
    """(A rewards, B rewards, seeds) over every (seed, problem) that both sides scored.
    a, b: (arm, link, kind)."""
    xs, ys, seeds = [], [], 0
    for s in sorted(runs):
        ra, rb = runs[s].get(a[0], {}).get(a[1]), runs[s].get(b[0], {}).get(b[1])
        if ra is None or rb is None or (split, a[2]) not in ra["acc"] or (split, b[2]) not in rb["acc"]:
            continue
        sa, sb = ra["acc"][(split, a[2])], rb["acc"][(split, b[2])]
        common = sorted(set(sa) & set(sb))
        xs += [sa[i] for i in common]
        ys += [sb[i] for i in common]
        seeds += 1
    return xs, ys, seeds


def comparison_table(runs: dict) -> list[str]:
    lines = ["| comparison (B - A) | split | link | seeds | pairs | A % | B % | B - A (points) | 95% CI | McNemar p | "
             "B - A per seed |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    common = sorted(set.intersection(*[{j for s in runs.values() for j in s.get(arm, {})} for arm in ARMS if
                                       any(arm in s for s in runs.values())] or [set()]))
    rows = []
    for j in [x for x in common if x > 0]:
        for split in ("test", "test-oot"):
            rows.append(("int4-qat vs bf16-then-ptq (both INT4)", split, j, ("bf16", j, "int4"), ("int4-qat", j, "int4")))
            rows.append(("int4-qat vs int4-ptq (both INT4)", split, j, ("int4-ptq", j, "int4"), ("int4-qat", j, "int4")))
            rows.append(("int4-qat (INT4) vs bf16 (dense)", split, j, ("bf16", j, "dense"), ("int4-qat", j, "int4")))
            rows.append(("int4-qat-exact vs int4-qat (both INT4; true on-policy vs default)", split, j,
                         ("int4-qat", j, "int4"), ("int4-qat-exact", j, "int4")))
    for arm, kind in (("int4-qat", "int4"), ("bf16", "dense"), ("bf16", "int4"), ("int4-ptq", "int4"),
                      ("int4-qat-exact", "int4")):
        links = sorted({x for s in runs.values() for x in s.get(arm, {})})
        if len(links) > 1:
            rows.append((f"{LABEL[(arm, kind)]}: link {links[-1]} vs its start", "test", links[-1],
                         (arm, 0, kind), (arm, links[-1], kind)))
    for name, split, j, a, b in rows:
        xs, ys, seeds = pairs(runs, a, b, split)
        if not xs:
            continue
        r = paired_compare(xs, ys, bootstrap=10000, seed=0)
        p = "-" if r["mcnemar_p"] is None else f"{r['mcnemar_p']:.2g}"
        per_seed = []  # the pooled CI is over (seed, problem) pairs; each seed's own difference shows the spread
        for s in sorted(runs):
            sx, sy, _ = pairs({s: runs[s]}, a, b, split)
            if sx:
                per_seed.append(f"s{s} {100 * (sum(sy) - sum(sx)) / len(sx):+.1f}")
        lines.append(f"| {name} | {split} | {j} | {seeds} | {r['n']} | {pct(r['a_mean'])} | {pct(r['b_mean'])} | "
                     f"{100 * r['difference']:+.1f} | [{100 * r['ci95'][0]:+.1f}, {100 * r['ci95'][1]:+.1f}] | {p} | "
                     f"{', '.join(per_seed)} |")
    return lines


def iterations(runs: dict, seed: int, arm: str) -> list[dict]:
    """The arm's per-iteration metrics of one seed, links concatenated in order."""
    rows = {}
    for j in sorted(runs[seed].get(arm, {})):
        for m in runs[seed][arm][j]["metrics"]:
            rows[int(m["iteration"])] = m
    return [rows[i] for i in sorted(rows)]


def arm_series(runs: dict, arm: str) -> list[list[dict]]:
    """The arm's per-iteration metrics, one list per seed that has any."""
    return [x for x in (iterations(runs, s, arm) for s in sorted(runs) if arm in runs[s]) if x]


def reward_table(runs: dict) -> list[str]:
    lines = ["| arm | seeds | iterations | reward, first 10 | reward, last 10 | mean abs dlogp | max abs dlogp |",
             "|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        series = arm_series(runs, arm)
        if not series:
            continue
        n = min(len(x) for x in series)
        first = [sum(m["reward_mean"] for m in x[:10]) / len(x[:10]) for x in series]
        last = [sum(m["reward_mean"] for m in x[n - 10:n]) / len(x[n - 10:n]) for x in series]
        mis = [m["train_rollout_logprob_abs_diff_mean"] for x in series for m in x[:n]
               if m.get("train_rollout_logprob_abs_diff_mean") is not None]
        mx = [m["train_rollout_logprob_abs_diff_max"] for x in series for m in x[:n]
              if m.get("train_rollout_logprob_abs_diff_max") is not None]
        span = lambda v: f"{sum(v) / len(v):.3f}" + (f" [{min(v):.3f}-{max(v):.3f}]" if len(v) > 1 else "")  # noqa: E731
        lines.append(f"| {arm} | {len(series)} | {n} | {span(first)} | {span(last)} | "
                     f"{(sum(mis) / len(mis)) if mis else float('nan'):.4f} | {max(mx) if mx else float('nan'):.3f} |")
    return lines


def block_table(runs: dict, block: int = 10) -> list[str]:
    """Mean training reward per block of `block` iterations, per arm and seed (runs of >= 3 blocks)."""
    rows = []
    for arm in ARMS:
        for s in sorted(runs):
            x = iterations(runs, s, arm) if arm in runs[s] else []
            if len(x) >= 3 * block:
                means = [sum(m["reward_mean"] for m in x[i:i + block]) / block for i in range(0, len(x) - block + 1, block)]
                rows.append((arm, s, means))
    if not rows:
        return []
    n = max(len(m) for _, _, m in rows)
    lines = [f"**Training reward per block of {block} iterations** (mean of reward_mean; each block reads other prompts)", "",
             "| arm | seed | " + " | ".join(f"{block * i + 1}-{block * (i + 1)}" for i in range(n)) + " |",
             "|---|---|" + "---|" * n]
    for arm, s, means in rows:
        lines.append(f"| {arm} | {s} | " + " | ".join(f"{v:.3f}" for v in means) + " |" + " - |" * (n - len(means)))
    return ["", *lines]


def tables(runs: dict) -> str:
    seeds = sorted(runs)
    out = [f"Records: {sum(len(links) for s in runs.values() for links in s.values())} links over seeds "
           f"{', '.join(map(str, seeds))}. Accuracy: greedy exact match, % (mean over seeds [min-max]).", "",
           "**Accuracy per arm and link**", "", *accuracy_table(runs), "",
           "**Paired comparisons** (pairs: (seed, problem) scored by both; bootstrap over pairs, 10 000 resamples, "
           "seed 0; McNemar exact)", "", *comparison_table(runs), "",
           "**Reward and train/rollout mismatch per arm** (iterations: the shortest seed's; [min-max] over seeds)", "",
           *reward_table(runs), *block_table(runs)]
    return "\n".join(out) + "\n"


def plots(runs: dict, png_dir: Path, prefix: str = "exp") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def finish(fig, ax, path: Path) -> Path:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # iterations are whole numbers
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    colors = {"int4-qat": "tab:blue", "int4-ptq": "tab:orange", "bf16": "tab:green", "int4-qat-exact": "tab:purple"}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for arm in ARMS[:3]:  # the three arms of every seed (int4-qat-exact: its own figure below)
        series = arm_series(runs, arm)
        if not series:
            continue
        n = min(len(x) for x in series)
        smooth = []
        for x in series:
            its = [m["iteration"] for m in x]
            r = [m["reward_mean"] for m in x]
            ax.plot(its, r, color=colors[arm], alpha=0.2, lw=0.8)
            smooth.append([sum(r[max(0, i - 4):i + 1]) / len(r[max(0, i - 4):i + 1]) for i in range(n)])
        its = [m["iteration"] for m in series[0][:n]]
        mean = [sum(v) / len(v) for v in zip(*smooth, strict=True)]
        ax.plot(its, mean, color=colors[arm], lw=2.2, label=f"{arm} ({len(series)} seeds, 5-it. moving avg.)")
        if len(series) > 1:
            ax.fill_between(its, [min(v) for v in zip(*smooth, strict=True)], [max(v) for v in zip(*smooth, strict=True)],
                            color=colors[arm], alpha=0.15)
    ax.set(xlabel="RL iteration", ylabel="reward mean (all rollouts)", title="reward per iteration (faint: each seed)")
    reward_png = finish(fig, ax, png_dir / f"{prefix}-reward.png")

    def accuracy_plot(split: str, path: Path) -> Path | None:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        drawn = False
        for (arm, kind), style in {("int4-qat", "int4"): "-o", ("int4-ptq", "int4"): "-s", ("bf16", "int4"): "-^",
                                   ("bf16", "dense"): "--^"}.items():
            links = sorted({j for s in runs.values() for j in s.get(arm, {})})
            xs, ys, es = [], [], []
            for j in links:
                vals = [v for s in sorted(runs) if j in runs[s].get(arm, {})
                        for v in runs[s][arm][j]["acc"].get((split, kind), {}).values()]
                if not vals:
                    continue
                p = sum(vals) / len(vals)
                xs.append(j)
                ys.append(100 * p)
                es.append(100 * 1.96 * math.sqrt(p * (1 - p) / len(vals)))
            if xs:
                ax.errorbar(xs, ys, yerr=es, fmt=style, color=colors[arm], capsize=3, label=LABEL[(arm, kind)])
                drawn = True
        ax.set(xlabel="RL iterations", ylabel=f"{split} accuracy, % (95% CI)", title=f"held-out {split} accuracy per link")
        if not drawn:
            plt.close(fig)
            return None
        return finish(fig, ax, path)

    out = [reward_png, accuracy_plot("test", png_dir / f"{prefix}-accuracy.png")]
    # val is scored at every link (the split that chooses a run's length): its own figure where it has links test lacks
    def scored(split: str) -> set:
        return {j for s in runs.values() for a in s.values() for j, r in a.items() if any(k[0] == split for k in r["acc"])}

    if scored("val") - scored("test"):
        out.append(accuracy_plot("val", png_dir / f"{prefix}-accuracy-val.png"))
    out = [p for p in out if p is not None]
    seeds = [sd for sd in sorted(runs) if "int4-qat-exact" in runs[sd] and "int4-qat" in runs[sd]]
    if seeds:  # true on-policy vs default from the same start and seed: reward and mismatch per iteration
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
        for arm in ("int4-qat", "int4-qat-exact"):
            for sd in seeds:
                x = iterations(runs, sd, arm)
                its, r = [m["iteration"] for m in x], [m["reward_mean"] for m in x]
                ma = [sum(r[max(0, i - 4):i + 1]) / len(r[max(0, i - 4):i + 1]) for i in range(len(r))]
                ax.plot(its, r, color=colors[arm], alpha=0.3, lw=0.8)
                ax.plot(its, ma, color=colors[arm], lw=2, label=f"{arm}, seed {sd} (5-it. moving avg.)")
                d = [m.get("train_rollout_logprob_abs_diff_mean") for m in x]
                bx.plot(its, [v if v is not None else float("nan") for v in d], "-o", ms=3, color=colors[arm],
                        label=f"{arm}, seed {sd}")
        ax.set(xlabel="RL iteration", ylabel="reward mean (all rollouts)", title="reward per iteration")
        bx.set(xlabel="RL iteration", ylabel="mean |train - rollout logprob|", title="train/rollout mismatch")
        bx.xaxis.set_major_locator(MaxNLocator(integer=True))
        bx.legend(fontsize=8)
        out.append(finish(fig, ax, png_dir / f"{prefix}-on-policy.png"))
    return out


def write_doc(doc: Path, body: str, marker: str = "exp") -> None:
    text = doc.read_text() if doc.exists() else "# Results\n"
    doc.write_text(replace_section(text, f"<!-- results:{marker} -->", f"<!-- /results:{marker} -->", body))


GAPS = {"llama-gap": REPO / "results" / "llama-cpp" / "same-weights",  # marker -> records of llama_cpp_logprobs.py
        "llama-moe": REPO / "results" / "llama-cpp" / "qwen3-moe"}


def gap_table(records: list[Path]) -> str:
    """bench/llama_cpp_logprobs.py's pairs, one table per record: mean / p99 / max |dlogp| and how
    often the greedy token agrees, over the same tokens (llama.cpp's greedy completions)."""
    lines = []
    for f in records:
        r = json.loads(f.read_text())
        lines += [f"Record `{f.relative_to(REPO) if f.is_relative_to(REPO) else f}`: {r['sequences']} prompts of "
                  f"`{r['prompts']}`, {r['max_new_tokens']} new tokens, {r['machine']}, {r['llama_cpp']}, "
                  f"engine kernel {r['engine']['kernel']}.", "",
                  "| pair (the same tokens) | tokens | mean abs dlogp | p99 | max | greedy token agrees |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, m in r["pairs"].items():
            lines.append(f"| {name} | {m['tokens']} | {m['mean_abs_diff']:.4f} | {m['p99_abs_diff']:.3f} | "
                         f"{m['max_abs_diff']:.3f} | {100 * m['greedy_agreement']:.1f}% |")
        lines.append("")
    return "\n".join(lines).strip()


# The experiments of docs/results.md: marker (and PNG prefix) -> their records (recipes/loop.mk's REPORTS).
EXPERIMENTS = {"exp": REPO / "results" / "exp",  # four arms, three seeds, 20 iterations (make experiment)
               "exp70": REPO / "results" / "exp70"}  # int4-qat and bf16, seed 0, 50 iterations (results/exp70/README.md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, help="one experiment's records (default: every experiment of EXPERIMENTS)")
    ap.add_argument("--marker", help="with --root: its section marker and PNG prefix (default exp)")
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "results.md")
    ap.add_argument("--tables", type=Path, help="also write the tables alone to this file (with --root)")
    ap.add_argument("--png-dir", type=Path, default=REPO / "docs")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    if args.tables and not args.root:
        raise SystemExit("--tables: needs --root (one experiment's tables)")
    if args.marker and not args.root:
        raise SystemExit("--marker: needs --root (the marker names that experiment's section)")
    todo = {args.marker or "exp": args.root} if args.root else EXPERIMENTS
    for marker, root in todo.items():
        runs = load(root)
        if not runs:
            raise SystemExit(f"{root}: no records (expected sSEED/ARM/link-J folders)")
        body = tables(runs)
        if args.tables:
            args.tables.write_text(body)
        if not args.no_doc:
            if marker != "exp" and f"<!-- results:{marker} -->" not in (args.doc.read_text() if args.doc.exists() else ""):
                raise SystemExit(f"{args.doc}: no <!-- results:{marker} --> section for {root}")
            write_doc(args.doc, body, marker)
        if not args.no_plots:
            for p in plots(runs, args.png_dir, marker):
                print(f"wrote {p}")
        print(body)
    if not args.no_doc:
        for marker, folder in GAPS.items():
            gaps = sorted(folder.glob("*.json"))
            if gaps and f"<!-- results:{marker} -->" in args.doc.read_text():
                write_doc(args.doc, gap_table(gaps), marker)


if __name__ == "__main__":
    main()
