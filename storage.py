"""Where files live: a local path, or object storage (`gs://...`, any filesystem Beam knows).

One seam for every module that reads or writes outside its own process: model checkpoints and
heads, the index's replication, the launch checks. Local paths use the OS directly; remote ones
go through Beam's FileSystems, imported only when a path is remote (the search service runs
without Beam for a local index). `create_only` is the write the index's commits need: exactly
one writer may create an object (`O_EXCL` locally, a generation-0 precondition on Cloud Storage).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["AlreadyExists", "Unreachable", "copy_from_local", "copy_to_local", "create_only", "delete", "exists", "is_remote",
           "match", "read_bytes", "write_bytes"]

_CHUNK = 8 * 1024 * 1024


class AlreadyExists(FileExistsError):
    """`create_only` found the object there already: another writer got there first."""


class Unreachable(OSError):
    """Object storage could not be asked (network, credentials, no such bucket): every filesystem
    raises its own errors, this is the one the callers see."""


def is_remote(path: str | Path) -> bool:
    return "://" in str(path)


def _fs():
    from apache_beam.io.filesystems import FileSystems

    return FileSystems


def _asking(path: str, call):
    try:
        return call()
    except AlreadyExists:  # the store answered: another writer was first
        raise
    except Exception as e:  # see Unreachable
        raise Unreachable(f"cannot reach {path}: {e}") from e


def exists(path: str | Path) -> bool:
    if not is_remote(path):
        return Path(path).exists()
    return _asking(str(path), lambda: _fs().exists(str(path)))


def read_bytes(path: str | Path) -> bytes:
    if not is_remote(path):
        return Path(path).read_bytes()
    with _fs().open(str(path)) as f:
        return f.read()


def write_bytes(path: str | Path, data: bytes) -> None:
    """Replaces whatever is there (a local file through a temporary name and a rename)."""
    if is_remote(path):
        with _fs().create(str(path)) as f:
            f.write(data)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def create_only(path: str | Path, data: bytes) -> None:
    """Writes `data` at `path` unless something is there already (AlreadyExists), atomically: locally
    a hard link (which like O_EXCL fails on an existing name), on Cloud Storage `if_generation_match=0`,
    on another Beam filesystem its own `create_only(path, data)` when it has one. One that has none
    offers no precondition through Beam: it is refused rather than checked-then-written, which two
    writers could both pass."""
    text = str(path)
    if text.startswith("gs://"):
        _gcs_create_only(text, data)
    elif is_remote(path):
        filesystem = _fs().get_filesystem(text)
        if not hasattr(filesystem, "create_only"):
            raise NotImplementedError(f"{text}: {type(filesystem).__name__} has no create-only write, so two "
                                      f"writers could both commit; keep the index on gs:// or a local disk")
        _asking(text, lambda: filesystem.create_only(text, data))
    else:
        # Written whole under a temporary name, then linked into place: link() fails if the name
        # exists (like O_EXCL), and a reader never sees a half-written file.
        tmp = Path(f"{text}.{os.getpid()}.{id(data)}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, text)
        except FileExistsError as e:
            raise AlreadyExists(text) from e
        finally:
            tmp.unlink()


def _gcs_create_only(path: str, data: bytes) -> None:
    from google.api_core.exceptions import PreconditionFailed
    from google.cloud import storage as gcs

    bucket, _, name = path.removeprefix("gs://").partition("/")
    try:
        gcs.Client().bucket(bucket).blob(name).upload_from_string(data, if_generation_match=0)
    except PreconditionFailed as e:
        raise AlreadyExists(path) from e


def match(pattern: str) -> list[str]:
    """Paths matching a glob (remote: the object listing)."""
    if not is_remote(pattern):
        import glob

        return sorted(glob.glob(pattern))
    (result,) = _asking(pattern, lambda: _fs().match([pattern]))
    return [m.path for m in result.metadata_list]


def delete(paths: list[str]) -> None:
    remote = [p for p in paths if is_remote(p)]
    if remote:
        _fs().delete(remote)
    for p in paths:
        if not is_remote(p):
            Path(p).unlink(missing_ok=True)


def copy_to_local(source: str, local: Path) -> None:
    """Copies a file (local or remote) to `local`, which appears whole or not at all."""
    tmp = local.with_name(local.name + f".{os.getpid()}.part")
    if is_remote(source):
        with _fs().open(source) as src, open(tmp, "wb") as sink:
            shutil.copyfileobj(src, sink, _CHUNK)
    else:
        shutil.copyfile(source, tmp)
    os.replace(tmp, local)


def copy_from_local(local: Path, target: str) -> None:
    if not is_remote(target):
        shutil.copyfile(local, target)
        return
    with open(local, "rb") as source, _fs().create(target) as sink:
        shutil.copyfileobj(source, sink, _CHUNK)
