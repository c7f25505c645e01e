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
    """An inventory of two days: alice twice from 10.0.0.5, bob once, carol failing once."""
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
        "users": 3,
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
    users = {row["name"]: row for row in data["users"]}
    assert set(users) == {"alice", "bob", "carol"}
    assert (users["carol"]["logins_failed"], users["carol"]["phase"]) == (1, "warn")
    assert users["alice"]["last_peer"] == "10.0.0.5"
    assert data["totals"] == [
        {"day": "2026-03-01", "clients": 2, "users": 2, "sessions": 2},
        {"day": "2026-03-02", "clients": 2, "users": 2, "sessions": 2},
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
    assert kinds == ["client"] * 3 + ["user"] * 3 + ["day"] * 2
    by_name = {(row["kind"], row["name"]): row for row in rows}
    five = by_name["client", "10.0.0.5"]
    assert (five["sessions"], five["phase"], five["upcoming"]) == (
        "2",
        "warn",
        "deny from 2099-03-01",
    )
    assert five["fingerprints"] == "CAPA,USER,PASS (1); USER,PASS (1)"
    carol = by_name["user", "carol"]
    assert (carol["logins_ok"], carol["logins_failed"], carol["last_peer"]) == (
        "0",
        "1",
        "10.0.0.7",
    )
    day = by_name["day", "2026-03-02"]
    assert (day["clients"], day["users"], day["sessions"]) == ("2", "2", "2")


def test_table(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = report(capsys, state_dir)
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith("Plaintext POP3 clients: 3 addresses, 3 users, 4 sessions")
    assert "Clients still on plaintext:" in lines
    assert "Users still on plaintext:" in lines
    assert "Totals per day:" in lines
    five = next(line for line in lines if line.startswith("10.0.0.5 "))
    assert "warn, deny from 2099-03-01" in five
    assert "2026-03-02T07:00:00Z" in five
    assert "CAPA,USER,PASS (1); USER,PASS (1)" in five
    total = next(line for line in lines if line.startswith("2026-03-01 "))
    assert total.split() == ["2026-03-01", "2", "2", "2"]
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
