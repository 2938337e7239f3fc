"""Background uploads: committed local generations are copied to a remote location.

The training loop commits each generation to local disk and hands its number to an ``Uploader``;
one background thread copies the generation's objects (shared blobs the remote already holds are
skipped), then the run's log files, then the manifest with a create-only write, which is the
remote commit, and applies retention there. A failure is retried with exponential backoff for
as long as the run lives, so an outage delays uploads but never training or local commits.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud import checkpoint as ckpt
from cloud.lease import Lease, LeaseLost
from cloud.storage import AlreadyExists, Storage, StorageError


class _Skip(Exception):
    """The local generation cannot be uploaded (pruned meanwhile, or damaged): drop it."""


@dataclass(frozen=True)
class UploadStatus:
    pending: list[int]
    """Generations committed locally but not yet remotely, oldest first."""
    oldest_pending_s: float
    """Seconds since the oldest pending generation was committed locally (0 when none)."""
    uploaded: int | None
    """Newest generation committed remotely by this process."""
    error: str
    """The last failure (empty once an upload succeeds again), or else the last retention problem
    on the remote (empty once retention succeeds again)."""
    fatal: str
    """A failure that retrying cannot fix (another writer committed the same generation)."""


class Uploader:
    """Copies generations from ``local`` to ``remote`` for run ``run``, oldest first.

    ``lock`` must be held by whoever prunes ``local``, with ``in_flight`` protected, so that a
    generation is not deleted while it is being read.
    """

    def __init__(
        self,
        local: Storage,
        remote: Storage,
        run: str,
        *,
        keep: int,
        keep_every: int,
        log_files: Callable[[], list[Path]] = list,
        max_backoff_s: float = 60.0,
        lease: Lease | None = None,
    ) -> None:
        """``lease``: this trainer's claim on the run at ``remote``; checked before each upload and
        released by ``close``."""
        self.local, self.remote, self.run = local, remote, run
        self.lease = lease
        self.keep, self.keep_every = keep, keep_every
        self.log_files = log_files
        self.max_backoff_s = max_backoff_s
        self.lock = threading.Lock()
        self.in_flight: int | None = None
        self._wake = threading.Condition()
        self._pending: dict[int, float] = {}  # generation -> when it was committed locally
        self._uploaded: int | None = None
        self._error = ""
        self._retention_error = ""
        self._fatal = ""
        self._closed = False
        self._remote_blobs: set[str] | None = None  # shared blob keys known to be on the remote
        self._thread = threading.Thread(target=self._work, name="evorl-upload", daemon=True)
        self._thread.start()

    def submit(self, generation: int) -> None:
        """Queue a generation that was just committed locally."""
        with self._wake:
            self._pending[generation] = time.monotonic()
            self._wake.notify_all()

    def status(self) -> UploadStatus:
        with self._wake:
            pending = sorted(self._pending)
            oldest = time.monotonic() - min(self._pending.values()) if self._pending else 0.0
            error = self._error or self._retention_error
            return UploadStatus(pending, oldest, self._uploaded, error, self._fatal)

    def wait(self, timeout_s: float) -> bool:
        """Block until nothing is pending (True) or ``timeout_s`` passed or uploads failed fatally."""
        deadline = time.monotonic() + timeout_s
        with self._wake:
            while self._pending and not self._fatal:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wake.wait(remaining)
            return not self._pending

    def close(self) -> None:
        """Stop the thread; pending generations stay local. A request in flight is not waited
        for beyond a second: the thread is a daemon, and an upload cut short is harmless (the
        remote manifest is written last)."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        self._thread.join(timeout=1.0)
        if self.lease is not None:
            self.lease.release()

    # ------------------------------------------------------------ the background thread

    def _work(self) -> None:
        backoff = min(1.0, self.max_backoff_s)
        while True:
            with self._wake:
                while not self._pending and not self._closed:
                    self._wake.wait()
                if self._closed or self._fatal:
                    return
                generation = min(self._pending)
            try:
                self._upload(generation)
                self._prune_remote()
                self._done(generation, uploaded=True)
                backoff = min(1.0, self.max_backoff_s)
            except _Skip as skip:
                self._done(generation, uploaded=False, error=str(skip))
            except LeaseLost as lost:  # another trainer writes the run now: stop, one line
                with self._wake:
                    self._fatal = str(lost)
                    self._wake.notify_all()
                return
            except (StorageError, OSError) as err:  # unreachable, denied, full, ...: retried
                with self._wake:
                    self._error = f"generation {generation + 1}: {err}"
                    if not self._closed:
                        self._wake.wait(backoff)  # or until close() or the next submit()
                backoff = min(2 * backoff, self.max_backoff_s)
            except Exception as err:  # never let the thread die silently: report and stop uploading
                with self._wake:
                    self._fatal = f"upload of generation {generation + 1} failed: {type(err).__name__}: {err}"
                    self._wake.notify_all()
                return
            finally:
                with self.lock:
                    self.in_flight = None

    def _done(self, generation: int, uploaded: bool, error: str = "") -> None:
        """Generation dealt with: uploaded, or skipped (for ``error`` if it is one)."""
        with self._wake:
            self._pending.pop(generation, None)
            if uploaded:
                self._uploaded = max(generation, self._uploaded if self._uploaded is not None else -1)
                self._error = ""
            elif error:
                self._error = f"generation {generation + 1} not uploaded: {error}"
            self._wake.notify_all()

    def _upload(self, generation: int) -> None:
        run, key = self.run, ckpt.manifest_key(self.run, generation)
        with self.lock:
            if not self.local.exists(key):
                raise _Skip("")  # pruned locally before its turn: retention would not keep it anyway
            self.in_flight = generation
        try:
            manifest = ckpt.read_manifest(self.local, run, generation)  # names only what the format defines
        except ckpt.CheckpointError as err:
            raise _Skip(str(err)) from None
        remote_manifest = ckpt.content_addressed(manifest)  # no fixed key another writer could overwrite
        if self.lease is not None:
            self.lease.check()  # another trainer took the run over: write nothing more
        if self._committed_already(key, remote_manifest):
            return
        if self._remote_blobs is None:
            self._remote_blobs = set(self.remote.list(f"{run}/{ckpt.OBJECTS}"))
        for local_key, entry in ckpt.manifest_objects(manifest, run):
            remote_key = f"{run}/{ckpt.OBJECTS}/{entry['sha256']}"
            shared = local_key.startswith(f"{run}/{ckpt.OBJECTS}/")
            if shared and remote_key in self._remote_blobs:  # a generation's own objects always go up:
                continue  # the same bytes under the same key, repairing a damaged copy of a rerun
            self.remote.write(remote_key, self._read_verified(local_key, entry))
            self._remote_blobs.add(remote_key)
        for path in self.log_files():  # before the manifest: a committed generation's log lines are there
            if path.is_file():
                self.remote.write(f"{run}/logs/{path.name}", _complete_lines(path.read_bytes()))
        self._commit(key, remote_manifest)
        self.remote.write(f"{run}/LATEST", f"gen-{generation:06d}".encode())

    def _prune_remote(self) -> None:
        """Retention on the remote side; a failure is shown in the status (and so in the log) and
        left for the next upload to retry."""
        problems: list[str] = []
        try:
            deleted = ckpt.prune(self.remote, self.run, self.keep, self.keep_every, problems=problems)
        except (StorageError, OSError) as err:
            self._remote_blobs = None  # what was deleted is unknown: list again next time
            self._set_retention_error(f"retention on {self.remote.url(self.run)} failed: {err}")
            return
        self._set_retention_error(f"retention on {self.remote.url(self.run)}: {problems[0]}" if problems else "")
        if self._remote_blobs is not None:
            self._remote_blobs.difference_update(deleted)

    def _set_retention_error(self, message: str) -> None:
        with self._wake:
            self._retention_error = message

    def _committed_already(self, key: str, manifest: dict[str, Any]) -> bool:
        """True if the remote holds this generation already (a retry after a lost response); a
        different one there is another writer's generation, which nothing may overwrite."""
        if not self.remote.exists(key):
            return False
        self._check_same(key, manifest)
        return True

    def _commit(self, key: str, manifest: dict[str, Any]) -> None:
        try:
            self.remote.write_new(key, ckpt.encode_manifest(manifest))
        except AlreadyExists:  # a retry after a lost response, or another writer
            self._check_same(key, manifest)

    def _check_same(self, key: str, manifest: dict[str, Any]) -> None:
        """Raise unless the remote manifest under ``key`` commits the same content."""
        try:
            theirs = json.loads(self.remote.read(key))
        except ValueError:
            theirs = {}
        if not isinstance(theirs, dict) or not ckpt.same_generation(theirs, manifest):
            raise _conflict(self.remote.url(key))

    def _read_verified(self, key: str, entry: dict[str, Any]) -> bytes:
        try:
            data = self.local.read(key)
        except FileNotFoundError:
            raise _Skip(f"{self.local.url(key)} is missing") from None
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise _Skip(f"{self.local.url(key)} does not match its manifest")
        return data


def _conflict(url: str) -> RuntimeError:
    return RuntimeError(
        f"{url} was committed by another writer with different contents; is a second trainer using the same run name?"
    )


def _complete_lines(data: bytes) -> bytes:
    """A log file up to its last newline (the writer may be in the middle of a line)."""
    return data[: data.rfind(b"\n") + 1]
