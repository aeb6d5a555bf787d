"""The results store: one SQLite file (WAL) per results directory, one row per cell.

A row is written in one transaction when its cell ends (ok or failed), so a killed run leaves no
half row and the next run resumes with the cells that are missing.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

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
"""
COLUMNS = ("key", "preset", "dataset", "defense", "attack", "backbone", "seed", "status", "accuracy",
           "train_accuracy", "seconds", "defense_seconds", "peak_memory_mb", "error", "config", "metrics",
           "environment", "started_at", "finished_at")


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

    def put(self, rec: CellRecord) -> None:
        values = [getattr(rec, c) for c in COLUMNS]
        for i, c in enumerate(COLUMNS):
            if c in ("config", "metrics", "environment"):
                values[i] = json.dumps(values[i], sort_keys=True, default=str)
        with self._db:  # one transaction
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(f"INSERT OR REPLACE INTO cells ({', '.join(COLUMNS)}) "
                             f"VALUES ({', '.join('?' * len(COLUMNS))})", values)

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
