"""`pipelines.index` input and output failures end in one clear line and a non-zero exit, run as users type it.

Seen before: an unreadable record file was a 76-line traceback, an unreadable directory "matched no
files", a directory named `sale[2024]` "matched no files" though it held records (its name was read as
a glob), a directory named `part-0.jsonl` was read as 0 records with exit 0, and a full disk ended in
a 133-line traceback.

Tests run as root here, where file modes do not stop reads: the permission cases run the command
without the capabilities that let root past them (`setpriv --bounding-set -dac_override,...`), and
are skipped where that cannot be done. The full disk is a 16 KiB tmpfs mounted in a private mount
namespace (`unshare -m`, skipped where not allowed) and, everywhere, an ENOSPC from fsync injected
through a sitecustomize.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.support.index_helpers import record
from tests.test_cli import ROOT, _one_line_refusal, cli

MODEL = "acme:custom-16"


def write_records(directory, n: int = 5) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    lines = [record(f"p{i}", 1, dim=16, model=MODEL, seed=i).to_json() for i in range(n)]
    (directory / "part-0.jsonl").write_text("\n".join(lines) + "\n")


def index(input_dir, index_dir, *prefix: str, env: dict | None = None, timeout: float = 120):
    """`python -m pipelines.index` (after `prefix`, a wrapper command), as a user types it."""
    args = ["--input_dir", str(input_dir), "--index_dir", str(index_dir), "--runner", "DirectRunner"]
    if not prefix:
        return cli("pipelines.index", *args, env=env, timeout=timeout)
    return subprocess.run([*prefix, sys.executable, "-m", "pipelines.index", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200", **(env or {})})


def test_a_directory_with_glob_characters_in_its_name_is_read_as_that_directory(tmp_path):
    write_records(tmp_path / "sale[2024]")
    write_records(tmp_path / "sale2", n=2)  # what `sale[2024]` would match as a glob's character class
    result = index(tmp_path / "sale[2024]", tmp_path / "index")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "5 records read (5 upserted" in result.stdout and "holds 5 live products" in result.stdout
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr


def _fifo(path):
    os.mkfifo(path)


@pytest.mark.parametrize("make, message", [
    (lambda path: path.mkdir(), "part-9.jsonl is a directory, not a file of records"),
    (_fifo, "part-9.jsonl is not a regular file"),
], ids=["directory", "fifo"])
def test_a_record_file_that_is_not_a_file_is_refused_in_one_line(tmp_path, make, message):
    write_records(tmp_path / "records")
    make(tmp_path / "records" / "part-9.jsonl")
    result = index(tmp_path / "records", tmp_path / "index", timeout=60)
    _one_line_refusal(result, f"cannot start: --input_dir: {tmp_path / 'records'}/{message}")
    assert not (tmp_path / "index").exists()


def test_an_input_dir_that_is_a_file_or_missing_is_refused_in_one_line(tmp_path):
    write_records(tmp_path / "records")
    result = index(tmp_path / "records" / "part-0.jsonl", tmp_path / "index", timeout=60)
    _one_line_refusal(result, f"--input_dir {tmp_path / 'records' / 'part-0.jsonl'} is a file, not the directory")
    result = index(tmp_path / "missing", tmp_path / "index", timeout=60)
    _one_line_refusal(result, f"--input_dir {tmp_path / 'missing'} does not exist")


def _without_root_overrides() -> tuple[str, ...]:
    """A command prefix under which file modes apply to this user (root's DAC overrides dropped)."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    probe = [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "true"] if setpriv else None
    if not probe or subprocess.run(probe, capture_output=True, timeout=10).returncode != 0:
        pytest.skip("running as root without setpriv: file modes cannot make a file unreadable")
    return tuple(probe[:-1])


@pytest.mark.parametrize("what", ["file", "directory"])
def test_an_unreadable_input_is_refused_in_one_line(tmp_path, what):
    prefix = _without_root_overrides()
    write_records(tmp_path / "records")
    locked = tmp_path / "records" / "part-0.jsonl" if what == "file" else tmp_path / "records"
    locked.chmod(0)
    try:
        result = index(tmp_path / "records", tmp_path / "index", *prefix, timeout=60)
    finally:
        locked.chmod(0o755)
    if what == "file":
        _one_line_refusal(result, f"--input_dir: cannot read {locked}: Permission denied")
    else:
        _one_line_refusal(result, f"--input_dir {locked} cannot be read: Permission denied")


FULL_DISK = "index: failed: no space left on device under {} (--index_dir"

ENOSPC_ON_FSYNC = '''
import errno, os
def _no_space(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
os.fsync = _no_space
'''


def test_a_full_disk_is_one_line_not_a_traceback(tmp_path):
    """ENOSPC from fsync (what a commit hits first on a full disk), injected into the command."""
    write_records(tmp_path / "records")
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(ENOSPC_ON_FSYNC)
    result = index(tmp_path / "records", tmp_path / "index", timeout=120,
                   env={"PYTHONPATH": f"{tmp_path / 'inject'}{os.pathsep}{ROOT}"})
    _one_line_refusal(result, FULL_DISK.format(tmp_path / "index"))
    assert "point --index_dir at a disk with room" in result.stderr


def test_a_really_full_disk_is_one_line_not_a_traceback(tmp_path):
    """A 16 KiB tmpfs, mounted in a mount namespace of the command's own (gone when it ends): SQLite
    fails with "database or disk is full" or "disk I/O error", numpy with a short write."""
    write_records(tmp_path / "records", n=200)
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=16k tmpfs "$0" && exec "$@"', str(disk)]
    if not shutil.which("unshare") or subprocess.run([*mount, "true"], capture_output=True, timeout=10).returncode:
        pytest.skip("cannot mount a tmpfs in a private mount namespace here (needs root or user namespaces)")
    result = index(tmp_path / "records", disk / "index", *mount, timeout=120)
    _one_line_refusal(result, FULL_DISK.format(disk / "index"))


def test_only_failures_of_the_machine_become_one_line(tmp_path):
    """What `launch` turns into one line (the rest keeps its traceback): a full disk, told by its errno,
    by SQLite's words, or by the disk's free space; an OSError naming its file."""
    import errno
    import sqlite3

    from pipelines.cli import describe_failure

    outputs = [("--index_dir", str(tmp_path / "index"))]
    assert describe_failure(ValueError("a bug"), outputs) is None
    assert describe_failure(OSError("64000 requested and 42976 written"), outputs) is None  # this disk has room
    assert describe_failure(PermissionError(errno.EACCES, "Permission denied", "/data/x"), outputs) == \
        "Permission denied: /data/x"
    in_a_step = RuntimeError("while running 'UpdateIndex'")
    in_a_step.__cause__ = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "index" / "seg.npy"))
    for error in (in_a_step, sqlite3.OperationalError("database or disk is full")):
        assert describe_failure(error, outputs).startswith(
            f"no space left on device under {tmp_path / 'index'} (--index_dir, "), error
