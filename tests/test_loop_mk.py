"""recipes/loop.mk with the real `make` on a tiny preset (issue 29): a full build; a second build
runs no qatctl command; changed SFT data reruns exactly SFT and what is downstream of it; a failed
stage leaves no target that Make considers up to date."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")

ARITH = REPO / "recipes/data/arith-train.jsonl"
REWARD = "def odd_length(completion, answer):\n    return float(len(completion) % 2)\n"


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    log = root / "commands.log"
    wrapper = root / "qatctl"  # the real CLI, every call logged: what Make ran
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {log}\nPYTHONPATH={REPO} exec {sys.executable} -m qatctl.cli "$@"\n')
    wrapper.chmod(0o755)
    (root / "rw.py").write_text(REWARD)
    sft = root / "sft.jsonl"
    sft.write_text("".join(ARITH.read_text().splitlines(keepends=True)[:32]))
    for split in ("val", "test"):
        (root / f"arith-{split}.jsonl").write_text(
            "".join((REPO / f"recipes/data/arith-{split}.jsonl").read_text().splitlines(keepends=True)[:3]))
    variables = [
        f"QATCTL={wrapper}", f"RUN={root / 'run'}", "MODEL=tiny-llama", f"SFT_DATA={sft}", f"RL_PROMPTS={ARITH}",
        f"EVAL={root}/arith-%.jsonl", "SPLITS=val", "LINKS=1", "KINDS=int4",
        "SFT_FLAGS=--steps 2 --batch-size 2 --micro-batch 2 --lr 1e-3 --save-every 1",
        f"RL_FLAGS=--prompts-per-step 2 --max-new-tokens 4 --lr 1e-3 --micro-batch 8 --reward {root}/rw.py:odd_length",
        "SAMPLES=2", "ACC_FLAGS=--max-new-tokens 4", "CONSISTENCY_FLAGS=--limit 2 --samples-per-prompt 2 --max-new-tokens 4",
    ]

    def make(*args, check=True):
        p = subprocess.run(["make", "-f", str(REPO / "recipes/loop.mk"), *variables, *args], cwd=REPO,
                           capture_output=True, text=True, timeout=900)
        if check and p.returncode != 0:
            raise AssertionError(f"make {' '.join(args)} exited {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
        return p

    def commands() -> list[str]:
        """The qatctl commands run since the last call."""
        lines = log.read_text().splitlines() if log.exists() else []
        log.write_text("")
        return lines

    return root, make, commands


def _stage_counts(lines):
    counts = {}
    for ln in lines:
        counts[ln.split()[0]] = counts.get(ln.split()[0], 0) + 1
    return counts


def test_loop_builds_once_then_reruns_exactly_what_changed_and_a_failure_stays_stale(loop):
    root, make, commands = loop
    run, reports = root / "run", root / "run/reports"

    dry = make("-n").stdout  # -n prints the exact commands and runs none
    assert f"init-qat tiny-llama --out {run}/init" in dry and "train-sft-qat" in dry and "--iterations 1" in dry
    assert commands() == [] and not (run / "init").exists()

    make("-j2")  # the whole loop, independent arms side by side
    first = _stage_counts(commands())
    # init; 2 SFT starts + their conversions; 3 arms x 1 link, each converted; accuracy (val, INT4)
    # at link 0 and 1 per arm, int4-ptq's link 0 copied from bf16's (one start, scored once); the
    # last link's consistency per arm
    assert first == {"init-qat": 1, "train-sft-qat": 2, "convert-int4": 2 + 3, "rl-step": 3,
                     "accuracy": 2 + 2 + 1, "eval-consistency": 3}
    for arm in ("int4-qat", "bf16", "int4-ptq"):
        for j in (0, 1):
            rec = json.loads((reports / f"s0/{arm}/link-{j}/accuracy-val-int4.json").read_text())
            assert rec["total"] == 3 and len(rec["samples"]) == 3
        rl = json.loads((reports / f"s0/{arm}/link-1/rl.json").read_text())
        assert rl["config"]["iterations"] == 1 and rl["config"]["seed"] == 0
        assert (reports / f"s0/{arm}/link-1/metrics.jsonl").read_text().strip()
        assert "arms" in json.loads((reports / f"s0/{arm}/link-1/consistency.json").read_text())
    assert json.loads((run / "s0/bf16/policy-1/qatctl.json").read_text())["config"]["rollout_precision"] == "bf16"
    assert (reports / "s0/int4-ptq/link-0/accuracy-val-int4.json").read_bytes() == \
        (reports / "s0/bf16/link-0/accuracy-val-int4.json").read_bytes()

    make()  # nothing to do: no qatctl command at all, and -q agrees
    assert commands() == []
    assert make("-q", check=False).returncode == 0

    init_mtime = (run / "init/qatctl.json").stat().st_mtime_ns
    sft = root / "sft.jsonl"
    sft.write_text(sft.read_text() + ARITH.read_text().splitlines(keepends=True)[40])
    assert make("-q", check=False).returncode == 1
    make()
    again = _stage_counts(commands())
    assert "init-qat" not in again and (run / "init/qatctl.json").stat().st_mtime_ns == init_mtime
    assert again["train-sft-qat"] == 2 and again["rl-step"] == 3 and again["eval-consistency"] == 3
    sft_manifest = json.loads((run / "s0/sft-qat/qatctl.json").read_text())
    assert any(i["path"] == str(sft) for i in sft_manifest["inputs"])
    assert make("-q", check=False).returncode == 0

    sft.write_text(sft.read_text() + "{not json\n")  # the SFT stage fails on this file
    before = (run / "s0/sft-qat/qatctl.json").stat().st_mtime_ns
    p = make(check=False)
    assert p.returncode != 0 and "train-sft-qat" in "".join(commands())
    assert (run / "s0/sft-qat/qatctl.json").stat().st_mtime_ns == before  # the old artifact, untouched
    assert make("-q", check=False).returncode == 1  # and still stale: the next make retries it


def test_loop_scores_dense_policies_and_refuses_bad_variables(loop):
    root, make, _ = loop
    dry = make("-n", "-B", "KINDS=int4 dense", "LINKS=1 2", "SPLITS=val test", "SPLITS_MID=val").stdout
    acc = {" ".join(ln.split(" accuracy ", 1)[1].split()[:3]) for ln in dry.splitlines() if " accuracy " in ln}
    # dense: the policy itself, through the fp32 engine; every split at link 0 and the last link,
    # SPLITS_MID between
    for model in ("int4-qat/policy-1", "int4-qat/int4-1"):
        assert f"{root}/run/s0/{model} --prompts {root}/arith-val.jsonl" in acc
        assert f"{root}/run/s0/{model} --prompts {root}/arith-test.jsonl" not in acc
    for model in ("int4-qat/policy-2", "int4-qat/int4-2", "sft-qat", "sft-qat-int4"):
        assert {f"{root}/run/s0/{model} --prompts {root}/arith-{s}.jsonl" for s in ("val", "test")} <= acc
    for bad, words in (("ARMS=int4-qat fp8", "ARMS: 'fp8'"), ("LINKS=10 x", "LINKS: 'x'"),
                       ("THREADS=0", "THREADS"), ("EVAL=recipes/data/arith.jsonl", "needs a %")):
        p = make("-n", bad, check=False)
        assert p.returncode == 2 and words in p.stderr, (bad, p.stderr)


def test_loop_runs_the_true_on_policy_arm_from_the_qat_start(loop):
    """ARMS=int4-qat-exact: int4-qat with --true-on-policy from the same start and seed; its link 0
    is int4-qat's (copied when that arm is built too, scored itself when it is not)."""
    root, make, _ = loop
    run, reports = root / "run", root / "run/reports"
    dry = make("-n", "-B", "ARMS=int4-qat int4-qat-exact").stdout
    rl = [ln for ln in dry.splitlines() if " rl-step " in ln]
    exact = [ln for ln in rl if "int4-qat-exact/policy-1" in ln]
    plain = [ln for ln in rl if "/int4-qat/policy-1" in ln]
    assert len(exact) == len(plain) == 1
    assert f"rl-step {run}/s0/sft-qat " in exact[0] and "--true-on-policy" in exact[0] and "--seed 0" in exact[0]
    assert "--true-on-policy" not in plain[0]
    same = exact[0].replace(" --true-on-policy", "").replace("int4-qat-exact", "int4-qat")
    assert same.split() == plain[0].split()  # every other flag the same
    assert f"cp {reports}/s0/int4-qat/link-0/accuracy-val-int4.json {reports}/s0/int4-qat-exact/link-0/" in dry
    alone = make("-n", "-B", "ARMS=int4-qat-exact", f"REPORTS={root}/elsewhere").stdout
    assert f"accuracy {run}/s0/sft-qat-int4 " in alone and "int4-qat/link-0" not in alone
