"""``toolstack.membership.member``: the same answer as ``np.isin``, for frame numbers spread
over a large host (the case where ``np.isin``'s table would span the host)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpage.toolstack.membership import member, member_frames

FRAMES = st.integers(0, (1 << 40) - 1)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(FRAMES, max_size=300), targets=st.lists(FRAMES, max_size=40),
       shared=st.lists(st.integers(0, 299), max_size=20), unsigned=st.booleans(),
       clash=st.booleans())
def test_member_is_isin(values, targets, shared, unsigned, clash):
    if values:  # some values among the targets, and (clash) some sharing their low 16 bits
        targets = targets + [values[i % len(values)] for i in shared]
        if clash and targets:
            values = values + [t ^ (1 << 20) for t in targets]
    dt = np.uint64 if unsigned else np.int64
    v = np.array(values, dtype=dt)
    t = np.array(targets, dtype=dt)
    np.testing.assert_array_equal(member(v, t), np.isin(v, t))
    grid = np.resize(v, (3, 512)) if v.size else np.zeros((3, 512), dtype=dt)
    np.testing.assert_array_equal(member(grid, t), np.isin(grid, t))


@settings(max_examples=200, deadline=None)
@given(frames=st.lists(st.integers(0, (1 << 40) - 1), max_size=300),
       flags=st.lists(st.integers(0, (1 << 12) - 1), min_size=1, max_size=300),
       nx=st.booleans(), targets=st.lists(st.integers(0, (1 << 40) - 1), max_size=40),
       shared=st.lists(st.integers(0, 299), max_size=20))
def test_member_frames_is_isin_of_the_frame_field(frames, flags, nx, targets, shared):
    """Entries with flags (and the NX bit) around the frame field: the same answer as
    ``np.isin`` of the field."""
    if frames:
        targets = targets + [frames[i % len(frames)] for i in shared]
    f = np.array(frames, dtype=np.uint64)
    e = (f << np.uint64(12)) | np.resize(np.array(flags, dtype=np.uint64), f.size) \
        | (np.uint64(1 << 63) if nx else np.uint64(0))
    t = np.array(targets, dtype=np.uint64)
    mask = (1 << 40) - 1
    want = np.isin((e >> np.uint64(12)) & np.uint64(mask), t)
    np.testing.assert_array_equal(member_frames(e, t, 12, mask), want)
