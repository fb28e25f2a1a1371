"""Generate the arithmetic task's four splits (deterministic: same seed, same files).

    python recipes/data/make_arith.py            # writes the four files below, here

    arith-train.jsonl     3000  SFT data and the RL prompt stream (shuffled: the mix is constant along the file)
    arith-val.jsonl        400  every hyperparameter and stopping choice is made here
    arith-test.jsonl       800  in-template held-out test (reported, never tuned on)
    arith-test-oot.jsonl   600  out-of-template test: wordings, an instruction suffix and negative
                                results that the SFT data never shows (reported, never tuned on)

Each line: {"messages": [user question, assistant worked answer], "answer": "N"}. The worked
answer restates the operation and ends with a marked final number ("Answer: N"), so the
`exact-number` reward (last number in the completion) and exact-match evaluation apply; rl-step
and accuracy read the same files as prompt sets (a trailing assistant turn is dropped).

Every split holds + , - and x in the same proportions (40/40/20: exact counts per split). Problems
are drawn per operation from one pool of canonical keys (the operation and its two operands as a
set), so no problem and no operand-swapped twin (a+b / b+a, a-b / b-a, a*b / b*a) is in two splits.
In-template questions: a-b has a >= b. Out-of-template: half the subtractions are negative.

Sizes: on 800 test problems the SE of one accuracy is at most 1.8 points; a paired difference of
two policies on the same problems has SE sqrt(d)/sqrt(800) for a discordant rate d (d = 0.3:
1.9 points), so a 10-point difference is > 5 SE.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

SIZES = {"train": 3000, "val": 400, "test": 800, "test-oot": 600}
FILES = {"train": "arith-train.jsonl", "val": "arith-val.jsonl", "test": "arith-test.jsonl",
         "test-oot": "arith-test-oot.jsonl"}
MIX = {"+": 0.4, "-": 0.4, "*": 0.2}
TEMPLATES = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}."]
OOT_TEMPLATES = {
    "+": ["Find the sum of {a} and {b}.", "What do you get if you add {a} and {b}?", "{a} plus {b} equals what?"],
    "-": ["Subtract {b} from {a}.", "What is {a} minus {b}?", "Take {b} away from {a}. What is left?"],
    "*": ["Multiply {a} by {b}.", "What is the product of {a} and {b}?", "How much is {a} times {b}?"],
}
OOT_SUFFIXES = ["", " Reply with the number only.", " Give the final answer at the end."]
_WORKED = re.compile(r"^(-?\d+) ([+\-*]) (-?\d+) = (-?\d+)")


def keys(op: str) -> list[tuple]:
    """Every canonical problem of an operation: (op, smaller operand, larger operand)."""
    if op == "*":
        pairs = {(min(a, b), max(a, b)) for a in range(2, 16) for b in range(2, 100)}
    else:
        pairs = {(a, b) for a in range(1, 100) for b in range(a, 100)}
    return [(op, *p) for p in sorted(pairs)]


def counts(n: int) -> dict[str, int]:
    """Exact per-operation counts of an n-problem split (largest remainder)."""
    raw = {op: n * f for op, f in MIX.items()}
    out = {op: int(v) for op, v in raw.items()}
    for op in sorted(raw, key=lambda o: raw[o] - out[o], reverse=True)[: n - sum(out.values())]:
        out[op] += 1
    return out


def row(key: tuple, split: str, rng: random.Random) -> dict:
    op, lo, hi = key
    if op == "-":
        a, b = (lo, hi) if split == "test-oot" and lo != hi and rng.random() < 0.5 else (hi, lo)
    else:
        a, b = (lo, hi) if rng.random() < 0.5 else (hi, lo)
    value = a + b if op == "+" else a - b if op == "-" else a * b
    if split == "test-oot":
        question = rng.choice(OOT_TEMPLATES[op]).format(a=a, b=b) + rng.choice(OOT_SUFFIXES)
    else:
        question = rng.choice(TEMPLATES).format(a=a, op=op, b=b)
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": f"{a} {op} {b} = {value}\nAnswer: {value}"}],
            "answer": str(value)}


def make(seed: int = 1234, sizes: dict[str, int] = SIZES) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    splits = {name: [] for name in sizes}
    for op in MIX:
        need = {name: counts(n)[op] for name, n in sizes.items()}
        drawn = rng.sample(keys(op), sum(need.values()))
        at = 0
        for name in ("test", "val", "test-oot", "train"):  # any order: each split gets exactly its share
            splits[name] += [row(k, name, rng) for k in drawn[at: at + need[name]]]
            at += need[name]
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


# ---------------------------------------------------------------- the checks a split must pass

def problem_key(r: dict) -> tuple:
    m = _WORKED.match(r["messages"][-1]["content"])
    if not m:
        raise ValueError(f"not a worked arithmetic answer: {r['messages'][-1]['content']!r}")
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return op, min(a, b), max(a, b)


def skeleton(question: str) -> str:
    """The wording of a question with its numbers taken out."""
    return re.sub(r"-?\d+", "#", question)


def check_splits(splits: dict[str, list[dict]]) -> list[str]:
    """What is wrong with a set of splits (empty: nothing): an operation missing or off its mix,
    a problem or its operand-swapped twin in two splits, an out-of-template wording seen in train,
    an in-template wording that train does not have."""
    problems = []
    seen: dict[tuple, str] = {}
    for name, rows in splits.items():
        n = len(rows)
        ops = {op: 0 for op in MIX}
        for r in rows:
            k = problem_key(r)
            ops[k[0]] += 1
            if k in seen and seen[k] != name:
                problems.append(f"{name}: {k} (or its operand-swapped twin) is also in {seen[k]}")
            seen.setdefault(k, name)
        for op, f in MIX.items():
            if abs(ops[op] - n * f) > 1:
                problems.append(f"{name}: {ops[op]} of {n} problems are {op!r}, expected {n * f:.0f}")
    train = {skeleton(r["messages"][0]["content"]) for r in splits.get("train", [])}
    for name, rows in splits.items():
        if name == "train":
            continue
        for r in rows:
            s = skeleton(r["messages"][0]["content"])
            if name.endswith("oot") and s in train:
                problems.append(f"{name}: the wording {s!r} is in train")
                break
            if not name.endswith("oot") and s not in train:
                problems.append(f"{name}: the wording {s!r} is not in train (in-template split)")
                break
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = ap.parse_args()
    splits = make(args.seed)
    problems = check_splits(splits)
    if problems:
        raise SystemExit("\n".join(problems))
    for name, rows in splits.items():
        (args.out / FILES[name]).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {args.out / FILES[name]}: {len(rows)} problems")


if __name__ == "__main__":
    main()
