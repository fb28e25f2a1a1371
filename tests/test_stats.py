"""qatctl compare / qatctl.stats: paired difference, bootstrap CI and McNemar's exact p, checked
against numbers worked out by hand."""

import json
import math

import pytest
from test_cli import assert_usage_error

from conftest import qatctl
from qatctl.stats import mcnemar_exact, paired_compare


def scored(path, rewards, prompts_digest="d" * 64):
    path.write_text(json.dumps({"model": path.stem, "prompts": "p.jsonl", "prompts_digest": prompts_digest,
                                "samples": [{"index": i, "reward": r} for i, r in enumerate(rewards)]}))
    return path


def test_mcnemar_by_hand():
    # 30 vs 10 discordant: 2 * sum_{k<=10} C(40, k) / 2^40
    by_hand = 2 * sum(math.comb(40, k) for k in range(11)) / 2**40
    assert mcnemar_exact(30, 10) == pytest.approx(by_hand, rel=1e-12) and 0.002 < by_hand < 0.0025
    assert mcnemar_exact(10, 30) == mcnemar_exact(30, 10)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)


def test_known_discordance_gives_the_right_p_and_a_ci_excluding_zero(tmp_path):
    # 200 problems: 100 both right, 60 both wrong, 30 only B right, 10 only A right -> B - A = +10 points
    a = [1] * 100 + [0] * 60 + [0] * 30 + [1] * 10
    b = [1] * 100 + [0] * 60 + [1] * 30 + [0] * 10
    r = paired_compare(a, b)
    assert r["difference"] == pytest.approx(0.10) and (r["a_only"], r["b_only"]) == (10, 30)
    assert r["mcnemar_p"] == pytest.approx(mcnemar_exact(30, 10))
    assert 0 < r["ci95"][0] < 0.10 < r["ci95"][1]
    # paired SE by hand: d is +1 (30), -1 (10), 0 (160); mean 0.1
    se = math.sqrt((30 * 0.9**2 + 10 * 1.1**2 + 160 * 0.1**2) / (200 * 199))
    assert r["paired_se"] == pytest.approx(se)
    out = json.loads(qatctl("compare", scored(tmp_path / "a.json", a), scored(tmp_path / "b.json", b), "--json").stdout)
    assert out["difference"] == pytest.approx(0.10) and out["mcnemar_p"] == pytest.approx(r["mcnemar_p"])
    assert out["ci95"] == r["ci95"]  # seeded: the same CI every time


def test_identical_files_give_zero_and_p_one(tmp_path):
    a = scored(tmp_path / "a.json", [1, 0, 1, 1, 0] * 20)
    out = json.loads(qatctl("compare", a, a, "--json").stdout)
    assert out["difference"] == 0 and out["ci95"] == [0, 0] and out["mcnemar_p"] == 1.0


def test_compare_refuses_what_cannot_be_paired(tmp_path):
    a = scored(tmp_path / "a.json", [1, 0, 1])
    assert_usage_error(qatctl("compare", a, scored(tmp_path / "b.json", [1, 0]), check=False), "not the same problems")
    other = scored(tmp_path / "c.json", [1, 0, 1], prompts_digest="e" * 64)
    assert_usage_error(qatctl("compare", a, other, check=False), "different prompt files")
    (tmp_path / "bad.json").write_text(json.dumps({"samples": [{"index": 0, "reward": float("nan")}]}).replace("NaN", "NaN"))
    assert_usage_error(qatctl("compare", a, tmp_path / "bad.json", check=False), "finite number")
    assert_usage_error(qatctl("compare", a, a, "--bootstrap", "5", check=False), "--bootstrap 5")
