"""By hand (``run_lab.py --group pvh-after``): does a PVH guest still migrate after dom0 has
touched its memory?  ``XENPAGE_LAB_AFTER`` picks what dom0 does first:

* ``inplace`` (default): one frame retired in place (pause, copy out,
  ``decrease_reservation``, ``populate_physmap``, copy back, unpause) -- in three runs of three
  the migration then failed (tests_xen/README.md);
* ``rewrite``: pause, copy one gfn out and back through a writable foreign mapping, unpause
  (the same mappings, no change to the guest's physmap);
* ``decpop``: pause, copy one gfn out, ``decrease_reservation``, ``populate_physmap``, copy
  back, unpause -- the in-place step without marking the frame offline first (the old frame
  goes back to Xen's heap as a free frame) and without ``hvm_p2m``;
* ``none``: nothing.

Then the guest is live-migrated with ``xl migrate``; the test asserts that it migrated and
memtest stayed clean."""

from __future__ import annotations

import os

import numpy as np

import translated as T


def test_migrate_after(xen, rec):
    what = os.environ.get("XENPAGE_LAB_AFTER", "inplace")
    g = T.start("pvh", rec)
    if what == "inplace":
        T.retire_in_place(xen, g, [T.ONE], rec, "after-in-place-1")
    elif what == "rewrite":
        gfns, _ = T.frames(xen, g, T.at(g, [T.ONE]))
        gen = g.last_gen()
        assert xen.pause(g.domid) == 0
        try:
            rc, data = xen.read_pages(g.domid, gfns)
            assert rc == 0
            wrc = xen.write_pages(g.domid, gfns, data)
        finally:
            xen.unpause(g.domid)
        hb = g.wait_after(gen, 2)
        rec.add("pvh-after-rewrite", gfns=[hex(int(x)) for x in gfns], write_rc=wrc, heartbeats=hb[-2:])
        assert wrc == 0 and all(c == 0 for _, _, c, _ in hb)
    elif what == "decpop":
        gfns = np.array([g.pfns()[T.at(g, [T.ONE])[0]]], dtype=np.int64)
        gen = g.last_gen()
        r = T.decrease_populate(xen, g.domid, gfns)
        hb = g.wait_after(gen, 2)
        rec.add("pvh-after-decpop", gfns=[hex(int(x)) for x in gfns], **r, heartbeats=hb[-2:])
        assert r["decrease_done"] == 1 and r["populate_done"] == 1 and r["write_rc"] == 0 \
            and r["identical"]
        assert all(c == 0 for _, _, c, _ in hb)
    rep = xen.live_migrate(g.domid)
    rec.add("pvh-after-migrate", after=what, report=rep.to_json())
    assert rep.ok, f"after {what}: {rep.error}\n" + "\n".join(l for l in rep.log if "rror" in l)
    hb = g.wait_after(-1, 2)
    assert hb and not g.bad_lines()
    assert np.all([c == 0 for _, _, c, _ in hb])
