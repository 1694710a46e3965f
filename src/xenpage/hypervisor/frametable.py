"""``struct page_info`` for every machine frame, stored as a structure of numpy arrays.

Xen keeps one 32-byte ``page_info`` per MFN in its frame table; here each field is a numpy
array indexed by MFN so that scans over millions of frames are vectorised:

* ``count_info`` -- PGC_* flags, the 2-bit PGC_state and the general count, read and written
  through :class:`CountInfo` (``ft.count_info[mfns]``, Xen's 64-bit values) and stored as two
  arrays: ``pgc_flags`` (uint8, bits 56-63: every PGC_* flag and the state) and ``pgc_count``
  (uint64, bits 0-55: the general reference count).  A free frame's count is 0, so on a host
  whose memory is mostly free only the byte array is resident (64 MiB at 256 GiB, where one
  uint64 array with the state bits set in every free frame's word was 512 MiB);
* ``type_info``  (uint64) -- PGT_* type, pinned/validated bits and the type count;
* ``owner1``     (uint16) -- owner domid + 1 (0 = no owner, like a NULL ``_domain``);
* ``buddy_order`` (int8)  -- order+1 of the free buddy chunk headed here, 0 elsewhere
  (``PFN_ORDER`` of a free chunk head);
* ``m2p_plus1``  (uint64) -- the machine-to-phys table, stored +1 so that 0 reads as
  ``INVALID_M2P_ENTRY``;
* ``content``    (uint64) -- a 64-bit fingerprint standing for the frame's 4 KiB of data;
  page-table frames (and frames written with arbitrary bytes) keep real ``uint64[512]``
  arrays in :attr:`FrameTable.pages` instead.

Arrays are zero-filled anonymous memory (:func:`sparse_zeros`) so untouched frames cost no
resident memory -- without transparent huge pages, which would make one written word of a
sparse array cost 2 MiB.
"""

from __future__ import annotations

import mmap

import numpy as np

from ..abi import mm
from ..abi.xen import INVALID_M2P_ENTRY

#: Multiplier used to expand a 64-bit fingerprint into the 512 words of a page.
_EXPAND_K = np.uint64(0x9E3779B97F4A7C15)
_IDX = np.arange(512, dtype=np.uint64)

_U = np.uint64
#: count_info's bits 56-63 (flags and state) live in ``pgc_flags``, bits 0-55 in ``pgc_count``
FLAGS_SHIFT = 56
_FSHIFT = _U(FLAGS_SHIFT)
_COUNT = _U(mm.PGC_count_mask)
#: PGC_state within the flags byte
_FSTATE = np.uint8(mm.PGC_state >> FLAGS_SHIFT)
_FSTATE_SHIFT = mm.PGC_state_shift - FLAGS_SHIFT
#: frames per slice in whole-table scans (temporaries of a few MiB, not of the table's size)
SCAN_STEP = 1 << 22


def sparse_zeros(n: int, dtype) -> np.ndarray:
    """A zero-filled array of ``n`` items whose untouched pages take no memory: private
    anonymous memory advised off transparent huge pages (numpy advises its large
    allocations *onto* them, so that writing the few frames of a sparse frame-table array
    would make 2 MiB resident per written word)."""
    dtype = np.dtype(dtype)
    nbytes = n * dtype.itemsize
    if nbytes < (1 << 22) or not hasattr(mmap, "MADV_NOHUGEPAGE") \
            or not hasattr(mmap, "MAP_ANONYMOUS"):
        return np.zeros(n, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buf, dtype=dtype, count=n)


def expand_fingerprint(fp: int) -> np.ndarray:
    """The 512 words of a data page whose content is represented by fingerprint ``fp``."""
    return (np.uint64(fp) ^ (_IDX * _EXPAND_K)).astype(np.uint64)


class CountInfo:
    """``page->count_info`` of every frame, indexed like a numpy array and reading and
    writing Xen's 64-bit values: ``ft.count_info[m]``, ``ft.count_info[mfns] = v``,
    ``ft.count_info[m] |= PGC_broken`` (read, change, write back).  An index gives a copy,
    never a view; the whole table is never made into one array by accident (``[:]`` asks for
    that copy explicitly), and a write leaves the count array's untouched pages alone when
    the counts written and overwritten are all 0."""

    __slots__ = ("_flags", "_count")

    def __init__(self, flags: np.ndarray, count: np.ndarray):
        self._flags, self._count = flags, count

    def __getitem__(self, idx):
        return (self._flags[idx].astype(np.uint64) << _FSHIFT) | self._count[idx]

    def __setitem__(self, idx, value) -> None:
        if isinstance(value, (int, np.integer)):
            v = int(value)
            self._flags[idx] = v >> FLAGS_SHIFT
            c = v & mm.PGC_count_mask
            if c or self._count[idx].any():
                self._count[idx] = c
            return
        v = np.asarray(value, dtype=np.uint64)
        self._flags[idx] = (v >> _FSHIFT).astype(np.uint8)
        c = v & _COUNT
        if c.any() or self._count[idx].any():
            self._count[idx] = c

    def add_at(self, idx, n) -> None:
        """``np.add.at`` on the 64-bit values: ``n`` added once per occurrence of a frame."""
        u, times = np.unique(np.asarray(idx, dtype=np.int64), return_counts=True)
        self[u] = self[u] + times.astype(np.uint64) * _U(n)

    def copy(self) -> np.ndarray:
        """Every frame's value as one uint64 array (8 bytes a frame: for small hosts)."""
        return self[:]

    def __len__(self) -> int:
        return self._flags.size

    def __array__(self, *a, **k):
        raise TypeError("count_info is stored as two arrays: index it (ft.count_info[mfns]), "
                        "or ask for a copy with ft.count_info.copy()")

    def __iter__(self):
        raise TypeError("count_info: index it instead of iterating over every frame")

    def __eq__(self, other):
        raise TypeError("count_info: index it (ft.count_info[mfns] == value)")

    __hash__ = None  # type: ignore[assignment]


class FrameTable:
    #: the stored arrays (what is saved; ``count_info`` is ``pgc_flags`` and ``pgc_count``)
    FIELDS = ("pgc_flags", "pgc_count", "type_info", "owner1", "buddy_order", "m2p_plus1", "content")
    DTYPES = {"pgc_flags": np.uint8, "pgc_count": np.uint64, "type_info": np.uint64,
              "owner1": np.uint16, "buddy_order": np.int8, "m2p_plus1": np.uint64,
              "content": np.uint64}

    def __init__(self, nframes: int):
        self.nframes = nframes
        for f in self.FIELDS:
            setattr(self, f, sparse_zeros(nframes, self.DTYPES[f]))
        self.count_info = CountInfo(self.pgc_flags, self.pgc_count)
        #: frames whose content is a real array of 512 words (page tables, raw writes)
        self.pages: dict[int, np.ndarray] = {}

    # -- scalar accessors (Python ints) -----------------------------------------------------
    def count(self, mfn: int) -> int:
        return int(self.count_info[mfn])

    def state(self, mfn: int) -> int:
        return (int(self.pgc_flags[mfn]) & int(_FSTATE)) >> _FSTATE_SHIFT

    def owner(self, mfn: int) -> int | None:
        o = int(self.owner1[mfn])
        return o - 1 if o else None

    def set_owner(self, mfn, domid: int | None) -> None:
        self.owner1[mfn] = 0 if domid is None else domid + 1

    def m2p(self, mfn: int) -> int:
        v = int(self.m2p_plus1[mfn])
        return v - 1 if v else INVALID_M2P_ENTRY

    def set_m2p(self, mfn, gpfn) -> None:
        """Write M2P entries; ``INVALID_M2P_ENTRY`` (or -1) invalidates."""
        if np.isscalar(gpfn):
            g = int(gpfn)
            self.m2p_plus1[mfn] = 0 if g in (INVALID_M2P_ENTRY, -1) else g + 1
        else:
            g = np.asarray(gpfn, dtype=np.uint64)
            self.m2p_plus1[mfn] = np.where(g == np.uint64(INVALID_M2P_ENTRY), np.uint64(0),
                                           g + np.uint64(1))

    def m2p_array(self, mfns: np.ndarray) -> np.ndarray:
        v = self.m2p_plus1[mfns]
        return np.where(v == 0, np.uint64(INVALID_M2P_ENTRY), v - np.uint64(1))

    # -- vectorised state helpers -----------------------------------------------------------
    def states(self, start: int = 0, n: int | None = None) -> np.ndarray:
        """PGC_state of frames ``start .. start+n-1`` (all frames from ``start`` by default)."""
        f = self.pgc_flags[start:] if n is None else self.pgc_flags[start:start + n]
        return ((f & _FSTATE) >> np.uint8(_FSTATE_SHIFT)).view(np.int8)

    def states_of(self, mfns) -> np.ndarray:
        """PGC_state of the frames ``mfns`` (any index)."""
        return ((self.pgc_flags[mfns] & _FSTATE) >> np.uint8(_FSTATE_SHIFT)).view(np.int8)

    def has_flag(self, flag: int, mfns=slice(None)) -> np.ndarray:
        """Whether count_info has the PGC_* bit(s) ``flag`` (bits 56-63), per frame."""
        assert flag >> FLAGS_SHIFT and not flag & mm.PGC_count_mask, "a PGC_* flag"
        return (self.pgc_flags[mfns] & np.uint8(flag >> FLAGS_SHIFT)) != 0

    def counts(self, mfns=slice(None)) -> np.ndarray:
        """The general reference count (count_info & PGC_count_mask), per frame."""
        return self.pgc_count[mfns]

    def set_state(self, mfn, state: int) -> None:
        keep = np.uint8(~int(_FSTATE) & 0xFF)
        self.pgc_flags[mfn] = (self.pgc_flags[mfn] & keep) | np.uint8(state << _FSTATE_SHIFT)

    def set_count_info_where(self, mask: np.ndarray, value: int) -> None:
        """``count_info = value`` for every frame where ``mask`` (a bool per frame) is set,
        without an index array of the frames (8 bytes a frame)."""
        np.copyto(self.pgc_flags, np.uint8(value >> FLAGS_SHIFT), where=mask)
        c = value & mm.PGC_count_mask
        for a in range(0, self.nframes, SCAN_STEP):  # zero counts stay untouched pages
            m, cur = mask[a:a + SCAN_STEP], self.pgc_count[a:a + SCAN_STEP]
            np.copyto(cur, _U(c), where=m if c else m & (cur != 0))

    # -- content ----------------------------------------------------------------------------
    def set_m2p_frames(self, chunk_heads: list[int]) -> None:
        """Name the frames that hold the machine-to-phys table: 2 MiB chunks, each 512 frames
        of 512 entries (``paging_init`` / ``XENMEM_machphys_mfn_list``)."""
        self.m2p_frame_pos = {h + i: c * 512 + i for c, h in enumerate(chunk_heads) for i in range(512)}

    def read_page(self, mfn: int) -> np.ndarray:
        """The frame's 512 words (a copy).  An M2P frame reads as its slice of the M2P."""
        pos = getattr(self, "m2p_frame_pos", {}).get(mfn)
        if pos is not None:
            lo = pos * 512
            out = np.full(512, np.uint64(INVALID_M2P_ENTRY), dtype=np.uint64)
            hi = min(lo + 512, self.nframes)
            if hi > lo:
                out[:hi - lo] = self.m2p_array(np.arange(lo, hi))
            return out
        p = self.pages.get(mfn)
        if p is not None:
            return p.copy()
        return expand_fingerprint(int(self.content[mfn]))

    def read_pages(self, mfns: np.ndarray) -> np.ndarray:
        """``(n, 512)`` words of many frames at once (compact frames expanded vectorised)."""
        mfns = np.asarray(mfns, dtype=np.int64).ravel()
        special = getattr(self, "m2p_frame_pos", {})
        lst = mfns.tolist()
        rows = list(map(self.pages.get, lst))
        if self.pages.keys() >= set(lst):  # every frame stored whole (page tables): one copy
            out = np.concatenate(rows).reshape(-1, 512) if rows else np.zeros((0, 512), dtype=np.uint64)
        else:
            real = np.fromiter((r is not None for r in rows), dtype=bool, count=len(rows))
            out = np.empty((mfns.size, 512), dtype=np.uint64)
            out[~real] = self.content[mfns[~real]][:, None] ^ (_IDX * _EXPAND_K)[None, :]
            if real.any():
                out[real] = np.concatenate([r for r in rows if r is not None]).reshape(-1, 512)
        if special and not special.keys().isdisjoint(lst):
            for i, m in enumerate(lst):
                if m in special:
                    out[i] = self.read_page(m)
        return out

    def write_page(self, mfn: int, words: np.ndarray) -> None:
        """Store 512 words; pages that are the expansion of a fingerprint stay compact."""
        words = np.asarray(words, dtype=np.uint64).reshape(512)
        fp = int(words[0])
        if np.array_equal(words, expand_fingerprint(fp)):
            self.pages.pop(mfn, None)
            self.content[mfn] = fp
        else:
            self.pages[mfn] = words.copy()

    def write_pages(self, mfns, rows: np.ndarray) -> None:
        """:meth:`write_page` for many frames at once (the compact test vectorised)."""
        mfns = np.asarray(mfns, dtype=np.int64).ravel()
        rows = np.asarray(rows, dtype=np.uint64).reshape(-1, 512)
        fp = rows[:, 0]
        compact = (rows == (fp[:, None] ^ (_IDX * _EXPAND_K)[None, :])).all(axis=1)
        lst = mfns.tolist()
        if len(set(lst)) < len(lst):  # a frame written twice keeps its last row
            for m, c, i in zip(lst, compact.tolist(), range(mfns.size)):
                if c:
                    self.pages.pop(m, None)
                else:
                    self.pages[m] = rows[i].copy()
            self.content[mfns[compact]] = fp[compact]
            return
        for m in self.pages.keys() & set(mfns[compact].tolist()):  # stored whole until now
            del self.pages[m]
        whole = np.flatnonzero(~compact)
        for m, i in zip(mfns[whole].tolist(), whole.tolist()):
            self.pages[m] = rows[i].copy()
        self.content[mfns[compact]] = fp[compact]

    def table(self, mfn: int) -> np.ndarray:
        """The live 512-entry array of a frame used as a page table (created on demand)."""
        p = self.pages.get(mfn)
        if p is None:
            p = expand_fingerprint(int(self.content[mfn]))
            self.pages[mfn] = p
        return p

    def fingerprint(self, mfn: int) -> int:
        """A 64-bit digest of the frame's current content (the fingerprint itself for compact
        pages; a hash of the words otherwise)."""
        p = self.pages.get(mfn)
        if p is None:
            return int(self.content[mfn])
        return hash(p.tobytes()) & 0xFFFFFFFFFFFFFFFF

    def set_fingerprint(self, mfn, fp) -> None:
        if np.isscalar(mfn):
            self.pages.pop(int(mfn), None)
        elif self.pages:
            # only the frames that hold real arrays are looked at (a guest's boot sets 10^7
            # fingerprints at once: no Python int per frame)
            m = np.asarray(mfn, dtype=np.int64).ravel()
            if m.size:
                keys = np.fromiter(self.pages.keys(), dtype=np.int64, count=len(self.pages))
                for k in keys[np.isin(keys, m, kind="table")].tolist():
                    del self.pages[k]
        self.content[mfn] = fp

    # -- persistence ------------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """The stored arrays themselves (no copies) and the frames held as real pages."""
        out = {f: getattr(self, f) for f in self.FIELDS}
        if self.pages:
            keys = np.fromiter(self.pages.keys(), dtype=np.int64, count=len(self.pages))
            out["pages_mfn"] = keys
            out["pages_data"] = np.stack([self.pages[int(k)] for k in keys])
        return out

    @classmethod
    def from_arrays(cls, nframes: int, arrs: dict[str, np.ndarray]) -> "FrameTable":
        ft = cls.__new__(cls)
        ft.nframes = nframes
        for f in cls.FIELDS:
            setattr(ft, f, arrs[f])
        ft.count_info = CountInfo(ft.pgc_flags, ft.pgc_count)
        ft.pages = {}
        if "pages_mfn" in arrs:
            for k, row in zip(arrs["pages_mfn"].tolist(), arrs["pages_data"]):
                ft.pages[k] = np.array(row, dtype=np.uint64)
        return ft
