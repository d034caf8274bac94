"""Reading and writing files safely: every read is bounded before it starts, every write atomic.

A path given by a user or named in a folder may be a FIFO, /dev/zero, a sparse 3 GB file or a
JSON bomb; nothing here reads more than the caller's limit, and nothing is replaced half-written.
"""

import contextlib
import json
import os
import stat
from pathlib import Path

from picogpt.errors import FileReadError, MissingFileError

MB = 1 << 20


def _human(n):
    return f"{n / MB:,.1f} MB" if n >= MB else f"{n:,} bytes"


def check_regular(path, limit, what="file", error=FileReadError):
    """The size of `path` after checking it is a regular file of at most `limit` bytes.

    Raises `error` naming the file; by default a missing file is a MissingFileError (also a
    FileNotFoundError) and anything else a FileReadError."""
    path = Path(path)
    try:
        st = os.stat(path)  # follows symlinks: a hub cache's files are links into blobs/
    except FileNotFoundError as e:
        missing = MissingFileError if error is FileReadError else error
        raise missing(f"{path}: {what} does not exist") from e
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror or e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: {what} is not a regular file")
    if st.st_size > limit:
        raise error(f"{path}: {what} is {_human(st.st_size)}, more than the {_human(limit)} "
                    "such a file can be")
    return st.st_size


def read_bytes(path, limit, what="file", error=FileReadError):
    """The bytes of a regular file of at most `limit` bytes (checked before and while reading)."""
    size = check_regular(path, limit, what, error)
    try:
        with open(path, "rb") as f:
            data = f.read(size + 1)  # not f.read(limit + 1): that allocates the whole limit
            if len(data) > size:  # the file has grown since the check
                data += f.read(limit + 1 - len(data))
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror or e}") from e
    if len(data) > limit:
        raise error(f"{path}: {what} is more than the {_human(limit)} such a file can be")
    return data


def decode_utf8(data, path, what="file", error=FileReadError):
    """`data` as text; bytes that are not UTF-8 are an error naming their offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: {what} is not UTF-8 text (byte offset {e.start})") from e


def read_text(path, limit, what="file", error=FileReadError):
    """The UTF-8 text of a regular file of at most `limit` bytes."""
    return decode_utf8(read_bytes(path, limit, what, error), path, what, error)


def load_json(path, limit, what="JSON file", error=FileReadError):
    """The JSON value in a regular file of at most `limit` bytes; a malformed or too deeply
    nested document (a JSON bomb) is `error` naming the file."""
    return parse_json(read_text(path, limit, what, error), path, what, error)


def parse_json(text, path, what="JSON file", error=FileReadError):
    """The JSON value in `text` (already bounded by its reader) that came from `path`; malformed
    or too deeply nested JSON is `error` naming the file."""
    try:
        return json.loads(text)
    except RecursionError as e:
        raise error(f"{path}: {what} is nested too deeply") from e
    except ValueError as e:
        raise error(f"{path}: {what} is not valid JSON: {e}") from e


def atomic_write(path, data):
    """Write `data` (bytes or str) to `path` so that a reader, or a kill at any moment, sees the
    old file or the new one, never half of one: write a temporary file, fsync, rename."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_file(path) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_file(path):
    """An open binary file that replaces `path` when the `with` block ends without an error, for
    data written piece by piece (a large checkpoint): written under `temporary_name(path)`,
    fsynced, renamed into place; deleted instead if anything fails."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path, obj):
    """Write `obj` as indented UTF-8 JSON, atomically."""
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


TMP_MARK = ".tmp"


def temporary_name(path):
    """The name a file is written under before it is renamed into place: `<name>.tmp<pid>`."""
    path = Path(path)
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


def remove_stale_temporaries(folder, names):
    """Delete `<name>.tmp<pid>` files that a killed picogpt left in `folder` for the given
    `names` (only ours: the name must be one we write and the pid no longer alive)."""
    for name in names:
        for tmp in stale_temporaries(folder, name):
            tmp.unlink(missing_ok=True)


def stale_temporaries(folder, name):
    """The `<name>.tmp<pid>` entries in `folder` whose process is no longer alive."""
    prefix = f"{name}{TMP_MARK}"
    try:
        entries = sorted(os.listdir(folder))  # not glob: a user's name may hold [ or *
    except OSError:  # no folder, no leftovers
        return
    for entry in entries:
        pid = entry[len(prefix):]
        ours = entry.startswith(prefix) and pid.isascii() and pid.isdigit()
        if ours and not _alive(int(pid)):
            yield Path(folder) / entry


def _alive(pid):
    """Whether process `pid` exists; a number no process can have counts as alive: such a name
    is not one picogpt wrote, so it is never deleted."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True
