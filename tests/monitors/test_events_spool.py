"""The on-disk event spool: order, cap, crash safety, erasure, file modes."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

from monitors.events.spool import Spool

REPO = Path(__file__).resolve().parents[2]


def drain(spool: Spool, batch: int = 7) -> list[bytes]:
    out: list[bytes] = []
    while spool.events:
        got = spool.read(batch)
        out += got.payloads
        spool.consume(got)
    return out


def test_replays_in_order_across_segments_and_empties(tmp_path: Path) -> None:
    spool = Spool.create(tmp_path / "spool", 1024 * 1024)
    for i in range(300):  # several segments of 128 KiB
        spool.append([(i, b"%05d" % i + b"x" * 1000)], sync=i % 50 == 0)
    assert spool.events == 300 and spool.dropped == 0
    assert len(list(spool.directory.glob("*.seg"))) > 2
    assert [int(p[:5]) for p in drain(spool)] == list(range(300))
    assert spool.events == 0 and not list(spool.directory.glob("*.seg"))
    spool.close()
    assert not (tmp_path / "spool").exists() or not list((tmp_path / "spool").iterdir())


def test_cap_drops_oldest_segment_only_when_full(tmp_path: Path) -> None:
    cap = 64 * 1024
    spool = Spool.create(tmp_path / "spool", cap)
    record = 1000
    fits = cap // (record + 17)
    for i in range(fits - 10):
        spool.append([(i, b"%05d" % i + b"x" * (record - 5))])
    assert spool.dropped == 0, "nothing dropped before the spool is full"
    for i in range(fits - 10, 200):
        spool.append([(i, b"%05d" % i + b"x" * (record - 5))])
    assert spool.dropped > 0 and spool.bytes <= cap
    kept = [int(p[:5]) for p in drain(spool)]
    assert kept == list(range(200 - len(kept), 200)), "the newest survive, in order"
    assert spool.dropped + len(kept) == 200, "every lost record is counted"
    spool.close()


def test_files_are_private(tmp_path: Path) -> None:
    spool = Spool.create(tmp_path / "spool", 1024 * 1024)
    spool.append([(1, b"a")])
    assert stat.S_IMODE(os.stat(tmp_path / "spool").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(spool.directory).st_mode) == 0o700
    for path in spool.directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    spool.close()


def test_torn_tail_is_skipped_on_adoption(tmp_path: Path) -> None:
    spool = Spool.create(tmp_path / "spool", 1024 * 1024)
    spool.append([(i, b"record-%d" % i) for i in range(5)])
    segment = next(spool.directory.glob("*.seg"))
    with segment.open("ab") as handle:  # a crash in the middle of a write
        handle.write(b"\x40\x00\x00\x00\x12\x34\x56\x78partial")
    directory = spool.directory
    os.close(spool._owner_fd)  # the owner "dies" (its lock goes with it)
    spool._owner_fd = None
    adopted = Spool.adopt(directory, 1024 * 1024)
    assert adopted is not None
    assert drain(adopted) == [b"record-%d" % i for i in range(5)]
    assert adopted.corrupt == 1
    adopted.close()


def test_live_owner_is_not_adopted(tmp_path: Path) -> None:
    spool = Spool.create(tmp_path / "spool", 1024 * 1024)
    assert Spool.adopt(spool.directory, 1024 * 1024) is None
    assert Spool.directories(tmp_path / "spool") == [spool.directory]
    spool.close()


def test_purge_tombstones_in_place(tmp_path: Path) -> None:
    spool = Spool.create(tmp_path / "spool", 1024 * 1024)
    spool.append([(i, b'{"user":{"id":"%d"},"n":%d}' % (i % 3, i)) for i in range(30)])
    visitor = Spool(spool.directory, 1024 * 1024)  # another process's erasure
    assert visitor.purge(lambda p: b'"id":"1"' in p) == 10
    visitor.close()
    raw = b"".join(p.read_bytes() for p in spool.directory.glob("*.seg"))
    assert b'"id":"1"' not in raw, "the bytes are gone from disk, not just skipped"
    left = drain(spool)
    assert len(left) == 20 and all(b'"id":"1"' not in p for p in left)
    assert spool.events == 0
    spool.close()


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from monitors.events.spool import Spool
    spool = Spool.create(Path(sys.argv[1]), 64 * 1024 * 1024)
    n = 0
    while True:
        spool.append([(n + i, b"ev-%08d" % (n + i) + b"y" * 300) for i in range(10)])
        n += 10
        print(n, flush=True)  # acknowledged: fsync'd before this line
    """
)


def test_nothing_acknowledged_is_lost_to_sigkill(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    acknowledged = 0
    for line in child.stdout:
        acknowledged = int(line)
        if acknowledged >= 3000:
            break
    child.send_signal(signal.SIGKILL)  # mid-append, likely
    child.wait()
    [directory] = Spool.directories(root)
    adopted = Spool.adopt(directory, 64 * 1024 * 1024)
    assert adopted is not None
    got = [int(p[3:11]) for p in drain(adopted, 500)]
    assert len(got) >= acknowledged
    assert got == list(range(len(got))), "in order, no gap, no duplicate"
    adopted.close()


def test_unreadable_records_do_not_stall_replay(tmp_path: Path) -> None:
    spool = Spool.create(tmp_path / "spool", 1024 * 1024)
    spool.append([(i, b"record-%d" % i) for i in range(5)])
    segment = next(spool.directory.glob("*.seg"))
    data = bytearray(segment.read_bytes())
    data[4] ^= 0xFF  # the first record's CRC: nothing after it can be trusted
    segment.write_bytes(bytes(data))
    batch = spool.read(10)
    assert batch.payloads == [] and spool.events == 0, "counted as gone, not retried forever"
    spool.close()
