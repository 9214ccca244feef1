"""The files of a run directory beside its database: atomic writes (a temporary file, an fsync, a rename),
content-addressed blobs (tensors stored once as canonical safetensors bytes in a file named by their sha256, checked
against their name when read) and lock files (``flock``, held by the process writing the run or by an agent).

The run store (:mod:`munet.storage.store`) owns the database that references the blobs; this module owns the files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Callable
from pathlib import Path as FsPath
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from munet.errors import StoreError

SUFFIX = ".safetensors"


def file_sha256(path: FsPath | str) -> str:
    """The lower-case hex sha256 of a file's bytes, read 1 MiB at a time.

    Raises:
        OSError: the file cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def atomic_write(path: FsPath, data: bytes | str, tmp: FsPath | None = None,
                 before_replace: Callable[[], None] | None = None) -> None:
    """Writes ``data`` to ``path`` through a temporary file (``tmp``, default ``path`` + ``.tmp``), an fsync and a
    rename; ``before_replace`` runs between the two (fault injection).

    Raises:
        OSError: the write failed (disk full, permissions); ``path`` is unchanged and the temporary file removed.
    """
    tmp = tmp or path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):  # a partial file on a full disk would only hold on to space
            tmp.unlink()
        raise


def blob_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """Canonical safetensors bytes of ``tensors`` (CPU, contiguous, no metadata), so equal content hashes equal."""
    return save_tensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


class BlobDir:
    """The blob folder of a run directory.

    Args:
        folder: where the blobs are.
        crash_point: called with ``"blob"`` between a blob's fsync and its rename (the store's fault injection).
    """

    def __init__(self, folder: FsPath, crash_point: Callable[[str], None] | None = None):
        self.folder = folder
        self._crash_point = crash_point

    def path(self, digest: str) -> FsPath:
        return self.folder / f"{digest}{SUFFIX}"

    def write(self, tensors: dict[str, torch.Tensor]) -> str:
        """Stores ``tensors`` (once per content) and returns their hash.

        Raises:
            OSError: the write failed; nothing of it is left.
        """
        data = blob_bytes(tensors)
        digest = hashlib.sha256(data).hexdigest()
        path = self.path(digest)
        if not path.exists():  # a temporary name of this process's own: another agent may write the same blob
            crash = self._crash_point
            atomic_write(path, data, tmp=path.with_name(f"{path.name}.{os.getpid()}.tmp"),
                         before_replace=(lambda: crash("blob")) if crash else None)
        return digest

    def read(self, digest: str, what: str) -> dict[str, torch.Tensor]:
        """The tensors of blob ``digest``, after checking its hash; ``what`` names the owner in errors.

        Raises:
            StoreError: the blob is missing, unreadable or corrupt.
        """
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise StoreError(f"blob {path.name} of {what} is missing or unreadable: {err.strerror}; restore the run "
                             f"from a copy (`munet check {self.folder.parent}` lists every problem)") from err
        if hashlib.sha256(data).hexdigest() != digest:
            raise StoreError(f"blob {path.name} of {what} is corrupt (truncated or altered: its sha256 does not "
                             f"match its name); run `munet check {self.folder.parent}`")
        try:
            return load_tensors(data)
        except SafetensorError as err:  # pragma: no cover - a file matching its hash was written by us
            raise StoreError(f"blob {path.name} of {what} is not a safetensors file: {err}") from err

    def problem(self, digest: str, what: str) -> str | None:
        """Why blob ``digest`` (of ``what``) cannot be trusted: missing, unreadable, or its content not matching its
        name (truncated or altered); ``None`` when it is sound. Reads the file in chunks, loads nothing."""
        path = self.path(digest)
        if not path.is_file():
            return f"blob {path.name} of {what} is missing"
        try:
            found = file_sha256(path)
        except OSError as err:
            return f"blob {path.name} of {what} is unreadable: {err.strerror or err}"
        if found != digest:
            return (f"blob {path.name} of {what} is corrupt: its content does not match its sha256 (truncated or "
                    "altered)")
        return None

    def collect(self, keep: set[str]) -> int:
        """Deletes the blobs not in ``keep`` and temporary files of interrupted writes; returns the count."""
        removed = 0
        for path in self.folder.iterdir():
            if path.name.endswith(".tmp") or (path.suffix == SUFFIX and path.stem not in keep):
                try:
                    path.unlink(missing_ok=True)
                except OSError:  # a leftover is harmless: the next checkpoint tries again, `check` notes it
                    continue
                removed += 1
        return removed

    def size(self) -> int:
        """Bytes of the stored blobs."""
        return sum(p.stat().st_size for p in self.folder.glob(f"*{SUFFIX}"))


def lock_file(run_dir: FsPath, name: str, wait: bool = False) -> Any:
    """Takes lock file ``name`` of the run directory (released by the OS if the process dies, even by SIGKILL);
    ``wait``: until its holder lets go, instead of refusing."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        f = open(run_dir / name, "a+")
    except OSError as err:
        if (run_dir / name).is_dir():
            raise StoreError(f"{run_dir / name} is a directory, where munet keeps the run's lock file; remove it "
                             "(munet makes the file anew)") from err
        raise StoreError(f"output directory {run_dir} is not writable: {err.strerror or err}") from err
    try:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise StoreError(f"{run_dir} is being written by another munet process (pid {holder}); wait for it to "
                         "finish or stop it") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def unlock_file(lock: Any | None) -> None:
    """Releases a lock :func:`lock_file` took (``None``: nothing to release)."""
    if lock is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
