"""A run that stops keeps what it did: the History is written to disk as rounds complete, and
an exception that ends :func:`~ppml_fast.federated.run_simulation` carries the completed rounds.

:func:`write_history` writes ``History.to_json()`` atomically: to a temporary file in the same
directory, flushed and fsynced, then ``os.replace``d over ``path`` (POSIX rename is atomic, so a
reader, or a crash at any point, sees either the previous complete History or the new one,
never a torn file), then the directory is fsynced so the rename itself survives a power loss.
``run_simulation(history_path=...)`` calls it after every round and once more when the run ends,
normally or with an error.

:func:`attach_history` is what the round loop does when something raises out of it (a strategy
that fails, ``SecAggError``, ``KeyboardInterrupt``): the History is marked ``stopped = "error"``
with the exception in ``stop_message``, set as ``exc.history`` (the rounds completed before
it; the failing round is not among them) and written to ``history_path`` when one is given; the
exception then propagates unchanged.
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional, Union

from .history import History

__all__ = ["attach_history", "check_history_path", "write_history"]

PathLike = Union[str, "os.PathLike[str]"]


def check_history_path(path: Optional[PathLike]) -> Optional[str]:
    """``path`` as a str, checked before the run starts (its directory exists, it is not a
    directory); None stays None."""
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"history_path must be a str or os.PathLike or None; got {type(path).__name__}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"history_path: directory {directory!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"history_path must name a file; {path!r} is a directory")
    return path


def write_history(history: History, path: PathLike) -> None:
    """Write ``history.to_json(indent=1)`` to ``path`` atomically (module docstring)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    text = history.to_json(indent=1)
    fd, tmp = tempfile.mkstemp(prefix=".history-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # the rename is durable once the directory entry is
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - a platform without directory fds
        return
    try:
        os.fsync(dfd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(dfd)


def attach_history(exc: BaseException, history: History, rnd: int, path: Optional[str]) -> None:
    """Mark ``history`` as stopped by ``exc`` during round ``rnd``, set ``exc.history`` and write
    it to ``path`` (when given). Never raises: a failure to write is noted in
    ``history.stop_message`` and the original exception goes on."""
    history.stopped = "error"
    history.stop_message = f"round {rnd}: {type(exc).__name__}: {exc}"
    try:
        exc.history = history  # type: ignore[attr-defined]
    except Exception:  # pragma: no cover - an exception type that refuses attributes
        pass
    if path is not None:
        try:
            write_history(history, path)
        except Exception as e:  # the run's own error matters more than the file's
            history.stop_message += f" (history_path not written: {type(e).__name__}: {e})"
