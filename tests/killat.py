"""Run the qatctl CLI with a SIGKILL injected at a named point (fault injection for tests):

    python tests/killat.py POINT [N] -- qatctl-args...

POINT is where the process kills itself, on the N-th time it gets there (default 1):
  trainer_state   inside the final save, trainer_state/'s tensors written, its state.json not yet
  checkpoint      the final trainer_state complete, the BF16 checkpoint not yet written
  manifest        the manifest written to its tmp name, not yet renamed
  step-saved      just after a resume state (train-sft-qat step-N, rl-step iter-N) was committed
"""

import os
import signal
import sys
from pathlib import Path

point, rest = sys.argv[1], sys.argv[2:]
nth = 1
if rest and rest[0] != "--":
    nth, rest = int(rest[0]), rest[1:]
sys.argv = ["qatctl", *rest[1:]]
seen = 0


def hit():
    global seen
    seen += 1
    if seen == nth:
        os.kill(os.getpid(), signal.SIGKILL)


from qatctl import models, state, trainrun  # noqa: E402

if point == "trainer_state":
    write_json = state._write_json

    def _write_json(path, obj):
        if Path(path).parent.name == state.TRAINER_STATE + ".tmp":
            hit()
        return write_json(path, obj)

    state._write_json = _write_json
elif point == "checkpoint":
    save_checkpoint = models.save_checkpoint

    def _save_checkpoint(*a, **k):
        hit()
        return save_checkpoint(*a, **k)

    models.save_checkpoint = _save_checkpoint
elif point == "manifest":
    replace = os.replace

    def _replace(src, dst, *a, **k):
        if Path(dst).name == "qatctl.json":
            hit()
        return replace(src, dst, *a, **k)

    os.replace = _replace
elif point == "step-saved":  # after a resume state of train-sft-qat or rl-step is in place
    save_step = trainrun.save_step

    def _save_step(*a, **k):
        out = save_step(*a, **k)
        hit()
        return out

    trainrun.save_step = _save_step
else:
    raise SystemExit(f"unknown kill point {point!r}")

from qatctl.cli import run  # noqa: E402

run()
