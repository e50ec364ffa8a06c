"""Files and directories at the boundary: inputs checked before they are opened, outputs before any work.

Inputs: `input_file` refuses a missing path, a directory, anything that is not a regular file (a FIFO would
block the reader forever, a device never ends) and an unreadable file, all before opening it; `input_dir`
refuses a missing, non-directory or unsearchable directory. Outputs: `output_file` / `output_dir` check, before
the (slow) computation, that the path can be written: its directory exists or can be made, no part of it is a
file, the name is not too long, it is not read-only. `write_atomic` writes a whole file through a temporary
beside it (checked writes, fsync, rename), so a failed write leaves any earlier file byte-identical.
Every failure is a UserError of one line naming the path and the cause (`os_error`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from pathlib import Path

from hessian_tools.errors import UserError

HINTS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EISDIR: "it is a directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EEXIST: "a file of that name is in the way",
    errno.ENOENT: "no such file or directory",
    errno.EIO: "input/output error",
}
TEMPORARY_PREFIX = ".tmp-"  # of the files output_file / output_dir probe with and write_atomic renames


def error_number(exc: Exception) -> int | None:
    """The errno of an OSError, or of a library error that reports one as "(os error N)" (safetensors)."""
    if isinstance(exc, OSError):
        return exc.errno
    found = re.search(r"\(os error (\d+)\)", str(exc))
    return int(found.group(1)) if found else None


def os_error(exc: Exception, path, doing: str) -> UserError:
    """A one-line UserError: `{path}: cannot {doing}: {cause}` (exc: an OSError or a library's I/O error)."""
    cause = HINTS.get(error_number(exc)) or getattr(exc, "strerror", None) or str(exc).splitlines()[0] \
        or type(exc).__name__
    return UserError(f"{path}: cannot {doing}: {cause}")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _checked_input(path, doing: str, access: int) -> tuple[Path, int]:
    """(path as a Path, its st_mode); a UserError `{path}: cannot {doing}: {cause}` when it cannot be reached or
    lacks the `access` bits (os.R_OK, ...)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise os_error(exc, path, doing) from None
    if not os.access(path, access):
        raise UserError(f"{path}: cannot {doing}: permission denied")
    return path, mode


def input_file(path, what: str = "file") -> Path:
    """`path` as a Path once it is known to be a readable regular file (nothing is opened)."""
    path, mode = _checked_input(path, f"read the {what}", os.F_OK)
    if stat.S_ISDIR(mode):
        raise UserError(f"{path}: is a directory; the {what} must be a file")
    if not stat.S_ISREG(mode):
        raise UserError(f"{path}: is {_kind(mode)}; the {what} must be a regular file")
    _checked_input(path, f"read the {what}", os.R_OK)
    return path


def input_dir(path, what: str = "directory") -> Path:
    """`path` as a Path once it is known to be a directory whose entries can be listed and opened."""
    path, mode = _checked_input(path, f"open the {what}", os.F_OK)
    if not stat.S_ISDIR(mode):
        raise UserError(f"{path}: is not a directory; the {what} must be one")
    _checked_input(path, f"open the {what}", os.R_OK | os.X_OK)
    return path


def is_regular(path) -> bool:
    """Whether `path` is a regular file; False for a missing path and for a path that cannot be reached."""
    try:
        return stat.S_ISREG(Path(path).stat().st_mode)
    except OSError:
        return False


def is_directory(path) -> bool:
    """Whether `path` is a directory; False for a missing path and for a path that cannot be reached."""
    try:
        return stat.S_ISDIR(Path(path).stat().st_mode)
    except OSError:
        return False


def output_dir(path, flag: str) -> Path:
    """Create directory `path` (and its parents) if needed and check that files can be made in it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise _missing_dir(path, flag) from None
    except OSError as exc:
        raise os_error(exc, path, f"create the {flag} directory") from None
    _probe(_temporary(path / "probe"), flag)
    return path


def _temporary(path: Path) -> Path:
    """A short hidden name beside `path` for a file written and renamed (or removed) by this process."""
    return path.with_name(f"{TEMPORARY_PREFIX}{os.getpid()}-{hashlib.sha1(path.name.encode()).hexdigest()[:8]}")


def _missing_dir(path: Path, flag: str) -> UserError:
    """Why directory `path` is not there: a file in the way (itself or an ancestor), or it does not exist."""
    for ancestor in (path, *path.parents):
        if os.path.lexists(ancestor):
            if not is_directory(ancestor):
                return UserError(f"{flag} {path}: {ancestor} is a file, not a directory")
            break
    return UserError(f"{flag} {path}: the directory {path} does not exist")


def output_file(path, flag: str) -> Path:
    """Check, before any work, that file `path` can be written in its existing directory; nothing is changed."""
    path = Path(path)
    if is_directory(path):
        raise UserError(f"{flag} {path}: is a directory; name a file")
    if not is_directory(path.parent):
        raise _missing_dir(path.parent, flag)
    _probe(_temporary(path), flag)  # what write_atomic will create
    if os.path.lexists(path):
        if not is_regular(path):
            raise UserError(f"{flag} {path}: is not a regular file (a FIFO, device or broken link?); name a file")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        except OSError as exc:
            raise os_error(exc, path, f"write {flag}") from None
    else:
        _probe(path, flag)
    return path


def _probe(path: Path, flag: str):
    """Create and remove an empty file at `path` (raises the cause as a UserError)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        raise os_error(exc, path if exc.errno == errno.ENAMETOOLONG else path.parent, f"write {flag}") from None
    os.close(fd)
    os.unlink(path)


def write_all(fd: int, data: bytes):
    """os.write until every byte is written (a short write is continued; its error, e.g. ENOSPC, raised)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, "write returned 0")
        view = view[n:]


def fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, data: bytes | str, flag: str = "output"):
    """Replace `path` by `data` through a temporary file beside it (written, fsynced, renamed); on failure the
    temporary is removed, any earlier file at `path` is as it was, and a one-line UserError is raised."""
    path = Path(path)
    data = data.encode("utf-8") if isinstance(data, str) else data
    tmp = _temporary(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise os_error(exc, path, f"write {flag}") from None
