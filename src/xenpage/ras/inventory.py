"""The fleet's retired-page inventory: many hosts' retired-page lists read in parallel (on the
Dask cluster of :mod:`.cluster`), one table per host and one per DIMM, the frames that could
not be retired and why, and the DIMMs ranked for replacement.

A host's list is either its ``xenpage badpages --json`` export or a copy of its ``retired.db``
(the service's SQLite store, :class:`xenpage.ras.store.Store`, opened read-only).  The host's
name is the file's stem (``web17.json``, ``web17.db``), or its directory's name for a file
called ``retired.db`` or ``badpages.json`` (``hosts/web17/retired.db``).

DIMMs are named by the decoded address the machine-check records carried (socket, channel,
DIMM: what ``badpages`` keeps as each frame's ``location``); a frame without one counts under
DIMM ``?``.  Ranking for replacement: uncorrected errors first (the next one may crash a
guest), then frames that could not be retired (their errors keep coming), then corrected
errors per day of the list's span.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

DAY = 86400.0

#: the per-frame table's columns
FRAME_COLUMNS = ("host", "mfn", "state", "outcome", "reason", "errors", "uncorrected", "socket",
                 "channel", "dimm", "first_time", "last_time", "retired_time", "detail")
#: states of a frame that could not be retired (yet)
UNRETIRABLE = ("pending", "failed")


def host_name(path: Path) -> str:
    if path.name in ("retired.db", "badpages.json"):
        return path.parent.name
    return path.stem


def _frames_of_db(path: Path) -> tuple[list[dict], int]:
    uri = f"file:{path}?mode=ro"
    db = sqlite3.connect(uri, uri=True)
    try:
        cols = ("mfn", "state", "outcome", "reason", "detail", "errors", "uncorrected",
                "location", "first_time", "last_time", "retired_time")
        rows = db.execute(f"SELECT {', '.join(cols)} FROM frames ORDER BY mfn").fetchall()
        events = db.execute("SELECT count(*) FROM events").fetchone()[0]
    finally:
        db.close()
    out = []
    for r in rows:
        d = dict(zip(cols, r))
        d["location"] = json.loads(d["location"] or "{}")
        out.append(d)
    return out, int(events)


def _frames_of_json(path: Path) -> tuple[list[dict], int]:
    d = json.loads(path.read_text())
    frames = d.get("frames", [])
    ev = d.get("events", 0)
    if isinstance(ev, dict):
        ev = sum(int(v) for v in ev.values() if isinstance(v, (int, float)))
    return frames, int(ev or 0)


def read_list(path: str | Path) -> tuple[list[dict], dict]:
    """One host's list: its frames (rows of :data:`FRAME_COLUMNS`) and its host row."""
    path = Path(path)
    host = host_name(path)
    try:
        if path.suffix == ".json":
            frames, events = _frames_of_json(path)
        else:
            frames, events = _frames_of_db(path)
    except (OSError, ValueError, sqlite3.Error, KeyError, TypeError) as e:
        return [], {"host": host, "path": str(path), "error": f"{type(e).__name__}: {e}"}
    rows = []
    for f in frames:
        loc = f.get("location") or {}
        rows.append({
            "host": host, "mfn": int(f["mfn"]), "state": str(f.get("state") or ""),
            "outcome": str(f.get("outcome") or ""), "reason": str(f.get("reason") or ""),
            "errors": int(f.get("errors") or 0), "uncorrected": int(f.get("uncorrected") or 0),
            "socket": _opt_int(loc.get("socketid")), "channel": _opt_int(loc.get("channel")),
            "dimm": _opt_int(loc.get("dimm")),
            "first_time": _opt_float(f.get("first_time")), "last_time": _opt_float(f.get("last_time")),
            "retired_time": _opt_float(f.get("retired_time")), "detail": str(f.get("detail") or ""),
        })
    return rows, {"host": host, "path": str(path), "error": "", "events": events}


def _opt_int(v):
    return None if v is None else int(v)


def _opt_float(v):
    return None if v is None else float(v)


def read_lists(paths: list[str]) -> tuple[list[dict], list[dict]]:
    """Many hosts' lists (one Dask task's share): their frame rows and host rows.  (Rows, not
    Arrow tables: tables unpickled on the client sit in unaligned buffers, which Arrow's
    group-by warns about.)"""
    frames: list[dict] = []
    hosts: list[dict] = []
    for p in paths:
        rows, h = read_list(p)
        frames += rows
        h["frames"] = len(rows)
        hosts.append(h)
    return frames, hosts


def host_schema():
    import pyarrow as pa
    return pa.schema([("host", pa.string()), ("path", pa.string()), ("error", pa.string()),
                      ("events", pa.int64()), ("frames", pa.int64())])


def frame_schema():
    import pyarrow as pa
    return pa.schema([("host", pa.string()), ("mfn", pa.int64()), ("state", pa.string()),
                      ("outcome", pa.string()), ("reason", pa.string()), ("errors", pa.int64()),
                      ("uncorrected", pa.int64()), ("socket", pa.int64()), ("channel", pa.int64()),
                      ("dimm", pa.int64()), ("first_time", pa.float64()),
                      ("last_time", pa.float64()), ("retired_time", pa.float64()),
                      ("detail", pa.string())])


def find_lists(inputs) -> list[str]:
    """Files named on the command line, and every ``*.json`` / ``*.db`` under directories."""
    out: list[str] = []
    for i in inputs:
        p = Path(i)
        if p.is_dir():
            out += sorted(str(q) for q in p.rglob("*") if q.is_file() and q.suffix in (".json", ".db"))
        else:
            out.append(str(p))
    return out


def inventory(paths: list[str], client=None, chunk: int = 200) -> dict:
    """Read ``paths`` (on ``client``'s cluster when given, ``chunk`` files a task) and build
    the tables: ``frames``, ``hosts``, ``dimms`` (ranked) and ``unretirable`` (with why)."""
    import pyarrow as pa
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    if client is None:
        parts = [read_lists(c) for c in chunks]
    else:
        parts = client.gather(client.map(read_lists, chunks, pure=False))
    frames = pa.Table.from_pylist([r for p in parts for r in p[0]], schema=frame_schema())
    hosts_read = pa.Table.from_pylist([h for p in parts for h in p[1]], schema=host_schema())
    return build_tables(frames, hosts_read)


def build_tables(frames, hosts_read) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    state = frames.column("state")
    is_ret = pc.equal(state, "retired")
    is_unret = pc.is_in(state, value_set=pa.array(UNRETIRABLE))
    first = pc.fill_null(frames.column("first_time"), np.nan)
    last = pc.fill_null(frames.column("last_time"), np.nan)
    f = frames.append_column("is_retired", pc.cast(is_ret, pa.int64())) \
              .append_column("is_unretirable", pc.cast(is_unret, pa.int64())) \
              .append_column("t0", first).append_column("t1", last)
    f = f.append_column("dimm_name", pc.if_else(
        pc.is_null(f.column("dimm")), pa.scalar("?"),
        pc.binary_join_element_wise("S", pc.cast(f.column("socket"), pa.string()), ":C",
                                    pc.cast(f.column("channel"), pa.string()), ":D",
                                    pc.cast(f.column("dimm"), pa.string()), "")))
    aggs = [("mfn", "count"), ("errors", "sum"), ("uncorrected", "sum"), ("is_retired", "sum"),
            ("is_unretirable", "sum"), ("t0", "min"), ("t1", "max")]
    ren = ["frames", "errors", "uncorrected", "retired", "unretirable", "first_time", "last_time"]

    def rates(t: pa.Table) -> pa.Table:
        span = pc.divide(pc.subtract(t.column("last_time"), t.column("first_time")), DAY)
        span = pc.max_element_wise(pc.fill_null(span, 0.0), pa.scalar(1.0))
        t = t.append_column("span_days", span)
        t = t.append_column("errors_per_day", pc.divide(pc.cast(pc.add(t.column("errors"),
                                                                        t.column("uncorrected")),
                                                                 pa.float64()), span))
        t = t.append_column("retired_per_day", pc.divide(pc.cast(t.column("retired"), pa.float64()), span))
        return t.append_column("memory_retired_kib", pc.multiply(t.column("retired"), 4))

    def group(keys):
        g = f.group_by(keys).aggregate(aggs)
        names = list(keys) + ren
        g = g.select([*keys, *[f"{c}_{a}" for c, a in aggs]]).rename_columns(names)
        return rates(g)

    hosts = group(["host"])
    # hosts whose list holds no frame (or could not be read) are in the table too
    hr = hosts_read.select(["host", "path", "error", "events"])
    hosts = hr.join(hosts, "host", join_type="left outer").sort_by("host")
    for c in ("frames", "errors", "uncorrected", "retired", "unretirable", "memory_retired_kib"):
        hosts = hosts.set_column(hosts.schema.get_field_index(c), c,
                                 pc.fill_null(hosts.column(c), 0))
    dimms = group(["host", "dimm_name"])
    order = np.lexsort((-dimms.column("errors_per_day").to_numpy(zero_copy_only=False),
                        -dimms.column("unretirable").to_numpy(),
                        -dimms.column("uncorrected").to_numpy()))
    dimms = dimms.take(pa.array(order))
    dimms = dimms.append_column("rank", pa.array(np.arange(1, dimms.num_rows + 1)))
    unret = f.filter(is_unret).select(["host", "mfn", "state", "outcome", "detail", "dimm_name",
                                       "errors", "uncorrected"]).sort_by([("host", "ascending"),
                                                                          ("mfn", "ascending")])
    why = unret.group_by(["outcome"]).aggregate([("mfn", "count")]) \
               .rename_columns(["outcome", "frames"]).sort_by([("frames", "descending")])
    return {"frames": frames, "hosts": hosts, "dimms": dimms, "unretirable": unret,
            "unretirable_why": why}


def write_parquet(tables: dict, out: str | Path) -> list[Path]:
    import pyarrow.parquet as pq
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("hosts", "dimms", "unretirable", "frames"):
        p = out / f"{name}.parquet"
        pq.write_table(tables[name], p)
        paths.append(p)
    return paths


def summary(tables: dict, top: int = 10) -> dict:
    h, d = tables["hosts"], tables["dimms"]
    return {
        "hosts": h.num_rows,
        "unreadable": [r for r in h.select(["host", "error"]).to_pylist() if r["error"]],
        "frames": tables["frames"].num_rows,
        "retired": int(sum(x or 0 for x in h.column("retired").to_pylist())),
        "unretirable": tables["unretirable"].num_rows,
        "unretirable_why": tables["unretirable_why"].to_pylist(),
        "dimms_with_errors": d.num_rows,
        "replace_first": d.slice(0, top).select(["rank", "host", "dimm_name", "uncorrected",
                                                 "unretirable", "errors", "errors_per_day",
                                                 "frames", "retired"]).to_pylist(),
    }


# -- one host's list grouped by DIMM, bank and row (``ras-mc-ctl --summary``) ------------------

_STATES = ("retired", "pending", "failed", "accounted")


def _tally() -> dict:
    return {"corrected": 0, "uncorrected": 0, "frames": {s: 0 for s in _STATES}, "nframes": 0}


def _add(t: dict, f: dict) -> None:
    # the list counts corrected errors (``errors``) and uncorrected ones apart
    t["uncorrected"] += int(f.get("uncorrected") or 0)
    t["corrected"] += int(f.get("errors") or 0)
    st = str(f.get("state") or "")
    t["frames"][st] = t["frames"].get(st, 0) + 1
    t["nframes"] += 1


def dimm_summary(frames: list[dict]) -> list[dict]:
    """A retired-page list's frames (``Frame.to_json``: errors (corrected), uncorrected, state and the
    decoded ``location`` of their errors -- socketid, channel, dimm, rank, bankgroup,
    dram_bank, row as :mod:`.sources` decodes them) grouped as ``ras-mc-ctl --summary``
    groups rasdaemon's events: per DIMM (socket:channel:dimm), then per bank (rank,
    bankgroup, bank) and row.  DIMMs in location order; a frame whose location was not
    decoded counts under a DIMM of ``None`` fields (``location unknown``)."""
    dimms: dict[tuple, dict] = {}
    for f in frames:
        loc = f.get("location") or {}
        key = tuple(loc.get(k) for k in ("socketid", "channel", "dimm"))
        d = dimms.get(key)
        if d is None:
            d = dimms[key] = dict(_tally(), socket=key[0], channel=key[1], dimm=key[2], banks={})
        _add(d, f)
        bkey = tuple(loc.get(k) for k in ("rank", "bankgroup", "dram_bank"))
        if all(v is None for v in bkey):
            continue
        b = d["banks"].get(bkey)
        if b is None:
            b = d["banks"][bkey] = dict(_tally(), rank=bkey[0], bankgroup=bkey[1], bank=bkey[2], rows={})
        _add(b, f)
        row = loc.get("row")
        if row is not None:
            r = b["rows"].get(row)
            if r is None:
                r = b["rows"][row] = dict(_tally(), row=row)
            _add(r, f)

    def order(k: tuple) -> tuple:
        return tuple((v is None, v if v is not None else 0) for v in k)

    out = []
    for k in sorted(dimms, key=order):
        d = dimms[k]
        banks = []
        for bk in sorted(d["banks"], key=order):
            b = d["banks"][bk]
            b["rows"] = [b["rows"][r] for r in sorted(b["rows"])]
            banks.append(b)
        d["banks"] = banks
        d["label"] = (f"{k[0]}:{k[1]}:{k[2]}" if None not in k else
                      "location unknown" if all(v is None for v in k) else
                      ":".join("?" if v is None else str(v) for v in k))
        out.append(d)
    return out


def _counts(t: dict) -> str:
    fr = ", ".join(f"{n} {s}" for s, n in t["frames"].items() if n)
    return (f"{t['corrected']} corrected, {t['uncorrected']} uncorrected errors; "
            f"{t['nframes']} frame{'s' if t['nframes'] != 1 else ''}" + (f" ({fr})" if fr else ""))


def dimm_summary_lines(dimms: list[dict]) -> list[str]:
    """:func:`dimm_summary` as text, laid out like ``ras-mc-ctl --summary``'s memory section."""
    if not dimms:
        return ["No Memory errors."]
    lines = ["Memory controller events summary:"]
    for d in dimms:
        where = ("location unknown" if d["label"] == "location unknown" else
                 f"DIMM {d['label']} (socket:channel:dimm)")
        lines.append(f"\t{where}: {_counts(d)}")
        for b in d["banks"]:
            lines.append(f"\t\trank {b['rank']} bankgroup {b['bankgroup']} bank {b['bank']}: {_counts(b)}")
            for r in b["rows"]:
                lines.append(f"\t\t\trow {r['row']:#x}: {_counts(r)}")
    return lines
