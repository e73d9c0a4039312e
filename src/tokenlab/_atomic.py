"""Directories written atomically: filled under a temporary name beside their destination, then renamed.

:func:`atomic_directory` and :func:`publish` are the one home of this for tokenlab's outputs
(checkpoint merges, the toy-world cache). The temporary directory

* is named ``.{dest.name}.{label}-{pid}@{host}-{random}`` in ``dest``'s parent, so that a later run
  can tell whose it is;
* is created with the user's umask (``drwxr-xr-x`` under the usual ``022``), as ``save_pretrained``
  creates its directories — not ``drwx------`` as :func:`tempfile.mkdtemp` does — so the renamed
  result has ordinary permissions;
* is removed when the block exits without publishing it: on an exception, on ``Ctrl-C``, and on
  ``SIGTERM``, which is turned into an exception for the duration of the block (in the main thread)
  and passed on to the previous handler once the directory is gone;
* and directories of earlier runs for the same destination whose process has died (same host, pid no
  longer running) are removed before a new one is made.

This module sits at the bottom of the package: it imports no tokenlab module.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_directory", "publish", "stale_directories"]


class _Terminated(BaseException):
    """SIGTERM, raised where the main thread was when it arrived (as KeyboardInterrupt is for SIGINT)."""


_deferred = {"active": False, "pending": False}  # SIGTERM held back while an output is swapped in


def _on_sigterm(signum, frame) -> None:
    if _deferred["active"]:
        _deferred["pending"] = True
        return
    raise _Terminated


@contextmanager
def _sigterm_deferred() -> Iterator[None]:
    """A SIGTERM arriving inside the block takes effect at its end (the block is a few renames)."""
    _deferred["active"] = True
    try:
        yield
    finally:
        _deferred["active"] = False
        if _deferred["pending"]:
            _deferred["pending"] = False
            raise _Terminated


def _prefix(dest: Path, label: str) -> str:
    return f".{dest.name}.{label}-"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, under another user
        return True
    return True


def stale_directories(dest: str | os.PathLike, label: str) -> list[Path]:
    """Temporary directories of ``dest`` (with ``label``) left by processes of this host that have died."""
    dest = Path(dest)
    if os.name != "posix" or not dest.parent.is_dir():  # os.kill(pid, 0) would terminate on Windows
        return []
    pattern = re.compile(re.escape(_prefix(dest, label)) + r"(\d+)@(.+)-[0-9a-f]{8}")
    host, found = _host(), []
    for path in dest.parent.iterdir():
        m = pattern.fullmatch(path.name)
        if m and m.group(2) == host and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            found.append(path)
    return found


def _make_directory(dest: Path, label: str) -> Path:
    while True:
        path = dest.parent / f"{_prefix(dest, label)}{os.getpid()}@{_host()}-{secrets.token_hex(4)}"
        try:
            path.mkdir(mode=0o777)  # the umask applies, as for any new directory
            return path
        except FileExistsError:
            continue


@contextmanager
def atomic_directory(dest: str | os.PathLike, label: str) -> Iterator[Path]:
    """Yield a new, empty temporary directory beside ``dest`` for the block to fill and
    :func:`publish`. Whatever is left of it when the block exits is removed — also after ``SIGTERM``,
    which then reaches the previous handler (by default: the process ends)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_directories(dest, label):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = _make_directory(dest, label)
    catch = threading.current_thread() is threading.main_thread() and signal.getsignal(
        signal.SIGTERM
    ) not in (signal.SIG_IGN, None)  # None: a handler installed from C, left alone
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if catch else None
    terminated = False
    try:
        yield tmp
    except _Terminated:
        terminated = True
    finally:
        if catch:  # first, so that a second SIGTERM ends the process (a later run sweeps the rest)
            signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(tmp, ignore_errors=True)
    if terminated:
        signal.raise_signal(signal.SIGTERM)
        raise SystemExit(128 + signal.SIGTERM)  # the previous handler returned: still stop here


def publish(tmp: Path, dest: str | os.PathLike, *, replace: bool) -> bool:
    """Rename the filled ``tmp`` to ``dest``. When ``dest`` exists, ``replace=True`` swaps it out
    (moved aside, then removed; SIGTERM is held back between the two renames, so ``dest`` is never
    missing), ``replace=False`` keeps it (another process published the same output first).
    Returns whether ``tmp`` was published."""
    dest = Path(dest)
    try:
        tmp.rename(dest)
        return True
    except OSError:
        if not dest.exists():
            raise
    if not replace:
        return False
    old = _make_directory(dest, "old")
    try:
        with _sigterm_deferred():
            dest.rename(old / dest.name)
            try:
                tmp.rename(dest)
            except BaseException:
                (old / dest.name).rename(dest)
                raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
    return True
