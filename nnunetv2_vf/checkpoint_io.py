"""Reading weight files with errors that say what is wrong and what to do (missing, empty, corrupt), writing files
atomically (one helper for checkpoints, json, npz, png) with a clear error when the disk is full, the one guard
against replacing a user's existing files, and the one-writer lock of a run folder."""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch

__all__ = ["read_weights_file", "atomic_write", "save_torch", "remove_stale_tmp_files", "WriteError",
           "payload_bytes", "refuse_overwrite", "refuse_nnunet_own_plans", "OverwriteRefused", "RunLock",
           "FolderInUse", "trained_checkpoint_kind"]


def read_weights_file(path: str | os.PathLike, what: str, missing_fix: str, reread_fix: str,
                      weights_only: bool = True, load: Optional[Callable[[str], Any]] = None,
                      allow_numpy: bool = False) -> Any:
    """``torch.load(path)`` (or ``load(path)``, e.g. safetensors) on CPU.

    ``allow_numpy``: also accept numpy arrays/scalars (nnU-Net's own checkpoints log metrics as numpy floats)
    while still loading weights-only: these are data types, not callables.

    Raises FileNotFoundError ``"<what> <path> not found: <missing_fix>"`` for a missing file, and ValueError naming
    an empty or unreadable file (truncated download, not a checkpoint) followed by ``reread_fix``.
    """
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} not found: {missing_fix}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{what} {path} is empty (interrupted download or copy?): {reread_fix}")
    try:
        if load is not None:
            return load(path)
        if allow_numpy and weights_only:
            with torch.serialization.safe_globals(_numpy_data_types()):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # noqa: BLE001 - torch/safetensors raise many types for truncated or foreign files
        if "Weights only load failed" in str(e):
            import re
            found = re.search(r"(?:Unsupported global|unsupported GLOBAL|GLOBAL) *:? *([\w.]+)", str(e))
            raise ValueError(f"{what} {path} holds Python objects besides tensors and plain data"
                             f"{f' ({found.group(1)})' if found else ''}; it is not loaded, since unpickling them "
                             f"could run code. Save only the weights from a trusted copy, e.g. "
                             f"torch.save({{'network_weights': model.state_dict()}}, path): {reread_fix}") from e
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"cannot read {what} {path} ({type(e).__name__}: {reason}); the file is corrupt or not a "
                         f"checkpoint: {reread_fix}") from e


def trained_checkpoint_kind(obj: Any) -> Optional[str]:
    """What a loaded checkpoint is when it comes from an nnU-Net training or a pretraining run ("an nnU-Net training
    checkpoint (trainer X, network Y)", "an nnUNetv2_vf_pretrain checkpoint"), else None; for messages that name
    the file's real kind and where it belongs."""
    if not isinstance(obj, dict) or not isinstance(obj.get("network_weights"), dict):
        return None
    if isinstance(obj.get("init_args"), dict):
        plans = obj["init_args"].get("plans") or {}
        conf = (plans.get("configurations") or {}).get(obj["init_args"].get("configuration"), {})
        network = ((conf.get("architecture") or {}).get("network_class_name") or "?").rsplit(".", 1)[-1]
        return f"an nnU-Net training checkpoint (trainer {obj.get('trainer_name', '?')}, network {network})"
    if obj.get("trainer_name") == "nnUNetv2_vf_pretrain":
        return "an nnUNetv2_vf_pretrain checkpoint"
    return None


def _numpy_data_types() -> list:
    """numpy's array, dtype and scalar reconstruction entries: what nnU-Net checkpoints contain besides tensors."""
    import numpy as np
    core = getattr(np, "_core", None) or np.core
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


# ---------------------------------------------------------------------------------------------- atomic writes
TMP_MARK = ".tmp"  # temporary files are '<name>.<host>-<pid>.tmp': tells a dead writer's leftover from a live one
OTHER_HOST_TMP_AGE_S = 3600  # another machine's (shared cache of multi-node DDP) leftovers: removed when this old


class WriteError(OSError):
    """A file could not be written (disk full, quota, permissions); the message says what is needed."""


def payload_bytes(obj: Any) -> int:
    """Bytes of the tensors/arrays in ``obj`` (nested dicts/lists): what a checkpoint of it needs on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if hasattr(obj, "nbytes") and not isinstance(obj, (int, float)):
        return int(obj.nbytes)
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    return 0


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], what: str = "file",
                 needed_bytes: Optional[int] = None) -> None:
    """Write ``path`` through ``write(binary_file)`` into a temporary file next to it, then ``os.replace``.

    Readers never see a half-written file, and a failed write (full disk) removes its temporary file and raises
    WriteError naming the free space and about how much is needed. A killed process leaves '<name>.<pid>.tmp',
    which ``remove_stale_tmp_files`` deletes at the next start.
    """
    path = os.fspath(path)
    tmp = f"{path}.{_writer_id()}{TMP_MARK}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the rename must not become visible before the data (power loss)
        os.replace(tmp, path)
    except BaseException as e:
        released = _remove_tmp(tmp)
        # torch.save reports ENOSPC as RuntimeError ('file write failed', 'unexpected pos'), numpy/json as OSError
        if isinstance(e, (OSError, RuntimeError)) and not isinstance(e, WriteError):
            error = WriteError(_write_failure_message(path, what, e, needed_bytes, released))
            error.free_bytes, error.reason = free_bytes_after(path, released), failure_reason(e, path, needed_bytes)
            raise error from e
        raise


def _remove_tmp(tmp: str) -> int:
    """Remove a failed write's temporary file; returns the bytes it held on disk (which a writer that still has it
    open keeps allocated until it is collected)."""
    if not os.path.exists(tmp):
        return 0
    try:
        held = os.stat(tmp).st_blocks * 512
    except (OSError, AttributeError):
        held = 0
    os.remove(tmp)
    return held


def free_bytes_after(path: str, released: int = 0) -> Optional[int]:
    """Free bytes in ``path``'s folder once a removed temporary file of ``released`` bytes is given back (counted
    whether or not the file system has reclaimed it yet); None when unknown."""
    import shutil
    folder = os.path.dirname(os.path.abspath(path))
    try:
        now = shutil.disk_usage(folder)
    except OSError:
        return None
    return min(now.total, now.free + released) if released and now.free < released else now.free


def failure_reason(e: BaseException, path: str, needed_bytes: Optional[int]) -> str:
    """The real cause of a failed write: the OSError in the exception chain (with its errno name), or ENOSPC when a
    library's own error (torch's 'unexpected pos', 'file write failed') hides a full disk."""
    import errno as errno_names
    seen, cause = set(), e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno:
            return f"{errno_names.errorcode.get(cause.errno, cause.errno)}: {os.strerror(cause.errno)}"
        cause = cause.__cause__ or cause.__context__
    raw = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    free = free_bytes_after(path)
    if free is not None and free < max(needed_bytes or 0, 2 ** 20):
        return f"ENOSPC: No space left on device ({type(e).__name__} from the writer: {raw})"
    return f"{type(e).__name__}: {raw}"


def _write_failure_message(path: str, what: str, e: BaseException, needed_bytes: Optional[int],
                           released: int = 0) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    free_bytes = free_bytes_after(path, released)
    free = "free space unknown" if free_bytes is None else f"{free_bytes / 2 ** 20:.1f} MiB free"
    need = f"it needs about {needed_bytes / 2 ** 20:.1f} MiB, " if needed_bytes else ""
    return (f"cannot write {what} {os.path.abspath(path)} ({failure_reason(e, path, needed_bytes)}); {need}{free} on "
            f"{folder}. Free disk space (or fix the permissions) and rerun the same command with --continue")


def save_torch(obj: Any, path: str | os.PathLike, what: str = "checkpoint") -> None:
    """``torch.save`` through ``atomic_write``."""
    atomic_write(path, lambda f: torch.save(obj, f), what, needed_bytes=payload_bytes(obj))


def _host_tag() -> str:
    import re
    import socket
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())


def _writer_id(pid: Optional[int] = None) -> str:
    """'<host>-<pid>' of a temporary file's writer."""
    return f"{_host_tag()}-{os.getpid() if pid is None else pid}"


def remove_stale_tmp_files(folder: str | os.PathLike, pattern: str = f"*{TMP_MARK}*") -> list[str]:
    """Delete temporary files of writers that are no longer running (killed mid-write); returns their names.

    Kept: files of a live process of this machine (another rank or run is writing them), and recent files of
    other machines (whose processes cannot be checked from here).
    """
    import glob
    import re
    import time
    host = _host_tag()
    removed = []
    for tmp in glob.glob(os.path.join(os.fspath(folder), pattern)):
        m = re.search(r"\.(\w+)-(\d+)\.tmp", os.path.basename(tmp))
        try:
            if m and m.group(1) == host:
                pid = int(m.group(2))
                if pid != os.getpid() and _pid_alive(pid):
                    continue
            elif m and time.time() - os.path.getmtime(tmp) < OTHER_HOST_TMP_AGE_S:
                continue
            os.remove(tmp)
            removed.append(os.path.basename(tmp))
        except OSError:  # removed meanwhile by another rank
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------------ existing user files
NNUNET_OWN_PLANS = "nnUNetPlans"  # nnU-Net's own plans: every configuration and model of the dataset reads them


class OverwriteRefused(ValueError):
    """A command would replace a file it did not create in this call; the message names the files and the fix."""


def refuse_overwrite(paths, overwrite: bool, command: str, fix: str) -> None:
    """The one overwrite guard of every command: raise :class:`OverwriteRefused` if any of ``paths`` exists and
    ``overwrite`` is False, naming each existing file (absolute) and ``fix``. Call it before writing anything, with
    every path the command is about to write, so a refusal leaves all of them unchanged."""
    existing = [os.path.abspath(os.fspath(p)) for p in paths if p is not None and os.path.lexists(os.fspath(p))]
    if existing and not overwrite:
        listing = "\n".join(f"  {p}" for p in existing)
        raise OverwriteRefused(f"{command} would replace {len(existing)} existing file(s), kept unchanged:\n{listing}\n"
                               f"Fix: {fix}, or pass --overwrite to replace them.")


def refuse_nnunet_own_plans(plans_name: str, command: str) -> None:
    """``-p nnUNetPlans`` would turn nnU-Net's own plans of the dataset into the plugin's: refused outright."""
    if plans_name == NNUNET_OWN_PLANS:
        raise OverwriteRefused(f"{command}: -p {NNUNET_OWN_PLANS} names nnU-Net's own plans, which every configuration "
                               f"and model of the dataset reads; they are never replaced (not even with "
                               f"--overwrite). Fix: give the new plans their own name, e.g. -p nnUNetPlans_VF, and "
                               f"train with that -p.")


# --------------------------------------------------------------------------------------------------- run locks
class FolderInUse(ValueError):
    """Another process holds the folder's run lock."""


class RunLock:
    """An exclusive ``flock`` on ``<folder>/<name>``: one writer per run folder.

    The kernel releases the lock when the holder exits, however it exits (SIGKILL included), so a stale lock file
    never blocks a ``--continue``; the file only records who holds it (PID, host, start time) for the
    message of a second process. POSIX only (fcntl); elsewhere the lock is a no-op.
    """

    def __init__(self, folder: str | os.PathLike, name: str = ".run.lock", command: str = "this folder's run"):
        self.path = os.path.join(os.path.abspath(os.fspath(folder)), name)
        self.command = command
        self._fd: Optional[int] = None

    def acquire(self, create: bool = True) -> "RunLock":
        """Take the lock (raise :class:`FolderInUse` naming the holder). ``create=False``: only if the lock file
        exists already, so that a refused or failed start leaves no file in a folder it did not create."""
        if self._fd is not None:
            return self
        try:
            import fcntl
        except ImportError:  # Windows: no flock
            return self
        import socket
        import time
        if not create and not os.path.isfile(self.path):
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "a process that has not said who it is"
            os.close(fd)
            raise FolderInUse(f"{os.path.dirname(self.path)} is in use by another {self.command}: {holder}. A run "
                              f"folder has one writer, so this process stops and writes nothing. Fix: wait for "
                              f"that run to end (or stop it), then resume with --continue; or give another -o "
                              f"folder.") from None
        os.ftruncate(fd, 0)
        os.write(fd, (f"PID {os.getpid()} on {socket.gethostname()}, started "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n").encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()
