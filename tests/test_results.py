"""`make results` (recipes/results.py) rebuilds the experiment tables from committed records: on a
small committed fixture it writes a table byte-identical to the committed one, and its plots."""

import subprocess
import sys

from conftest import REPO

FIXTURE = REPO / "tests" / "fixtures"


def test_results_rebuild_the_committed_table_byte_for_byte(tmp_path):
    out = tmp_path / "tables.md"
    subprocess.run([sys.executable, REPO / "recipes/results.py", "--root", FIXTURE / "results-mini", "--tables", out,
                    "--doc", tmp_path / "results.md", "--png-dir", tmp_path], check=True, capture_output=True,
                   timeout=300)
    assert out.read_bytes() == (FIXTURE / "results-mini.md").read_bytes()
    doc = (tmp_path / "results.md").read_text()
    assert "<!-- results:exp -->" in doc and out.read_text().strip() in doc
    for png in ("exp-reward.png", "exp-accuracy.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_changed_record_changes_the_table(tmp_path):
    import json
    import shutil

    root = tmp_path / "r"
    shutil.copytree(FIXTURE / "results-mini", root)
    f = root / "s0" / "int4-qat" / "link-4" / "accuracy-test-int4.json"
    d = json.loads(f.read_text())
    for s in d["samples"]:
        s["reward"] = 1.0
    f.write_text(json.dumps(d))
    out = tmp_path / "tables.md"
    subprocess.run([sys.executable, REPO / "recipes/results.py", "--root", root, "--tables", out, "--no-plots",
                    "--no-doc"], check=True, capture_output=True, timeout=300)
    assert out.read_bytes() != (FIXTURE / "results-mini.md").read_bytes()


def _results_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("results_script", REPO / "recipes" / "results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_block_table_averages_each_block_of_ten_iterations():
    r = _results_module()
    metrics = [{"iteration": i, "reward_mean": float(i)} for i in range(1, 36)]  # 3 full blocks and 5 more
    runs = {0: {"int4-qat": {35: {"acc": {}, "metrics": metrics, "rl": None}}}}
    lines = r.block_table(runs)
    assert "| 1-10 | 11-20 | 21-30 |" in lines[3]
    assert lines[5] == "| int4-qat | 0 | 5.500 | 15.500 | 25.500 |"  # the partial block 31-35 is left out
    short = {0: {"bf16": {20: {"acc": {}, "metrics": metrics[:20], "rl": None}}}}
    assert r.block_table(short) == []  # fewer than three blocks: no table (the 20-iteration experiment's is unchanged)


def test_tables_without_a_root_is_refused(tmp_path):
    p = subprocess.run([sys.executable, REPO / "recipes/results.py", "--tables", tmp_path / "t.md", "--no-plots"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "--tables: needs --root" in p.stderr and not (tmp_path / "t.md").exists()


def test_a_marker_without_a_root_is_refused(tmp_path):
    p = subprocess.run([sys.executable, REPO / "recipes/results.py", "--marker", "x", "--no-plots", "--doc", tmp_path / "r.md"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "--marker: needs --root" in p.stderr and not (tmp_path / "r.md").exists()


def test_the_comparison_table_gives_each_seeds_own_difference():
    r = _results_module()

    def link(rewards):
        return {"acc": {("test", "int4"): dict(enumerate(rewards))}, "metrics": [], "rl": None}

    # seed 0: int4-qat 8/10 at link 5 vs 4/10 at its start (+40); seed 1: 5/10 vs 5/10 (+0)
    runs = {0: {"int4-qat": {0: link([1.0] * 4 + [0.0] * 6), 5: link([1.0] * 8 + [0.0] * 2)}},
            1: {"int4-qat": {0: link([1.0] * 5 + [0.0] * 5), 5: link([0.0] * 5 + [1.0] * 5)}}}
    row = [ln for ln in r.comparison_table(runs) if ln.startswith("| int4-qat: link 5 vs its start")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[3:5] == ["2", "20"] and cells[7] == "+20.0"  # pooled over (seed, problem) pairs
    assert cells[-1] == "s0 +40.0, s1 +0.0"
