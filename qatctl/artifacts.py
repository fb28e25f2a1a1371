"""Artifact folders and their manifests (DESIGN §3).

An artifact is a folder with a `qatctl.json` whose status is "complete". A stage builds its
output in `DIR.partial/`, writes the manifest last, and renames the folder into place, so a kill
at any moment leaves either no `DIR` or a complete earlier one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import shutil
import weakref
from dataclasses import dataclass
from pathlib import Path

from qatctl import __version__
from qatctl.errors import QatctlError

MANIFEST = "qatctl.json"
SCHEMA = 1
KINDS = ("qat-checkpoint", "int4-checkpoint", "rollouts", "report", "gguf")


def copy_plain_file(src: Path, dst: Path) -> None:
    """Copy a file of an input artifact into an output; a symlink there is refused (copying it
    would put its target's content, any file the user can read, into the output)."""
    if Path(src).is_symlink():
        raise QatctlError(f"{src}: is a symlink; an artifact's files are plain files (copy the target in its place)")
    shutil.copy2(src, dst)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_input(path, kind: str) -> dict:
    """A plain input file's manifest entry (path, kind, content digest); a missing file is the
    user's one-line error naming it."""
    if not Path(path).is_file():
        raise QatctlError(f"{path}: no such file ({kind})")
    return {"path": str(path), "kind": kind, "digest": sha256_file(Path(path))}


@dataclass(frozen=True)
class Artifact:
    """A complete artifact read from disk."""

    path: Path
    manifest: dict

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def digest(self) -> str:
        return sha256_file(self.path / MANIFEST)

    def as_input(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "digest": self.digest}


def read_manifest(path: Path) -> dict:
    """The manifest of an artifact folder, checked for shape (not for completeness)."""
    path = Path(path)
    if not path.exists():
        raise QatctlError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise QatctlError(f"{path}: not an artifact folder (expected a folder with {MANIFEST})")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise QatctlError(f"{mpath}: missing; {path} is not a qatctl artifact (or was never completed)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QatctlError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise QatctlError(f"{mpath}: expected a JSON object")
    for key in ("schema", "stage", "kind", "status"):
        if key not in manifest:
            raise QatctlError(f"{mpath}: missing field {key!r}")
    if manifest["schema"] != SCHEMA:
        raise QatctlError(f"{mpath}: schema {manifest['schema']!r} is not supported (expected {SCHEMA})")
    return manifest


def read_artifact(path, expect_kind: str | tuple[str, ...] | None = None) -> Artifact:
    """Open an input artifact: it must be complete, of the expected kind, with its files present."""
    path = Path(path)
    manifest = read_manifest(path)
    mpath = path / MANIFEST
    if manifest["status"] != "complete":
        raise QatctlError(f"{mpath}: status is {manifest['status']!r}, expected 'complete'")
    kinds = (expect_kind,) if isinstance(expect_kind, str) else expect_kind
    if kinds and manifest["kind"] not in kinds:
        raise QatctlError(f"{path}: is a {manifest['kind']!r} (made by {manifest['stage']}), "
                          f"expected a {' or '.join(repr(k) for k in kinds)}")
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise QatctlError(f"{mpath}: field 'files' is not an object of file -> sha256")
    for name, digest in files.items():
        _verify_file(path, name, digest)
    return Artifact(path, manifest)


_VERIFIED: dict[tuple, str] = {}  # (path, inode, size, mtime_ns) -> sha256: each file hashed once per process


def _verify_file(root: Path, name: str, digest) -> None:
    """A listed file must be there, a plain file inside the artifact (no symlink: qatctl never
    writes one, and one would be read as its target's content), with the digest the manifest
    records: a swapped or edited weight file is refused, not trusted by its manifest."""
    f = root / name
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise QatctlError(f"{root / MANIFEST}: file entry {name!r} points outside the artifact")
    cur = root
    for part in Path(name).parts:
        cur = cur / part
        if cur.is_symlink():
            raise QatctlError(f"{cur}: is a symlink; an artifact's files are plain files (copy the target in its place)")
    if not f.is_file():
        raise QatctlError(f"{f}: listed in {MANIFEST} but missing")
    st = f.stat()
    key = (str(f.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    actual = _VERIFIED.get(key) or sha256_file(f)
    if actual != digest:
        raise QatctlError(f"{f}: its sha256 differs from the one in {MANIFEST} (the file was changed after the "
                          "artifact was made); rebuild the artifact")
    _VERIFIED[key] = actual


def _normalized(obj):
    """JSON round trip, so tuples/Paths compare equal to what a manifest holds."""
    return json.loads(json.dumps(obj, default=str))


class OutputDir:
    """The one output folder of a stage run.

        out = OutputDir(path, stage="convert-int4", kind="int4-checkpoint", config=..., inputs=[...])
        if (done := out.up_to_date()) is not None: return done
        with out.building() as tmp:
            ... write files into tmp ...
            manifest = out.commit(tmp, quant=..., metrics=...)
    """

    def __init__(self, path, *, stage: str, kind: str, config: dict, inputs: list[dict], force: bool = False):
        assert kind in KINDS, kind
        if str(path).strip() in ("", "."):
            raise QatctlError(f"--out {str(path)!r}: give a folder to create (not the current folder)")
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        # --force moves the replaced artifact here for the moment of the swap: a hidden name only
        # qatctl uses (a user's own `OUT.old` is never touched)
        self.replaced = self.path.with_name(f".{self.path.name}.qatctl-replaced")
        self.stage, self.kind, self.force = stage, kind, force
        self.config, self.inputs = _normalized(config), _normalized(inputs)
        self.writer = int(os.environ.get("RANK", "0")) == 0  # one writer: rank 0 of a distributed run
        self._check_place()
        self._release = weakref.finalize(self, _lock(self.path)) if self.writer else None

    def _check_place(self) -> None:
        """--out must not be an input, sit inside one, or contain one; its parent must be a folder;
        only folders qatctl made may be in the way."""
        out = self.path.resolve()
        for i in self.inputs:
            src = Path(i.get("path", "")).resolve() if i.get("path") else None
            if src is not None and (out == src or src in out.parents or out in src.parents):
                raise QatctlError(f"--out {self.path}: is, or overlaps, the input {i['path']}; choose another folder")
        parent = next((p for p in out.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise QatctlError(f"--out {self.path}: {parent} is a file, not a folder")
        if self.partial.exists() and not (self.partial / RUN_KEY).is_file():
            raise QatctlError(f"{self.partial}: exists and was not made by qatctl; move it away (it is never deleted)")
        old = self.replaced
        if old.exists() and not (old / MANIFEST).is_file():
            raise QatctlError(f"{old}: exists and was not made by qatctl; move it away (it is never deleted)")

    def up_to_date(self) -> dict | None:
        """The existing manifest if the output is complete with the same config and inputs.

        Raises if a different complete (or foreign) output is in the way and --force is off;
        --force never replaces a folder that is not a qatctl artifact.
        """
        if not self.path.exists():
            return None
        if not (self.path / MANIFEST).is_file():
            raise QatctlError(f"{self.path}: exists and is not a qatctl artifact; remove it yourself "
                              "(--force replaces only qatctl outputs)")
        existing = read_manifest(self.path)
        same = (existing.get("status") == "complete"
                and _run_key(existing.get("stage"), existing.get("config"), existing.get("inputs", []))
                == self._run_key())
        if same:  # also under --force, which replaces only a *different* output: a Make recipe
            # passes it on every run, and an input touched without a change retrains nothing
            if self.writer:  # newer than its inputs now, so a Make target on it is not stale
                with contextlib.suppress(OSError):  # a read-only output is still up to date
                    os.utime(self.path / MANIFEST)
            return existing
        if self.force:
            return None
        raise QatctlError(f"{self.path}: holds a {existing.get('stage')} output with a different config or "
                          "inputs; pass --force to replace it")

    def building(self, resume: bool = False):
        """Context giving the partial folder; `resume` keeps one left by a killed run of the
        same config and inputs (training stages checkpoint inside it) instead of wiping it."""
        return _Building(self, resume)

    def _run_key(self) -> dict:
        return _run_key(self.stage, self.config, self.inputs)

    def commit(self, tmp: Path, *, quant: dict | None = None, metrics: dict | None = None,
               extra: dict | None = None) -> dict:
        """Digest the files, write the manifest last, rename the folder into place."""
        # RUN_KEY stays until the folder is in place: a partial cut short here is still known as ours
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*"))
                 if p.is_file() and str(p.relative_to(tmp)) not in (RUN_KEY, MANIFEST, MANIFEST + ".tmp")}
        manifest = {
            "schema": SCHEMA, "stage": self.stage, "kind": self.kind, "status": "complete",
            "qatctl_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "config": self.config, "inputs": self.inputs, "quant": quant, "metrics": _normalized(metrics or {}),
            "files": files, **(extra or {}),
        }
        mtmp = tmp / (MANIFEST + ".tmp")
        with open(mtmp, "w") as f:
            json.dump(manifest, f, indent=1, allow_nan=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(mtmp, tmp / MANIFEST)
        fsync_dir(tmp)
        if self.path.exists():  # --force: swap, so the old artifact survives a kill mid-swap
            old = self.replaced
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.path, old)
            os.replace(tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, self.path)
        (self.path / RUN_KEY).unlink(missing_ok=True)
        fsync_dir(self.path.parent)
        self.release()
        return manifest

    def release(self) -> None:
        """Drop the lock on --out (also when this object goes away or the process ends)."""
        if self._release is not None:
            self._release()


def _run_key(stage, config, inputs) -> dict:
    """What makes two runs of a stage the same run: stage, config, and each input's kind and digest."""
    return {"stage": stage, "config": config, "inputs": [[i["kind"], i["digest"]] for i in inputs]}


RUN_KEY = ".qatctl-run.json"  # in a partial folder: the config and inputs it was started with


class _Building:
    def __init__(self, out: OutputDir, resume: bool):
        self.out, self.resume = out, resume

    def __enter__(self) -> Path:
        p, key = self.out.partial, self.out._run_key()
        keep = False
        if self.resume and (p / RUN_KEY).is_file():
            try:
                keep = json.loads((p / RUN_KEY).read_text()) == key
            except json.JSONDecodeError:
                keep = False
        if not keep and self.resume and not self.out.force and _has_state(p) and _differs(p, key):
            raise QatctlError(f"{p}: holds the resume state of a killed run with another config or inputs "
                              f"({_what_differs(p, key)}); rerun that command to finish it, or pass --force to "
                              "discard its progress")
        if not keep:
            shutil.rmtree(p, ignore_errors=True)  # a stale partial of another run is never reused
            p.parent.mkdir(parents=True, exist_ok=True)
            p.mkdir()
            (p / RUN_KEY).write_text(json.dumps(key))
        return p

    def __exit__(self, exc_type, exc, tb):
        # A partial holding resume state survives errors and interrupts; otherwise nothing
        # half-written stays.
        if exc_type is not None and not (self.resume and _has_state(self.out.partial)):
            shutil.rmtree(self.out.partial, ignore_errors=True)
        return False


def _differs(partial: Path, key: dict) -> bool:
    try:
        return json.loads((partial / RUN_KEY).read_text()) != key
    except (OSError, json.JSONDecodeError):
        return True


def _what_differs(partial: Path, key: dict) -> str:
    """e.g. "config lr 1e-05 -> 0.0001": the first differences between a partial's run and this one."""
    try:
        old = json.loads((partial / RUN_KEY).read_text())
    except (OSError, json.JSONDecodeError):
        return "its run record is unreadable"
    diffs = [f"{k} {old.get('config', {}).get(k)!r} -> {v!r}" for k, v in key["config"].items()
             if old.get("config", {}).get(k) != v]
    if old.get("inputs") != key["inputs"]:
        diffs.append("inputs changed")
    return "config " + ", ".join(diffs[:3]) if diffs else "another stage"


def _has_state(partial: Path) -> bool:
    """Whether a partial folder holds a training stage's resume state (its `state/` folder)."""
    state = partial / "state"
    final = partial / "trainer_state" / "state.json"  # a finished run's final state (its save was cut)
    return (state.is_dir() and any(state.iterdir())) or final.is_file()


def _lock(path: Path):
    """An exclusive lock on --out for this run (a sibling lock file, removed on release): a second
    run on the same --out fails at once, naming the holder. Returns the release function."""
    import fcntl
    import stat

    lock = path.with_name(f".{path.name}.qatctl-lock")
    if not lock.parent.exists():
        lock.parent.mkdir(parents=True)
    while True:
        # Never through a symlink or into a file with other names (a planted link would make
        # this truncate a user's file): O_NOFOLLOW, then a regular file with one link only.
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise QatctlError(f"{lock}: is a symlink; qatctl's lock file is never one — remove it") from None
            raise
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            os.close(fd)
            raise QatctlError(f"{lock}: is not a lock file qatctl made (not a plain file with one name); remove it")
        f = os.fdopen(fd, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise QatctlError(f"--out {path}: in use by another qatctl run ({holder}); wait for it or stop it") from None
        try:  # the previous holder may have unlinked the file between our open and flock
            if os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}")
    f.flush()

    def release():
        if not f.closed:
            try:
                os.unlink(lock)
            except FileNotFoundError:
                pass
            f.close()

    return release


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
