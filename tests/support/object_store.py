"""An object store in memory, registered with Beam's FileSystems as `memgs://`, for the remote index tests.

It keeps GCS's semantics where the index relies on them: flat keys (no directories, no rename),
an object appears whole when its writer closes and not before, listing by prefix. Every call is
counted, so a test can tell what a reader or writer asked of the store.
"""

from __future__ import annotations

import collections
import io
import threading
import time

from apache_beam.io.filesystem import BeamIOError, CompressionTypes, FileMetadata, FileSystem

import storage

SCHEME = "memgs"


class MemoryObjectStore(FileSystem):
    objects: dict[str, bytes] = {}
    calls: collections.Counter = collections.Counter()
    opened: list[str] = []
    _lock = threading.Lock()

    @classmethod
    def scheme(cls):
        return SCHEME

    @classmethod
    def reset(cls) -> None:
        with cls._lock:
            cls.objects.clear()
            cls.calls.clear()
            cls.opened.clear()

    def join(self, basepath, *paths):
        return "/".join([basepath.rstrip("/"), *(p.strip("/") for p in paths)])

    def split(self, path):
        head, _, tail = path.rstrip("/").rpartition("/")
        return head, tail

    def mkdirs(self, path):
        pass

    def has_dirs(self):
        return False

    def _list(self, dir_or_prefix):
        self.calls["list"] += 1
        with self._lock:
            items = [(p, len(b)) for p, b in self.objects.items() if p.startswith(dir_or_prefix)]
        for path, size in items:
            yield FileMetadata(path, size, time.time())

    def create(self, path, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
        self.calls["create"] += 1
        store = self

        class _Writer(io.BytesIO):
            def close(self):
                if not self.closed:
                    with store._lock:
                        store.objects[path] = self.getvalue()
                super().close()

        return _Writer()

    def create_only(self, path, data: bytes):
        """GCS's `if_generation_match=0`: the object is written only if there is none, atomically."""
        self.calls["create_only"] += 1
        with self._lock:
            if path in self.objects:
                raise storage.AlreadyExists(path)
            self.objects[path] = bytes(data)

    def open(self, path, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
        self.calls["open"] += 1
        self.opened.append(path)
        with self._lock:
            if path not in self.objects:
                raise BeamIOError(f"no object {path}", {path: FileNotFoundError(path)})
            return io.BytesIO(self.objects[path])

    def copy(self, source_file_names, destination_file_names):
        with self._lock:
            for source, destination in zip(source_file_names, destination_file_names):
                self.objects[destination] = self.objects[source]

    def rename(self, source_file_names, destination_file_names):
        raise BeamIOError("object stores have no rename", {})

    def exists(self, path):
        self.calls["exists"] += 1
        return path in self.objects

    def size(self, path):
        return len(self.objects[path])

    def last_updated(self, path):
        return time.time()

    def checksum(self, path):
        return str(hash(self.objects[path]))

    def metadata(self, path):
        return FileMetadata(path, self.size(path), time.time())

    def delete(self, paths):
        self.calls["delete"] += 1
        with self._lock:
            missing = {p: FileNotFoundError(p) for p in paths if p not in self.objects}
            for path in paths:
                self.objects.pop(path, None)
        if missing:
            raise BeamIOError("some objects were missing", missing)
