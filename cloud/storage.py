"""One small storage interface, chosen by URI scheme.

Keys are ``/``-separated paths relative to the storage root: a local folder, ``s3://bucket/prefix``
or ``gs://bucket/prefix`` behind the same methods.
"""

from __future__ import annotations

import builtins
import os
import re
import shutil
import sys
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from urllib.parse import urlparse

from config import UserError

_USER_INFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@'\"]*@")


def redact(text: str) -> str:
    """``text`` with the user info (``user:password@``) of every URL in it removed."""
    return _USER_INFO.sub(r"\1", text)


class StorageError(UserError):
    """Storage cannot be used as configured (bad URI, not writable, ...): shown as one line."""


class AlreadyExists(StorageError):
    """``write_new`` found an object under its key."""


class Storage(ABC):
    @abstractmethod
    def read(self, key: str) -> bytes: ...

    @abstractmethod
    def write(self, key: str, data: bytes) -> None:
        """Write ``data`` under ``key`` atomically: readers see the old object or the new one."""

    @abstractmethod
    def write_new(self, key: str, data: bytes) -> None:
        """Create ``key`` only if nothing is stored under it (a commit); raise AlreadyExists otherwise."""

    def write_many(self, prefix: str, objects: dict[str, bytes]) -> None:
        """Write ``objects`` (names relative to ``prefix``); local storage makes them appear together."""
        for name, data in objects.items():
            self.write(f"{prefix}/{name}", data)

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (recursively), sorted."""

    def folders(self, prefix: str) -> builtins.list[str]:
        """Names of the folders directly below ``prefix`` (one level, not every key below), sorted."""
        base = prefix.strip("/")
        skip = len(base) + 1 if base else 0
        return sorted({key[skip:].split("/")[0] for key in self.list(prefix) if "/" in key[skip:]})

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def url(self, key: str) -> str:
        """Where ``key`` lives, for messages (a path, ``s3://...`` or ``gs://...``; never credentials)."""


class LocalStorage(Storage):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / key

    def url(self, key: str) -> str:
        return str(self._path(key))

    def read(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def write(self, key: str, data: bytes) -> None:
        self._write_via_temp(key, data, os.replace)

    def write_new(self, key: str, data: bytes) -> None:
        """``link`` puts the temporary file in place only if the name is free."""
        self._write_via_temp(key, data, os.link)

    def _write_via_temp(self, key: str, data: bytes, place: Callable[[Path, Path], None]) -> None:
        """Write a synced temporary file beside ``key``, ``place`` it under ``key``, sync the folder."""
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            _write_into_folder(tmp, data)
            try:
                place(tmp, path)
            except FileExistsError:  # only os.link refuses an existing name
                raise AlreadyExists(f"{path} already exists; not overwritten") from None
            except OSError as err:
                if place is os.link and not path.parent.is_file():
                    raise StorageError(
                        f"cannot create {path}: {err.strerror or err} (create-only commits need a file system "
                        "with hard links)"
                    ) from None
                raise
            _sync_dir(path.parent)
        except OSError as err:  # a full disk, a quota, a read-only mount, ...
            raise StorageError(f"cannot write to {path}: {err.strerror or err}") from None
        finally:
            with suppress(OSError):
                tmp.unlink(missing_ok=True)  # already gone after os.replace

    def write_many(self, prefix: str, objects: dict[str, bytes]) -> None:
        """Into a hidden temporary folder, synced, then renamed to ``prefix`` in one step."""
        final = self._path(prefix)
        staging = final.with_name(f".{final.name}.partial")
        try:
            shutil.rmtree(staging, ignore_errors=True)  # left by a crash
            for name, data in objects.items():
                _write_into_folder(staging / name, data)
            if final.exists():  # objects of an uncommitted attempt (a committed one has a manifest: refuse)
                if any(p.name == "MANIFEST.json" for p in final.iterdir()):
                    raise AlreadyExists(f"{final} is already committed; not overwritten")
                shutil.rmtree(final)
            os.rename(staging, final)
            _sync_dir(final.parent)
        except OSError as err:
            shutil.rmtree(staging, ignore_errors=True)
            raise StorageError(f"cannot write to {final}: {err.strerror or err}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        keys = []
        for folder, _, names in os.walk(base):  # a folder deleted meanwhile is skipped, not an error
            for name in names:
                relative = (Path(folder) / name).relative_to(self.root)
                if ".tmp-" not in name and not _in_staging(relative):
                    keys.append(str(relative).replace(os.sep, "/"))
        return sorted(keys)

    def folders(self, prefix: str) -> builtins.list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and not _in_staging(Path(p.name)))

    def delete(self, key: str) -> None:
        """Remove ``key`` and the folders it leaves empty. Another writer may be filling one of
        them or another deleter emptying it at the same moment: such a folder is left to them."""
        path = self._path(key)
        path.unlink(missing_ok=True)
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()  # refuses a folder that is not empty
            except OSError:  # not empty, or already removed by another deleter
                return
            parent = parent.parent


def _in_staging(relative: Path) -> bool:
    """A path inside a staging folder (``.NAME.partial``) of ``write_many``, below the root."""
    return any(part.startswith(".") and part.endswith(".partial") for part in relative.parts)


def _write_into_folder(path: Path, data: bytes, attempts: int = 5) -> None:
    """Create ``path``'s folders and write ``path`` synced. A concurrent ``delete`` may remove
    a folder it has just found empty between the two steps: then both are done again."""
    for attempt in range(attempts):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            _write_synced(path, data)
            return
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_dir(path: Path) -> None:
    """Make a rename or link in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_storage(uri: str, *, quick: bool = False) -> Storage:
    """Storage for a local path (or ``file://`` URI), ``s3://bucket/prefix`` or ``gs://bucket/prefix``.

    ``quick`` gives up on an unreachable server within seconds (for the check before training)
    instead of retrying for a minute or two as background uploads should. The cloud clients are
    optional extras, imported only when their scheme is used.
    """
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return LocalStorage(parsed.path if parsed.scheme else uri)
    if parsed.scheme == "s3":
        try:
            from cloud.s3 import S3Storage
        except ImportError:
            raise StorageError(f"{redact(uri)} needs boto3: pip install 'evorl[s3]'") from None
        return S3Storage.from_uri(uri, max_attempts=2, connect_timeout=3) if quick else S3Storage.from_uri(uri)
    if parsed.scheme == "gs":
        try:
            from cloud.gcs import GCSStorage
        except ImportError:
            raise StorageError(f"{redact(uri)} needs google-cloud-storage: pip install 'evorl[gcs]'") from None
        return GCSStorage.from_uri(uri, timeout=5, deadline=8) if quick else GCSStorage.from_uri(uri)
    raise StorageError(
        f"unsupported storage URI {redact(uri)!r}; use a local path, s3://bucket/prefix or gs://bucket/prefix"
    )


def check_writable(storage: Storage, key: str) -> None:
    """Create (create-only, as a commit does), read back and delete a marker so a bad location
    fails before training starts; warn if the location does not refuse to overwrite it. The
    marker's name is unique to the call: trainers starting together do not trip over each other."""
    marker = f"{key}/.write-check-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    try:
        storage.write_new(marker, b"ok")
        if storage.read(marker) != b"ok":
            raise StorageError(f"storage at {key!r} did not return what was written")
        overwrites = _overwrites(storage, marker)
        storage.delete(marker)
    except OSError as err:
        raise StorageError(f"cannot use {storage.url(key)}: {err.strerror or err}") from None
    if overwrites:
        print(
            f"warning: {storage.url(key)} does not refuse to overwrite a create-only write (If-None-Match / "
            "if_generation_match ignored): only the run's WRITER claim keeps a second trainer from replacing a commit",
            file=sys.stderr,
            flush=True,
        )


def _overwrites(storage: Storage, key: str) -> bool:
    """True if a create-only write over an existing ``key`` succeeds."""
    try:
        storage.write_new(key, b"again")
    except AlreadyExists:
        return False
    return True
