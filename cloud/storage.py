"""One small storage interface, chosen by URI scheme.

Keys are ``/``-separated paths relative to the storage root. Only local paths are served
for now; ``gs://`` and ``s3://`` plug in behind the same five methods.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from urllib.parse import urlparse

from config import UserError


class StorageError(UserError):
    """Storage cannot be used as configured (bad URI, not writable, ...): shown as one line."""


class Storage(ABC):
    @abstractmethod
    def read(self, key: str) -> bytes: ...

    @abstractmethod
    def write(self, key: str, data: bytes) -> None:
        """Write ``data`` under ``key`` atomically: readers see the old object or the new one."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (recursively), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None: ...


class LocalStorage(Storage):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def read(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:  # a full disk, a quota, a read-only mount, ...
            tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot write to {path}: {err.strerror or err}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(
            str(p.relative_to(self.root)).replace(os.sep, "/")
            for p in base.rglob("*")
            if p.is_file() and ".tmp-" not in p.name
        )

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        parent = path.parent
        while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent


def open_storage(uri: str) -> Storage:
    """Storage for a local path (or ``file://`` URI), ``s3://bucket/prefix`` or ``gs://bucket/prefix``.

    The cloud clients are optional extras, imported only when their scheme is used.
    """
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return LocalStorage(parsed.path if parsed.scheme else uri)
    if parsed.scheme == "s3":
        from cloud.s3 import S3Storage

        return S3Storage.from_uri(uri)
    if parsed.scheme == "gs":
        from cloud.gcs import GCSStorage

        return GCSStorage.from_uri(uri)
    raise StorageError(f"unsupported storage URI {uri!r}; use a local path, s3://bucket/prefix or gs://bucket/prefix")


def check_writable(storage: Storage, key: str) -> None:
    """Write, read back and delete a marker so a bad location fails before training starts."""
    marker = f"{key}/.write-check"
    try:
        storage.write(marker, b"ok")
        if storage.read(marker) != b"ok":
            raise StorageError(f"storage at {key!r} did not return what was written")
        storage.delete(marker)
    except OSError as err:
        raise StorageError(f"cannot write to {getattr(storage, 'root', '')}/{key}: {err.strerror}") from None
