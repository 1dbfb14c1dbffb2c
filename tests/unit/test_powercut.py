"""The power-cut model (tests/campaigns/powercut.py) on hand-written strace output.

What the campaign concludes rests on two things checked here without strace: the parser
reads `strace -f -yy -xx` lines (joined across threads, HTTP requests and answers found in
socket data), and the disk model keeps only what an fsync made durable.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.campaigns import powercut
from tests.campaigns.powercut import EXACT, SYNCED, ZEROED, Disk, Op

ROOT = "/srv/state"


def hx(text: str | bytes) -> str:
    """A value as strace -xx prints it: every byte as \\xHH."""
    raw = text.encode() if isinstance(text, str) else text
    return "".join(f"\\x{b:02x}" for b in raw)


def fd(n: int, path: str) -> str:
    return f"{n}<{hx(path)}>"


def atomic_write_lines(name: str, data: bytes, *, fsync_file: bool = True,
                       fsync_dir: bool = True, tid: int = 7) -> list[str]:
    """What fsutil.atomic_write looks like under strace."""
    tmp, final = f"{ROOT}/.{name}.tmp", f"{ROOT}/{name}"
    lines = [
        f'{tid} openat(AT_FDCWD<{hx("/")}>, "{hx(tmp)}", O_WRONLY|O_CREAT|O_EXCL|O_CLOEXEC, '
        f"0666) = {fd(3, tmp)}",
        f'{tid} write({fd(3, tmp)}, "{hx(data)}", {len(data)}) = {len(data)}',
    ]
    if fsync_file:
        lines.append(f"{tid} fsync({fd(3, tmp)}) = 0")
    lines += [f"{tid} close({fd(3, tmp)}) = 0",
              f'{tid} rename("{hx(tmp)}", "{hx(final)}") = 0']
    if fsync_dir:
        lines += [f'{tid} openat(AT_FDCWD<{hx("/")}>, "{hx(ROOT)}", '
                  f"O_RDONLY|O_CLOEXEC|O_DIRECTORY) = {fd(4, ROOT)}",
                  f"{tid} fdatasync({fd(4, ROOT)}) = 0",
                  f"{tid} close({fd(4, ROOT)}) = 0"]
    return lines


def images(lines: list[str], variant: str) -> list[dict[str, bytes | None]]:
    """The files the variant shows after each prefix of the parsed operations."""
    ops = powercut.parse_ops("\n".join(lines) + "\n", [ROOT])
    out = []
    for crash in powercut.crash_states(Disk([ROOT]), ops, fs_variants=(variant,)):
        out.append({Path(p).name: (f.data if f else None)
                    for p, f in crash.image.entries.items()})
    return out


def test_an_atomic_write_is_parsed_in_order_with_its_bytes() -> None:
    ops = powercut.parse_ops("\n".join(atomic_write_lines("a.json", b'{"x": 1}\n')), [ROOT])
    assert [op.kind for op in ops] == ["create", "write", "sync", "rename", "sync"]
    assert ops[1] == Op("write", f"{ROOT}/.a.json.tmp", data=b'{"x": 1}\n', line=2)
    assert ops[3].path2 == f"{ROOT}/a.json"


def test_the_final_name_appears_only_once_its_folder_is_fsynced() -> None:
    exact = images(atomic_write_lines("a.json", b"whole"), EXACT)
    synced = images(atomic_write_lines("a.json", b"whole"), SYNCED)
    assert exact[4] == {"a.json": b"whole"}  # after the rename
    assert synced[4] == {}  # the rename is not durable yet: nothing under either name
    assert synced[5] == {"a.json": b"whole"}
    assert all(i.get("a.json") in (None, b"whole") for i in exact + synced)


def test_without_the_file_fsync_a_power_cut_leaves_the_name_without_the_data() -> None:
    lines = atomic_write_lines("a.json", b"whole", fsync_file=False)
    assert images(lines, SYNCED)[-1] == {"a.json": b""}
    assert images(lines, ZEROED)[-1] == {"a.json": b"\0" * 5}
    assert images(lines, EXACT)[-1] == {"a.json": b"whole"}


def test_unfinished_calls_of_threads_are_joined_and_puts_found_in_socket_data() -> None:
    sock = f"5<{hx('TCP:[127.0.0.1:40000->127.0.0.1:5000]')}>"
    request = b"PUT /bkt/ecg-reports/2026/a%20b.json HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = b"HTTP/1.1 200 OK\r\nETag: 1\r\n"
    mark = powercut.MARK_PREFIX + b"done\n"
    lines = [
        f'8 sendto({sock}, "{hx(request)}", {len(request)}, 0, NULL, 0 <unfinished ...>',
        *atomic_write_lines("a.json", b"x", tid=7),
        f"8 <... sendto resumed>) = {len(request)}",
        f'8 sendto({sock}, "{hx(b"body")}", 4, 0, NULL, 0) = 4',
        f"8 recvfrom({sock}, <unfinished ...>",
        f'8 <... recvfrom resumed>"{hx(answer)}", 65536, 0, NULL, NULL) = {len(answer)}',
        f'7 write(2<{hx("pipe:[1]")}>, "{hx(mark)}", {len(mark)}) = {len(mark)}',
    ]
    ops = powercut.parse_ops("\n".join(lines), [ROOT], bucket="bkt")
    assert [op.kind for op in ops] == ["create", "write", "sync", "rename", "sync",
                                       "put_sent", "put_answered", "mark"]
    assert ops[5].path == ops[6].path == "ecg-reports/2026/a b.json"
    assert ops[6].size == 200 and ops[7].path == "done"
    states = list(powercut.crash_states(Disk([ROOT]), ops))
    in_flight = [s for s in states if s.prefix == 6]
    assert {s.bucket_variant: bool(s.landed) for s in in_flight} == {
        powercut.IN_FLIGHT_LANDED: True, powercut.IN_FLIGHT_LOST: False}
    assert all(s.landed == {"ecg-reports/2026/a b.json"} for s in states if s.prefix >= 7)


def test_a_write_the_model_cannot_replay_is_refused_not_ignored() -> None:
    lines = [f'7 openat(AT_FDCWD<{hx("/")}>, "{hx(ROOT + "/f")}", O_WRONLY|O_CREAT, 0644) '
             f"= {fd(3, ROOT + '/f')}",
             f'7 writev({fd(3, ROOT + "/f")}, [{{iov_base="{hx("a")}", iov_len=1}}], 1) = 1']
    with pytest.raises(powercut.Unmodelled, match="writev"):
        powercut.parse_ops("\n".join(lines), [ROOT])
    outside = [line.replace(hx(ROOT), hx("/elsewhere")) for line in lines]
    assert powercut.parse_ops("\n".join(outside), [ROOT]) == []


def test_an_unlink_not_followed_by_a_folder_fsync_comes_back_after_a_cut(
        tmp_path: Path) -> None:
    (tmp_path / "old").write_bytes(b"kept")
    root = str(tmp_path)
    disk = Disk.snapshot([root])
    disk.apply(Op("unlink", f"{root}/old"))
    assert disk.image(EXACT).get(f"{root}/old") is None
    assert disk.image(SYNCED).get(f"{root}/old") == b"kept"
    disk.apply(Op("sync", root))
    assert disk.image(SYNCED).get(f"{root}/old") is None
