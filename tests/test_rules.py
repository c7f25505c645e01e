"""Enforcement phase rules: parsing, matching, dates, dry run, and the Policy verdicts."""

from __future__ import annotations

import datetime as dt
import ipaddress
import tomllib
from pathlib import Path

import pytest

from pop3proxy.config import ConfigError, load_settings
from pop3proxy.migration.pseudonym import (
    Pseudonymizer,
    parse_pseudonym_key,
    parse_pseudonym_key_file,
)
from pop3proxy.migration.rules import (
    DEFAULT_DENY_MESSAGE,
    Rule,
    RuleSet,
    parse_rules,
)
from pop3proxy.policy import ALLOW, Policy

A = ipaddress.ip_address("10.1.2.3")
B = ipaddress.ip_address("192.168.5.6")
V6 = ipaddress.ip_address("fd00::5")
BEFORE = dt.datetime(2027, 2, 28, 23, 59, tzinfo=dt.UTC)
AFTER = dt.datetime(2027, 3, 1, 0, 0, tzinfo=dt.UTC)


def toml_rules(text: str) -> RuleSet:
    return RuleSet(parse_rules(tomllib.loads(text)["rules"]))


def test_ruleset_is_a_policy() -> None:
    policy: Policy = RuleSet()
    assert policy.on_connect(A, AFTER) is ALLOW
    assert policy.on_login(A, "alice", AFTER) is ALLOW


def test_network_deny_decides_at_connect_with_sys_perm_and_port_995() -> None:
    rules = toml_rules('[[rules]]\nname = "lan"\nnetworks = ["10.0.0.0/8"]\nphase = "deny"\n')
    verdict = rules.on_connect(A, AFTER)
    assert verdict.action == "deny"
    assert verdict.rule == "lan"
    assert verdict.reply is not None
    assert verdict.reply.startswith(b"-ERR [SYS/PERM] ")
    assert verdict.reply.endswith(b"\r\n")
    assert b"995" in verdict.reply
    assert b"TLS" in verdict.reply
    assert DEFAULT_DENY_MESSAGE.encode() in verdict.reply
    assert rules.on_connect(B, AFTER).action == "allow"
    assert rules.on_connect(V6, AFTER).action == "allow"
    assert rules.on_login(A, "anyone", AFTER).action == "deny"


def test_warn_carries_the_notice() -> None:
    rules = toml_rules(
        '[[rules]]\nnetworks = ["192.168.0.0/16"]\nphase = "warn"\n'
        'notice = "Please switch to port 995 (TLS) before March"\n'
    )
    verdict = rules.on_connect(B, AFTER)
    assert verdict.action == "warn"
    assert verdict.notice == "Please switch to port 995 (TLS) before March"
    assert verdict.rule == "rule-1"
    assert verdict.reply is None
    assert rules.on_connect(A, AFTER).action == "allow"


def test_explicit_allow_shadows_later_rules() -> None:
    rules = toml_rules(
        '[[rules]]\nname = "printer"\nnetworks = ["10.1.2.3/32"]\nphase = "allow"\n'
        '[[rules]]\nname = "everyone"\nphase = "deny"\n'
    )
    first = rules.on_connect(A, AFTER)
    assert (first.action, first.rule) == ("allow", "printer")
    assert rules.on_connect(B, AFTER).action == "deny"


def test_date_rule_is_not_in_force_before_its_date() -> None:
    rules = toml_rules(
        '[[rules]]\nname = "cutoff"\nnetworks = ["10.0.0.0/8"]\nphase = "deny"\n'
        "from = 2027-03-01\n"
        '[[rules]]\nname = "nag"\nnetworks = ["10.0.0.0/8"]\nphase = "warn"\n'
    )
    before = rules.on_connect(A, BEFORE)
    assert (before.action, before.rule) == ("warn", "nag")
    after = rules.on_connect(A, AFTER)
    assert (after.action, after.rule) == ("deny", "cutoff")
    # Naive datetimes are read as UTC.
    assert rules.on_connect(A, BEFORE.replace(tzinfo=None)).action == "warn"
    # Other offsets compare as instants: 00:30 in Berlin is still February in UTC.
    berlin = dt.timezone(dt.timedelta(hours=1))
    assert rules.on_connect(A, dt.datetime(2027, 3, 1, 0, 30, tzinfo=berlin)).action == "warn"


def test_date_time_with_offset_and_string_forms() -> None:
    (rule,) = parse_rules(["phase=deny from=2027-03-01T08:00:00+01:00"])
    assert rule.starts == dt.datetime(2027, 3, 1, 7, 0, tzinfo=dt.UTC)
    table = tomllib.loads("[[rules]]\nphase='deny'\nfrom=2027-03-01T07:00:00Z")
    (toml_rule,) = parse_rules(table["rules"])
    assert toml_rule.starts == rule.starts
    assert not rule.in_force(dt.datetime(2027, 3, 1, 6, 59, tzinfo=dt.UTC))
    assert rule.in_force(dt.datetime(2027, 3, 1, 7, 0, tzinfo=dt.UTC))


def test_user_rule_leaves_connect_undecided_then_decides_at_login() -> None:
    rules = toml_rules(
        '[[rules]]\nname = "boss"\nusers = ["ceo@*"]\nphase = "allow"\n'
        '[[rules]]\nname = "rest"\nphase = "deny"\n'
    )
    assert rules.on_connect(A, AFTER).action == "allow"
    assert rules.on_login(A, "CEO@example.com", AFTER).rule == "boss"
    denied = rules.on_login(A, "clerk@example.com", AFTER)
    assert (denied.action, denied.rule) == ("deny", "rest")


def test_network_and_user_both_must_match() -> None:
    rules = toml_rules(
        '[[rules]]\nname = "old-scanners"\nnetworks = ["10.0.0.0/8"]\n'
        'users = ["scan-*", "fax"]\nphase = "deny"\n'
    )
    assert rules.on_login(A, "scan-3", AFTER).action == "deny"
    assert rules.on_login(A, "FAX", AFTER).action == "deny"
    assert rules.on_login(B, "scan-3", AFTER).action == "allow"
    assert rules.on_login(A, "alice", AFTER).action == "allow"


def test_dry_run_turns_deny_into_a_logged_would_deny() -> None:
    parsed = parse_rules(["name=cut phase=deny networks=10.0.0.0/8 notice='moving soon'"])
    verdict = RuleSet(parsed, dry_run=True).on_connect(A, AFTER)
    assert verdict.action == "warn"
    assert verdict.dry_run
    assert verdict.rule == "cut"
    assert verdict.notice == "moving soon"
    assert verdict.reply is None
    # Only deny is affected; warn stays a plain warn.
    warn = RuleSet(parse_rules(["phase=warn"]), dry_run=True).on_connect(A, AFTER)
    assert (warn.action, warn.dry_run) == ("warn", False)
    # Per-rule dry run.
    per_rule = RuleSet(parse_rules(["phase=deny dry_run=true"])).on_connect(B, AFTER)
    assert (per_rule.action, per_rule.dry_run) == ("warn", True)


def test_custom_deny_message() -> None:
    rules = RuleSet(parse_rules(["deny message='Use pop.example.com port 995 with SSL'"]))
    verdict = rules.on_connect(A, AFTER)
    assert verdict.reply == b"-ERR [SYS/PERM] Use pop.example.com port 995 with SSL\r\n"


def test_ipv6_rules_do_not_match_ipv4_and_back() -> None:
    rules = RuleSet(parse_rules(["deny networks=fd00::/8", "warn networks=0.0.0.0/0"]))
    assert rules.on_connect(V6, AFTER).action == "deny"
    assert rules.on_connect(A, AFTER).action == "warn"


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (["phase=block"], "rule 1: phase must be one of allow, warn, deny"),
        (["phase=deny networks=10.0.0.300/8"], "not a network"),
        (["phase=deny from=next-week"], "is not a date"),
        (["phase=deny netwrks=10.0.0.0/8"], 'did you mean "networks"'),
        (["phase=warn notice='two\nlines'"], "one line"),
        (["name=x phase=warn", "name=x phase=deny"], "used twice"),
        (["phase=deny dry_run=maybe"], "true or false"),
        ([{"phase": "deny", "users": [3]}], "strings"),
        (42, "array of tables"),
        (["allow stray"], "not key=value"),
    ],
)
def test_bad_rules_are_reported(raw: object, problem: str) -> None:
    with pytest.raises(ValueError, match=r"rule|array") as info:
        parse_rules(raw)
    assert problem in str(info.value)


def test_env_form_separates_rules_with_semicolons() -> None:
    rules = parse_rules("name=a phase=warn networks=10.0.0.0/8; name=b phase=deny")
    assert [r.name for r in rules] == ["a", "b"]
    assert rules[0].networks == (ipaddress.ip_network("10.0.0.0/8"),)


def test_rules_from_toml_config_file_and_reload(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(
        'dry_run = true\n[[rules]]\nname = "cut"\nnetworks = ["10.0.0.0/8"]\nphase = "deny"\n',
        encoding="utf-8",
    )
    settings = load_settings({"config": str(config)}, environ={})
    first = RuleSet.from_settings(settings)
    assert first.dry_run
    assert first.on_connect(A, AFTER).dry_run
    config.write_text(
        '[[rules]]\nname = "cut"\nnetworks = ["10.0.0.0/8"]\nphase = "deny"\n', encoding="utf-8"
    )
    second = RuleSet.from_settings(load_settings({"config": str(config)}, environ={}))
    assert second.on_connect(A, AFTER).action == "deny"
    assert first.on_connect(A, AFTER).action == "warn"  # the old set is unchanged


def test_bad_rule_in_config_is_one_line_config_error(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text('[[rules]]\nphase = "later"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings({"config": str(config)}, environ={})
    message = str(info.value)
    assert "--rules" in message
    assert "phase must be one of" in message
    assert "\n" not in message


def test_rules_and_dry_run_from_environment() -> None:
    settings = load_settings(
        {}, environ={"POP3PROXY_RULES": "deny networks=10.0.0.0/8", "POP3PROXY_DRY_RUN": "yes"}
    )
    assert settings.dry_run
    assert settings.rules[0].phase == "deny"


def test_classify_shows_phase_and_what_is_scheduled() -> None:
    rules = toml_rules(
        '[[rules]]\nname = "cutoff"\nnetworks = ["10.0.0.0/8"]\nphase = "deny"\n'
        "from = 2027-03-01\n"
        '[[rules]]\nname = "nag"\nnetworks = ["10.0.0.0/8"]\nphase = "warn"\n'
        '[[rules]]\nname = "vip"\nusers = ["boss"]\nphase = "allow"\n'
    )
    now = rules.classify(A, None, BEFORE)
    assert (now.phase, now.rule, now.upcoming) == ("warn", "nag", "deny from 2027-03-01")
    later = rules.classify(A, None, AFTER)
    assert (later.phase, later.rule, later.upcoming) == ("deny", "cutoff", None)
    assert rules.classify(B, None, AFTER).phase == "allow"
    assert rules.classify(B, "boss", AFTER).rule == "vip"
    assert rules.classify(None, "boss", AFTER).rule == "vip"


def test_rule_describe() -> None:
    rule = Rule(
        "x",
        "deny",
        networks=(ipaddress.ip_network("10.0.0.0/8"),),
        users=("*@old",),
        starts=AFTER,
    )
    assert rule.describe() == "deny from 2027-03-01 (net 10.0.0.0/8; users *@old)"


# -- pseudonyms ---------------------------------------------------------------------------------


def test_pseudonyms_are_keyed_stable_and_never_skip_a_name() -> None:
    one = Pseudonymizer(b"k" * 16)
    other = Pseudonymizer(b"j" * 16)
    name = one.pseudonym("alice")
    assert name == one.pseudonym("alice")
    assert name != one.pseudonym("bob")
    assert name != other.pseudonym("alice")
    assert name.startswith("u-")
    assert len(name) == 26
    assert "alice" not in name
    # A name that looks like a pseudonym is pseudonymised too (no USER <pseudonym> spoofing).
    assert one.user(name) == one.pseudonym(name) != name
    assert one.user(None) is None


def test_pseudonym_event_fields() -> None:
    p = Pseudonymizer(b"k" * 16)
    login = p.event_fields("pop3.login", {"user": "alice", "mechanism": "USER"})
    assert login == {"user": p.pseudonym("alice"), "mechanism": "USER"}
    command = p.event_fields("pop3.command", {"verb": "USER", "args": ["alice"]})
    assert command["args"] == [p.pseudonym("alice")]
    apop = p.event_fields("pop3.command", {"verb": "APOP", "args": ["bob", "***"]})
    assert apop["args"] == [p.pseudonym("bob"), "***"]
    other = {"verb": "RETR", "args": ["1"]}
    assert p.event_fields("pop3.command", other) is other


def test_pseudonym_key_from_file_or_value(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(b"0123456789abcdef0123\n")
    from_file = parse_pseudonym_key_file(str(key_file))
    assert from_file.value == b"0123456789abcdef0123"
    assert "0123456789" not in repr(from_file)
    assert parse_pseudonym_key("an inline key of enough length").source == "environment"
    with pytest.raises(ValueError, match="shorter than 16"):
        parse_pseudonym_key("short")
    with pytest.raises(ValueError, match="looks like a file name"):
        parse_pseudonym_key(str(key_file))  # a file name is not taken as the key
    key_file.write_bytes(b"tiny")
    with pytest.raises(ValueError, match="fewer than 16"):
        parse_pseudonym_key_file(str(key_file))


def test_an_unreadable_user_name_fails_closed_only_where_a_deny_rule_needs_it() -> None:
    rules = toml_rules(
        """
        [[rules]]
        name = "ceo warned"
        users = ["ceo@*"]
        phase = "warn"
        [[rules]]
        name = "scanners off"
        networks = ["10.0.0.0/8"]
        users = ["scan-*"]
        phase = "deny"
        [[rules]]
        name = "rest warned"
        phase = "warn"
        """
    )
    refused = rules.on_login(A, None, AFTER)
    assert (refused.action, refused.reason, refused.rule) == (
        "deny",
        "user_unknown",
        "scanners off",
    )
    assert refused.reply is not None
    assert b"does not show the user name" in refused.reply
    # Outside the deny rule's networks, rules that need the name are passed over.
    assert (rules.on_login(B, None, AFTER).rule, rules.on_login(B, None, AFTER).action) == (
        "rest warned",
        "warn",
    )
    dry = RuleSet(rules.rules, dry_run=True).on_login(A, None, AFTER)
    assert (dry.action, dry.dry_run, dry.reason) == ("warn", True, "user_unknown")
