"""
Writing files so that nothing a user already has is lost, and nothing is ever half-written.

Every file the project writes goes through `write_atomic` (a temporary file in the same folder,
renamed over the target) and every folder through `replace_dir`; an output folder is claimed with
`claim_dir`, which refuses a folder that already holds results, or with overwrite=True moves them
aside. Nothing here deletes a user's file. Errors are infra/errors.py's.
"""
import errno
import os
import re
import shutil
import time
from pathlib import Path

from infra.errors import UserError


def describe_os_error(e: OSError) -> str:
    """A short reason for an OSError, with the fix where there is a usual one."""
    if e.errno == errno.ENOSPC:
        return "no space left on the device; free some disk space"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded; free some space"
    if e.errno == errno.EFBIG:
        return ("a file-size limit stopped the write (ulimit -f, or the file system's largest "
                "file); raise the limit or write elsewhere")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied or read-only; choose a folder you can write to"
    return e.strerror or str(e)


def write_failure(e: BaseException) -> str | None:
    """Why a write failed, for an OSError and for the serializers' own errors, which are not
    OSErrors (safetensors' SafetensorError "I/O error: ... (os error 28)", torch.save's
    RuntimeError from its zip writer); None when `e` is not a failed write."""
    if isinstance(e, OSError):
        return describe_os_error(e)
    text = str(e)
    code = re.search(r"os error (\d+)", text)
    if type(e).__name__ == "SafetensorError" and code:
        n = int(code.group(1))
        return describe_os_error(OSError(n, os.strerror(n)))
    if type(e).__name__ == "SafetensorError" or (
            isinstance(e, RuntimeError) and ("PytorchStreamWriter" in text
                                             or "inline_container" in text)):
        return "the write stopped short: usually a full disk, a quota or a file-size limit"
    return None


def size_text(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


def free_space(path) -> str:
    """'N.N GiB free there': the free space of the file system of `path` (or its nearest existing
    parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return f"{size_text(shutil.disk_usage(p).free)} free there"
    except OSError:
        return "free space unknown"


def write_atomic(path, write):
    """write(tmp_path) into a temporary file beside `path`, then rename it over `path`: a reader
    sees the old file or the new one, never a mix. On any failure the temporary file is removed;
    a failed write (disk full, quota, a serializer's own error) becomes one UserError naming the
    path, anything else is re-raised."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        why = write_failure(e)
        if why is None:
            raise
        raise UserError(f"writing {path} failed ({why}; {free_space(path)})") from None


def write_text(path, text: str):
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def replace_dir(tmp, final):
    """Move the complete folder `tmp` to `final`; an older `final` is replaced only once `tmp` is in
    place."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def remove_partial(folder):
    """Remove a temporary folder this project was writing when it failed (never a user's folder)."""
    shutil.rmtree(folder, ignore_errors=True)


def check_writable_dir(path, flag: str = "--out") -> Path:
    """Check that the folder `path` can be written, or created and written, so that a bad output
    path costs a second, not a whole run. It leaves no trace: a folder that does not exist yet is
    not created here (the writer creates it, `make_dir` or `write_atomic`), so a run refused by a
    later check leaves nothing behind."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: exists and is not a folder; pass a folder path")
    parent = path
    while not parent.exists():
        # the deepest folder that exists; writing there is what mkdir needs
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: cannot write there ({parent} is a file, not a folder); "
                        f"pass a folder path")
    try:
        probe = parent / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write there ({describe_os_error(e)})") from None
    return path


def make_dir(path, flag: str = "--out") -> Path:
    """Create the folder `path` (and its parents), after check_writable_dir's checks."""
    path = check_writable_dir(path, flag)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write there ({describe_os_error(e)})") from None
    return path


def check_writable_file(path, flag: str = "--out") -> Path:
    """Check, before the work that fills it, that the file `path` can be written (a missing folder
    is created by the writer, write_atomic)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; pass a file path")
    check_writable_dir(path.parent, flag=f"{flag} {path}: its folder")
    return path


def holds(folder, names: tuple) -> list[str]:
    """Which of `names` the folder holds (none where it is not a folder)."""
    folder = Path(folder)
    return [n for n in names if (folder / n).exists()] if folder.is_dir() else []


def check_movable(path, flag: str = "--out"):
    """Refuse (one line) to move aside, for --overwrite, a folder that is or holds the working
    folder or the home folder: nothing would be lost, but the user's shell, or every program
    that keeps files at home, would find itself in OUT.old-<time>."""
    real = Path(os.path.realpath(path))
    home = os.path.expanduser("~")          # "~" itself where no home is known
    for what, inside in (("the folder you are working in", os.getcwd()),
                         ("your home folder", home)):
        if inside == "~":
            continue
        inside = Path(os.path.realpath(inside))
        if real == inside or real in inside.parents:
            raise UserError(f"{flag} {path}: --overwrite would move {what} ({inside}) aside with "
                            f"everything in it; give the run a folder of its own, e.g. "
                            f"{flag} runs/NAME")


def claim_dir(path, markers: tuple, overwrite: bool, flag: str = "--out",
              hint: str = "") -> Path | None:
    """Make `path` a fresh, writable output folder. If it already holds any of `markers` (earlier
    results): refuse with one line, or with overwrite=True move the whole folder aside to
    `<path>.old-<time>` (never deleted) and return where it went."""
    path = Path(path)
    moved = None
    found = holds(path, markers)
    if found:
        if not overwrite:
            raise UserError(f"{flag} {path}: already holds earlier results ({', '.join(found)}); "
                            f"{hint}pass --overwrite to move them aside to "
                            f"{path.name}.old-<time>/, or choose another {flag}")
        check_movable(path, flag)
        moved = path.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while moved.exists():
            n += 1
            moved = moved.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        os.replace(path, moved)
    make_dir(path, flag)
    return moved
