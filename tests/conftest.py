"""Shared fixtures: tiny random checkpoints (fast) and the real SmolLM2-135M (slow, built once)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def qatctl(*args, check=True, timeout=600, **kw) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (real exit codes, real stderr)."""
    p = subprocess.run([sys.executable, "-m", "qatctl.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, cwd=kw.pop("cwd", REPO), **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"qatctl {' '.join(map(str, args))} exited {p.returncode}\n{p.stderr[-3000:]}")
    return p


def torchrun(log: Path, *args) -> subprocess.Popen:
    """Start `qatctl ARGS` on two DeepSpeed CPU ranks (torchrun, gloo on loopback); its output
    goes to `log` (a file, not a pipe: nobody reads while it runs). Wait with `finish`."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache/torch_extensions"))}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "qatctl.cli", *map(str, args)]
    with open(log, "a") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path) -> str:
    """Wait for a `torchrun` process; its output."""
    proc.wait(timeout=900)
    return Path(log).read_text()


def redigest(folder: Path) -> None:
    """Rewrite a copied artifact's manifest file digests after a test changed a file in it, as if
    the stage had written the odd file (inputs are verified against their digests: without this
    the reader's own checks would never be reached)."""
    import json

    from qatctl.artifacts import sha256_file

    m = json.loads((folder / "qatctl.json").read_text())
    m["files"] = {n: sha256_file(folder / n) for n in m["files"]}
    (folder / "qatctl.json").write_text(json.dumps(m))


def make_tiny(preset: str, out: Path, **options):
    from stages.init_qat import InitQatConfig, run

    return run(InitQatConfig(model=preset, out=out, **options))


def make_int4(ckpt: Path, out: Path):
    from stages.convert_int4 import ConvertInt4Config, run

    return run(ConvertInt4Config(ckpt=ckpt, out=out))


def make_pair(root: Path, preset: str = "tiny-llama", seed: int = 0) -> tuple[Path, Path]:
    """(qat-checkpoint, its int4-checkpoint) of a tiny preset under root/init and root/int4."""
    make_tiny(preset, root / "init", seed=seed)
    make_int4(root / "init", root / "int4")
    return root / "init", root / "int4"


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory):
    """{preset: (qat-checkpoint, int4-checkpoint)} for every tiny preset."""
    root = tmp_path_factory.mktemp("tiny")
    pairs = {}
    for preset in ("tiny-llama", "tiny-qwen3", "tiny-qwen3-moe"):
        make_tiny(preset, root / preset)
        make_int4(root / preset, root / f"{preset}-int4")
        pairs[preset] = (root / preset, root / f"{preset}-int4")
    return pairs


@pytest.fixture(scope="session")
def long_int4(tmp_path_factory):
    """Two int4 tiny-llamas (seeds 0 and 1) with a 32k context. The native engine decodes the
    512-token preset's longest request in milliseconds, faster than a client's next call, so
    tests that pause, abort or update while a request runs use these and ask for ~32k tokens."""
    from qatctl import models

    root = tmp_path_factory.mktemp("long")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(models._TINY_COMMON, "max_position_embeddings", 32768)
        return make_pair(root / "s0", seed=0)[1], make_pair(root / "s1", seed=1)[1]


@pytest.fixture(scope="session")
def smollm2_pair(tmp_path_factory):
    """(qat-checkpoint, int4-checkpoint) of the real SmolLM2-135M-Instruct, made through the CLI."""
    root = tmp_path_factory.mktemp("smollm2")
    qatctl("init-qat", "smollm2-135m", "--out", root / "init")
    qatctl("convert-int4", root / "init", "--out", root / "int4")
    return root / "init", root / "int4"


def assert_same_update(start: dict, a: dict, b: dict) -> None:
    """Two runs of one update (e.g. DeepSpeed and the plain loop) from the same start weights give
    the same result within a tolerance far below what the update moved: the largest difference
    between them is under a tenth of the largest change from the start, tensor by tensor where the
    tensor moved, and the weights did move (a run that updated nothing fails)."""

    moved = 0
    for k in start:
        step = (a[k].float() - start[k].float()).abs().max().item()
        gap = (a[k].float() - b[k].float()).abs().max().item()
        if step > 0:
            moved += 1
            assert gap <= 0.1 * step, f"{k}: the runs differ by {gap:.3g}, the update moved it by {step:.3g}"
        else:
            assert gap == 0, f"{k}: unchanged in one run, moved by {gap:.3g} in the other"
    assert moved >= len(start) // 2, f"only {moved} of {len(start)} tensors moved: the update did not run"
