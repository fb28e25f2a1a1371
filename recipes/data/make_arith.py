"""Generate the arithmetic SFT set and its held-out split (deterministic: same seed, same files).

    python recipes/data/make_arith.py            # writes arith-train.jsonl and arith-test.jsonl here

Each line: {"messages": [user question, assistant worked answer], "answer": "N"}. The worked
answer restates the operation and ends with a marked final number ("Answer: N"), so the
`exact-number` reward (last number in the completion) and exact-match evaluation apply. The
test split shares no question with the train split. rl-step and eval read the same files as
prompt sets (a trailing assistant turn is dropped).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TEMPLATES = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}."]


def problem(rng: random.Random) -> tuple[tuple, str, str, int]:
    kind = rng.choice(["+", "-", "*"])
    if kind == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 25)
    else:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        if kind == "-" and b > a:
            a, b = b, a
    value = a + b if kind == "+" else a - b if kind == "-" else a * b
    question = rng.choice(TEMPLATES).format(a=a, op=kind, b=b)
    return (a, kind, b), question, f"{a} {kind} {b} = {value}\nAnswer: {value}", value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    seen, rows = set(), []
    while len(rows) < args.train + args.test:
        key, q, worked, value = problem(rng)  # key: the operation, whatever the phrasing
        if key in seen:
            continue
        seen.add(key)
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": worked}],
                     "answer": str(value)})
    for name, part in (("arith-train.jsonl", rows[: args.train]), ("arith-test.jsonl", rows[args.train:])):
        (args.out / name).write_text("".join(json.dumps(r) + "\n" for r in part))
        print(f"wrote {args.out / name}: {len(part)} examples")


if __name__ == "__main__":
    main()
