"""The results store: one SQLite file (WAL) per results directory, one row per cell.

A row is written in one transaction when its cell ends (ok or failed), so a killed run leaves no
half row and the next run resumes with the cells that are missing.

Runners that share a results directory coordinate through leases: a runner claims a cell (a row in
``leases``: owner, host, pid, expiry) in one transaction just before running it, renews its leases
while it runs, and drops the lease in the transaction that writes the cell's record. Another runner
skips a cell that is finished or leased by a live runner; a lease whose expiry has passed, or whose
owner is a dead process on this host, is taken over.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from benchmark.faults import kill_point

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    key TEXT PRIMARY KEY,
    preset TEXT, dataset TEXT, defense TEXT, attack TEXT, backbone TEXT, seed INTEGER,
    status TEXT NOT NULL,            -- ok | failed
    accuracy REAL,                   -- clean test accuracy, %
    train_accuracy REAL,             -- accuracy on the protected training batches, last epoch, %
    seconds REAL,                    -- wall time of the cell (defense from cache or not, plus training)
    defense_seconds REAL,            -- time to generate the protected set (0 when it came from the cache)
    peak_memory_mb REAL,
    error TEXT,
    config TEXT NOT NULL,            -- JSON: the fully resolved configs
    metrics TEXT,                    -- JSON: anything else the plugins reported
    environment TEXT,                -- JSON: versions, device, git commit
    started_at REAL, finished_at REAL
);
CREATE TABLE IF NOT EXISTS leases (
    key TEXT PRIMARY KEY,            -- the cell being computed
    owner TEXT NOT NULL,             -- host:pid:random of the runner computing it
    host TEXT NOT NULL, pid INTEGER NOT NULL,
    expires REAL NOT NULL            -- unix time; renewed while the owner lives
);
"""
LEASE_SECONDS = 600.0  # a lease not renewed for this long is taken over (renewed every LEASE_SECONDS / 10)
COLUMNS = ("key", "preset", "dataset", "defense", "attack", "backbone", "seed", "status", "accuracy",
           "train_accuracy", "seconds", "defense_seconds", "peak_memory_mb", "error", "config", "metrics",
           "environment", "started_at", "finished_at")


class Claim(Enum):
    """What ``Store.claim`` found: the cell is now ours, already finished, or leased by a live runner."""

    CLAIMED = "claimed"
    FINISHED = "finished"
    LEASED = "leased"


def new_owner() -> str:
    """A runner's identity in the ``leases`` table: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def _alive(host: str, pid: int) -> bool:
    """Whether the owner of a lease may still be running (on another host we cannot tell: yes)."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    try:  # Linux: a killed process its parent has not reaped yet is a zombie, not a runner
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass(frozen=True)
class CellRecord:
    key: str
    preset: str
    dataset: str
    defense: str
    attack: str
    backbone: str
    seed: int
    status: str
    accuracy: float | None
    train_accuracy: float | None
    seconds: float
    defense_seconds: float | None
    peak_memory_mb: float | None
    error: str | None
    config: dict
    metrics: dict
    environment: dict
    started_at: float
    finished_at: float


class Store:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def finished_keys(self) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT key FROM cells WHERE status = 'ok'")}

    def put(self, rec: CellRecord, owner: str | None = None) -> None:
        """Write a record and drop ``owner``'s lease on its cell, in one transaction. A finished (ok)
        record is never replaced by a failed one (e.g. from a runner whose lease was taken over)."""
        values = [getattr(rec, c) for c in COLUMNS]
        for i, c in enumerate(COLUMNS):
            if c in ("config", "metrics", "environment"):
                values[i] = json.dumps(values[i], sort_keys=True, default=str)
        with self._db:  # one transaction
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(f"INSERT INTO cells ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
                             f"ON CONFLICT(key) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in COLUMNS[1:])} "
                             f"WHERE cells.status != 'ok' OR excluded.status = 'ok'", values)
            if owner is not None:
                self._db.execute("DELETE FROM leases WHERE key = ? AND owner = ?", (rec.key, owner))
            kill_point("store_write")

    def claim(self, key: str, owner: str, *, since: float, seconds: float = LEASE_SECONDS) -> Claim:
        """Lease cell ``key`` to ``owner`` unless it is finished (ok, or failed at or after ``since``, the
        start of this run) or leased by another live runner; one transaction."""
        now = time.time()
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT status, finished_at FROM cells WHERE key = ?", (key,)).fetchone()
            if row is not None and (row[0] == "ok" or (row[1] or 0) >= since):
                return Claim.FINISHED
            lease = self._db.execute("SELECT owner, host, pid, expires FROM leases WHERE key = ?", (key,)).fetchone()
            if lease is not None and lease[0] != owner:
                if lease[3] > now and _alive(lease[1], lease[2]):
                    return Claim.LEASED
                log.warning("taking over cell %s from %s (%s)", key, lease[0],
                            "lease expired" if lease[3] <= now else "its process is gone")
            host, pid = socket.gethostname(), os.getpid()
            self._db.execute("INSERT OR REPLACE INTO leases (key, owner, host, pid, expires) VALUES (?, ?, ?, ?, ?)",
                             (key, owner, host, pid, now + seconds))
            return Claim.CLAIMED

    def renew(self, owner: str, seconds: float = LEASE_SECONDS) -> int:
        """Push back the expiry of every lease ``owner`` holds; returns how many."""
        with self._db:
            return self._db.execute("UPDATE leases SET expires = ? WHERE owner = ?",
                                    (time.time() + seconds, owner)).rowcount

    def release(self, owner: str) -> None:
        """Drop every lease ``owner`` holds (a runner that stops, normally or by an error)."""
        with self._db:
            self._db.execute("DELETE FROM leases WHERE owner = ?", (owner,))

    def leases(self) -> dict[str, str]:
        """Cell key -> owner of every lease in the store."""
        return dict(self._db.execute("SELECT key, owner FROM leases"))

    def rows(self) -> Iterator[dict]:
        cur = self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM cells ORDER BY started_at")
        for row in cur:
            d = dict(zip(COLUMNS, row))
            for c in ("config", "metrics", "environment"):
                d[c] = json.loads(d[c]) if d[c] else {}
            yield d

    def frame(self) -> pd.DataFrame:
        """All cells as a DataFrame (JSON columns left as dicts)."""
        return pd.DataFrame(list(self.rows()), columns=list(COLUMNS))


class LeaseKeeper:
    """A runner's leases: renewed by a background thread while it lives, dropped when it stops."""

    def __init__(self, path: str | Path, owner: str | None = None, seconds: float = LEASE_SECONDS) -> None:
        self.path, self.owner, self.seconds = Path(path), owner or new_owner(), seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="uebench-leases", daemon=True)

    def _renew(self) -> None:
        with Store(self.path) as store:  # its own connection: SQLite connections stay in their thread
            while not self._stop.wait(self.seconds / 10):
                store.renew(self.owner, self.seconds)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        with Store(self.path) as store:
            store.release(self.owner)
