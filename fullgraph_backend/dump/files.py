"""The files of a dump folder, which nobody vouches for: what ``fullgraph dump`` reads, and how we write.

Reading opens only regular files inside the folder: a name from a dump file that is absolute,
climbs out with ``..`` or resolves through a symlink to outside is a :class:`DumpError`, and so
is a FIFO or a device, found before opening so that reading never blocks. Writing replaces a
file whole (a temporary file renamed over it), so a symlink or FIFO planted under a name we
write is replaced, never written through.
"""
from __future__ import annotations

import json
import os
import stat
import uuid

from fullgraph_backend.dump.schema import DumpError, checked


def locate(root: str, relative: object, source: str) -> str:
    """The absolute path of ``relative``, a path inside ``root`` as a dump file names it.

    ``source`` says where the name was read (``0_0/passes.json: passes[1].graph``) in the
    :class:`DumpError` raised when it is not a relative path leading to somewhere inside ``root``.
    """
    if not isinstance(relative, str) or not relative or "\0" in relative:
        raise DumpError(f"{source} must be a path inside the dump folder, got {relative!r:.80}")
    if os.path.isabs(relative):
        raise DumpError(f"{source} is an absolute path ({relative!r:.80}); a dump names files inside its folder")
    path = os.path.abspath(os.path.join(root, relative))
    base = os.path.realpath(root)
    if os.path.commonpath([base, os.path.realpath(path)]) != base:  # symlinks resolved
        raise DumpError(f"{source} ({relative!r:.80}) leads outside the dump folder")
    return path


def read_text(path: str, source: str) -> str | None:
    """The text of regular file ``path`` (None if there is none); a :class:`DumpError` naming ``source`` else."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DumpError(f"cannot read {source}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise DumpError(f"{source} is not a regular file; a dump holds only regular files")
    try:
        # O_NONBLOCK: a FIFO swapped in since the check still cannot block the open
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError as e:
        raise DumpError(f"cannot read {source}: {e.strerror}") from None


def read_json(root: str, relative: str, schema: object, default: object) -> object:
    """JSON file ``relative`` of dump ``root`` (``default`` if it is absent), checked against ``schema``."""
    text = read_text(locate(root, relative, relative), relative)
    try:
        value = default if text is None else json.loads(text)
    except ValueError as e:
        raise DumpError(f"cannot read {relative}: {e}") from None
    return checked(value, schema, relative)


def write_text(path: str, text: str) -> None:
    """Write ``path`` whole by renaming a new file over it: a planted symlink or FIFO is replaced."""
    temporary = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # O_EXCL never follows a link
    try:
        with open(fd, "w") as f:
            f.write(text)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
