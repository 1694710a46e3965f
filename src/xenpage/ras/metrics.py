"""The retired-page list as Prometheus metrics, in the text exposition format (version 0.0.4)
that node_exporter's textfile collector reads from ``*.prom`` files: written whole and
atomically (:func:`xenpage.statefiles.replace_durably`: a temporary file that the collector
ignores, renamed over the ``.prom``), 0644 so that node_exporter's own user can read it.

Everything comes from the store, so the figures survive restarts of the service; the
process's own counters (records read, actions, errors) are labelled as the service's.
"""

from __future__ import annotations

import math
from pathlib import Path

from .. import statefiles
from .inventory import dimm_summary

#: metric name -> (type, help)
METRICS = {
    "xenpage_retirement_enabled": ("gauge", "1 when page retirement is on (switch and policy)"),
    "xenpage_frames": ("gauge", "Frames in the retired-page list, by state (retired: offlined in "
                                "Xen; pending: offline-pending; failed: could not be retired; "
                                "accounted: counted, no action)"),
    "xenpage_memory_retired_bytes": ("gauge", "Memory withdrawn by retired frames"),
    "xenpage_frame_errors": ("gauge", "Memory errors recorded on the frames of the list, by type"),
    "xenpage_events": ("gauge", "Machine-check events stored, by kind"),
    "xenpage_quarantined_records": ("gauge", "Records the service could not use (kept aside)"),
    "xenpage_dimm_errors": ("gauge", "Memory errors on listed frames per DIMM, by type"),
    "xenpage_dimm_frames": ("gauge", "Listed frames per DIMM, by state"),
    "xenpage_service_records_total": ("counter", "Machine-check records read by this service "
                                                 "process since it started"),
    "xenpage_service_transitions_total": ("counter", "Frame state transitions made by this "
                                                     "service process"),
    "xenpage_service_errors_total": ("counter", "Retirement actions that failed in this "
                                                "service process"),
}


def _label(v) -> str:
    s = str(v)
    return s.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf")
    return repr(v) if isinstance(v, float) else str(int(v))


def exposition(status: dict, stats: dict | None = None) -> str:
    """The metrics text of :func:`xenpage.ras.service.status` (``frames``, ``counts``,
    ``events``, ``enabled``, ...) and, for the running service, its ``Stats``."""
    samples: dict[str, list[tuple[dict, float]]] = {k: [] for k in METRICS}
    samples["xenpage_retirement_enabled"].append(({}, 1 if status.get("enabled") else 0))
    for state, n in sorted(status["counts"].items()):
        samples["xenpage_frames"].append(({"state": state}, n))
    samples["xenpage_memory_retired_bytes"].append(({}, 4096 * status["counts"].get("retired", 0)))
    frames = status["frames"]
    samples["xenpage_frame_errors"] += [
        ({"type": "corrected"}, sum(int(f.get("errors") or 0) for f in frames)),
        ({"type": "uncorrected"}, sum(int(f.get("uncorrected") or 0) for f in frames))]
    for kind, n in sorted((status.get("events") or {}).items()):
        samples["xenpage_events"].append(({"kind": kind}, n))
    samples["xenpage_quarantined_records"].append(({}, len(status.get("quarantined") or [])))
    for d in dimm_summary(frames):
        lab = {"socket": "" if d["socket"] is None else d["socket"],
               "channel": "" if d["channel"] is None else d["channel"],
               "dimm": "" if d["dimm"] is None else d["dimm"]}
        samples["xenpage_dimm_errors"] += [(dict(lab, type="corrected"), d["corrected"]),
                                           (dict(lab, type="uncorrected"), d["uncorrected"])]
        for state, n in d["frames"].items():
            samples["xenpage_dimm_frames"].append((dict(lab, state=state), n))
    if stats is not None:
        samples["xenpage_service_records_total"].append(({}, stats.get("records", 0)))
        samples["xenpage_service_transitions_total"].append(({}, stats.get("transitions", 0)))
        samples["xenpage_service_errors_total"].append(({}, stats.get("errors", 0)))
    out = []
    for name, (typ, help_) in METRICS.items():
        if not samples[name]:
            continue
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {typ}")
        for labels, v in samples[name]:
            lab = ",".join(f'{k}="{_label(x)}"' for k, x in labels.items())
            out.append(f"{name}{{{lab}}} {_num(v)}" if lab else f"{name} {_num(v)}")
    return "\n".join(out) + "\n"


def write(path: str | Path, status: dict, stats: dict | None = None) -> None:
    """Write the metrics file atomically (0644: node_exporter runs as its own user)."""
    statefiles.replace_durably(path, exposition(status, stats), perm=0o644)
