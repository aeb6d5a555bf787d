"""Content-addressed cache of tensors (protected data sets and zoo checkpoints).

Entries are safetensors files named by a hash of everything that made them, written atomically
(temporary file + rename) with a checksum of their content and their own name in the header, and
verified on read: a truncated, corrupt or foreign entry (another entry's file under this name) is
reported, deleted and rebuilt, never trusted. Nothing is unpickled. Two processes that need the same
missing entry build it once: the second waits on a lock file (``flock``, released by the kernel when
its holder dies) and then reads the entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from benchmark.faults import kill_point

try:
    import fcntl
except ImportError:  # not POSIX: entries are still atomic, only a concurrent build is not shared
    fcntl = None

log = logging.getLogger(__name__)


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_atomic(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None, *,
                key: str | None = None) -> None:
    """Write a safetensors file with a content checksum (and the entry's ``key``), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous(memory_format=torch.contiguous_format).clone()
               for k, v in tensors.items()}
    header = {"sha256": tensor_digest(tensors), "meta": json.dumps(meta or {}, sort_keys=True)}
    if key is not None:
        header["key"] = key
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        kill_point("cache_write")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_verified(path: Path, key: str | None = None) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Load and verify a file written by ``save_atomic``; ``None`` (and a warning) if it is corrupt, or
    if it names another ``key`` than this one (entries written before keys were recorded name none)."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        if key is not None and header.get("key", key) != key:
            raise ValueError(f"it holds entry {header['key']!r}")
        tensors = load_file(str(path))
        if header.get("sha256") != tensor_digest(tensors):
            raise ValueError("checksum mismatch")
        return tensors, json.loads(header.get("meta", "{}"))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        log.warning("cache entry %s is corrupt (%s); rebuilding it", path.name, exc)
        path.unlink(missing_ok=True)
        return None


class Cache:
    """A folder of verified tensor files, one subfolder per kind (``protected``, ``zoo``, ...)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.safetensors"

    def get_or_build(self, kind: str, key: str,
                     build: Callable[[], tuple[dict[str, torch.Tensor], dict]],
                     accept: Callable[[dict], bool] | None = None,
                     ) -> tuple[dict[str, torch.Tensor], dict, bool]:
        """Return (tensors, meta, hit). ``build`` runs only when there is no valid entry; an entry whose
        meta ``accept`` refuses (e.g. written by an older version that did not record everything) is
        built again and replaced."""
        path, name = self.path(kind, key), f"{kind}/{key}"
        loaded = self._load(path, name, accept)
        if loaded is None:
            with _build_lock(path):
                loaded = self._load(path, name, accept)  # another process may have built it meanwhile
                if loaded is None:
                    tensors, meta = build()
                    kill_point("generate")
                    save_atomic(path, tensors, meta, key=name)
                    return tensors, meta, False
        log.info("loaded %s %s from cache", kind, key)
        return loaded[0], loaded[1], True

    @staticmethod
    def _load(path: Path, name: str, accept: Callable[[dict], bool] | None,
              ) -> tuple[dict[str, torch.Tensor], dict] | None:
        loaded = load_verified(path, name)
        if loaded is not None and accept is not None and not accept(loaded[1]):
            log.info("cache entry %s lacks what this version records; building it again", name)
            return None
        return loaded


@contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """Hold ``<entry>.lock`` while building an entry, so concurrent runners build it once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    with open(path.with_suffix(".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
