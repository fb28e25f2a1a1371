"""The demo's closing table: held-out accuracy before SFT, after SFT and after RL, and the plot.

    python recipes/summary.py runs/demo
"""

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
table = Table(title=f"{run}: greedy exact match on recipes/data/arith-test.jsonl (INT4 kernel)")
for col in ("model", "artifact", "correct", "accuracy"):
    table.add_column(col, justify="right" if col in ("correct", "accuracy") else "left")
for label, name in (("before SFT", "init-int4"), ("after SFT-QAT", "int4"), ("after RL", "rl-int4")):
    acc = json.loads((run / f"accuracy-{name}.json").read_text())
    table.add_row(label, str(run / name), f"{acc['correct']}/{acc['total']}", f"{acc['accuracy']:.1%}")
rl = json.loads((run / "rl" / "qatctl.json").read_text())["metrics"]
console = Console()
console.print(table)
console.print(f"RL: {rl['iterations_run']} GRPO iterations ({rl['arm']}), reward per iteration "
              f"{[round(r, 3) for r in rl['reward_curve']]}, mean |logp_train - logp_rollout| "
              f"{[round(m, 4) for m in rl['mismatch_curve']]}")
console.print(f"curves: {run / 'rl-metrics.png'}")
