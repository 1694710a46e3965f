"""What a same-host live migration sends, read on the way: a relay between ``xl migrate``'s
sender and its receiver.

Debian's Xen 4.17 ``libxl-save-helper`` passes none of libxenguest's iteration progress to
``xl`` (lab, 2026-12-05), so the log holds neither rounds nor pages.  The stream does: with an
empty ssh command ``xl migrate`` runs its "host" string through ``sh -c`` as the receiving end
(``create_migration_child``), so that string can be this relay, which starts ``xl
migrate-receive``, forwards every byte of the sender's stream to it unchanged (the receiver's
answers go straight back: its stdout is the relay's), and walks the libxc stream inside
libxl's (docs/specs/libxc-migration-stream.pandoc: an image header -- marker of eight 0xff
octets and "XENF" -- a domain header, then records of type and length, each padded to 8
octets).  A ``PAGE_DATA`` record lists pfns, each with its type in the top four bits; a pfn
of type XTAB, BROKEN or XALLOC carries no page.  libxenguest's save loop sends each
iteration's pages in ascending pfn order (``send_dirty_pages`` walks the dirty bitmap
upwards), so a record starting at or below where the previous one ended begins a new round;
the last round is the one sent with the guest suspended.

Run by path (``python3 streamcount.py STATS_JSON CMD...``, standard library only): the stats
go to STATS_JSON when the stream ends; the exit status is the receiver's.  A stream it cannot
read is still forwarded whole (the stats then say why they stop).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time

MARKER = b"\xff" * 8 + b"XENF"
IHDR_LEN = 24          # marker, id, version, options, two reserved fields
DHDR_LEN = 16          # type, page_shift, reserved, xen_major, xen_minor
REC_TYPE_END = 0x00000000
REC_TYPE_PAGE_DATA = 0x00000001
PFN_MASK = 0x000FFFFFFFFFFFFF
#: XEN_DOMCTL_PFINFO_XTAB, _BROKEN, _XALLOC >> 28: pfns sent without a page
NO_PAGE_TYPES = (0xF, 0xD, 0xE)


class StreamCounter:
    """Fed the sender's bytes in order; counts pages and rounds of the libxc stream."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.state = "search"
        self.need = 0          # bytes wanted in buf for the current state
        self.skip = 0          # bytes to pass over (page data, other records)
        self.rec_len = 0
        self.last_pfn = -1
        self.rounds: list[dict] = []
        self.records = 0
        self.bytes = 0
        self.error: str | None = None
        self.t_end: float | None = None

    # -- input ---------------------------------------------------------------------------
    def feed(self, data: bytes, t: float) -> None:
        self.bytes += len(data)
        mv = memoryview(data)
        while len(mv) and self.state != "done":
            if self.skip:
                k = min(self.skip, len(mv))
                self.skip -= k
                mv = mv[k:]
                continue
            if self.state == "search":
                self.buf += mv
                mv = mv[len(mv):]
                i = self.buf.find(MARKER)
                if i < 0:
                    del self.buf[:max(0, len(self.buf) - len(MARKER) + 1)]
                    continue
                rest = bytes(self.buf[i:])
                self.buf.clear()
                self._want("headers", IHDR_LEN + DHDR_LEN)
                mv = memoryview(rest + bytes(mv))
                continue
            k = min(self.need - len(self.buf), len(mv))
            self.buf += mv[:k]
            mv = mv[k:]
            if len(self.buf) == self.need:
                self._step(t)

    def _want(self, state: str, n: int) -> None:
        self.state, self.need = state, n
        self.buf.clear()

    def _step(self, t: float) -> None:
        b = bytes(self.buf)
        if self.state == "headers":
            version = struct.unpack_from(">I", b, 12)[0]
            options = struct.unpack_from(">H", b, 16)[0]
            if options & 1:
                raise ValueError("a big-endian stream")
            self.version = version
            self._want("rhdr", 8)
        elif self.state == "rhdr":
            rtype, length = struct.unpack("<II", b)
            self.records += 1
            self.rec_len = length
            padded = (length + 7) & ~7
            if rtype == REC_TYPE_END:
                self.t_end = t
                self.state = "done"
            elif rtype == REC_TYPE_PAGE_DATA and length >= 8:
                self._want("pd_count", 8)
            else:
                self._want("rhdr", 8)
                self.skip = padded
        elif self.state == "pd_count":
            count = struct.unpack_from("<I", b, 0)[0]
            if 8 + 8 * count > self.rec_len:
                raise ValueError(f"PAGE_DATA of {count} pfns in {self.rec_len} octets")
            self.count = count
            self._want("pd_pfns", 8 * count)
            if count == 0:
                self._pfns(b"", t)
        elif self.state == "pd_pfns":
            self._pfns(b, t)

    def _pfns(self, b: bytes, t: float) -> None:
        words = struct.unpack(f"<{self.count}Q", b)
        pfns = [w & PFN_MASK for w in words]
        pages = sum(1 for w in words if (w >> 60) not in NO_PAGE_TYPES)
        if pfns:
            if not self.rounds or pfns[0] <= self.last_pfn:
                self.rounds.append({"t": round(t, 3), "pages": 0, "pfns": 0})
            self.last_pfn = pfns[-1]
            self.rounds[-1]["pages"] += pages
            self.rounds[-1]["pfns"] += len(pfns)
        padded = (self.rec_len + 7) & ~7
        self._want("rhdr", 8)
        self.skip = padded - 8 - 8 * self.count

    # -- output --------------------------------------------------------------------------
    def stats(self) -> dict:
        return {"stream_seen": self.state != "search", "complete": self.state == "done",
                "rounds": len(self.rounds) or None,
                "pages_sent": sum(r["pages"] for r in self.rounds) if self.rounds else None,
                "per_round": [r["pages"] for r in self.rounds],
                "round_start_s": [r["t"] for r in self.rounds], "end_s": self.t_end,
                "records": self.records, "bytes": self.bytes, "error": self.error}


def relay(stats_path: str, cmd: list[str], fd_in: int = 0) -> int:
    """Start ``cmd`` (the receiver), forward ``fd_in`` to its stdin, count on the way."""
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, bufsize=0)
    out = child.stdin.fileno()
    counter: StreamCounter | None = StreamCounter()
    t0 = time.monotonic()
    try:
        while True:
            data = os.read(fd_in, 1 << 20)
            if not data:
                break
            mv = memoryview(data)
            try:
                while len(mv):
                    mv = mv[os.write(out, mv):]
            except BrokenPipeError:
                break
            if counter is not None and counter.state != "done":
                try:
                    counter.feed(data, time.monotonic() - t0)
                except (ValueError, struct.error) as e:
                    counter.error = str(e)
                    counter.state = "done"
            elif counter is not None:
                counter.bytes += len(data)
    finally:
        try:
            child.stdin.close()
        except BrokenPipeError:
            pass
        rc = child.wait()
        tmp = stats_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(counter.stats(), receiver_exit=rc), f)
        os.replace(tmp, stats_path)
    return rc


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: streamcount.py STATS_JSON RECEIVER_CMD...")
    sys.exit(relay(sys.argv[1], sys.argv[2:]))
