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
