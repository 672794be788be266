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

__all__ = ["AlreadyExists", "Changed", "Unreachable", "copy_from_local", "copy_to_local", "create_only", "delete",
           "exists", "is_remote", "match", "read_bytes", "read_versioned", "replace_if", "write_bytes"]

_CHUNK = 8 * 1024 * 1024


class AlreadyExists(FileExistsError):
    """`create_only` found the object there already: another writer got there first."""


class Changed(RuntimeError):
    """`replace_if` found the object changed since it was read: another writer got there first."""


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

    try:
        _gcs_blob(path).upload_from_string(data, if_generation_match=0)
    except PreconditionFailed as e:
        raise AlreadyExists(path) from e


def read_versioned(path: str | Path) -> tuple[bytes | None, str]:
    """The object's bytes (None when there is none) and a token of this version, for `replace_if`:
    the object's generation on Cloud Storage, a digest of the bytes locally."""
    text = str(path)
    if text.startswith("gs://"):
        named = _gcs_blob(text)
        blob = named.bucket.get_blob(named.name)  # its metadata, generation included, in one request
        if blob is None:
            return None, "0"
        return blob.download_as_bytes(if_generation_match=blob.generation), str(blob.generation)
    if is_remote(path):
        raise NotImplementedError(f"{text}: only gs:// and local paths have a conditional replace")
    data = Path(text).read_bytes() if Path(text).exists() else None
    return data, _digest(data)


def replace_if(path: str | Path, data: bytes, token: str) -> None:
    """Replaces the object with `data` only if it is still the version `token` names (Changed otherwise),
    atomically: a generation precondition on Cloud Storage; locally, under an exclusive lock, a check of
    the bytes and a rename over the old file (readers see the old file or the new one, never half)."""
    text = str(path)
    if text.startswith("gs://"):
        from google.api_core.exceptions import PreconditionFailed

        try:
            _gcs_blob(text).upload_from_string(data, if_generation_match=int(token))
        except PreconditionFailed as e:
            raise Changed(f"{text} changed since it was read") from e
        return
    if is_remote(path):
        raise NotImplementedError(f"{text}: only gs:// and local paths have a conditional replace")
    import fcntl

    target = Path(text)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{target.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = target.read_bytes() if target.exists() else None
        if _digest(current) != token:
            raise Changed(f"{text} changed since it was read")
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)


def _digest(data: bytes | None) -> str:
    import hashlib

    return "0" if data is None else hashlib.sha256(data).hexdigest()


def _gcs_blob(path: str):
    from google.cloud import storage as gcs

    bucket, _, name = path.removeprefix("gs://").partition("/")
    return gcs.Client().bucket(bucket).blob(name)


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
