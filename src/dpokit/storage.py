"""Writing to disk without losing work: a directory appears whole or not at all, a full disk is one
clear error (not a C++ traceback) and leaves no half-written directory behind, and what was written
can be checked later against the sizes and checksums recorded with it."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

from dpokit.errors import StorageError

# the write failures that are the disk's doing; EFBIG is a file-size limit (ulimit -f, some filesystems)
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
MANIFEST = "manifest.json"


def json_text(value, **kwargs) -> str:
    """`json.dumps` for every JSON file dpokit writes: NaN and ±Infinity become null, so that strict readers
    (`jq`, `pandas.read_json(lines=True)`, JavaScript) read every file."""
    return json.dumps(_finite(value), allow_nan=False, **kwargs)


def text_lines(text: str) -> list[str]:
    """The lines of a JSONL or text file, split at newlines only (a trailing \r dropped): `str.splitlines`
    also splits at U+2028, U+2029 and U+0085, which the JSON dpokit writes with `ensure_ascii=False` (samples,
    pairs) holds raw inside its strings, and a row cut there is not JSON."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem that holds `path` (or would, for a path not yet created)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def human_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def disk_failure(exc: BaseException) -> str | None:
    """The reason, if `exc` is a write that failed for the disk's sake. torch.save (C++) and safetensors
    (Rust) do not raise OSError: their messages carry the errno's text or number instead."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
            return os.strerror(exc.errno)
        text = str(exc)
        for number in DISK_ERRNOS:
            if os.strerror(number) in text or f"code: {number}," in text:
                return os.strerror(number)
        if "file write failed" in text or "basic_ios::clear" in text:  # torch's stream writer, errno lost
            return "write failed"
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def disk_errors(path: Path):
    """Turn a write under `path` that fails for lack of space, quota or a read-only disk into a one-line
    StorageError naming the path and the free space."""
    try:
        yield
    except Exception as e:
        reason = disk_failure(e)
        if reason is None:
            raise
        raise StorageError(f"cannot write {path}: {reason} ({human_bytes(free_bytes(path))} free there)") from None


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Yield a temporary sibling of `final` to fill. On success its files are flushed to disk and it is
    renamed to `final` (replacing an older one); on any failure it is removed."""
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with disk_errors(final):
            tmp.mkdir(parents=True)
            yield tmp
            fsync_tree(tmp)
            if final.exists():  # moved aside first, so a crash here leaves the old or the new one whole
                old = final.with_name(f".old-{final.name}")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(root: Path) -> int:
    """Record every file under `root` with its size and SHA-256; returns the total size."""
    files = {str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
             for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (root / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")
    return sum(f["bytes"] for f in files.values())


def check_manifest(root: Path, required: tuple[str, ...] = ()) -> str | None:
    """What is wrong with `root` against its manifest (a file missing, of another size or checksum), or
    None when it is intact. Without a manifest (an older dpokit wrote it) only `required` is checked."""
    missing = next((name for name in required if not (root / name).exists()), None)
    if missing is not None:
        return f"{missing} is missing"
    manifest = root / MANIFEST
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, OSError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__})"
    for name, expected in files.items():
        path = root / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{name} has {size} bytes, {expected['bytes']} were written"
        if sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def manifest_bytes(root: Path) -> int | None:
    """The total size recorded in `root`'s manifest."""
    try:
        return sum(f["bytes"] for f in json.loads((root / MANIFEST).read_text())["files"].values())
    except (ValueError, KeyError, OSError):
        return None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
