"""Write and read key and certificate files with safe permissions."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common.errors import SecurityError
from common.log import get_logger

__all__ = [
    "PRIVATE_MODE",
    "PUBLIC_MODE",
    "owner_only_umask",
    "private_dir",
    "read_private",
    "read_public",
    "write_private",
    "restrict_tree",
    "write_public",
]

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644

_log = get_logger("keyfiles")


def _write_atomic(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Write ``data`` to a fresh temp file created with ``mode``, then move it into place.

    The temp file is created with ``O_CREAT | O_EXCL`` and ``mode`` (the umask can only take bits
    away), so the bytes are never readable by anyone else, not even for a moment. Without
    ``overwrite`` the file is moved into place with ``link``, which fails atomically if ``path``
    already exists; with ``overwrite`` it is moved with ``replace``.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise SecurityError(
            f"refusing to overwrite existing key/certificate file {path}",
            "move it away first, or pass overwrite=True if replacing it is intended",
        )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        try:
            os.fchmod(fd, mode)  # exact mode, whatever the umask took away
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError as err:
                raise SecurityError(
                    f"refusing to overwrite existing key/certificate file {path}",
                    "move it away first, or pass overwrite=True if replacing it is intended",
                ) from err
    finally:
        tmp.unlink(missing_ok=True)
    _log.debug("wrote %s (mode %o, %d bytes)", path, mode, len(data))


def write_private(path: str | Path, data: bytes, *, overwrite: bool = False) -> Path:
    """Write a private key (or any secret) to a file readable by its owner only (0600).

    Parameters
    ----------
    path : str | Path
        Destination; missing parent directories are created.
    data : bytes
        The secret bytes, e.g. a PEM private key.
    overwrite : bool (default: False)
        Replace an existing file. Without it an existing file raises :class:`SecurityError`.

    Returns
    -------
    Path
        The written path.
    """
    path = Path(path)
    _write_atomic(path, bytes(data), PRIVATE_MODE, overwrite)
    return path


def write_public(path: str | Path, data: bytes, *, overwrite: bool = False) -> Path:
    """Write a public key or certificate to a world-readable file (0644).

    Parameters
    ----------
    path : str | Path
        Destination; missing parent directories are created.
    data : bytes
        The public bytes, e.g. a PEM certificate.
    overwrite : bool (default: False)
        Replace an existing file. Without it an existing file raises :class:`SecurityError`.

    Returns
    -------
    Path
        The written path.
    """
    path = Path(path)
    _write_atomic(path, bytes(data), PUBLIC_MODE, overwrite)
    return path


def _missing(path: Path, what: str, how_to_create: str | None) -> SecurityError:
    return SecurityError(
        f"{what} file {path} does not exist",
        how_to_create
        or f"create it with the qanafed provisioning/keygen command, or fix the {what} path",
    )


def read_private(path: str | Path, *, how_to_create: str | None = None) -> bytes:
    """Read a private key file, refusing one that group or others may access.

    Parameters
    ----------
    path : str | Path
        The private key file.
    how_to_create : str | None (default: None)
        The fix shown when the file is missing (e.g. the command that generates it).

    Returns
    -------
    bytes
        The file's content.

    Raises
    ------
    SecurityError
        The file is missing, is not a regular file, or has any group/other permission bit set
        (the message names the file, its mode and ``chmod 600 FILE``).
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise _missing(path, "private key", how_to_create) from None
    except OSError as err:
        raise SecurityError(
            f"cannot open private key file {path}: {err.strerror}",
            f"check the path and that you own {path}",
        ) from err
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SecurityError(
                f"private key path {path} is not a regular file", "point to the key file itself"
            )
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise SecurityError(
                f"private key file {path} has mode {mode:04o}: group/others can access it",
                f"chmod 600 {path}",
            )
    except SecurityError:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def read_public(path: str | Path, *, how_to_create: str | None = None) -> bytes:
    """Read a public key or certificate file.

    Parameters
    ----------
    path : str | Path
        The file.
    how_to_create : str | None (default: None)
        The fix shown when the file is missing.

    Returns
    -------
    bytes
        The file's content.
    """
    path = Path(path)
    if not path.is_file():
        raise _missing(path, "public key/certificate", how_to_create)
    return path.read_bytes()


def private_dir(path: str | Path) -> Path:
    """Create the folder ``path`` (and parents) readable by its owner only (0700), or tighten it.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def restrict_tree(root: str | Path) -> None:
    """Take every group and other permission bit off ``root`` and what it holds (links skipped)."""
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            entry = os.path.join(folder, name)
            info = os.lstat(entry)
            if not stat.S_ISLNK(info.st_mode) and stat.S_IMODE(info.st_mode) & 0o077:
                os.chmod(entry, stat.S_IMODE(info.st_mode) & 0o700)
        if folder == str(root):
            os.chmod(folder, 0o700)


@contextmanager
def owner_only_umask() -> Iterator[None]:
    """Create files 0600 and folders 0700 inside the block (umask 077), also in child processes."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)
