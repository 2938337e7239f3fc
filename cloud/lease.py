"""One trainer at a time per run at a checkpoint location: a lease, renewed while it lives.

``<run>/WRITER`` names the trainer that writes the run there (a random id, its host and process),
when it last renewed its claim and ``ttl_s``. A trainer that finds a claim by another one renewed
less than that ``ttl_s`` ago stops before it writes anything; a claim that is older belongs to a trainer
that is gone (killed, pre-empted) and is taken over. A trainer renews its claim every ``ttl_s / 4``
seconds and releases it when it closes. Before each upload the claim is checked, so a trainer
whose lease was taken over (after it could not renew for ``ttl_s``) writes nothing more.

Ages are measured with the wall clocks of the two machines: they should agree to within a few
seconds (NTP), which is what ``ttl_s`` (60 s by default) allows for.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from cloud.storage import AlreadyExists, Storage, StorageError
from config import UserError

LEASE = "WRITER"
_RELEASED: set[str] = set()
"""Claims this process released, even where deleting them failed (the location was down)."""


class RunInUse(UserError):
    """Another live trainer writes this run at this location."""


class LeaseLost(Exception):
    """Another trainer took the run over (this one could not renew in time)."""


class Lease:
    """This trainer's claim on ``run`` at ``storage``."""

    def __init__(self, storage: Storage, run: str, ttl_s: float) -> None:
        self.storage, self.run, self.ttl_s = storage, run, ttl_s
        self.key = f"{run}/{LEASE}"
        self.id = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost = ""

    def refuse_if_taken(self) -> None:
        """Raise RunInUse if another trainer holds a live claim; reads only."""
        holder = self._holder()
        if holder is None or holder.get("id") in (self.id, *_RELEASED):
            return
        if self._age(holder) < self._ttl(holder):
            raise RunInUse(self._in_use_message(holder))

    def acquire(self) -> None:
        """Claim the run (create-only if nobody ever did), then keep renewing in the background."""
        self.refuse_if_taken()
        if self._holder() is None:
            try:
                self.storage.write_new(self.key, self._record())
            except AlreadyExists:  # another trainer claimed it a moment ago
                self.refuse_if_taken()
                self.storage.write(self.key, self._record())
        else:
            self.storage.write(self.key, self._record())
        self._thread = threading.Thread(target=self._renew_forever, name="evorl-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise LeaseLost if another trainer holds the run now."""
        if self._lost:
            raise LeaseLost(self._lost)
        holder = self._holder()
        if holder is not None and holder.get("id") != self.id:
            self._lost = self._taken_over_message(holder)
            raise LeaseLost(self._lost)

    def release(self) -> None:
        """Stop renewing and remove the claim if it is still this trainer's (best effort)."""
        self._stop.set()
        _RELEASED.add(self.id)
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        try:
            holder = self._holder()
            if holder is not None and holder.get("id") == self.id:
                self.storage.delete(self.key)
        except (StorageError, OSError):
            pass  # it expires by itself

    # ------------------------------------------------------------ helpers

    def _renew_forever(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.check()
                self.storage.write(self.key, self._record())
            except LeaseLost:
                return
            except (StorageError, OSError):
                continue  # unreachable for now: try again at the next tick

    def _record(self) -> bytes:
        record = {"id": self.id, "host": socket.gethostname(), "pid": os.getpid(), "renewed": time.time()}
        return json.dumps({**record, "ttl_s": self.ttl_s}).encode()

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.storage.read(self.key))
        except FileNotFoundError:
            return None
        except ValueError:
            return {"id": "", "renewed": 0.0}  # damaged: nobody's claim
        return holder if isinstance(holder, dict) else {"id": "", "renewed": 0.0}

    @staticmethod
    def _age(holder: dict[str, Any]) -> float:
        renewed = holder.get("renewed")
        return time.time() - float(renewed) if isinstance(renewed, (int, float)) else float("inf")

    def _ttl(self, holder: dict[str, Any]) -> float:
        """How long the holder's claim lasts unrenewed: what it promised, else this trainer's."""
        ttl = holder.get("ttl_s")
        return float(ttl) if isinstance(ttl, (int, float)) and ttl > 0 else self.ttl_s

    def _who(self, holder: dict[str, Any]) -> str:
        return f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"

    def _in_use_message(self, holder: dict[str, Any]) -> str:
        age = self._age(holder)
        return (
            f"run {self.run!r} at {self.storage.url(self.run)} is being written by another trainer "
            f"({self._who(holder)}, alive {age:.0f}s ago); nothing was written. Stop that trainer first, "
            f"or, if it is gone, retry in {max(self._ttl(holder) - age, 1):.0f}s"
        )

    def _taken_over_message(self, holder: dict[str, Any]) -> str:
        return (
            f"another trainer ({self._who(holder)}) took over run {self.run!r} at {self.storage.url(self.run)}; "
            "this one uploads nothing more (its generations stay local)"
        )
