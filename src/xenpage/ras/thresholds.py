"""Thresholds and actions, in the syntax operators already use.

* mcelog (``/etc/mcelog/mcelog.conf``, ``[page]`` section)::

      memory-ce-threshold = 2 / 24h     # capacity [k|m|g] / time [d|h|m]; no unit = seconds
      memory-ce-action = soft           # off | account | soft | hard | soft-then-hard

  parsed as mcelog's ``leaky-bucket.c`` ``parse_rate`` does (two ``sscanf`` patterns; ``s``
  is *not* a time unit there, zero capacity or time is an error).

* rasdaemon (``/etc/sysconfig/rasdaemon`` or the environment)::

      PAGE_CE_THRESHOLD=50              # [k|m]: x1000, x1000000
      PAGE_CE_REFRESH_CYCLE=24h         # [d|h|m|s]; no unit = hours
      PAGE_CE_ACTION=soft               # off | account | soft | hard | soft-then-hard
      ROW_CE_THRESHOLD=... ROW_CE_REFRESH_CYCLE=... ROW_CE_ACTION=...

  parsed as rasdaemon's ``ras-page-isolation.c`` does: a bad value falls back to the
  default with rasdaemon's message, and a row action other than ``off`` turns the page
  action off.

* xenpage's own keys (``[xenpage]`` section of the same file)::

      enabled = yes                     # the global off switch (also: xenpage retire-switch)
      row-ce-threshold = 4 / 24h        # mcelog syntax; row-ce-action = off|account|soft|...
      bank-ce-threshold = 64 / 24h      # bank-ce-action = ...
      unit-scope = seen                 # row/bank overflow retires the frames seen with
                                        # errors there (as rasdaemon) or `all` of the unit
      retry-initial = 60s   retry-max = 1d   soft-attempts = 3   max-retired = 0
      hvm = migrate                     # HVM/PVH frames: live migration | exchange (in place, stock hypercalls) | none
      pv-fallback = none                # PV frames left pending: none | migrate (the guest)

Mapped to Xen: ``soft`` is ``mem-offline`` (the frame is exchanged in a PV guest, an HVM guest is live-migrated off
it -- or its frame exchanged in place, ``hvm = exchange`` --, a free frame is offlined at once,
anything else stays pending);
``hard`` marks the frame broken through Xen's machine-check path on the simulator (its PV
owner is crashed, dom0 or an HVM owner gets a vMCE) and on real Xen retires it by every means
and keeps it as broken by policy, never faking a machine check (:mod:`.actions`);
``soft-then-hard`` tries soft first; ``account`` only
records that the threshold was crossed; ``off`` does not count.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path


class ThresholdError(ValueError):
    """A threshold or config value that cannot be used."""


class Action(str, Enum):
    OFF = "off"
    ACCOUNT = "account"
    SOFT = "soft"
    HARD = "hard"
    SOFT_THEN_HARD = "soft-then-hard"

    @classmethod
    def parse(cls, text: str) -> "Action":
        t = (text or "").strip().lower()
        for a in cls:
            if a.value == t:
                return a
        raise ThresholdError(f"unknown action {text!r} (off, account, soft, hard, soft-then-hard)")

    @property
    def acts(self) -> bool:
        return self in (Action.SOFT, Action.HARD, Action.SOFT_THEN_HARD)


_TUNITS = {"d": 86400, "h": 3600, "m": 60, "": 1}


@dataclass(frozen=True)
class Rate:
    """A leaky bucket's configuration (mcelog's ``struct bucket_conf``): overflow when
    ``capacity`` errors accumulate, ``capacity`` errors leak away every ``agetime`` s."""

    capacity: int
    agetime: int
    tunit: str = "h"

    def __str__(self) -> str:
        u = _TUNITS.get(self.tunit, 1)
        if self.agetime % u:
            return f"{self.capacity} / {self.agetime}"
        return f"{self.capacity} / {self.agetime // u}{self.tunit}"

    def to_json(self) -> dict:
        return {"capacity": self.capacity, "agetime_s": self.agetime, "text": str(self)}


# -- mcelog ---------------------------------------------------------------------------------

class _Scan:
    """Just enough of ``sscanf`` for mcelog's two rate patterns."""

    def __init__(self, s: str):
        self.s, self.i = s, 0

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i].isspace():
            self.i += 1

    def u(self) -> int | None:
        self.ws()
        m = re.compile(r"[+-]?\d+").match(self.s, self.i)
        if not m:
            return None
        self.i = m.end()
        return int(m.group()) % (1 << 32)

    def one(self) -> str | None:
        self.ws()
        if self.i >= len(self.s):
            return None
        c = self.s[self.i]
        self.i += 1
        return c

    def lit(self, c: str) -> bool:
        self.ws()
        if self.i < len(self.s) and self.s[self.i] == c:
            self.i += 1
            return True
        return False


def parse_mcelog_rate(text: str) -> Rate:
    """mcelog's ``parse_rate``: ``"%u %1s / %u %1s"``, else ``"%u / %u %1s"``."""
    sc = _Scan(text)
    n, cap, cunit, t, tunit = 0, None, "", None, ""
    cap = sc.u()
    if cap is not None:
        n += 1
        c = sc.one()
        if c is not None:
            n += 1
            cunit = c
            if sc.lit("/"):
                t = sc.u()
                if t is not None:
                    n += 1
                    c = sc.one()
                    if c is not None:
                        n += 1
                        tunit = c
    if n != 4:
        cunit, tunit = "", ""
        if n > 2:
            raise ThresholdError(f"bad rate {text!r}: expected 'count / time' (e.g. '2 / 24h')")
        sc = _Scan(text)
        cap = sc.u()
        ok = cap is not None and sc.lit("/")
        t = sc.u() if ok else None
        if t is None:
            raise ThresholdError(f"bad rate {text!r}: expected 'count / time' (e.g. '2 / 24h')")
        c = sc.one()
        tunit = c or ""
    if not t or not cap:
        raise ThresholdError(f"bad rate {text!r}: count and time must be non-zero")
    mult = {"g": 10 ** 9, "m": 10 ** 6, "k": 10 ** 3, "": 1}.get(cunit.lower())
    if mult is None:
        raise ThresholdError(f"bad rate {text!r}: count unit {cunit!r} is not k, m or g")
    tl = tunit.lower()
    if tl not in _TUNITS:
        hint = " (mcelog has no 's': give seconds without a unit)" if tl == "s" else ""
        raise ThresholdError(f"bad rate {text!r}: time unit {tunit!r} is not d, h or m{hint}")
    return Rate(cap * mult, t * _TUNITS[tl], tl)


# -- rasdaemon ------------------------------------------------------------------------------

#: rasdaemon's unit chains: a unit multiplies by its own factor and every later one
_THRESHOLD_UNITS = (("m", 1000), ("k", 1000), ("", 1))
_CYCLE_UNITS = (("d", 24), ("h", 60), ("m", 60), ("s", 1))
ULONG_MAX = (1 << 64) - 1


@dataclass(frozen=True)
class _Iso:
    name: str
    units: tuple
    default_value: int
    default_unit: str

    @property
    def base_unit(self) -> str:
        return self.units[-1][0]


PAGE_CE_THRESHOLD = _Iso("PAGE_CE_THRESHOLD", _THRESHOLD_UNITS, 50, "")
PAGE_CE_REFRESH_CYCLE = _Iso("PAGE_CE_REFRESH_CYCLE", _CYCLE_UNITS, 24 * 60 * 60, "h")
ROW_CE_THRESHOLD = _Iso("ROW_CE_THRESHOLD", _THRESHOLD_UNITS, 50, "")
ROW_CE_REFRESH_CYCLE = _Iso("ROW_CE_REFRESH_CYCLE", _CYCLE_UNITS, 24 * 60 * 60, "h")
RASDAEMON_KEYS = ("PAGE_CE_THRESHOLD", "PAGE_CE_REFRESH_CYCLE", "PAGE_CE_ACTION",
                  "ROW_CE_THRESHOLD", "ROW_CE_REFRESH_CYCLE", "ROW_CE_ACTION")


def parse_isolation_value(iso: _Iso, text: str | None) -> tuple[int, str | None]:
    """rasdaemon's ``parse_isolation_value`` + ``parse_isolation_env``: ``(value, message)``
    with the default value and rasdaemon's message when the text is unusable."""
    bad = (iso.default_value,
           f"Improper {iso.name}, set to default {iso.default_value}{iso.base_unit}.")
    if not text or not text[0].isdigit():
        return bad
    m = re.match(r"\d+", text)
    value = int(m.group())
    end = text[m.end():]
    if value > ULONG_MAX:
        return iso.default_value, (f"{iso.name} is set overflow({text}), set to default "
                                   f"{iso.default_value}{iso.base_unit}")
    if value == 0 or len(end) > 1:
        return bad
    suffix = end if end else iso.default_unit
    idx = next((i for i, (u, _) in enumerate(iso.units) if u == suffix.lower()), None)
    if idx is None:
        return bad
    for _, f in iso.units[idx:]:
        if f and value > ULONG_MAX // f:
            return iso.default_value, (f"{iso.name} is set overflow({text}), set to default "
                                       f"{iso.default_value}{iso.base_unit}")
        value *= f
    return value, None


def _rasdaemon_action(env: dict, key: str, default: Action) -> tuple[Action, str | None]:
    v = env.get(key)
    if v is not None:
        for a in Action:
            if a.value == v.strip().lower():
                return a, None
    return default, f"Improper {key}, set to default {default.value}"


# -- the policy -----------------------------------------------------------------------------

@dataclass
class Policy:
    #: the global off switch: no counting, no action (events are still recorded)
    enabled: bool = True
    page_action: Action = Action.SOFT
    page: Rate = Rate(2, 86400, "h")
    row_action: Action = Action.OFF
    row: Rate = Rate(4, 86400, "h")
    bank_action: Action = Action.OFF
    bank: Rate = Rate(64, 86400, "h")
    #: a row/bank overflow retires the frames seen with errors in it ("seen", as rasdaemon's
    #: row isolation) or every frame of the unit ("all"; needs the DRAM address map)
    unit_scope: str = "seen"
    #: pending frames are retried after retry_initial, doubling up to retry_max (seconds)
    retry_initial: float = 60.0
    retry_max: float = 86400.0
    #: soft-then-hard: go hard when soft fails outright or is still pending after this many tries
    soft_attempts: int = 3
    #: stop retiring (and say so) beyond this many frames; 0 = no limit
    max_retired: int = 0
    #: how soft retires an HVM guest's frame: live migration ("migrate", the toolstack's
    #: default), in place with stock hypercalls ("exchange"), or not at all ("none")
    hvm: str = "migrate"
    #: a PV frame left pending (granted, referenced elsewhere): live-migrate its guest
    #: ("migrate") or wait ("none")
    fallback: str = "none"
    #: where each setting came from, and rasdaemon/mcelog-style messages from parsing
    origin: dict = field(default_factory=dict)
    messages: list = field(default_factory=list)

    def describe(self) -> list[str]:
        out = [f"page retirement is {'on' if self.enabled else 'OFF (global switch)'}",
               f"Page offline choice on Corrected Errors is {self.page_action.value}"]
        if self.page_action != Action.OFF:
            out.append(f"Threshold of memory Corrected Errors is {self.page.capacity} / "
                       f"{self.page.agetime}s")
        if self.row_action != Action.OFF:
            out.append(f"Row offline choice on Corrected Errors is {self.row_action.value}, "
                       f"threshold {self.row.capacity} / {self.row.agetime}s")
        if self.bank_action != Action.OFF:
            out.append(f"Bank offline choice on Corrected Errors is {self.bank_action.value}, "
                       f"threshold {self.bank.capacity} / {self.bank.agetime}s")
        return out

    def to_json(self) -> dict:
        return {"enabled": self.enabled, "page_action": self.page_action.value,
                "page": self.page.to_json(), "row_action": self.row_action.value,
                "row": self.row.to_json(), "bank_action": self.bank_action.value,
                "bank": self.bank.to_json(), "unit_scope": self.unit_scope,
                "retry_initial_s": self.retry_initial, "retry_max_s": self.retry_max,
                "soft_attempts": self.soft_attempts, "max_retired": self.max_retired,
                "hvm": self.hvm, "fallback": self.fallback,
                "origin": dict(self.origin), "messages": list(self.messages)}

    @classmethod
    def named(cls, name: str) -> "Policy":
        """Ready-made policies, optionally with ``+`` modifiers (``first-error+hvm-exchange``,
        ``mcelog+pv-migrate``; ``hvm-migrate``, ``hvm-exchange``, ``hvm-none``,
        ``pv-migrate``, ``pv-wait``): ``first-error`` (retire on the first corrected error),
        ``mcelog`` (2 / 24h, the mcelog example), ``mcelog-default`` (10 / 24h),
        ``rasdaemon`` (50 / 24h), ``row`` (2 / 24h per frame, and every frame of a DRAM row
        with 2 errors in 24h), ``account`` (count only), ``off``."""
        base, *mods = name.split("+")
        p = cls()
        presets = {
            "first-error": dict(page=Rate(1, 86400, "h")),
            "mcelog": dict(page=Rate(2, 86400, "h")),
            "mcelog-default": dict(page=Rate(10, 86400, "h")),
            "rasdaemon": dict(page=Rate(50, 86400, "h")),
            "row": dict(page=Rate(2, 86400, "h"), row_action=Action.SOFT, row=Rate(2, 86400, "h"),
                        unit_scope="all"),
            "account": dict(page_action=Action.ACCOUNT),
            "off": dict(enabled=False),
        }
        if base not in presets:
            raise ThresholdError(f"unknown policy {name!r} ({', '.join(presets)})")
        p = replace(p, **presets[base], origin={"preset": name})
        for m in mods:
            if m.startswith("hvm-") and m[4:] in HVM_METHODS:
                p.hvm = m[4:]
            elif m in ("pv-migrate", "pv-wait"):
                p.fallback = "migrate" if m == "pv-migrate" else "none"
            else:
                raise ThresholdError(f"unknown policy modifier {m!r} (hvm-migrate, hvm-exchange, "
                                     "hvm-none, pv-migrate, pv-wait)")
        return p


HVM_METHODS = ("migrate", "exchange", "none")

_BOOL = {"yes": True, "on": True, "true": True, "1": True, "enable": True, "enabled": True,
         "no": False, "off": False, "false": False, "0": False, "disable": False, "disabled": False}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``6h``, ``1d`` -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdSMHD]?)\s*", text or "")
    if not m:
        raise ThresholdError(f"bad duration {text!r} (e.g. 60s, 15m, 6h, 1d)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2).lower()]


def parse_config(text: str, env: dict | None = None, base: Policy | None = None,
                 name: str = "config") -> Policy:
    """A policy from a config file mixing mcelog's ``[page]`` keys, rasdaemon's
    ``KEY=VALUE`` lines and xenpage's ``[xenpage]`` keys (see the module docstring), then
    rasdaemon keys from ``env`` (the environment, as rasdaemon reads them)."""
    p = replace(base or Policy(), origin=dict((base or Policy()).origin), messages=[])
    section = ""
    ras: dict[str, str] = {}
    for ln, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip().lower()
            continue
        m = re.fullmatch(r"(?:export\s+)?([A-Z][A-Z0-9_]*)\s*=\s*(.*)", line)
        if m and m.group(1) in RASDAEMON_KEYS:
            ras[m.group(1)] = m.group(2).strip().strip("'\"")
            continue
        if "=" not in line:
            raise ThresholdError(f"{name}:{ln}: expected 'key = value', got {raw.strip()!r}")
        key, value = (x.strip() for x in line.split("=", 1))
        key = key.lower()
        where = f"{name}:{ln}"
        try:
            _apply(p, section, key, value, where)
        except ThresholdError as e:
            raise ThresholdError(f"{where}: {e}") from None
    for k in RASDAEMON_KEYS:
        if env and k in env:
            ras[k] = env[k]
    if ras:
        apply_rasdaemon(p, ras, name)
    return p


def _apply(p: Policy, section: str, key: str, value: str, where: str) -> None:
    if section == "page" and key == "memory-ce-threshold":
        p.page = parse_mcelog_rate(value)
    elif section == "page" and key == "memory-ce-action":
        p.page_action = Action.parse(value)
    elif section == "page" and key in ("memory-ce-trigger", "memory-ce-log",
                                       "memory-ce-counter-replacement-threshold"):
        p.messages.append(f"{where}: mcelog's {key} is not used by xenpage (ignored)")
        return
    elif section == "xenpage" and key == "enabled":
        if value.lower() not in _BOOL:
            raise ThresholdError(f"enabled = {value!r}: say yes or no")
        p.enabled = _BOOL[value.lower()]
    elif section == "xenpage" and key in ("row-ce-threshold", "bank-ce-threshold"):
        setattr(p, key.split("-")[0], parse_mcelog_rate(value))
    elif section == "xenpage" and key in ("row-ce-action", "bank-ce-action"):
        setattr(p, key.split("-")[0] + "_action", Action.parse(value))
    elif section == "xenpage" and key == "unit-scope":
        if value not in ("seen", "all"):
            raise ThresholdError(f"unit-scope = {value!r}: seen or all")
        p.unit_scope = value
    elif section == "xenpage" and key in ("retry-initial", "retry-max"):
        setattr(p, key.replace("-", "_"), parse_duration(value))
    elif section == "xenpage" and key == "hvm":
        if value not in HVM_METHODS:
            raise ThresholdError(f"hvm = {value!r}: migrate, exchange or none")
        p.hvm = value
    elif section == "xenpage" and key == "pv-fallback":
        if value not in ("migrate", "none"):
            raise ThresholdError(f"pv-fallback = {value!r}: migrate or none")
        p.fallback = value
    elif section == "xenpage" and key in ("soft-attempts", "max-retired"):
        if not value.isdigit():
            raise ThresholdError(f"{key} = {value!r}: a whole number")
        setattr(p, key.replace("-", "_"), int(value))
    else:
        p.messages.append(f"{where}: unknown key {key!r} in [{section}] (ignored)")
        return
    p.origin[key] = where


def _rasdaemon_rate(env: dict, what: str, threshold, cycle, msgs: list) -> Rate:
    """``<what>_CE_THRESHOLD`` per ``<what>_CE_REFRESH_CYCLE`` (defaults and messages of
    rasdaemon's ``parse_isolation_env``)."""
    cap, m1 = parse_isolation_value(threshold, env.get(f"{what}_CE_THRESHOLD"))
    cyc, m2 = parse_isolation_value(cycle, env.get(f"{what}_CE_REFRESH_CYCLE"))
    msgs += [x for x in (m1, m2) if x]
    return Rate(cap, cyc, "s")


def apply_rasdaemon(p: Policy, env: dict, name: str = "environment") -> Policy:
    """rasdaemon's page (and row) isolation settings, with its defaults and messages."""
    msgs = p.messages
    p.page_action, m = _rasdaemon_action(env, "PAGE_CE_ACTION", Action.SOFT)
    if m:
        msgs.append(m)
    if p.page_action != Action.OFF:
        p.page = _rasdaemon_rate(env, "PAGE", PAGE_CE_THRESHOLD, PAGE_CE_REFRESH_CYCLE, msgs)
    if any(k.startswith("ROW_") for k in env):
        p.row_action, m = _rasdaemon_action(env, "ROW_CE_ACTION", Action.OFF)
        if m:
            msgs.append(m)
        if p.row_action != Action.OFF:
            p.row = _rasdaemon_rate(env, "ROW", ROW_CE_THRESHOLD, ROW_CE_REFRESH_CYCLE, msgs)
            msgs.append("row threshold is open, so turn off page threshold")
            p.page_action = Action.OFF
    for k in env:
        p.origin[k] = name
    return p


def load_policy(path: str | os.PathLike | None = None, env: dict | None = None,
                preset: str | None = None) -> Policy:
    """The service's policy: a preset (or the defaults), then the config file if any, then
    rasdaemon keys from ``env``."""
    base = Policy.named(preset) if preset else Policy()
    if path is None:
        if env and any(k in env for k in RASDAEMON_KEYS):
            p = replace(base, origin=dict(base.origin), messages=[])
            return apply_rasdaemon(p, {k: env[k] for k in RASDAEMON_KEYS if k in env})
        return base
    text = Path(path).read_text()
    return parse_config(text, env=env, base=base, name=str(path))
