"""Manifests, atomic output folders, up-to-date re-runs, input kind checks (DESIGN §3)."""

import json

import pytest

from qatctl.artifacts import MANIFEST, OutputDir, read_artifact
from qatctl.errors import QatctlError


def build(path, config=None, inputs=(), force=False, kind="report"):
    out = OutputDir(path, stage="test-stage", kind=kind, config=config or {"a": 1}, inputs=list(inputs), force=force)
    if (done := out.up_to_date()) is not None:
        return done, False
    with out.building() as tmp:
        (tmp / "data.txt").write_text("hello")
        return out.commit(tmp, metrics={"x": 1.5}), True


def test_commit_writes_complete_manifest_last(tmp_path):
    m, built = build(tmp_path / "out")
    assert built
    on_disk = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert on_disk == m
    for key in ("schema", "stage", "kind", "status", "qatctl_version", "created", "config", "inputs",
                "quant", "metrics", "files"):
        assert key in m
    assert m["status"] == "complete" and m["files"] == {"data.txt": m["files"]["data.txt"]}
    assert len(m["files"]["data.txt"]) == 64
    assert not (tmp_path / "out.partial").exists()


def test_rerun_same_config_is_up_to_date_and_different_needs_force(tmp_path):
    m1, _ = build(tmp_path / "out")
    m2, built = build(tmp_path / "out")
    assert not built and m2 == m1
    with pytest.raises(QatctlError, match="different config or inputs; pass --force"):
        build(tmp_path / "out", config={"a": 2})
    m3, built = build(tmp_path / "out", config={"a": 2}, force=True)
    assert built and m3["config"] == {"a": 2}
    # --force replaces only a different output: the same run again is up to date (a Make recipe
    # passes --force every time; an input touched without a change must not rebuild)
    m4, built = build(tmp_path / "out", config={"a": 2}, force=True)
    assert not built and m4 == m3
    assert read_artifact(tmp_path / "out").manifest == m3
    assert not (tmp_path / "out.old").exists()


def test_input_digest_change_invalidates(tmp_path):
    _, _ = build(tmp_path / "out", inputs=[{"path": "x", "kind": "report", "digest": "aa"}])
    with pytest.raises(QatctlError, match="--force"):
        build(tmp_path / "out", inputs=[{"path": "x", "kind": "report", "digest": "bb"}])


def test_failure_leaves_nothing(tmp_path):
    out = OutputDir(tmp_path / "out", stage="s", kind="report", config={}, inputs=[])
    with pytest.raises(RuntimeError):
        with out.building() as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_read_artifact_checks(tmp_path):
    with pytest.raises(QatctlError, match="no such file"):
        read_artifact(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(QatctlError, match=r"qatctl.json: missing"):
        read_artifact(tmp_path / "plain")
    build(tmp_path / "rep")
    with pytest.raises(QatctlError, match=r"is a 'report' \(made by test-stage\), expected a 'qat-checkpoint'"):
        read_artifact(tmp_path / "rep", "qat-checkpoint")
    (tmp_path / "rep" / "data.txt").unlink()
    with pytest.raises(QatctlError, match="data.txt: listed in qatctl.json but missing"):
        read_artifact(tmp_path / "rep")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST).write_text("{not json")
    with pytest.raises(QatctlError, match="not valid JSON"):
        read_artifact(tmp_path / "bad")
    (tmp_path / "inc").mkdir()
    (tmp_path / "inc" / MANIFEST).write_text(json.dumps({"schema": 1, "stage": "s", "kind": "report",
                                                         "status": "running"}))
    with pytest.raises(QatctlError, match="status is 'running'"):
        read_artifact(tmp_path / "inc")


def test_foreign_folder_in_the_way(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(QatctlError, match="not a qatctl artifact; remove it yourself"):
        build(tmp_path / "out")
    with pytest.raises(QatctlError, match=r"--force replaces only qatctl outputs"):
        build(tmp_path / "out", force=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_up_to_date_touches_the_manifest_for_make(tmp_path):
    """An up-to-date rerun leaves the output's manifest newer than its inputs (Make's convention:
    a target older than a prerequisite is rebuilt every time)."""
    import os

    build(tmp_path / "out")
    manifest = tmp_path / "out" / "qatctl.json"
    os.utime(manifest, (1_000_000, 1_000_000))
    _, built = build(tmp_path / "out")
    assert not built and manifest.stat().st_mtime > 1_000_000 + 3600
