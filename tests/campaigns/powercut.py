"""Power-cut states from a syscall trace: what the disk (and the bucket) may hold after a cut.

A SIGKILL leaves every write the kernel accepted; a power cut leaves only what reached the
disk, and the agent's promises rest on the order of its writes, fsyncs and renames. This
module records that order and replays it:

1. `trace()` runs a command under `strace -f` (Debian package strace) tracing the
   file-system calls that change files (open with O_CREAT/O_TRUNC, write/pwrite64 with their
   data, ftruncate, fsync/fdatasync, rename*, unlink*, mkdir*, rmdir) and the socket calls
   of HTTP requests. `-xx` prints every string and path as hex escapes and `-yy` names each
   fd's file or socket, so the parse never meets a quote or a comma inside a value.
2. `parse_ops()` turns the trace into the operations on files under the given roots (and
   the PUTs sent and answered, and markers a harness writes to stderr), in the order the
   calls completed. A call on those files that the model cannot replay (writev, fallocate,
   a hard link, O_APPEND...) raises `Unmodelled`, so a new kind of write is never ignored.
3. `Disk` replays operations on a model with two clocks per file: what the page cache holds
   (every write) and what an fsync made durable (a file's data at its last fsync, a folder's
   entries at its last fsync). `Disk.image()` is the disk a cut may leave: the exact prefix
   (every write landed), or only what was fsynced (unsynced data and unsynced creates,
   renames and unlinks lost), or the names as written with unsynced bytes read back as
   zeros (metadata committed before data, as ext4's data=writeback or a torn page may).
4. `crash_states()` yields one state per prefix of the operations and per variant, with
   the bucket a cut at that point leaves: a power cut does not roll S3 back, so every PUT
   answered 2xx has landed and a PUT still in flight may or may not have.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np

MARK_PREFIX = b"\x00powercut:"  # what a harness writes to stderr to mark a moment
MAX_STRING = 64 << 20  # bytes of one write strace prints; strace reserves 5x this (virtual)

# Calls that change files or carry HTTP, plus those the model refuses (to fail loudly).
TRACED = (
    "openat", "open", "creat", "close", "lseek",
    "write", "pwrite64", "writev", "pwritev", "pwritev2",
    "ftruncate", "truncate", "fallocate",
    "fsync", "fdatasync", "sync_file_range",
    "rename", "renameat", "renameat2", "unlink", "unlinkat",
    "mkdir", "mkdirat", "rmdir", "link", "linkat", "symlink", "symlinkat",
    "connect", "sendto", "sendmsg", "recvfrom", "recvmsg",
)
_REFUSED = {"open", "creat", "writev", "pwritev", "pwritev2", "truncate", "fallocate",
            "link", "linkat", "symlink", "symlinkat", "sync_file_range", "sendmsg", "recvmsg"}
EXACT = "exact"        # every operation of the prefix landed, in order
SYNCED = "synced"      # only what an fsync made durable (names and data)
ZEROED = "zeroed"      # names as written; bytes not yet fsynced read back as zeros
NAMES_SYNCED_DATA_EXACT = "synced-names"  # unsynced names lost, all data written landed
NAMES_EXACT_DATA_SYNCED = "synced-data"   # names as written, unsynced data lost (empty)
FS_VARIANTS = (EXACT, SYNCED, ZEROED, NAMES_SYNCED_DATA_EXACT, NAMES_EXACT_DATA_SYNCED)
_VIEWS = {EXACT: ("volatile", "volatile"), SYNCED: ("synced", "synced"),
          ZEROED: ("volatile", "zeroed"), NAMES_SYNCED_DATA_EXACT: ("synced", "volatile"),
          NAMES_EXACT_DATA_SYNCED: ("volatile", "synced")}


class Unmodelled(RuntimeError):
    """The trace holds a call on the traced files that this model cannot replay."""


class ModelError(RuntimeError):
    """Replaying the trace met something the model says cannot have happened."""


# --- running strace -------------------------------------------------------------------


def strace_argv(trace_file: Path, argv: Sequence[str]) -> list[str]:
    """The strace command line that records `argv` (and its threads and children).

    -f follows threads and children, --seccomp-bpf stops only at the traced calls (the run
    stays fast), -yy names each fd's path or socket, -xx prints all bytes as hex escapes,
    -s prints up to MAX_STRING bytes of each buffer (a longer one fails the parse, never
    passes truncated)."""
    return ["strace", "-f", "-qq", "--seccomp-bpf", "-yy", "-xx", "-s", str(MAX_STRING),
            "-e", "trace=" + ",".join(TRACED), "-o", str(trace_file), *argv]


def trace(argv: Sequence[str], trace_file: Path, *, env: Mapping[str, str], cwd: Path,
          timeout: float) -> subprocess.CompletedProcess[str]:
    """Run `argv` under strace; its exit status is the traced command's."""
    if shutil.which("strace") is None:
        raise FileNotFoundError("strace is not installed: apt-get install strace (the "
                                "power-cut check records the agent's syscalls with it)")
    return subprocess.run(strace_argv(trace_file, argv), env=dict(env), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, check=False)


# --- parsing strace's output ----------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One completed system call: its name, raw arguments and raw result."""

    tid: int
    name: str
    args: tuple[str, ...]
    result: str
    line: int

    @property
    def ret(self) -> int | None:
        """The integer result, None when the call failed or never returned."""
        m = re.match(r"-?\d+", self.result)
        if m is None or self.result.startswith("-1 "):
            return None
        return int(m.group(0))


_OPEN = {"(": ")", "[": "]", "{": "}", "<": ">"}
_HEX = re.compile(r"(?:\\x[0-9a-f]{2})+")


def _split_args(text: str) -> tuple[list[str], str]:
    """Top-level arguments of `text` (just after the call's '('), and what follows ')'."""
    args: list[str] = []
    stack: list[str] = []
    start = 0
    quoted = False
    i = 0
    while i < len(text):
        ch = text[i]
        if quoted:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch in _OPEN:
            stack.append(_OPEN[ch])
        elif stack and ch == stack[-1]:
            stack.pop()
        elif ch == ")" and not stack:
            if text[start:i].strip():
                args.append(text[start:i].strip())
            return args, text[i + 1:]
        elif ch == "," and not stack:
            args.append(text[start:i].strip())
            start = i + 1
        i += 1
    raise ValueError(f"unbalanced call text: {text[:200]!r}")


def parse_calls(text: str) -> Iterator[Call]:
    """Completed calls in the order strace saw them complete (`-f` lines joined)."""
    pending: dict[int, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        tid_text, _, body = raw.partition(" ")
        if not tid_text.isdigit():
            raise ValueError(f"trace line {number} has no pid (strace -f): {raw[:120]!r}")
        tid = int(tid_text)
        body = body.strip()
        if body.startswith(("+++", "---", "???")):
            continue
        if body.endswith("<unfinished ...>"):
            pending[tid] = body[: -len("<unfinished ...>")]
            continue
        resumed = re.match(r"<\.\.\. (\w+) resumed>(.*)$", body)
        if resumed:
            if tid not in pending:
                continue  # the call started before strace attached
            body = pending.pop(tid) + resumed.group(2)
        m = re.match(r"(\w+)\((.*)$", body)
        if m is None:
            raise ValueError(f"trace line {number} is not a call: {raw[:120]!r}")
        args, rest = _split_args(m.group(2))
        result = rest.strip()
        if not result.startswith("="):
            raise ValueError(f"trace line {number} has no result: {raw[:120]!r}")
        yield Call(tid, m.group(1), tuple(args), result[1:].strip(), number)


def _unhex(text: str) -> bytes:
    if text and not _HEX.fullmatch(text):
        raise ValueError(f"expected -xx hex escapes, got {text[:60]!r}")
    return bytes.fromhex(text.replace("\\x", ""))


def string_arg(arg: str) -> bytes:
    """The bytes of a quoted `-xx` string argument (never truncated: `-s` is huge)."""
    if not (arg.startswith('"') and arg.endswith('"')):
        raise ValueError(f"not a complete string argument: {arg[:60]!r}")
    return _unhex(arg[1:-1])


def annotated(arg: str) -> tuple[str, str | None]:
    """(what precedes '<', the `-yy` annotation decoded) of `3<\\x2f...>` or AT_FDCWD<...>."""
    m = re.match(r"([^<]*)<(.*)>(\(deleted\))?$", arg, re.S)
    if m is None:
        return arg, None
    note = m.group(2)
    decoded = _unhex(note).decode("utf-8", "surrogateescape") if _HEX.fullmatch(note) \
        else note
    return m.group(1), decoded + (" (deleted)" if m.group(3) else "")


# --- operations -----------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One step that matters to a power cut, in trace order.

    kinds: create (open with O_CREAT; `trunc` with O_TRUNC), trunc (O_TRUNC alone), write,
    truncate (ftruncate to `size`), sync (fsync/fdatasync of a file or folder), rename
    (`path` to `path2`), unlink, mkdir, rmdir; put_sent / put_answered (an HTTP PUT of key
    `path`, answered with status `size`); mark (a harness's marker `path`).
    """

    kind: str
    path: str
    path2: str = ""
    offset: int = 0
    data: bytes = b""
    size: int = 0
    trunc: bool = False
    line: int = 0

    def describe(self) -> str:
        """A short line naming the operation, for failure reports."""
        name = self.path.rsplit("/", 1)[-1] or self.path
        if self.kind == "write":
            return f"write {name} [{self.offset}:{self.offset + len(self.data)}]"
        if self.kind == "rename":
            return f"rename {name} -> {self.path2.rsplit('/', 1)[-1]}"
        if self.kind == "put_answered":
            return f"PUT {name} answered {self.size}"
        return f"{self.kind} {name}" + (" (trunc)" if self.trunc else "")


@dataclass
class _Request:
    method: str
    key: str
    answered: bool = False
    head: bytes = b""


@dataclass
class _Parser:
    roots: tuple[str, ...]
    bucket_path: str
    ops: list[Op] = field(default_factory=list)
    positions: dict[tuple[int, str], int] = field(default_factory=dict)
    requests: dict[str, _Request] = field(default_factory=dict)

    def ours(self, path: str | None) -> bool:
        return path is not None and any(path == r or path.startswith(r + "/")
                                        for r in self.roots)

    def at(self, dirfd: str | None, raw: str) -> str:
        """An absolute path from a path argument and the `-yy` annotation of its dirfd."""
        path = string_arg(raw).decode("utf-8", "surrogateescape")
        if not path.startswith("/"):
            if dirfd is None:
                raise ValueError(f"relative path {path!r} without a directory")
            _, base = annotated(dirfd)
            if base is None:
                raise ValueError(f"dirfd {dirfd!r} has no -yy path")
            path = f"{base}/{path}"
        return os.path.normpath(path)

    def call(self, c: Call) -> None:
        handler = getattr(self, f"_{c.name}", None)
        if c.name in _REFUSED:
            notes = [annotated(a)[1] for a in c.args]
            paths = notes + [self.at(None, a) for a in c.args if a.startswith('"\\x2f')]
            if c.ret is not None and (any(self.ours(p) for p in paths) or any(
                    n is not None and n.startswith(("TCP:", "TCPv6:")) for n in notes)):
                raise Unmodelled(f"trace line {c.line}: {c.name} on a traced file or socket;"
                                 " extend powercut.py to replay it")
            return
        if handler is None or c.ret is None:
            return  # a failed call changes nothing
        handler(c)

    def _fd(self, c: Call) -> tuple[int, str | None]:
        fd_text, path = annotated(c.args[0])
        return int(fd_text), path

    def _openat(self, c: Call) -> None:
        _, path = annotated(c.result)
        flags = c.args[2]
        if not self.ours(path):
            return
        assert path is not None
        if "O_APPEND" in flags and not flags.startswith("O_RDONLY"):
            raise Unmodelled(f"trace line {c.line}: O_APPEND on {path}")
        if "O_CREAT" in flags:
            self.ops.append(Op("create", path, trunc="O_TRUNC" in flags, line=c.line))
        elif "O_TRUNC" in flags:
            self.ops.append(Op("trunc", path, line=c.line))
        self.positions[(int(c.result.split("<", 1)[0]), path)] = 0

    def _close(self, c: Call) -> None:
        fd, _ = self._fd(c)
        for key in [k for k in self.positions if k[0] == fd]:
            del self.positions[key]

    def _lseek(self, c: Call) -> None:
        fd, path = self._fd(c)
        if self.ours(path):
            assert path is not None
            self.positions[(fd, path)] = int(c.result.split()[0])

    def _write(self, c: Call) -> None:
        fd, path = self._fd(c)
        n = int(c.result.split()[0])
        data = string_arg(c.args[1])[:n]
        if data.startswith(MARK_PREFIX):
            self.ops.append(Op("mark", data[len(MARK_PREFIX):].decode().strip(), line=c.line))
            return
        if path is not None and path.startswith(("TCP:", "TCPv6:")):
            self._sent(path, data, c.line)
            return
        if not self.ours(path):
            return
        assert path is not None
        self._live(path, c)
        if (fd, path) not in self.positions:
            raise ModelError(f"trace line {c.line}: write to {path} on fd {fd} whose open "
                             "was not traced")
        pos = self.positions[(fd, path)]
        self.ops.append(Op("write", path, offset=pos, data=data, line=c.line))
        self.positions[(fd, path)] = pos + n

    def _pwrite64(self, c: Call) -> None:
        _, path = self._fd(c)
        if not self.ours(path):
            return
        assert path is not None
        self._live(path, c)
        n = int(c.result.split()[0])
        self.ops.append(Op("write", path, offset=int(c.args[3]),
                           data=string_arg(c.args[1])[:n], line=c.line))

    def _ftruncate(self, c: Call) -> None:
        _, path = self._fd(c)
        if self.ours(path):
            assert path is not None
            self._live(path, c)
            self.ops.append(Op("truncate", path, size=int(c.args[1]), line=c.line))

    def _fsync(self, c: Call) -> None:
        _, path = self._fd(c)
        if self.ours(path):
            assert path is not None
            self._live(path, c)
            self.ops.append(Op("sync", path, line=c.line))

    _fdatasync = _fsync

    def _live(self, path: str, c: Call) -> None:
        if path.endswith(" (deleted)"):
            raise Unmodelled(f"trace line {c.line}: {c.name} on an unlinked file {path}")

    def _rename(self, c: Call) -> None:
        self._renamed(self.at(None, c.args[0]), self.at(None, c.args[1]), c.line)

    def _renameat(self, c: Call) -> None:
        self._renamed(self.at(c.args[0], c.args[1]), self.at(c.args[2], c.args[3]), c.line)

    def _renameat2(self, c: Call) -> None:
        if "RENAME_EXCHANGE" in c.args[4] or "RENAME_WHITEOUT" in c.args[4]:
            raise Unmodelled(f"trace line {c.line}: renameat2 {c.args[4]}")
        self._renameat(c)

    def _renamed(self, old: str, new: str, line: int) -> None:
        if self.ours(old) or self.ours(new):
            if not (self.ours(old) and self.ours(new)):
                raise Unmodelled(f"trace line {line}: rename across the traced roots "
                                 f"({old} -> {new})")
            self.ops.append(Op("rename", old, new, line=line))

    def _unlink(self, c: Call) -> None:
        self._named("unlink", self.at(None, c.args[0]), c.line)

    def _unlinkat(self, c: Call) -> None:
        kind = "rmdir" if "AT_REMOVEDIR" in c.args[2] else "unlink"
        self._named(kind, self.at(c.args[0], c.args[1]), c.line)

    def _mkdir(self, c: Call) -> None:
        self._named("mkdir", self.at(None, c.args[0]), c.line)

    def _mkdirat(self, c: Call) -> None:
        self._named("mkdir", self.at(c.args[0], c.args[1]), c.line)

    def _rmdir(self, c: Call) -> None:
        self._named("rmdir", self.at(None, c.args[0]), c.line)

    def _named(self, kind: str, path: str, line: int) -> None:
        if self.ours(path):
            self.ops.append(Op(kind, path, line=line))

    # --- HTTP over the traced sockets ---

    def _sendto(self, c: Call) -> None:
        _, sock = self._fd(c)
        if sock is not None and sock.startswith(("TCP:", "TCPv6:")):
            self._sent(sock, string_arg(c.args[1])[: int(c.result.split()[0])], c.line)

    def _recvfrom(self, c: Call) -> None:
        _, sock = self._fd(c)
        if sock is None or not sock.startswith(("TCP:", "TCPv6:")):
            return
        request = self.requests.get(sock)
        if request is None or request.answered:
            return  # the rest of a response body
        request.head += string_arg(c.args[1])[: int(c.result.split()[0])]
        while request.head.startswith(b"HTTP/1.1 1") and b"\r\n\r\n" in request.head:
            request.head = request.head.split(b"\r\n\r\n", 1)[1]  # 100 Continue
        # botocore reads "100 Continue" a byte at a time: an interim answer is not the answer
        if b"\r\n" not in request.head or request.head.startswith(b"HTTP/1.1 1"):
            return
        status = int(request.head.split(b" ", 2)[1])
        request.answered = True
        if request.method == "PUT":
            self.ops.append(Op("put_answered", request.key, size=status, line=c.line))

    def _sent(self, sock: str, data: bytes, line: int) -> None:
        request = self.requests.get(sock)
        if request is not None and not request.answered:
            return  # more of the same request (its body)
        first = data.split(b"\r\n", 1)[0].decode("latin-1")
        m = re.match(r"([A-Z]+) (\S+) HTTP/1\.[01]$", first)
        if m is None:
            raise ModelError(f"trace line {line}: a request that does not start with a "
                             f"request line: {first[:80]!r}")
        method, target = m.group(1), urlsplit(m.group(2)).path
        if method in ("POST", "DELETE", "PATCH") and target.startswith(self.bucket_path):
            raise Unmodelled(f"trace line {line}: {method} {target}: only PUTs are modelled")
        key = unquote(target[len(self.bucket_path):]) if target.startswith(
            self.bucket_path) else unquote(target)
        self.requests[sock] = _Request(method, key)
        if method == "PUT":
            self.ops.append(Op("put_sent", key, line=line))


def parse_ops(text: str, roots: Iterable[Path | str], *, bucket: str = "") -> list[Op]:
    """The operations of a trace on files under `roots`, and its PUTs into `bucket`."""
    parser = _Parser(tuple(os.path.normpath(str(r)) for r in roots), f"/{bucket}/")
    for c in parse_calls(text):
        parser.call(c)
    return parser.ops


# --- the disk model -------------------------------------------------------------------


@dataclass
class _Inode:
    is_dir: bool
    data: bytes = b""
    synced: bytes | None = None  # the data at its last fsync (None: never fsynced)
    entries: dict[str, int] = field(default_factory=dict)
    synced_entries: dict[str, int] = field(default_factory=dict)
    mtime: float | None = None  # kept from the snapshot while the file is unchanged


@dataclass(frozen=True)
class File:
    """A file of an image: its bytes, and the snapshot's mtime if it never changed."""

    data: bytes
    mtime: float | None = None


@dataclass(frozen=True)
class Image:
    """What the traced roots hold after a cut: absolute path -> File, or None for a folder."""

    entries: Mapping[str, File | None]

    def signature(self) -> str:
        """A digest of names and contents: equal images recover alike."""
        digest = hashlib.sha256()
        for path in sorted(self.entries):
            f = self.entries[path]
            digest.update(path.encode("utf-8", "surrogateescape") + b"\0")
            digest.update(b"/" if f is None else hashlib.sha256(f.data).digest())
        return digest.hexdigest()

    def get(self, path: Path | str) -> bytes | None:
        """The bytes of the file at `path`, None if it is absent (or a folder)."""
        f = self.entries.get(os.path.normpath(str(path)))
        return None if f is None else f.data


class Disk:
    """Replays operations on the traced roots, keeping what is written apart from what is
    durable: a file's data at its last fsync, a folder's entries at its last fsync."""

    def __init__(self, roots: Iterable[Path | str]) -> None:
        self.inodes: dict[int, _Inode] = {}
        self.roots: dict[str, int] = {}
        for root in roots:
            self.roots[os.path.normpath(str(root))] = self._new(_Inode(is_dir=True))

    @classmethod
    def snapshot(cls, roots: Iterable[Path | str]) -> Disk:
        """The roots as they are on disk now, all of it durable (the state before a trace)."""
        disk = cls(roots)
        for root, ino in disk.roots.items():
            disk._load(Path(root), ino)
        return disk

    def _load(self, folder: Path, ino: int) -> None:
        node = self.inodes[ino]
        for entry in sorted(folder.iterdir()):
            if entry.is_symlink():
                raise Unmodelled(f"symbolic link {entry} in a traced root")
            if entry.is_dir():
                child = self._new(_Inode(is_dir=True))
                self._load(entry, child)
            else:
                data = entry.read_bytes()
                child = self._new(_Inode(is_dir=False, data=data, synced=data,
                                         mtime=entry.stat().st_mtime))
            node.entries[entry.name] = child
        node.synced_entries = dict(node.entries)

    def _new(self, node: _Inode) -> int:
        ino = len(self.inodes) + 1
        self.inodes[ino] = node
        return ino

    def _parent(self, path: str) -> tuple[_Inode, str]:
        folder, name = os.path.split(path)
        ino = self._lookup(folder)
        if ino is None or not self.inodes[ino].is_dir:
            raise ModelError(f"{path}: its folder does not exist in the model")
        return self.inodes[ino], name

    def _lookup(self, path: str) -> int | None:
        for root, ino in self.roots.items():
            if path == root:
                return ino
            if path.startswith(root + "/"):
                node: int | None = ino
                for part in path[len(root) + 1:].split("/"):
                    if node is None:
                        return None
                    node = self.inodes[node].entries.get(part)
                return node
        raise ModelError(f"{path} is outside the traced roots")

    def _file(self, op: Op) -> _Inode:
        ino = self._lookup(op.path)
        if ino is None:
            raise ModelError(f"trace line {op.line}: {op.describe()}: no such file in the "
                             "model")
        return self.inodes[ino]

    def apply(self, op: Op) -> None:
        """Replay one operation (the page cache's view; durability only changes on sync)."""
        k = op.kind
        if k in ("mark", "put_sent", "put_answered"):
            return
        if k == "create":
            parent, name = self._parent(op.path)
            if name in parent.entries:
                if op.trunc:
                    self._set(self.inodes[parent.entries[name]], b"")
            else:
                parent.entries[name] = self._new(_Inode(is_dir=False))
        elif k == "trunc":
            self._set(self._file(op), b"")
        elif k == "write":
            node = self._file(op)
            data = node.data
            if op.offset > len(data):
                data += bytes(op.offset - len(data))
            self._set(node, data[:op.offset] + op.data + data[op.offset + len(op.data):])
        elif k == "truncate":
            node = self._file(op)
            self._set(node, node.data[:op.size] + bytes(max(0, op.size - len(node.data))))
        elif k == "sync":
            node = self._file(op)
            if node.is_dir:
                node.synced_entries = dict(node.entries)
            else:
                node.synced = node.data
        elif k == "rename":
            src, sname = self._parent(op.path)
            dst, dname = self._parent(op.path2)
            if sname not in src.entries:
                raise ModelError(f"trace line {op.line}: {op.describe()}: no such file")
            ino = src.entries.pop(sname)
            dst.entries[dname] = ino
        elif k in ("unlink", "rmdir"):
            parent, name = self._parent(op.path)
            if parent.entries.pop(name, None) is None:
                raise ModelError(f"trace line {op.line}: {op.describe()}: no such entry")
        elif k == "mkdir":
            parent, name = self._parent(op.path)
            parent.entries[name] = self._new(_Inode(is_dir=True))
        else:
            raise ModelError(f"unknown operation {k!r}")

    @staticmethod
    def _set(node: _Inode, data: bytes) -> None:
        node.data = data
        node.mtime = None

    def image(self, variant: str = EXACT) -> Image:
        """The disk a cut now may leave, in one of FS_VARIANTS."""
        names, data = _VIEWS[variant]
        out: dict[str, File | None] = {}

        def walk(path: str, ino: int) -> None:
            node = self.inodes[ino]
            entries = node.entries if names == "volatile" else node.synced_entries
            for name, child in sorted(entries.items()):
                sub = self.inodes[child]
                full = f"{path}/{name}"
                if sub.is_dir:
                    out[full] = None
                    walk(full, child)
                else:
                    out[full] = File(self._content(sub, data), sub.mtime)

        for root, ino in self.roots.items():
            walk(root, ino)
        return Image(out)

    @staticmethod
    def _content(node: _Inode, view: str) -> bytes:
        if view == "volatile" or node.synced == node.data:
            return node.data
        synced = node.synced or b""
        if view == "synced":
            return synced
        # zeroed: the size as written; bytes that differ from the fsynced ones read as 0
        now = np.frombuffer(node.data, dtype=np.uint8)
        old = np.zeros(len(now), dtype=np.uint8)
        n = min(len(now), len(synced))
        old[:n] = np.frombuffer(synced, dtype=np.uint8)[:n]
        return np.where(now == old, now, 0).astype(np.uint8).tobytes()


def materialise(image: Image, roots: Iterable[Path | str]) -> None:
    """Make the roots on disk hold exactly `image` (what the rebooted agent finds)."""
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)
        Path(root).mkdir(parents=True)
    for path in sorted(image.entries):
        f = image.entries[path]
        if f is None:
            Path(path).mkdir()
            continue
        Path(path).write_bytes(f.data)
        if f.mtime is not None:
            os.utime(path, (f.mtime, f.mtime))


# --- crash states ---------------------------------------------------------------------


IN_FLIGHT_LANDED = "in-flight PUT landed"
IN_FLIGHT_LOST = "in-flight PUT lost"
NO_PUT_IN_FLIGHT = "no PUT in flight"


@dataclass(frozen=True)
class CrashState:
    """The disk and the bucket a power cut after `prefix` operations may leave."""

    prefix: int
    fs_variant: str
    bucket_variant: str
    image: Image
    landed: frozenset[str]  # keys whose PUT has (in this variant) reached the bucket
    marks: frozenset[str]   # harness markers written before the cut
    last: Op | None         # the last operation before the cut

    def label(self) -> str:
        where = self.last.describe() if self.last else "before the first operation"
        return (f"cut after op {self.prefix} ({where}), disk {self.fs_variant}, "
                f"{self.bucket_variant}")


def crash_states(disk: Disk, ops: Sequence[Op], *,
                 fs_variants: Sequence[str] = (EXACT, SYNCED),
                 each_in_flight: bool = False) -> Iterator[CrashState]:
    """Every prefix of `ops` (0..len), each in every fs variant and bucket variant.

    The bucket holds every PUT answered 2xx; the PUTs in flight all landed, or none did,
    and with `each_in_flight` also each one alone. `disk` is consumed (the operations are
    applied to it as the prefixes grow).
    """
    answered: set[str] = set()
    in_flight: set[str] = set()
    marks: set[str] = set()
    for k in range(len(ops) + 1):
        if k:
            op = ops[k - 1]
            disk.apply(op)
            if op.kind == "put_sent":
                in_flight.add(op.path)
            elif op.kind == "put_answered":
                in_flight.discard(op.path)
                if 200 <= op.size < 300:
                    answered.add(op.path)
            elif op.kind == "mark":
                marks.add(op.path)
        buckets = ([(IN_FLIGHT_LANDED, answered | in_flight), (IN_FLIGHT_LOST, set(answered))]
                   if in_flight else [(NO_PUT_IN_FLIGHT, set(answered))])
        if each_in_flight and len(in_flight) > 1:
            buckets += [(f"only {key.rsplit('/', 1)[-1]} of the PUTs in flight landed",
                         answered | {key}) for key in sorted(in_flight)]
        for variant in fs_variants:
            image = disk.image(variant)
            for bucket_variant, landed in buckets:
                yield CrashState(k, variant, bucket_variant, image, frozenset(landed),
                                 frozenset(marks), ops[k - 1] if k else None)


def summary(ops: Sequence[Op]) -> dict[str, int]:
    """How many operations of each kind a trace holds."""
    counts: dict[str, int] = {}
    for op in ops:
        counts[op.kind] = counts.get(op.kind, 0) + 1
    return counts

