"""Thresholds in mcelog's and rasdaemon's syntax, parsed as those tools parse them
(mcelog leaky-bucket.c ``parse_rate``; rasdaemon ras-page-isolation.c
``parse_isolation_value``), and xenpage's config file."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from xenpage.ras.thresholds import (PAGE_CE_REFRESH_CYCLE, PAGE_CE_THRESHOLD, Action, Policy,
                                    Rate, ThresholdError, apply_rasdaemon, load_policy,
                                    parse_config, parse_duration, parse_isolation_value,
                                    parse_mcelog_rate)


@pytest.mark.parametrize("text,cap,age", [
    ("2 / 24h", 2, 86400),
    ("10 / 24h", 10, 86400),          # mcelog.conf's default
    ("2/24h", 2, 86400),
    ("  2   /   24   h ", 2, 86400),
    ("2k / 1d", 2000, 86400),
    ("2 k/ 1d", 2000, 86400),
    ("3m / 2h", 3_000_000, 7200),
    ("1g / 1m", 10 ** 9, 60),
    ("2K / 24H", 2000, 86400),         # units are case-insensitive (tolower)
    ("5 / 60", 5, 60),                 # no unit: seconds
    ("1 / 1d", 1, 86400),
    ("7 / 90m", 7, 5400),
    ("4 / 24hours", 4, 86400),         # %1s reads one character: the rest is ignored
])
def test_mcelog_rate_valid(text, cap, age):
    r = parse_mcelog_rate(text)
    assert (r.capacity, r.agetime) == (cap, age)


@pytest.mark.parametrize("text", [
    "", "abc", "2", "2 /", "/ 24h",
    "0 / 24h", "2 / 0h",               # zero capacity or time
    "2 / 24s",                         # mcelog's timeconv has no 's'
    "2 / 24x", "2x / 24h",
    "2k / 24",                         # first pattern matched 3 fields: mcelog returns -1
])
def test_mcelog_rate_invalid(text):
    with pytest.raises(ThresholdError):
        parse_mcelog_rate(text)


def test_mcelog_rate_s_hint():
    with pytest.raises(ThresholdError, match="no 's'"):
        parse_mcelog_rate("2 / 30s")


@given(cap=st.integers(1, 10 ** 6), t=st.integers(1, 10 ** 4), unit=st.sampled_from(["", "m", "h", "d"]))
def test_mcelog_rate_str_roundtrip(cap, t, unit):
    r = parse_mcelog_rate(f"{cap} / {t}{unit}")
    assert parse_mcelog_rate(str(r)) == r


@pytest.mark.parametrize("text,value,msg", [
    ("50", 50, None),
    ("1k", 1000, None),
    ("1K", 1000, None),
    ("2m", 2_000_000, None),           # m: x1000 x1000 (the unit chain)
    ("0", 50, "Improper PAGE_CE_THRESHOLD, set to default 50."),
    ("", 50, "Improper PAGE_CE_THRESHOLD, set to default 50."),
    (None, 50, "Improper PAGE_CE_THRESHOLD, set to default 50."),
    ("k1", 50, "Improper PAGE_CE_THRESHOLD, set to default 50."),
    ("1kk", 50, "Improper PAGE_CE_THRESHOLD, set to default 50."),
    ("1x", 50, "Improper PAGE_CE_THRESHOLD, set to default 50."),
    ("99999999999999999999999", 50, "PAGE_CE_THRESHOLD is set overflow(99999999999999999999999), set to default 50"),
    ("18446744073709551615m", 50, "PAGE_CE_THRESHOLD is set overflow(18446744073709551615m), set to default 50"),
])
def test_rasdaemon_threshold(text, value, msg):
    assert parse_isolation_value(PAGE_CE_THRESHOLD, text) == (value, msg)


@pytest.mark.parametrize("text,value", [
    ("24h", 86400), ("24", 86400),    # default unit: hours
    ("1d", 86400), ("90m", 5400), ("30s", 30), ("2D", 172800),
])
def test_rasdaemon_cycle(text, value):
    assert parse_isolation_value(PAGE_CE_REFRESH_CYCLE, text) == (value, None)


def test_rasdaemon_cycle_bad_uses_default_in_seconds():
    assert parse_isolation_value(PAGE_CE_REFRESH_CYCLE, "1w") == (
        86400, "Improper PAGE_CE_REFRESH_CYCLE, set to default 86400s.")


def test_rasdaemon_env_keys():
    p = apply_rasdaemon(Policy(), {"PAGE_CE_THRESHOLD": "50", "PAGE_CE_REFRESH_CYCLE": "24h",
                                   "PAGE_CE_ACTION": "soft-then-hard"})
    assert p.page == Rate(50, 86400, "s") and p.page_action == Action.SOFT_THEN_HARD
    assert p.messages == []


def test_rasdaemon_bad_action_defaults_to_soft():
    p = apply_rasdaemon(Policy(), {"PAGE_CE_ACTION": "explode", "PAGE_CE_THRESHOLD": "3"})
    assert p.page_action == Action.SOFT
    assert "Improper PAGE_CE_ACTION, set to default soft" in p.messages


def test_rasdaemon_off_skips_thresholds():
    p = apply_rasdaemon(Policy(), {"PAGE_CE_ACTION": "off", "PAGE_CE_THRESHOLD": "garbage"})
    assert p.page_action == Action.OFF and p.messages == []


def test_rasdaemon_row_turns_page_off():
    p = apply_rasdaemon(Policy(), {"ROW_CE_ACTION": "soft", "ROW_CE_THRESHOLD": "3",
                                   "ROW_CE_REFRESH_CYCLE": "1h", "PAGE_CE_ACTION": "soft"})
    assert p.row_action == Action.SOFT and p.row == Rate(3, 3600, "s")
    assert p.page_action == Action.OFF
    assert "row threshold is open, so turn off page threshold" in p.messages


CONFIG = """
# mcelog.conf style
[page]
memory-ce-threshold = 3 / 12h
memory-ce-action = soft-then-hard
memory-ce-trigger = page-error-trigger   # not used

[xenpage]
enabled = yes
row-ce-threshold = 5 / 1d
row-ce-action = account
unit-scope = all
retry-initial = 30s
retry-max = 6h
soft-attempts = 5
max-retired = 1000
hvm = exchange
pv-fallback = migrate
"""


def test_config_file_mcelog_and_xenpage_keys():
    p = parse_config(CONFIG, name="retired.conf")
    assert p.page == Rate(3, 43200, "h") and p.page_action == Action.SOFT_THEN_HARD
    assert p.row == Rate(5, 86400, "d") and p.row_action == Action.ACCOUNT
    assert p.unit_scope == "all" and p.retry_initial == 30 and p.retry_max == 6 * 3600
    assert p.soft_attempts == 5 and p.max_retired == 1000 and p.enabled
    assert p.hvm == "exchange" and p.fallback == "migrate"
    assert p.origin["memory-ce-threshold"] == "retired.conf:4"
    assert any("memory-ce-trigger" in m for m in p.messages)


def test_config_rasdaemon_lines_and_env_override():
    p = parse_config("PAGE_CE_THRESHOLD=7\nPAGE_CE_ACTION=account\n",
                     env={"PAGE_CE_THRESHOLD": "9"})
    assert p.page.capacity == 9 and p.page_action == Action.ACCOUNT


def test_config_global_off_switch():
    assert parse_config("[xenpage]\nenabled = no\n").enabled is False


@pytest.mark.parametrize("text,where", [
    ("[page]\nmemory-ce-threshold = 2 / 24s\n", "cfg:2"),
    ("[page]\nmemory-ce-action = maybe\n", "cfg:2"),
    ("[xenpage]\nenabled = perhaps\n", "cfg:2"),
    ("just words\n", "cfg:1"),
])
def test_config_errors_name_the_line(text, where):
    with pytest.raises(ThresholdError, match=where):
        parse_config(text, name="cfg")


def test_preset_modifiers():
    p = Policy.named("first-error+hvm-exchange+pv-migrate")
    assert (p.page.capacity, p.hvm, p.fallback) == (1, "exchange", "migrate")
    assert Policy.named("mcelog+hvm-none").hvm == "none"
    with pytest.raises(ThresholdError):
        Policy.named("mcelog+warp-drive")


def test_load_policy_presets_and_file(tmp_path):
    assert load_policy(preset="first-error").page.capacity == 1
    assert load_policy(preset="rasdaemon").page.capacity == 50
    assert load_policy(preset="off").enabled is False
    f = tmp_path / "r.conf"
    f.write_text("[page]\nmemory-ce-threshold = 4 / 1h\n")
    assert load_policy(f, preset="first-error").page == Rate(4, 3600, "h")
    with pytest.raises(ThresholdError):
        load_policy(preset="nonsense")
    p = load_policy(env={"PAGE_CE_THRESHOLD": "1k"})
    assert p.page.capacity == 1000


@pytest.mark.parametrize("text,s", [("90", 90), ("90s", 90), ("15m", 900), ("6h", 21600), ("1d", 86400)])
def test_durations(text, s):
    assert parse_duration(text) == s


def test_policy_describe_is_rasdaemon_like():
    lines = Policy().describe()
    assert "Page offline choice on Corrected Errors is soft" in lines
    assert "Threshold of memory Corrected Errors is 2 / 86400s" in lines
