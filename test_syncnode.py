"""Tests for syncnode, black box over WSGI unless a promise needs the database or a real server.

Areas, each behind a banner: accounts, sessions, passwords and reset, throttling, store,
permissions, health, errors and routing, secrets, embedding, real server, CLI, properties.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import http.client
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from typing import NoReturn

import argon2
import pytest
import waitress.server
import webtest
from waitress import wasyncore

import syncnode

PASSWORD = "correct horse"

#: Argon2 parameters that make a hash take well under a millisecond.
CHEAP_HASHING = {"argon2_time_cost": 1, "argon2_memory_cost": 8, "argon2_parallelism": 1}


# ==================================================================================================
# Fixtures
# ==================================================================================================


class FakeClock:
    """A clock the tests move by hand, so that nothing sleeps."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path) -> str:
    return str(tmp_path / "syncnode.db")


@pytest.fixture
def make_app(db_path, clock):
    """Build apps on the test's database (or another path) with cheap hashing and the fake clock."""
    apps = []

    def make(database: str | None = None, **settings):
        app = syncnode.create_app(database or db_path, clock=clock, **{**CHEAP_HASHING, **settings})
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app) -> webtest.TestApp:
    return webtest.TestApp(app)


@pytest.fixture
def db(db_path):
    """A second connection to the test's database, for promises HTTP cannot show."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    yield conn
    conn.close()


class User:
    """A registered user: its id, session token and the headers that carry the token."""

    def __init__(self, name: str, token: str) -> None:
        self.name = name
        self.token = token
        self.headers = {"Authorization": f"Bearer {token}"}


@pytest.fixture
def make_user(client):
    """Register a user through the API and return it."""

    def make(name: str = "alice", password: str = PASSWORD) -> User:
        response = client.post_json("/account", {"id": name, "password": password})
        return User(name, response.json["token"])

    return make


@pytest.fixture
def user(make_user) -> User:
    return make_user("alice")


@pytest.fixture
def other(make_user) -> User:
    return make_user("bob")


def quote(key: str) -> str:
    """Percent-encode a key for a URL path, leaving slashes and existing escapes as they are."""
    return urllib.parse.quote(key, safe="/%")


def put(client, user: User, key: str, value: bytes = b"v", token: str | None = None, **kw):
    """PUT a value as the user, with X-Sync-Token when given; return the response."""
    headers = dict(user.headers)
    if token is not None:
        headers["X-Sync-Token"] = token
    headers.update(kw.pop("headers", {}))
    return client.put(f"/store/{quote(key)}", value, headers=headers, **kw)


def share(client, owner: User, key: str, grants: dict[str, str], **kw):
    """Grant permissions on a key as its owner; return the response."""
    body = [{"user": name, "permission": level} for name, level in grants.items()]
    return client.put_json(f"/permission/{quote(key)}", body, headers=owner.headers, **kw)


def assert_error(response, status: int, code: str) -> None:
    """Assert a contract error answer: status, JSON type, code and a message sentence."""
    assert response.status_int == status
    assert response.content_type == "application/json"
    assert response.json["code"] == code
    assert isinstance(response.json["message"], str) and response.json["message"]
    if code == "AUTH01":
        assert response.headers["WWW-Authenticate"] == "Bearer"


def table_counts(db) -> dict[str, int]:
    """Count the rows of every table, to show that a refused request changed nothing."""
    tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return {table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in tables}


def snapshot(db) -> dict[str, list]:
    """Every row of the data tables, for before/after comparisons."""
    return {
        "users": db.execute("SELECT id, name, password_hash FROM users ORDER BY id").fetchall(),
        "sessions": db.execute(
            "SELECT id, user_id, expires_ms FROM sessions ORDER BY id"
        ).fetchall(),
        "items": db.execute("SELECT key, token, meta, value FROM items ORDER BY key").fetchall(),
        "permissions": db.execute(
            "SELECT item_id, user_id, level FROM permissions ORDER BY item_id, user_id"
        ).fetchall(),
        "reset_tokens": db.execute("SELECT user_id, expires_ms FROM reset_tokens").fetchall(),
    }


# ==================================================================================================
# Accounts
# ==================================================================================================


def test_account_register_answers_token_and_expiration(client, clock, db):
    response = client.post_json("/account", {"id": "alice", "password": PASSWORD})
    assert response.status_int == 200
    assert response.content_type == "application/json"
    body = response.json
    assert set(body) == {"token", "expiration"}
    assert len(body["token"]) >= 43  # 256 bits of URL-safe base64
    assert body["expiration"] == int(clock.now * 1000) + 30 * 86400 * 1000
    assert db.execute("SELECT name FROM users").fetchall() == [("alice",)]


def test_account_register_normalises_the_id(client, db):
    client.post_json("/account", {"id": "  ＡＬＩＣＥ@Example.ORG ", "password": PASSWORD})
    assert db.execute("SELECT name FROM users").fetchall() == [("alice@example.org",)]
    response = client.post_json("/auth", {"id": "Alice@example.org", "password": PASSWORD})
    assert response.status_int == 200


def test_account_register_taken_id_is_acct03(client, user, db):
    before = snapshot(db)
    response = client.post_json("/account", {"id": " ALICE", "password": PASSWORD}, status=409)
    assert_error(response, 409, "ACCT03")
    assert snapshot(db) == before


@pytest.mark.parametrize(
    "body",
    [
        {"id": "", "password": PASSWORD},
        {"id": "   ", "password": PASSWORD},
        {"id": "a b", "password": PASSWORD},
        {"id": "a\u00a0b", "password": PASSWORD},
        {"id": "a\x00b", "password": PASSWORD},
        {"id": "a\x85b", "password": PASSWORD},
        {"id": "x" * 255, "password": PASSWORD},
        {"id": "alice", "password": "short"},
        {"id": "alice", "password": "1234567"},
        {"id": "alice", "password": "p" * 1025},
        {"id": "alice"},
        {"password": PASSWORD},
        {"id": 5, "password": PASSWORD},
        {"id": "alice", "password": None},
        ["alice", PASSWORD],
        "alice",
        None,
    ],
    ids=[
        "empty-id", "blank-id", "space", "nbsp", "nul", "c1-control", "id-255-chars",
        "password-5", "password-7", "password-1025", "no-password", "no-id", "id-number",
        "password-null", "array", "string", "null",
    ],
)  # fmt: skip
def test_account_register_bad_credentials_are_acct02(client, db, body):
    response = client.post("/account", json.dumps(body), status=400)
    assert_error(response, 400, "ACCT02")
    assert table_counts(db)["users"] == 0


@pytest.mark.parametrize(
    "raw", [b"{", b"not json", b"\xff\xfe", b""], ids=["cut", "text", "bytes", "empty"]
)
def test_account_register_malformed_json_is_acct02(client, db, raw):
    response = client.post("/account", raw, status=400)
    assert_error(response, 400, "ACCT02")
    assert table_counts(db)["users"] == 0


def test_account_register_edge_lengths_are_accepted(client, db):
    client.post_json("/account", {"id": "x" * 254, "password": "p" * 8})
    client.post_json("/account", {"id": "y", "password": "p" * 1024})
    assert table_counts(db)["users"] == 2


def test_account_register_non_ascii_id_and_password(client):
    client.post_json("/account", {"id": "zoë@exämple.org", "password": "pässwörd✓"})
    response = client.post_json("/auth", {"id": "ZOË@EXÄMPLE.ORG", "password": "pässwörd✓"})
    assert response.status_int == 200


def test_account_register_closed_is_acct01(make_app, db):
    client = webtest.TestApp(make_app(registration="closed"))
    response = client.post_json("/account", {"id": "alice", "password": PASSWORD}, status=403)
    assert_error(response, 403, "ACCT01")
    assert table_counts(db)["users"] == 0


def test_account_register_low_disk_is_disk01(make_app, db):
    client = webtest.TestApp(make_app(min_free_bytes=2**62))
    response = client.post_json("/account", {"id": "alice", "password": PASSWORD}, status=507)
    assert_error(response, 507, "DISK01")
    assert table_counts(db)["users"] == 0


def test_account_delete_removes_user_and_sessions(client, user, db):
    client.delete("/account", headers=user.headers, status=204)
    assert table_counts(db)["users"] == 0
    assert table_counts(db)["sessions"] == 0
    response = client.get("/store", headers=user.headers, status=401)
    assert_error(response, 401, "AUTH01")


def test_account_delete_removes_solely_owned_keys_and_keeps_shared_ones(client, user, other, db):
    put(client, user, "mine")
    put(client, user, "shared-read")
    put(client, user, "co-owned")
    share(client, user, "shared-read", {"bob": "READ"})
    share(client, user, "co-owned", {"bob": "OWN"})
    put(client, other, "bobs")
    share(client, other, "bobs", {"alice": "WRITE"})
    client.delete("/account", headers=user.headers, status=204)
    keys = [row[0] for row in db.execute("SELECT key FROM items ORDER BY key")]
    assert keys == ["bobs", "co-owned"]
    listing = client.get("/store", headers=other.headers).json
    assert [(e["key"], e["permission"]) for e in listing] == [("bobs", "OWN"), ("co-owned", "OWN")]
    assert client.get("/permission/bobs", headers=other.headers).json == [
        {"user": "bob", "permission": "OWN"}
    ]


def test_account_deleted_id_can_register_again_and_inherits_nothing(client, user, other):
    put(client, other, "bobs")
    share(client, other, "bobs", {"alice": "READ"})
    put(client, user, "old")
    client.delete("/account", headers=user.headers, status=204)
    again = client.post_json("/account", {"id": "alice", "password": "another password"}).json
    headers = {"Authorization": f"Bearer {again['token']}"}
    assert client.get("/store", headers=headers).json == []
    assert client.get("/permission/bobs", headers=other.headers).json == [
        {"user": "bob", "permission": "OWN"}
    ]


# ==================================================================================================
# Sessions
# ==================================================================================================


def test_session_login_answers_new_token(client, user, clock):
    clock.advance(60)
    body = client.post_json("/auth", {"id": "alice", "password": PASSWORD}).json
    assert set(body) == {"token", "expiration"}
    assert body["token"] != user.token
    assert body["expiration"] == int(clock.now * 1000) + 30 * 86400 * 1000
    client.get("/store", headers={"Authorization": f"Bearer {body['token']}"}, status=200)


@pytest.mark.parametrize(
    "body", [{"id": "alice", "password": "wrong password"}, {"id": "nobody", "password": PASSWORD}],
    ids=["wrong-password", "unknown-id"],
)  # fmt: skip
def test_session_login_wrong_credentials_are_auth01(client, user, db, body):
    response = client.post_json("/auth", body, status=401)
    assert_error(response, 401, "AUTH01")
    assert table_counts(db)["sessions"] == 1


def test_session_login_bad_body_is_acct02(client, user):
    response = client.post("/auth", b"[1]", status=400)
    assert_error(response, 400, "ACCT02")


def test_session_list_newest_first_with_current_flag(client, user, clock, db):
    clock.advance(10)
    second = client.post_json("/auth", {"id": "alice", "password": PASSWORD}).json
    listing = client.get("/account", headers=user.headers).json
    assert len(listing) == 2
    assert [set(entry) for entry in listing] == [{"id", "expiration", "current", "createdAt"}] * 2
    assert listing[0]["createdAt"] == listing[1]["createdAt"] + 10_000
    assert [entry["current"] for entry in listing] == [False, True]
    assert listing[0]["expiration"] == second["expiration"]
    public_ids = {row[0] for row in db.execute("SELECT public_id FROM sessions")}
    assert {entry["id"] for entry in listing} == public_ids
    assert user.token not in json.dumps(listing) and second["token"] not in json.dumps(listing)


def test_session_list_shows_only_own_sessions(client, user, other):
    listing = client.get("/account", headers=other.headers).json
    assert len(listing) == 1 and listing[0]["current"] is True


def test_session_logout_ends_only_that_session(client, user, db):
    second = client.post_json("/auth", {"id": "alice", "password": PASSWORD}).json
    client.delete("/auth", headers=user.headers, status=204)
    assert_error(client.get("/store", headers=user.headers, status=401), 401, "AUTH01")
    client.get("/store", headers={"Authorization": f"Bearer {second['token']}"}, status=200)
    assert table_counts(db)["sessions"] == 1


def test_session_expires_after_ttl_and_is_purged(make_app, clock, db):
    client = webtest.TestApp(make_app(session_ttl=60))
    token = client.post_json("/account", {"id": "alice", "password": PASSWORD}).json["token"]
    headers = {"Authorization": f"Bearer {token}"}
    clock.advance(59)
    client.get("/store", headers=headers, status=200)
    clock.advance(1)
    assert_error(client.get("/store", headers=headers, status=401), 401, "AUTH01")
    assert table_counts(db)["sessions"] == 0


@pytest.mark.parametrize(
    "value",
    [
        None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Bearer not a token",
        "Bearer " + "A" * 43, "Bearer " + "A" * 600, "Bearer tök€n", "Token abc",
    ],
    ids=[
        "missing", "empty", "scheme-only", "scheme-space", "basic", "spaces", "unknown",
        "too-long", "non-ascii", "other-scheme",
    ],
)  # fmt: skip
def test_session_bad_bearer_is_auth01(client, user, value):
    headers = {} if value is None else {"Authorization": value}
    for method, path in [("GET", "/store"), ("GET", "/account"), ("DELETE", "/auth")]:
        response = client.request(path, method=method, headers=headers, status=401)
        assert_error(response, 401, "AUTH01")


def test_session_bearer_scheme_is_case_insensitive(client, user):
    client.get("/store", headers={"Authorization": f"bearer {user.token}"}, status=200)


def test_session_token_is_stored_only_as_digest(client, user, db):
    import hashlib

    digests = [row[0] for row in db.execute("SELECT token_digest FROM sessions")]
    assert digests == [hashlib.sha256(user.token.encode()).digest()]


# ==================================================================================================
# Store
# ==================================================================================================


def test_store_put_creates_key_owned_by_caller(client, user, db):
    response = put(client, user, "notes", b"\x00\x01binary\xff", status=204)
    token = response.headers["X-Sync-Token"]
    assert response.headers["ETag"] == f'"{token}"'
    assert len(token) >= 16 and token.isascii()
    assert response.body == b""
    row = db.execute("SELECT value, token, meta FROM items WHERE key = 'notes'").fetchone()
    assert row == (b"\x00\x01binary\xff", token, None)
    assert client.get("/store", headers=user.headers).json == [
        {"key": "notes", "permission": "OWN", "token": token}
    ]


def test_store_get_answers_value_and_headers(client, user):
    token = put(client, user, "notes", b"hello", headers={"X-Sync-Meta": "v=1; t=text"}).headers[
        "X-Sync-Token"
    ]
    response = client.get("/store/notes", headers=user.headers)
    assert response.body == b"hello"
    assert response.content_type == "application/octet-stream"
    assert response.headers["X-Sync-Token"] == token
    assert response.headers["ETag"] == f'"{token}"'
    assert response.headers["X-Sync-Meta"] == "v=1; t=text"


def test_store_head_answers_headers_without_body(client, user):
    token = put(client, user, "k", b"hello").headers["X-Sync-Token"]
    response = client.head("/store/k", headers=user.headers)
    assert response.status_int == 200 and response.body == b""
    assert response.headers["X-Sync-Token"] == token


def test_store_get_without_meta_sends_no_meta_header(client, user):
    put(client, user, "k")
    assert "X-Sync-Meta" not in client.get("/store/k", headers=user.headers).headers


def test_store_update_with_token_replaces_value_and_meta(client, user, db):
    first = put(client, user, "k", b"one", headers={"X-Sync-Meta": "m1"}).headers["X-Sync-Token"]
    second = put(client, user, "k", b"two", token=first, status=204).headers["X-Sync-Token"]
    assert second != first
    assert db.execute("SELECT value, token, meta FROM items").fetchone() == (b"two", second, None)


@pytest.mark.parametrize(
    "token", [None, "stale", "", "tök€n"], ids=["missing", "wrong", "empty", "non-ascii"]
)
def test_store_update_without_matching_token_is_key01(client, user, db, token):
    put(client, user, "k", b"one")
    before = snapshot(db)
    headers = dict(user.headers)
    if token is not None:
        headers["X-Sync-Token"] = token.encode().decode("latin-1")
    response = client.put("/store/k", b"two", headers=headers, status=409)
    assert_error(response, 409, "KEY01")
    assert snapshot(db) == before


def test_store_create_with_token_is_key01(client, user, db):
    response = put(client, user, "new", token="anything", status=409)
    assert_error(response, 409, "KEY01")
    assert table_counts(db)["items"] == 0


def test_store_create_over_invisible_key_is_key01(client, user, other, db):
    put(client, other, "taken", b"bob's")
    before = snapshot(db)
    assert_error(put(client, user, "taken", b"mine", status=409), 409, "KEY01")
    assert snapshot(db) == before


def test_store_missing_and_invisible_keys_are_the_same_err01(client, user, other):
    put(client, other, "hidden")
    for key in ["hidden", "absent"]:
        assert_error(client.get(f"/store/{key}", headers=user.headers, status=404), 404, "ERR01")
        response = client.delete(
            f"/store/{key}", headers={**user.headers, "X-Sync-Token": "x"}, status=404
        )
        assert_error(response, 404, "ERR01")


def test_store_read_holder_reads_but_cannot_write_or_delete(client, user, other, db):
    token = put(client, user, "k", b"v").headers["X-Sync-Token"]
    share(client, user, "k", {"bob": "READ"})
    assert client.get("/store/k", headers=other.headers).body == b"v"
    before = snapshot(db)
    assert_error(put(client, other, "k", b"x", token=token, status=403), 403, "PERM01")
    response = client.delete(
        "/store/k", headers={**other.headers, "X-Sync-Token": token}, status=403
    )
    assert_error(response, 403, "PERM01")
    assert snapshot(db) == before


def test_store_write_holder_updates_but_cannot_delete(client, user, other, db):
    token = put(client, user, "k", b"v").headers["X-Sync-Token"]
    share(client, user, "k", {"bob": "WRITE"})
    new = put(client, other, "k", b"bob", token=token, status=204).headers["X-Sync-Token"]
    response = client.delete("/store/k", headers={**other.headers, "X-Sync-Token": new}, status=403)
    assert_error(response, 403, "PERM01")
    assert db.execute("SELECT value FROM items").fetchone() == (b"bob",)
    assert client.get("/store", headers=other.headers).json == [
        {"key": "k", "permission": "WRITE", "token": new}
    ]


def test_store_permission_error_comes_before_token_error(client, user, other):
    put(client, user, "k")
    share(client, user, "k", {"bob": "READ"})
    assert_error(put(client, other, "k", b"x", token="stale", status=403), 403, "PERM01")


def test_store_delete_removes_value_and_permissions(client, user, other, db):
    token = put(client, user, "k").headers["X-Sync-Token"]
    share(client, user, "k", {"bob": "READ"})
    client.delete("/store/k", headers={**user.headers, "X-Sync-Token": token}, status=204)
    assert table_counts(db)["items"] == 0 and table_counts(db)["permissions"] == 0
    assert client.get("/store", headers=other.headers).json == []
    assert put(client, other, "k", b"new", status=204)


@pytest.mark.parametrize("token", [None, "stale"], ids=["missing", "wrong"])
def test_store_delete_without_matching_token_is_key01(client, user, db, token):
    put(client, user, "k")
    headers = dict(user.headers) | ({"X-Sync-Token": token} if token else {})
    assert_error(client.delete("/store/k", headers=headers, status=409), 409, "KEY01")
    assert table_counts(db)["items"] == 1


def test_store_list_is_sorted_and_shows_only_held_keys(client, user, other):
    for key in ["b", "a/z", "a", "é", "Z"]:
        put(client, user, key)
    put(client, other, "bobs")
    listing = client.get("/store", headers=user.headers).json
    assert [entry["key"] for entry in listing] == ["Z", "a", "a/z", "b", "é"]
    assert [entry["key"] for entry in client.get("/store", headers=other.headers).json] == ["bobs"]


def test_store_keys_may_hold_slashes_and_encoded_characters(client, user):
    put(client, user, "a/b/c", b"slashes")
    put(client, user, "x%2Fy", b"encoded slash")
    put(client, user, "%E2%82%AC%20sign", b"euro")
    assert client.get("/store/a/b/c", headers=user.headers).body == b"slashes"
    assert client.get("/store/x/y", headers=user.headers).body == b"encoded slash"
    assert client.get(quote("/store/€ sign"), headers=user.headers).body == b"euro"
    keys = [entry["key"] for entry in client.get("/store", headers=user.headers).json]
    assert keys == ["a/b/c", "x/y", "€ sign"]


def test_store_key_of_1024_chars_is_accepted_and_1025_is_req01(client, user, db):
    put(client, user, "k" * 1024, status=204)
    put(client, user, "é" * 1024, status=204)  # characters, not bytes
    assert_error(put(client, user, "k" * 1025, status=400), 400, "REQ01")
    assert table_counts(db)["items"] == 2


@pytest.mark.parametrize(
    "path", ["", "%00", "a%0Ab", "a%7Fb", "%C2%85", "%FF", "%C3"],
    ids=["empty", "nul", "newline", "del", "c1", "invalid-utf8", "truncated-utf8"],
)  # fmt: skip
def test_store_bad_key_is_req01_for_every_method(client, user, db, path):
    for method in ["GET", "PUT", "DELETE"]:
        response = client.request(f"/store/{path}", method=method, headers=user.headers, status=400)
        assert_error(response, 400, "REQ01")
        response = client.request(
            f"/permission/{path}", method=method, headers=user.headers, status=400
        )
        assert_error(response, 400, "REQ01")
    assert table_counts(db)["items"] == 0


def test_store_authentication_comes_before_key_shape(client):
    assert_error(client.get("/store/%00", status=401), 401, "AUTH01")


def test_store_value_over_limit_is_size01_and_nothing_stored(make_app, db):
    client = webtest.TestApp(make_app(max_value_bytes=100))
    token = client.post_json("/account", {"id": "alice", "password": PASSWORD}).json["token"]
    headers = {"Authorization": f"Bearer {token}"}
    client.put("/store/k", b"x" * 100, headers=headers, status=204)
    response = client.put("/store/big", b"x" * 101, headers=headers, status=413)
    assert_error(response, 413, "SIZE01")
    assert [row[0] for row in db.execute("SELECT key FROM items")] == ["k"]


def test_store_empty_value_is_stored(client, user):
    put(client, user, "empty", b"", status=204)
    assert client.get("/store/empty", headers=user.headers).body == b""


@pytest.mark.parametrize(
    "meta,status,code",
    [
        ("é".encode().decode("latin-1"), 400, "REQ01"),
        ("tab\there", 400, "REQ01"),
        ("x" * 8193, 413, "SIZE01"),
    ],
    ids=["non-ascii", "control", "over-8192"],
)
def test_store_bad_meta_is_refused(client, user, db, meta, status, code):
    response = put(client, user, "k", headers={"X-Sync-Meta": meta}, status=status)
    assert_error(response, status, code)
    assert table_counts(db)["items"] == 0


def test_store_meta_of_8192_printable_bytes_is_kept(client, user):
    meta = ("".join(chr(c) for c in range(0x20, 0x7F)) * 100)[:8192]
    put(client, user, "k", headers={"X-Sync-Meta": meta}, status=204)
    assert client.get("/store/k", headers=user.headers).headers["X-Sync-Meta"] == meta


def test_store_put_on_low_disk_is_disk01(make_app, db):
    client = webtest.TestApp(make_app())
    token = client.post_json("/account", {"id": "alice", "password": PASSWORD}).json["token"]
    low = webtest.TestApp(make_app(min_free_bytes=2**62))
    response = low.put("/store/k", b"v", headers={"Authorization": f"Bearer {token}"}, status=507)
    assert_error(response, 507, "DISK01")
    assert table_counts(db)["items"] == 0


def test_store_values_are_rows_not_files(client, user, tmp_path):
    put(client, user, "k", b"x" * 10_000)
    names = {path.name for path in tmp_path.iterdir()}
    assert names <= {"syncnode.db", "syncnode.db-wal", "syncnode.db-shm"}


# ==================================================================================================
# Permissions
# ==================================================================================================


def test_permission_list_is_visible_to_every_holder_sorted_by_user(client, make_user, user, other):
    carol = make_user("carol")
    put(client, user, "k")
    share(client, user, "k", {"carol": "WRITE", "bob": "READ"}, status=204)
    expected = [
        {"user": "alice", "permission": "OWN"},
        {"user": "bob", "permission": "READ"},
        {"user": "carol", "permission": "WRITE"},
    ]
    for holder in (user, other, carol):
        assert client.get("/permission/k", headers=holder.headers).json == expected


def test_permission_operations_on_invisible_key_are_err01(client, user, other, db):
    put(client, other, "hidden")
    before = snapshot(db)
    assert_error(client.get("/permission/hidden", headers=user.headers, status=404), 404, "ERR01")
    assert_error(share(client, user, "hidden", {"alice": "OWN"}, status=404), 404, "ERR01")
    response = client.delete("/permission/hidden?users=alice", headers=user.headers, status=404)
    assert_error(response, 404, "ERR01")
    assert snapshot(db) == before


def test_permission_grant_replaces_existing_level(client, user, other):
    put(client, user, "k")
    share(client, user, "k", {"bob": "OWN"})
    share(client, user, "k", {"bob": "READ"})
    assert client.get("/store", headers=other.headers).json[0]["permission"] == "READ"


def test_permission_grant_normalises_user_ids(client, user, other):
    put(client, user, "k")
    share(client, user, "k", {" BOB ": "READ"}, status=204)
    assert client.get("/permission/k", headers=other.headers).json[1] == {
        "user": "bob",
        "permission": "READ",
    }


@pytest.mark.parametrize("level", ["READ", "WRITE"])
def test_permission_changes_need_own(client, user, other, db, level):
    put(client, user, "k")
    share(client, user, "k", {"bob": level})
    before = snapshot(db)
    assert_error(share(client, other, "k", {"bob": "OWN"}, status=403), 403, "PERM01")
    response = client.delete("/permission/k?users=alice", headers=other.headers, status=403)
    assert_error(response, 403, "PERM01")
    assert snapshot(db) == before


def test_permission_grant_is_all_or_nothing_on_unknown_user(client, user, other, db):
    put(client, user, "k")
    before = snapshot(db)
    response = share(client, user, "k", {"bob": "READ", "nobody": "READ"}, status=404)
    assert_error(response, 404, "ERR01")
    assert snapshot(db) == before


@pytest.mark.parametrize(
    "body",
    [
        {"user": "bob", "permission": "READ"},
        [{"user": "bob", "permission": "read"}],
        [{"user": "bob", "permission": "ADMIN"}],
        [{"user": "bob"}],
        [{"permission": "READ"}],
        [{"user": 7, "permission": "READ"}],
        [{"user": "bob", "permission": "READ"}, "bob"],
        [{"user": "bob", "permission": "READ"}, {"user": "BOB", "permission": "OWN"}],
    ],
    ids=[
        "object",
        "lower-case",
        "unknown-level",
        "no-level",
        "no-user",
        "user-number",
        "mixed",
        "duplicate",
    ],
)
def test_permission_bad_grant_body_is_req01(client, user, other, db, body):
    put(client, user, "k")
    before = snapshot(db)
    response = client.put("/permission/k", json.dumps(body), headers=user.headers, status=400)
    assert_error(response, 400, "REQ01")
    assert snapshot(db) == before


def test_permission_malformed_json_is_req01(client, user):
    put(client, user, "k")
    response = client.put("/permission/k", b"[{", headers=user.headers, status=400)
    assert_error(response, 400, "REQ01")


def test_permission_request_shape_comes_before_visibility(client, user, other):
    put(client, other, "hidden")
    response = client.put("/permission/hidden", b"{}", headers=user.headers, status=400)
    assert_error(response, 400, "REQ01")


def test_permission_last_owner_cannot_downgrade_or_leave(client, user, other, db):
    put(client, user, "k")
    share(client, user, "k", {"bob": "WRITE"})
    before = snapshot(db)
    assert_error(share(client, user, "k", {"alice": "WRITE"}, status=409), 409, "PERM02")
    response = client.delete("/permission/k?users=alice", headers=user.headers, status=409)
    assert_error(response, 409, "PERM02")
    assert snapshot(db) == before


def test_permission_owner_may_leave_when_another_owner_remains(client, user, other):
    put(client, user, "k")
    share(client, user, "k", {"bob": "OWN", "alice": "READ"}, status=204)
    client.delete("/permission/k?users=alice", headers=user.headers, status=204)
    assert client.get("/permission/k", headers=other.headers).json == [
        {"user": "bob", "permission": "OWN"}
    ]
    assert client.get("/store", headers=user.headers).json == []


def test_permission_any_holder_may_remove_itself(client, user, other):
    put(client, user, "k")
    share(client, user, "k", {"bob": "READ"})
    client.delete("/permission/k?users=bob", headers=other.headers, status=204)
    assert client.get("/store", headers=other.headers).json == []
    assert_error(client.get("/store/k", headers=other.headers, status=404), 404, "ERR01")


def test_permission_remove_ignores_unknown_and_permissionless_users(client, make_user, user, other):
    make_user("carol")
    put(client, user, "k")
    share(client, user, "k", {"bob": "READ"})
    client.delete("/permission/k?users=bob,carol,nobody,,a%20b", headers=user.headers, status=204)
    assert client.get("/permission/k", headers=user.headers).json == [
        {"user": "alice", "permission": "OWN"}
    ]


def test_permission_remove_without_users_is_req01(client, user):
    put(client, user, "k")
    assert_error(client.delete("/permission/k", headers=user.headers, status=400), 400, "REQ01")


def test_permission_revoked_user_can_no_longer_write(client, user, other):
    token = put(client, user, "k").headers["X-Sync-Token"]
    share(client, user, "k", {"bob": "WRITE"})
    client.delete("/permission/k?users=bob", headers=user.headers, status=204)
    assert_error(put(client, other, "k", b"x", token=token, status=409), 409, "KEY01")


# ==================================================================================================
# Health
# ==================================================================================================


def test_health_needs_no_token_and_reports_both_parts(client):
    response = client.get("/health")
    assert response.json == {"database": True, "disk": True}
    assert response.content_type == "application/json"


def test_health_low_disk_is_500_with_disk_false(make_app):
    client = webtest.TestApp(make_app(min_free_bytes=2**62))
    response = client.get("/health", status=500)
    assert response.json == {"database": True, "disk": False}


def test_health_broken_database_is_500_with_database_false(app, client, db_path):
    app.context.close()
    os.remove(db_path)
    os.mkdir(db_path)  # a directory where the database was: no query can run
    response = client.get("/health", status=500)
    assert response.json["database"] is False


# ==================================================================================================
# Errors and routing
# ==================================================================================================


@pytest.mark.parametrize(
    "method,path,allow",
    [
        ("POST", "/store", "GET, HEAD, OPTIONS"),
        ("PATCH", "/store/k", "DELETE, GET, HEAD, OPTIONS, PUT"),
        ("POST", "/permission/k", "DELETE, GET, HEAD, OPTIONS, PUT"),
        ("GET", "/auth", "DELETE, OPTIONS, POST"),
        ("PUT", "/account", "DELETE, GET, HEAD, OPTIONS, POST"),
        ("GET", "/password", "OPTIONS, POST"),
        ("DELETE", "/resetpassword", "OPTIONS, POST"),
        ("POST", "/health", "GET, HEAD, OPTIONS"),
    ],
)
def test_routing_wrong_method_is_req02_with_allow(client, method, path, allow):
    response = client.request(path, method=method, status=405)
    assert_error(response, 405, "REQ02")
    assert response.headers["Allow"] == allow


@pytest.mark.parametrize("path", ["/", "/nothing", "/store-x", "/api-x/y", "/stores/k"])
def test_routing_unknown_path_is_json_err01(client, path):
    assert_error(client.get(path, status=404), 404, "ERR01")


def test_errors_unexpected_failure_is_err02_and_logged(app, client, user, monkeypatch, caplog):
    def explode(*args, **kwargs):
        raise RuntimeError("boom with secret detail")

    monkeypatch.setattr(syncnode, "list_keys", explode)
    with caplog.at_level(logging.ERROR, logger="syncnode"):
        response = client.get("/store", headers=user.headers, status=500)
    assert_error(response, 500, "ERR02")
    assert "boom" not in response.text and "Traceback" not in response.text
    assert any(record.exc_info for record in caplog.records)


def test_errors_huge_header_is_handled(client, user):
    response = put(client, user, "k", headers={"X-Sync-Meta": "m" * 100_000}, status=413)
    assert_error(response, 413, "SIZE01")
    client.get("/store", headers={**user.headers, "X-Filler": "f" * 100_000}, status=200)


@pytest.mark.parametrize(
    "raw", [b"\x00\x01\x02", b'{"a": 1}' * 1000, base64.b64encode(os.urandom(300))],
    ids=["binary", "repeated-json", "base64"],
)  # fmt: skip
def test_errors_garbage_json_bodies_are_refused(client, user, raw):
    put(client, user, "k")
    assert_error(client.put("/permission/k", raw, headers=user.headers, status=400), 400, "REQ01")
    assert_error(client.post("/auth", raw, status=400), 400, "ACCT02")
    assert_error(client.post("/resetpassword", raw, status=400), 400, "REQ01")
    assert_error(client.post("/password", raw, headers=user.headers, status=400), 400, "REQ01")


def test_errors_oversized_json_body_is_size01(client, user):
    put(client, user, "k")
    body = json.dumps([{"user": "bob", "permission": "READ"}] * 40_000)
    response = client.put("/permission/k", body, headers=user.headers, status=413)
    assert_error(response, 413, "SIZE01")


# ==================================================================================================
# Settings
# ==================================================================================================


def test_settings_misspelt_setting_is_type_error(db_path):
    with pytest.raises(TypeError):
        syncnode.create_app(db_path, sesion_ttl=5)


@pytest.mark.parametrize(
    "override",
    [
        {"registration": "maybe"},
        {"session_ttl": 0},
        {"max_value_bytes": -1},
        {"port": 70000},
        {"threads": 0},
        {"synchronous": "OFF"},
        {"trusted_proxies": "not-an-address"},
        {"argon2_memory_cost": 4},
        {"database": ":memory:"},
    ],
    ids=lambda override: next(iter(override)),
)
def test_settings_bad_value_is_value_error(db_path, override):
    with pytest.raises(ValueError):
        syncnode.Settings(**{"database": db_path, **override})


def test_settings_every_setting_is_in_the_readme():
    with open(os.path.join(os.path.dirname(__file__), "README.md"), encoding="utf-8") as file:
        readme = file.read()
    for item in syncnode.dataclasses.fields(syncnode.Settings):
        assert f"`--{item.name.replace('_', '-')}`" in readme
        assert f"`SYNCNODE_{item.name.upper()}`" in readme


def test_settings_flags_beat_environment_beat_defaults():
    environ = {"SYNCNODE_PORT": "9000", "SYNCNODE_REGISTRATION": "closed"}
    settings = syncnode.parse_args(["--port", "9100"], environ)
    assert (settings.port, settings.registration, settings.host) == (9100, "closed", "127.0.0.1")


NEW_PASSWORD = "battery staple"

#: What a session or reset token looks like inside a log line: 256 bits of URL-safe base64.
TOKEN_TEXT = re.compile(r"[A-Za-z0-9_-]{43,}")


def bearer(token: str) -> dict[str, str]:
    """Return the headers that carry a bearer token."""
    return {"Authorization": f"Bearer {token}"}


def login(client, name: str, password: str, **kw):
    """POST /auth with an id and a password; return the response."""
    return client.post_json("/auth", {"id": name, "password": password}, **kw)


def request_reset(client, caplog, name: str = "alice", **kw) -> str:
    """Ask for a password reset and return the one token the server wrote to its log."""
    seen = len(caplog.records)
    client.post_json("/resetpassword", {"id": name}, status=204, **kw)
    lines = [record.getMessage() for record in caplog.records[seen:]]
    [token] = [token for line in lines for token in TOKEN_TEXT.findall(line)]
    return token


def logged_tokens(caplog) -> list[str]:
    """Return every token-like string in the captured log lines."""
    return [token for record in caplog.records for token in TOKEN_TEXT.findall(record.getMessage())]


def digest(token: str) -> bytes:
    """Return the SHA-256 digest under which the contract stores a token."""
    return hashlib.sha256(token.encode()).digest()


def stored_hash(db, name: str = "alice") -> str:
    """Return the stored password hash of a user."""
    return db.execute("SELECT password_hash FROM users WHERE name = ?", (name,)).fetchone()[0]


def reset_digests(db) -> list[bytes]:
    """Return the digests of the stored reset tokens."""
    return [row[0] for row in db.execute("SELECT token_digest FROM reset_tokens ORDER BY user_id")]


def assert_throttled(response, window: int) -> None:
    """Assert an AUTH02 answer whose Retry-After is whole seconds within the window."""
    assert_error(response, 429, "AUTH02")
    retry_after = response.headers["Retry-After"]
    assert retry_after.isdigit() and 0 < int(retry_after) <= window


# ==================================================================================================
# Passwords and reset
# ==================================================================================================


def test_password_change_sets_the_new_password(client, user, db):
    old_hash = stored_hash(db)
    response = client.post_json(
        "/password", {"password": NEW_PASSWORD}, headers=user.headers, status=204
    )
    assert response.body == b""
    assert stored_hash(db) != old_hash
    assert_error(login(client, "alice", PASSWORD, status=401), 401, "AUTH01")
    login(client, "alice", NEW_PASSWORD, status=200)


def test_password_change_revokes_other_sessions_and_keeps_the_current_one(client, user, other, db):
    second = login(client, "alice", PASSWORD).json["token"]
    third = login(client, "alice", PASSWORD).json["token"]
    client.post_json("/password", {"password": NEW_PASSWORD}, headers=bearer(second), status=204)
    for token in (user.token, third):
        assert_error(client.get("/store", headers=bearer(token), status=401), 401, "AUTH01")
    client.get("/store", headers=bearer(second), status=200)
    client.get("/store", headers=other.headers, status=200)
    digests = {row[0] for row in db.execute("SELECT token_digest FROM sessions")}
    assert digests == {digest(second), digest(other.token)}


def test_password_change_deletes_a_pending_reset_token(client, user, db, caplog):
    reset = request_reset(client, caplog)
    client.post_json("/password", {"password": NEW_PASSWORD}, headers=user.headers, status=204)
    assert table_counts(db)["reset_tokens"] == 0
    before = snapshot(db)
    response = client.post_json(
        "/password", {"password": "third password"}, headers=bearer(reset), status=401
    )
    assert_error(response, 401, "AUTH01")
    assert snapshot(db) == before


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b'{"password": ', b"\xff\xfe", b"[]", b'"correct horse"', b"null", b"{}",
     b'{"pass": "correct horse"}', b'{"password": 12345678}', b'{"password": null}',
     b'{"password": ["correct horse"]}'],
    ids=["empty", "text", "cut", "bytes", "array", "string", "null", "no-password",
         "misspelt-field", "password-number", "password-null", "password-array"],
)  # fmt: skip
def test_password_change_bad_body_is_req01(client, user, db, raw):
    before = snapshot(db)
    response = client.post("/password", raw, headers=user.headers, status=400)
    assert_error(response, 400, "REQ01")
    assert snapshot(db) == before


@pytest.mark.parametrize(
    "password", ["", "p" * 7, "p" * 1025], ids=["empty", "7-chars", "1025-chars"]
)
def test_password_change_bad_length_is_acct02(client, user, db, password):
    before = snapshot(db)
    response = client.post_json(
        "/password", {"password": password}, headers=user.headers, status=400
    )
    assert_error(response, 400, "ACCT02")
    assert snapshot(db) == before
    login(client, "alice", PASSWORD, status=200)


@pytest.mark.parametrize("password", ["p" * 8, "p" * 1024, "ü" * 8], ids=["8", "1024", "non-ascii"])
def test_password_change_edge_lengths_are_accepted(client, user, password):
    client.post_json("/password", {"password": password}, headers=user.headers, status=204)
    login(client, "alice", password, status=200)


@pytest.mark.parametrize(
    "headers",
    [{}, bearer("A" * 43), {"Authorization": "Basic YWxpY2U6Y29ycmVjdCBob3JzZQ=="},
     {"Authorization": "Bearer"}],
    ids=["missing", "unknown", "basic", "scheme-only"],
)  # fmt: skip
def test_password_change_without_a_valid_token_is_auth01(client, user, db, headers):
    before = snapshot(db)
    response = client.post_json(
        "/password", {"password": NEW_PASSWORD}, headers=headers, status=401
    )
    assert_error(response, 401, "AUTH01")
    assert snapshot(db) == before


def test_password_change_authentication_comes_before_the_body(client, user):
    response = client.post("/password", b"not json", headers=bearer("A" * 43), status=401)
    assert_error(response, 401, "AUTH01")


def test_password_change_with_expired_session_is_auth01_and_purges_it(make_app, clock, db):
    client = webtest.TestApp(make_app(session_ttl=60))
    token = client.post_json("/account", {"id": "alice", "password": PASSWORD}).json["token"]
    old_hash = stored_hash(db)
    clock.advance(60)
    response = client.post_json(
        "/password", {"password": NEW_PASSWORD}, headers=bearer(token), status=401
    )
    assert_error(response, 401, "AUTH01")
    assert table_counts(db)["sessions"] == 0
    assert stored_hash(db) == old_hash


@pytest.mark.parametrize(
    "name",
    ["nobody", "nobody@example.org", "", "   ", "a b", "a\x00b", "x" * 255],
    ids=["unknown", "unknown-email", "empty", "blank", "space", "nul", "255-chars"],
)
def test_reset_request_for_unknown_or_invalid_id_is_204_and_creates_nothing(
    client, user, db, caplog, name
):
    before = snapshot(db)
    response = client.post_json("/resetpassword", {"id": name}, status=204)
    assert response.body == b""
    assert snapshot(db) == before
    assert logged_tokens(caplog) == []


def test_reset_request_answer_does_not_reveal_whether_the_id_exists(client, user):
    known = client.post_json("/resetpassword", {"id": "alice"}, status=204)
    unknown = client.post_json("/resetpassword", {"id": "nobody"}, status=204)
    assert sorted(known.headers.items()) == sorted(unknown.headers.items())
    assert known.body == unknown.body == b""


def test_reset_request_logs_one_warning_with_the_id_and_token(client, user, db, caplog):
    response = client.post_json("/resetpassword", {"id": "alice"}, status=204)
    assert response.body == b""
    lines = [record for record in caplog.records if TOKEN_TEXT.search(record.getMessage())]
    assert len(lines) == 1
    [record] = lines
    assert record.name == "syncnode" and record.levelno == logging.WARNING
    assert "alice" in record.getMessage()
    [token] = TOKEN_TEXT.findall(record.getMessage())
    assert db.execute("SELECT token_digest FROM reset_tokens").fetchall() == [(digest(token),)]


def test_reset_token_is_stored_only_as_digest(client, user, db, db_path, caplog):
    token = request_reset(client, caplog)
    [(stored,)] = db.execute("SELECT token_digest FROM reset_tokens").fetchall()
    assert stored == digest(token)
    for path in (db_path, db_path + "-wal"):
        with open(path, "rb") as file:
            assert token.encode() not in file.read()


@pytest.mark.parametrize(
    "name", [" ALICE ", "Alice", "\tａｌｉｃｅ\n"], ids=["spaces", "case", "nfkc"]
)
def test_reset_request_normalises_the_id(client, user, db, caplog, name):
    token = request_reset(client, caplog, name)
    user_id = db.execute("SELECT id FROM users WHERE name = 'alice'").fetchone()[0]
    assert db.execute("SELECT user_id, token_digest FROM reset_tokens").fetchall() == [
        (user_id, digest(token))
    ]


def test_reset_second_request_replaces_the_first(client, user, db, caplog):
    first = request_reset(client, caplog)
    second = request_reset(client, caplog)
    assert first != second
    assert table_counts(db)["reset_tokens"] == 1
    before = snapshot(db)
    response = client.post_json(
        "/password", {"password": NEW_PASSWORD}, headers=bearer(first), status=401
    )
    assert_error(response, 401, "AUTH01")
    assert snapshot(db) == before
    assert reset_digests(db) == [digest(second)]


def test_reset_token_sets_the_password_and_revokes_every_session(client, user, other, db, caplog):
    second = login(client, "alice", PASSWORD).json["token"]
    token = request_reset(client, caplog)
    response = client.post_json(
        "/password", {"password": NEW_PASSWORD}, headers=bearer(token), status=204
    )
    assert response.body == b""
    for session in (user.token, second):
        assert_error(client.get("/store", headers=bearer(session), status=401), 401, "AUTH01")
    client.get("/store", headers=other.headers, status=200)
    assert [row[0] for row in db.execute("SELECT token_digest FROM sessions")] == [
        digest(other.token)
    ]
    assert table_counts(db)["reset_tokens"] == 0
    assert_error(login(client, "alice", PASSWORD, status=401), 401, "AUTH01")
    login(client, "alice", NEW_PASSWORD, status=200)


def test_reset_token_works_only_once(client, user, db, caplog):
    token = request_reset(client, caplog)
    client.post_json("/password", {"password": NEW_PASSWORD}, headers=bearer(token), status=204)
    before = snapshot(db)
    response = client.post_json(
        "/password", {"password": "third password"}, headers=bearer(token), status=401
    )
    assert_error(response, 401, "AUTH01")
    assert snapshot(db) == before
    login(client, "alice", NEW_PASSWORD, status=200)


@pytest.mark.parametrize(
    "method, path",
    [("GET", "/store"), ("GET", "/store/k"), ("PUT", "/store/k"), ("DELETE", "/store/k"),
     ("GET", "/permission/k"), ("GET", "/account"), ("DELETE", "/account"), ("DELETE", "/auth")],
    ids=["list", "get", "put", "delete", "permissions", "sessions", "delete-account", "logout"],
)  # fmt: skip
def test_reset_token_is_auth01_everywhere_but_password(client, user, db, caplog, method, path):
    put(client, user, "k")
    token = request_reset(client, caplog)
    before = snapshot(db)
    response = client.request(path, method=method, headers=bearer(token), status=401)
    assert_error(response, 401, "AUTH01")
    assert snapshot(db) == before
    assert reset_digests(db) == [digest(token)]


def test_reset_token_expires_after_reset_ttl(client, user, clock, db, caplog):
    token = request_reset(client, caplog)
    clock.advance(3600)
    before = snapshot(db)
    response = client.post_json(
        "/password", {"password": NEW_PASSWORD}, headers=bearer(token), status=401
    )
    assert_error(response, 401, "AUTH01")
    after = snapshot(db)
    assert after["reset_tokens"] == []  # expired, and purged by housekeeping
    assert {**after, "reset_tokens": None} == {**before, "reset_tokens": None}
    login(client, "alice", PASSWORD, status=200)


def test_reset_token_works_until_reset_ttl(client, user, clock, caplog):
    token = request_reset(client, caplog)
    clock.advance(3599)
    client.post_json("/password", {"password": NEW_PASSWORD}, headers=bearer(token), status=204)
    login(client, "alice", NEW_PASSWORD, status=200)


def test_reset_token_expiry_follows_the_setting(make_app, clock, caplog):
    client = webtest.TestApp(make_app(reset_ttl=60))
    client.post_json("/account", {"id": "alice", "password": PASSWORD})
    token = request_reset(client, caplog)
    clock.advance(60)
    response = client.post_json(
        "/password", {"password": NEW_PASSWORD}, headers=bearer(token), status=401
    )
    assert_error(response, 401, "AUTH01")


def test_reset_token_refused_body_does_not_spend_it(client, user, db, caplog):
    token = request_reset(client, caplog)
    before = snapshot(db)
    response = client.post_json(
        "/password", {"password": "short"}, headers=bearer(token), status=400
    )
    assert_error(response, 400, "ACCT02")
    response = client.post("/password", b"[]", headers=bearer(token), status=400)
    assert_error(response, 400, "REQ01")
    assert snapshot(db) == before
    assert reset_digests(db) == [digest(token)]


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b'{"id": ', b"\xff\xfe", b"[]", b'"alice"', b"null", b"{}",
     b'{"user": "alice"}', b'{"id": 5}', b'{"id": null}', b'{"id": ["alice"]}'],
    ids=["empty", "text", "cut", "bytes", "array", "string", "null", "no-id", "misspelt-field",
         "id-number", "id-null", "id-array"],
)  # fmt: skip
def test_reset_request_malformed_body_is_req01(client, user, db, caplog, raw):
    before, counts = snapshot(db), table_counts(db)
    response = client.post("/resetpassword", raw, status=400)
    assert_error(response, 400, "REQ01")
    assert snapshot(db) == before
    assert table_counts(db) == counts
    assert logged_tokens(caplog) == []


# ==================================================================================================
# Throttling
# ==================================================================================================


def fail_logins(client, count: int, name: str = "alice", address: str = "192.0.2.1", **kw) -> None:
    """Send failed logins (each AUTH01) for one id, or for a new unknown id each time ("{}")."""
    for number in range(count):
        response = login(
            client,
            name.format(number),
            "wrong password",
            extra_environ={"REMOTE_ADDR": address.format(number)},
            status=401,
            **kw,
        )
        assert_error(response, 401, "AUTH01")


def test_throttle_login_per_id_is_auth02_even_with_the_right_password(client, user, db):
    fail_logins(client, 10, address="192.0.2.{}")
    sessions = table_counts(db)["sessions"]
    response = login(
        client, "alice", PASSWORD, extra_environ={"REMOTE_ADDR": "198.51.100.9"}, status=429
    )
    assert_throttled(response, 900)
    assert table_counts(db)["sessions"] == sessions


def test_throttle_login_per_id_counts_the_normalised_id(client, user):
    fail_logins(client, 10, name=" ALICE ")
    assert_throttled(login(client, "alice", PASSWORD, status=429), 900)


def test_throttle_login_per_id_leaves_other_ids_alone(client, user, other):
    fail_logins(client, 10, address="192.0.2.{}")
    login(client, "bob", PASSWORD, status=200)


def test_throttle_login_works_again_after_the_window(client, user, clock):
    fail_logins(client, 10)
    clock.advance(901)
    login(client, "alice", PASSWORD, status=200)


def test_throttle_login_retry_after_is_exactly_long_enough(client, user, clock):
    for _ in range(10):
        fail_logins(client, 1)
        clock.advance(10)
    response = login(client, "alice", PASSWORD, status=429)
    # The oldest of the ten failures leaves the 900 s window 900 - 100 seconds from now.
    assert response.headers["Retry-After"] == "800"
    clock.advance(799)
    assert_throttled(login(client, "alice", PASSWORD, status=429), 900)
    clock.advance(1)
    login(client, "alice", PASSWORD, status=200)


def test_throttle_login_per_address_default_is_100(client, user):
    fail_logins(client, 100, name="nobody{}")
    response = login(
        client, "alice", PASSWORD, extra_environ={"REMOTE_ADDR": "192.0.2.1"}, status=429
    )
    assert_throttled(response, 900)


def test_throttle_login_per_address_counts_every_id(make_app):
    client = webtest.TestApp(make_app(login_fails_per_address=3))
    client.post_json("/account", {"id": "alice", "password": PASSWORD})
    fail_logins(client, 3, name="nobody{}", address="203.0.113.7")
    response = login(
        client, "alice", PASSWORD, extra_environ={"REMOTE_ADDR": "203.0.113.7"}, status=429
    )
    assert_throttled(response, 900)
    login(client, "alice", PASSWORD, extra_environ={"REMOTE_ADDR": "203.0.113.8"}, status=200)


def test_throttle_login_window_follows_the_setting(make_app, clock):
    client = webtest.TestApp(make_app(login_window=60, login_fails_per_id=2))
    client.post_json("/account", {"id": "alice", "password": PASSWORD})
    fail_logins(client, 2)
    assert_throttled(login(client, "alice", PASSWORD, status=429), 60)
    clock.advance(60)
    login(client, "alice", PASSWORD, status=200)


@pytest.mark.parametrize(
    "setting, failures, name",
    [("login_fails_per_id", 11, "alice"), ("login_fails_per_address", 101, "nobody{}")],
    ids=["per-id", "per-address"],
)
def test_throttle_login_limit_of_zero_is_off(make_app, setting, failures, name):
    client = webtest.TestApp(make_app(**{setting: 0}))
    client.post_json("/account", {"id": "alice", "password": PASSWORD})
    fail_logins(client, failures, name=name)
    login(client, "alice", PASSWORD, extra_environ={"REMOTE_ADDR": "192.0.2.1"}, status=200)


def test_throttle_reset_per_id_is_auth02_and_creates_no_token(client, user, db, caplog):
    for number in range(5):
        token = request_reset(client, caplog, extra_environ={"REMOTE_ADDR": f"192.0.2.{number}"})
    before, seen = snapshot(db), len(caplog.records)
    response = client.post_json(
        "/resetpassword",
        {"id": " Alice"},
        status=429,
        extra_environ={"REMOTE_ADDR": "198.51.100.9"},
    )
    assert_throttled(response, 3600)
    assert snapshot(db) == before
    assert [r for r in caplog.records[seen:] if TOKEN_TEXT.search(r.getMessage())] == []
    assert reset_digests(db) == [digest(token)]


def test_throttle_reset_per_address_is_auth02(client, user, db, caplog):
    same = {"REMOTE_ADDR": "203.0.113.7"}
    for number in range(50):
        client.post_json("/resetpassword", {"id": f"nobody{number}"}, extra_environ=same)
    before = snapshot(db)
    response = client.post_json("/resetpassword", {"id": "alice"}, extra_environ=same, status=429)
    assert_throttled(response, 3600)
    assert snapshot(db) == before
    assert logged_tokens(caplog) == []
    request_reset(client, caplog, extra_environ={"REMOTE_ADDR": "198.51.100.9"})


def test_throttle_reset_works_again_after_the_window(client, user, clock, caplog):
    for _ in range(5):
        request_reset(client, caplog)
    assert_throttled(client.post_json("/resetpassword", {"id": "alice"}, status=429), 3600)
    clock.advance(3601)
    request_reset(client, caplog)


@pytest.mark.parametrize(
    "setting, requests, name",
    [("resets_per_id", 5, "alice"), ("resets_per_address", 50, "nobody{}")],
    ids=["per-id", "per-address"],
)
def test_throttle_reset_limit_of_zero_is_off(make_app, db, caplog, setting, requests, name):
    client = webtest.TestApp(make_app(**{setting: 0}))
    client.post_json("/account", {"id": "alice", "password": PASSWORD})
    same = {"REMOTE_ADDR": "203.0.113.7"}
    for number in range(requests):
        client.post_json("/resetpassword", {"id": name.format(number)}, extra_environ=same)
    token = request_reset(client, caplog, extra_environ=same)
    assert reset_digests(db) == [digest(token)]


def test_throttle_registrations_per_address(make_app, db):
    client = webtest.TestApp(make_app(registrations_per_address=2))
    same = {"REMOTE_ADDR": "203.0.113.7"}
    for name in ("alice", "bob"):
        client.post_json("/account", {"id": name, "password": PASSWORD}, extra_environ=same)
    before = snapshot(db)
    response = client.post_json(
        "/account", {"id": "carol", "password": PASSWORD}, extra_environ=same, status=429
    )
    assert_throttled(response, 3600)
    assert snapshot(db) == before
    client.post_json(
        "/account",
        {"id": "carol", "password": PASSWORD},
        extra_environ={"REMOTE_ADDR": "203.0.113.8"},
        status=200,
    )


def test_throttle_registrations_are_unlimited_by_default(client, db):
    for number in range(5):
        client.post_json("/account", {"id": f"user{number}", "password": PASSWORD}, status=200)
    assert table_counts(db)["users"] == 5


def proxied_logins(make_app, remote: str, forwarded: list[str], **settings) -> list[int]:
    """Fail logins for new ids with each X-Forwarded-For value; return the statuses."""
    client = webtest.TestApp(make_app(login_fails_per_address=2, **settings))
    return [
        login(
            client,
            f"nobody{number}",
            "wrong password",
            headers={"X-Forwarded-For": hops},
            extra_environ={"REMOTE_ADDR": remote},
            expect_errors=True,
        ).status_int
        for number, hops in enumerate(forwarded)
    ]


def test_throttle_trusted_proxy_forwarded_address_is_counted(make_app):
    forwarded = ["192.0.2.1", "192.0.2.1", "192.0.2.1", "192.0.2.2"]
    statuses = proxied_logins(make_app, "10.0.0.1", forwarded, trusted_proxies="10.0.0.1")
    assert statuses == [401, 401, 429, 401]


def test_throttle_trusted_proxy_forged_leading_hops_are_ignored(make_app):
    forwarded = [f"198.51.100.{number}, 192.0.2.1" for number in range(3)]
    statuses = proxied_logins(make_app, "10.0.0.1", forwarded, trusted_proxies="10.0.0.0/8")
    assert statuses == [401, 401, 429]


def test_throttle_forwarded_for_is_ignored_without_trusted_proxies(make_app):
    forwarded = [f"198.51.100.{number}" for number in range(3)]
    statuses = proxied_logins(make_app, "192.0.2.1", forwarded)
    assert statuses == [401, 401, 429]


def test_throttle_forwarded_for_from_an_untrusted_client_is_ignored(make_app):
    forwarded = [f"198.51.100.{number}" for number in range(3)]
    statuses = proxied_logins(make_app, "192.0.2.1", forwarded, trusted_proxies="10.0.0.1")
    assert statuses == [401, 401, 429]


# ==================================================================================================
# Secrets
# ==================================================================================================


class ResponseRecorder:
    """WSGI middleware that keeps the status line, headers and body of every answer."""

    def __init__(self, app) -> None:
        self.app = app
        self.answers: list[str] = []

    def __call__(self, environ, start_response):
        head = []

        def start(status, headers, exc_info=None):
            head.append(status + "".join(f"\n{name}: {value}" for name, value in headers))
            return start_response(status, headers, exc_info)

        chunks = self.app(environ, start)
        try:
            body = b"".join(chunks)
        finally:
            if hasattr(chunks, "close"):
                chunks.close()
        self.answers.append(head[0] + "\n\n" + body.decode("utf-8", "replace"))
        return [body]


def assert_nothing_leaked(records, answers, passwords, hashes, sessions, resets) -> None:
    """Assert that log lines and answers carry no secret, and each reset token one WARNING line."""
    lines = [(record, logging.Formatter().format(record)) for record in records]
    for reset in resets:
        carriers = [(record.name, record.levelname) for record, line in lines if reset in line]
        assert carriers == [("syncnode", "WARNING")]
    for _, line in lines:
        for secret in [*passwords, *hashes, *sessions, "$argon2"]:
            assert secret not in line
    for answer in answers:
        for secret in [*passwords, *hashes, *resets, "$argon2"]:
            assert secret not in answer


def test_secrets_full_flow_leaks_nothing_in_logs_or_answers(make_app, db, caplog):
    caplog.set_level(logging.DEBUG)
    recorder = ResponseRecorder(make_app())
    client = webtest.TestApp(recorder)
    passwords = [PASSWORD, "bobs password", NEW_PASSWORD, "reset password"]
    hashes: set[str] = set()
    sessions: list[str] = []
    resets: list[str] = []

    def remember(response) -> dict[str, str]:
        sessions.append(response.json["token"])
        hashes.update(row[0] for row in db.execute("SELECT password_hash FROM users"))
        return bearer(response.json["token"])

    try:
        alice = remember(client.post_json("/account", {"id": "alice", "password": passwords[0]}))
        bob = remember(client.post_json("/account", {"id": "bob", "password": passwords[1]}))
        alice = remember(login(client, "alice", passwords[0]))
        login(client, "alice", passwords[1], status=401)
        login(client, "nobody", passwords[0], status=401)
        token = client.put("/store/k", b"value", headers=alice).headers["X-Sync-Token"]
        client.put_json("/permission/k", [{"user": "bob", "permission": "WRITE"}], headers=alice)
        client.get("/store/k", headers=bob)
        client.put("/store/k", b"new", headers={**bob, "X-Sync-Token": token}, status=204)
        client.get("/account", headers=alice)
        client.post_json("/password", {"password": passwords[2]}, headers=alice, status=204)
        alice = remember(login(client, "alice", passwords[2]))
        client.delete("/account", headers=alice, status=204)
        resets.append(request_reset(client, caplog, "bob"))
        client.get("/store", headers=bearer(resets[0]), status=401)
        client.post_json(
            "/password", {"password": passwords[3]}, headers=bearer(resets[0]), status=204
        )
        bob = remember(login(client, "bob", passwords[3]))
        client.delete("/account", headers=bob, status=204)
        assert len(hashes) == 4 and len(sessions) == 5 and len(recorder.answers) == 18
    finally:
        # Check whatever ran, so that a step that fails cannot hide a leak in the steps before it.
        assert_nothing_leaked(caplog.records, recorder.answers, passwords, hashes, sessions, resets)


def test_secrets_database_holds_no_raw_token_or_password(client, user, other, db, db_path, caplog):
    second = login(client, "alice", PASSWORD).json["token"]
    reset = request_reset(client, caplog, "bob")
    tokens = [user.token, other.token, second]
    digests = {row[0] for row in db.execute("SELECT token_digest FROM sessions")}
    assert digests == {digest(token) for token in tokens}
    contents = b""
    for path in (db_path, db_path + "-wal"):
        with open(path, "rb") as file:
            contents += file.read()
    for secret in [*tokens, reset, PASSWORD]:
        assert secret.encode() not in contents


def test_secrets_password_is_stored_as_argon2id(client, user, db):
    password_hash = stored_hash(db)
    assert password_hash.startswith("$argon2id$")
    assert argon2.PasswordHasher().verify(password_hash, PASSWORD)


def test_secrets_login_rehashes_when_the_parameters_change(make_app, db):
    webtest.TestApp(make_app()).post_json("/account", {"id": "alice", "password": PASSWORD})
    old_hash = stored_hash(db)
    assert argon2.extract_parameters(old_hash).time_cost == 1
    login(webtest.TestApp(make_app(argon2_time_cost=2)), "alice", PASSWORD, status=200)
    new_hash = stored_hash(db)
    assert new_hash.startswith("$argon2id$") and ",t=2," in new_hash
    assert argon2.extract_parameters(new_hash).time_cost == 2
    assert argon2.PasswordHasher().verify(new_hash, PASSWORD)


def test_secrets_login_keeps_a_current_hash(client, user, db):
    old_hash = stored_hash(db)
    login(client, "alice", PASSWORD, status=200)
    assert stored_hash(db) == old_hash


@pytest.mark.parametrize(
    "name, password, status",
    [("nobody", PASSWORD, 401), ("alice", "wrong password", 401), ("alice", PASSWORD, 200)],
    ids=["unknown-id", "wrong-password", "right-password"],
)
def test_secrets_login_spends_one_verification(client, user, monkeypatch, name, password, status):
    calls = []
    verify = argon2.PasswordHasher.verify

    def counting_verify(self, *args, **kwargs):
        calls.append(args)
        return verify(self, *args, **kwargs)

    monkeypatch.setattr(argon2.PasswordHasher, "verify", counting_verify)
    login(client, name, password, status=status)
    assert len(calls) == 1


#: A lower-case version 4 UUID, the shape of every App API id.
UUID4_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def auth_headers(token: str) -> dict[str, str]:
    """Return the headers that carry a session token as a bearer token."""
    return {"Authorization": f"Bearer {token}"}


def app_login_token(client: webtest.TestApp, name: str, password: str = PASSWORD) -> str:
    """Log in on /api/auth/login and return the access token; the login cookies are dropped."""
    response = client.post_json("/api/auth/login", {"email": name, "password": password})
    assert response.status_int == 201
    client.reset()  # Forget the immich_access_token cookie, so that it authenticates nothing.
    return response.json["accessToken"]


def new_api_key(client: webtest.TestApp, owner: User, *permissions: str) -> str:
    """Create an API key for the user with the given permissions and return its secret."""
    body = {"name": "test key", "permissions": list(permissions)}
    response = client.post_json("/api/api-keys", body, headers=owner.headers, status=201)
    return response.json["secret"]


class ThreadedServer:
    """A WSGI app on waitress, bound to 127.0.0.1 on a free port, run from a daemon thread."""

    def __init__(self, wsgi_app: Callable, threads: int = 4) -> None:
        self.socket_map: dict = {}
        self.server = waitress.server.create_server(
            wsgi_app, map=self.socket_map, host="127.0.0.1", port=0, threads=threads
        )
        self.port = self.server.effective_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.run, name="waitress", daemon=True)
        self.thread.start()

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def stop(self) -> None:
        """Close the server and its channels, then stop the worker threads, within seconds.

        The socket map belongs to the loop thread, so the closing (server.close() and every
        open channel's) runs there, handed over through the server's trigger.
        """
        self.server.trigger.pull_trigger(lambda: wasyncore.close_all(self.socket_map))
        self.thread.join(timeout=5)
        self.server.task_dispatcher.shutdown(timeout=5)
        assert not self.thread.is_alive(), "the waitress loop did not stop"
        assert not self.server.task_dispatcher.threads, "waitress worker threads did not stop"


@pytest.fixture
def serve(make_app):
    """Start a syncnode app with the given settings on waitress; stop it at teardown."""
    servers: list[ThreadedServer] = []

    def start(threads: int = 4, **settings) -> ThreadedServer:
        server = ThreadedServer(make_app(**settings), threads)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


# ==================================================================================================
# App API: real client
# ==================================================================================================

#: Runs @immich/sdk against a live server: node SCRIPT CONFIG_JSON, prints one JSON document of
#: {step: {"ok": answer} | {"error": {...}}}. A failing step is recorded, and the script goes on.
SDK_SCRIPT = r"""
import * as sdk from '@immich/sdk';

const config = JSON.parse(process.argv[2]);
const results = {};

const describe = (error) => {
  if (sdk.isHttpError(error)) return { kind: 'HttpError', status: error.status, data: error.data };
  if (sdk.isMalformedResponseError(error)) return { kind: error.name, message: error.message };
  return { kind: error?.name ?? 'unknown', message: String(error?.message ?? error) };
};

async function step(name, call) {
  try {
    results[name] = { ok: await call() };
  } catch (error) {
    results[name] = { error: describe(error) };
  }
  return results[name].ok;
}

async function syncNode(method, path, token, body) {
  const headers = { Authorization: `Bearer ${token}` };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const response = await fetch(config.syncUrl + path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  return { status: response.status, body: text ? JSON.parse(text) : null };
}

const { admin, bob, password } = config;
sdk.init({ baseUrl: config.baseUrl });
await step('configBefore', () => sdk.getServerConfig());
await step('ping', () => sdk.pingServer());
await step('signUpAdmin', () => sdk.signUpAdmin({
  signUpDto: { email: admin.email, password, name: admin.name },
}));
await step('signUpAgain', () => sdk.signUpAdmin({
  signUpDto: { email: 'second@example.org', password, name: 'Second' },
}));
await step('registerBob', async () => {
  const response = await fetch(config.syncUrl + '/account', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ id: bob.email, password }),
  });
  return { status: response.status, body: await response.json() };
});
await step('configAfter', () => sdk.getServerConfig());
await step('wrongPassword', () => sdk.login({
  loginCredentialDto: { email: admin.loginEmail, password: 'not the password' },
}));
await step('bobLogin', () => sdk.login({ loginCredentialDto: { email: bob.email, password } }));
const auth = await step('login', () => sdk.login({
  loginCredentialDto: { email: admin.loginEmail, password },
}));
if (auth) {
  sdk.setHeader('Authorization', `Bearer ${auth.accessToken}`);
  await step('me', () => sdk.getMyUser());
  await step('validate', () => sdk.validateAccessToken());
  const created = await step('createApiKey', () => sdk.createApiKey({
    apiKeyCreateDto: { name: 'sdk key', permissions: ['all'] },
  }));
  await step('apiKeys', () => sdk.getApiKeys());
  await step('sessions', () => sdk.getSessions());
  await step('accountSessions', () => syncNode('GET', '/account', auth.accessToken));
  await step('notServed', () => sdk.getServerStatistics());
  if (created) {
    sdk.init({ baseUrl: config.baseUrl, apiKey: created.secret });
    sdk.setHeader('Authorization', undefined);
    await step('meByApiKey', () => sdk.getMyUser());
    await step('myApiKey', () => sdk.getMyApiKey());
    await step('sessionsByApiKey', () => sdk.getSessions());
    sdk.setApiKey(undefined);
  }
  sdk.setHeader('Authorization', `Bearer ${auth.accessToken}`);
  await step('logout', () => sdk.logout());
  await step('meAfterLogout', () => sdk.getMyUser());
  await step('storeAfterLogout', () => syncNode('GET', '/store', auth.accessToken));
}
console.log(JSON.stringify(results));
"""

NPM_INSTALL_TIMEOUT = 180
NODE_RUN_TIMEOUT = 60


def skip_or_fail(reason: str) -> NoReturn:
    """Skip for a missing tool on a developer's machine; on CI (CI set) fail instead."""
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason} (CI is set, so this fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def immich_sdk_dir(tmp_path_factory) -> str:
    """A folder with @immich/sdk 3.x installed from npm, once per test session."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        skip_or_fail("node and npm are needed to run @immich/sdk")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
    major = re.match(r"v(\d+)", version.stdout.strip())
    if major is None or int(major[1]) < 18:
        skip_or_fail(f"@immich/sdk needs Node.js 18 or newer (global fetch), not {version.stdout}")
    folder = tmp_path_factory.mktemp("immich-sdk")
    # A package.json of its own keeps npm from installing into a project further up.
    (folder / "package.json").write_text('{"name": "sdk-check", "private": true}\n')
    command = [npm, "install", "--no-audit", "--no-fund", "@immich/sdk@3"]
    env = {**os.environ, "npm_config_update_notifier": "false"}
    try:
        done = subprocess.run(
            command, cwd=folder, env=env, capture_output=True, text=True,
            timeout=NPM_INSTALL_TIMEOUT,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        skip_or_fail(f"npm install @immich/sdk@3 took over {NPM_INSTALL_TIMEOUT} s")
    if done.returncode != 0:
        skip_or_fail(f"npm install @immich/sdk@3 failed: {done.stderr.strip()[-2000:]}")
    manifest = folder / "node_modules" / "@immich" / "sdk" / "package.json"
    if not manifest.exists():
        skip_or_fail("npm install @immich/sdk@3 left no node_modules/@immich/sdk")
    assert json.loads(manifest.read_text())["version"].startswith("3.")
    return str(folder)


def run_sdk_script(sdk_dir: str, config: dict) -> dict:
    """Write the SDK script beside node_modules, run it on the config, return its results."""
    script = os.path.join(sdk_dir, "sdk_check.mjs")
    with open(script, "w", encoding="utf-8") as file:
        file.write(SDK_SCRIPT)
    try:
        done = subprocess.run(
            [shutil.which("node") or "node", script, json.dumps(config)],
            cwd=sdk_dir, capture_output=True, text=True, timeout=NODE_RUN_TIMEOUT,
        )  # fmt: skip
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the @immich/sdk script ran over {NODE_RUN_TIMEOUT} s: {error.stderr}")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_app_client_immich_sdk_works_against_a_live_server(immich_sdk_dir, serve, db):
    live = serve()
    config = {
        "baseUrl": f"{live.url}/api",
        "syncUrl": live.url,
        "password": PASSWORD,
        "admin": {"email": "Admin@Example.org", "loginEmail": " ADMIN@example.ORG", "name": "Ada"},
        "bob": {"email": "bob"},
    }
    results = run_sdk_script(immich_sdk_dir, config)
    failed = {name: result["error"] for name, result in results.items() if "error" in result}
    expected_failures = {
        "signUpAgain", "wrongPassword", "notServed", "meAfterLogout",
    }  # fmt: skip
    assert set(failed) == expected_failures, failed
    ok = {name: result["ok"] for name, result in results.items() if "ok" in result}

    # Server facts, before and after the first account.
    assert ok["ping"] == {"res": "pong"}
    assert ok["configBefore"] == {
        "loginPageMessage": "",
        "userDeleteDelay": 0,
        "isInitialized": False,
    }
    assert ok["configAfter"]["isInitialized"] is True

    # The admin: signed up through the SDK, the id normalised, a fresh v4 UUID.
    admin = ok["signUpAdmin"]
    assert UUID4_TEXT.fullmatch(admin["id"])
    assert admin["email"] == "admin@example.org" and admin["name"] == "Ada"
    assert admin["isAdmin"] is True and admin["shouldChangePassword"] is False
    assert failed["signUpAgain"]["kind"] == "HttpError"
    assert failed["signUpAgain"]["status"] == 400
    assert failed["signUpAgain"]["data"]["message"] == "The server already has an admin"

    # Bob registered on the Sync Node API and logs in on the App API as a plain user.
    assert ok["registerBob"]["status"] == 200
    assert set(ok["registerBob"]["body"]) == {"token", "expiration"}
    assert ok["bobLogin"]["userEmail"] == "bob" and ok["bobLogin"]["isAdmin"] is False
    assert UUID4_TEXT.fullmatch(ok["bobLogin"]["userId"])
    assert ok["bobLogin"]["userId"] != admin["id"]

    # A wrong password is an HttpError 401 with Immich's JSON body, not a malformed answer.
    wrong = failed["wrongPassword"]
    assert wrong["kind"] == "HttpError" and wrong["status"] == 401
    assert wrong["data"]["message"] == "Incorrect email or password"
    assert wrong["data"]["statusCode"] == 401 and wrong["data"]["error"] == "Unauthorized"

    # Login and the user behind the token.
    login = ok["login"]
    assert login["userId"] == admin["id"] and login["userEmail"] == "admin@example.org"
    assert login["name"] == "Ada" and login["isAdmin"] is True
    assert isinstance(login["accessToken"], str) and len(login["accessToken"]) >= 43
    assert ok["me"]["id"] == admin["id"] and ok["me"]["email"] == "admin@example.org"
    assert ok["validate"] == {"authStatus": True}

    # The API key: created, listed, and acting for its user.
    created = ok["createApiKey"]
    assert isinstance(created["secret"], str) and len(created["secret"]) >= 43
    key = created["apiKey"]
    assert UUID4_TEXT.fullmatch(key["id"])
    assert key["name"] == "sdk key" and key["permissions"] == ["all"]
    assert ok["apiKeys"] == [key]
    assert ok["meByApiKey"]["id"] == admin["id"]
    assert ok["myApiKey"] == key

    # Sessions: the login's is the one current session, the same one the Sync Node API lists.
    sessions = ok["sessions"]
    assert len(sessions) == 1
    assert sessions[0]["current"] is True and UUID4_TEXT.fullmatch(sessions[0]["id"])
    assert sessions[0]["isPendingSyncReset"] is False
    account = ok["accountSessions"]
    assert account["status"] == 200
    assert [(entry["id"], entry["current"]) for entry in account["body"]] == [
        (sessions[0]["id"], True)
    ]
    assert [entry["current"] for entry in ok["sessionsByApiKey"]] == [False]

    # Routes outside the document answer JSON 404s, so the SDK reports an HttpError.
    assert failed["notServed"]["kind"] == "HttpError" and failed["notServed"]["status"] == 404
    assert failed["notServed"]["data"]["message"] == "Cannot GET /api/server/statistics"

    # Logout ends the session on both APIs.
    assert ok["logout"] == {"successful": True, "redirectUri": "/auth/login?autoLaunch=0"}
    assert failed["meAfterLogout"]["status"] == 401
    assert failed["meAfterLogout"]["data"]["message"] == "Invalid user token"
    assert ok["storeAfterLogout"]["status"] == 401
    assert ok["storeAfterLogout"]["body"]["code"] == "AUTH01"

    # What the server stored: two users, one API key, only digests of secrets.
    assert db.execute("SELECT name FROM users ORDER BY id").fetchall() == [
        ("admin@example.org",), ("bob",),
    ]  # fmt: skip
    digest = hashlib.sha256(created["secret"].encode()).digest()
    assert db.execute("SELECT public_id, secret_digest FROM api_keys").fetchall() == [
        (key["id"], digest)
    ]


# ==================================================================================================
# App API: cross-API
# ==================================================================================================


def test_cross_api_sync_node_login_token_works_on_app_api(client, user):
    token = client.post_json("/auth", {"id": "alice", "password": PASSWORD}).json["token"]
    me = client.get("/api/users/me", headers=auth_headers(token), status=200).json
    assert me["email"] == "alice" and me["name"] == "alice"
    assert UUID4_TEXT.fullmatch(me["id"])


def test_cross_api_app_login_token_works_on_sync_node(client, user):
    token = app_login_token(client, "alice")
    put(client, User("alice", token), "from-app", b"app value", status=204)
    listing = client.get("/store", headers=auth_headers(token), status=200).json
    assert [entry["key"] for entry in listing] == ["from-app"]
    assert client.get("/store/from-app", headers=user.headers).body == b"app value"


def test_cross_api_app_revokes_sync_node_session(client, user):
    sync_token = client.post_json("/auth", {"id": "alice", "password": PASSWORD}).json["token"]
    listing = client.get("/account", headers=auth_headers(sync_token)).json
    [session_id] = [entry["id"] for entry in listing if entry["current"]]
    app_token = app_login_token(client, "alice")
    client.delete(f"/api/sessions/{session_id}", headers=auth_headers(app_token), status=204)
    response = client.get("/store", headers=auth_headers(sync_token), status=401)
    assert_error(response, 401, "AUTH01")
    client.get("/store", headers=user.headers, status=200)
    client.get("/store", headers=auth_headers(app_token), status=200)


def test_cross_api_app_logout_ends_the_token_on_sync_node(client, user):
    token = app_login_token(client, "alice")
    client.post("/api/auth/logout", headers=auth_headers(token), status=200)
    assert_error(client.get("/store", headers=auth_headers(token), status=401), 401, "AUTH01")
    assert_error(client.get("/account", headers=auth_headers(token), status=401), 401, "AUTH01")
    client.get("/store", headers=user.headers, status=200)


def test_cross_api_account_lists_app_login_and_child_sessions(client, user, clock):
    clock.advance(10)
    token = app_login_token(client, "alice")
    clock.advance(10)
    child = client.post_json("/api/sessions", {}, headers=auth_headers(token), status=201).json
    listing = client.get("/account", headers=auth_headers(token), status=200).json
    app_sessions = client.get("/api/sessions", headers=auth_headers(token)).json
    assert [set(entry) for entry in listing] == [{"id", "expiration", "current", "createdAt"}] * 3
    assert {entry["id"] for entry in listing} == {entry["id"] for entry in app_sessions}
    # Newest first: the child, the App API login, the registration's session.
    assert listing[0]["id"] == child["id"]
    assert [entry["current"] for entry in listing] == [False, True, False]
    assert [entry["createdAt"] for entry in listing] == sorted(
        (entry["createdAt"] for entry in listing), reverse=True
    )
    assert listing[0]["expiration"] == listing[1]["expiration"]  # A child outlives no parent.
    from_child = client.get("/account", headers=auth_headers(child["token"]), status=200).json
    assert [entry["current"] for entry in from_child] == [True, False, False]


def test_cross_api_sync_node_logout_ends_app_child_sessions(client, user):
    child = client.post_json("/api/sessions", {}, headers=user.headers, status=201).json
    client.get("/store", headers=auth_headers(child["token"]), status=200)
    client.delete("/auth", headers=user.headers, status=204)
    response = client.get("/store", headers=auth_headers(child["token"]), status=401)
    assert_error(response, 401, "AUTH01")


# API keys on Sync Node paths.


def api_key_headers(secret: str) -> dict[str, str]:
    return {"x-api-key": secret}


def test_cross_api_store_read_key_reads_but_cannot_write(client, user, db):
    token = put(client, user, "notes", b"secret notes").headers["X-Sync-Token"]
    headers = api_key_headers(new_api_key(client, user, "store.read"))
    response = client.get("/store/notes", headers=headers, status=200)
    assert response.body == b"secret notes" and response.headers["X-Sync-Token"] == token
    assert client.get("/store", headers=headers).json == [
        {"key": "notes", "permission": "OWN", "token": token}
    ]
    assert client.get("/permission/notes", headers=headers).json == [
        {"user": "alice", "permission": "OWN"}
    ]
    before = snapshot(db)
    response = client.put(
        "/store/notes", b"changed", headers={**headers, "X-Sync-Token": token}, status=403
    )
    assert_error(response, 403, "PERM01")
    assert response.json["message"] == "Missing required permission: store.write"
    assert snapshot(db) == before


def test_cross_api_store_write_key_may_put_but_not_delete(client, user, db):
    token = put(client, user, "notes", b"first").headers["X-Sync-Token"]
    headers = api_key_headers(new_api_key(client, user, "store.write"))
    response = client.put(
        "/store/notes", b"second", headers={**headers, "X-Sync-Token": token}, status=204
    )
    token = response.headers["X-Sync-Token"]
    created = client.put("/store/created-by-key", b"new", headers=headers, status=204)
    assert client.get("/store", headers=user.headers).json == [
        {"key": "created-by-key", "permission": "OWN", "token": created.headers["X-Sync-Token"]},
        {"key": "notes", "permission": "OWN", "token": token},
    ]
    before = snapshot(db)
    response = client.delete("/store/notes", headers={**headers, "X-Sync-Token": token}, status=403)
    assert_error(response, 403, "PERM01")
    assert response.json["message"] == "Missing required permission: store.own"
    assert snapshot(db) == before
    assert client.get("/store/notes", headers=user.headers).body == b"second"


def test_cross_api_store_own_key_is_capped_by_the_users_read_permission(client, user, other, db):
    token = put(client, other, "bobs", b"bob's value").headers["X-Sync-Token"]
    share(client, other, "bobs", {"alice": "READ"}, status=204)
    headers = api_key_headers(new_api_key(client, user, "store.own"))
    assert client.get("/store/bobs", headers=headers, status=200).body == b"bob's value"
    before = snapshot(db)
    response = client.delete("/store/bobs", headers={**headers, "X-Sync-Token": token}, status=403)
    assert_error(response, 403, "PERM01")
    response = client.put(
        "/store/bobs", b"overwrite", headers={**headers, "X-Sync-Token": token}, status=403
    )
    assert_error(response, 403, "PERM01")
    assert snapshot(db) == before


def test_cross_api_store_own_key_deletes_the_users_own_key(client, user, db):
    token = put(client, user, "mine", b"v").headers["X-Sync-Token"]
    headers = api_key_headers(new_api_key(client, user, "store.own"))
    client.delete("/store/mine", headers={**headers, "X-Sync-Token": token}, status=204)
    assert table_counts(db)["items"] == 0


def test_cross_api_session_read_key_lists_sessions_with_none_current(client, user):
    client.post_json("/auth", {"id": "alice", "password": PASSWORD})
    headers = api_key_headers(new_api_key(client, user, "session.read"))
    listing = client.get("/account", headers=headers, status=200).json
    assert len(listing) == 2
    assert [entry["current"] for entry in listing] == [False, False]
    by_session = client.get("/account", headers=user.headers).json
    assert {entry["id"] for entry in listing} == {entry["id"] for entry in by_session}


def test_cross_api_key_without_session_read_cannot_list_sessions(client, user):
    headers = api_key_headers(new_api_key(client, user, "store.own"))
    response = client.get("/account", headers=headers, status=403)
    assert_error(response, 403, "PERM01")
    assert response.json["message"] == "Missing required permission: session.read"


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("DELETE", "/auth", None),
        ("DELETE", "/account", None),
        ("POST", "/password", json.dumps({"password": "a new password"}).encode()),
    ],
    ids=["logout", "delete-account", "change-password"],
)
def test_cross_api_session_only_operations_refuse_api_keys(client, user, db, method, path, body):
    headers = api_key_headers(new_api_key(client, user, "all"))
    if body is not None:
        headers["Content-Type"] = "application/json"
    before, counts = snapshot(db), table_counts(db)
    response = client.request(path, method=method, body=body, headers=headers, status=403)
    assert_error(response, 403, "PERM01")
    assert snapshot(db) == before and table_counts(db) == counts
    client.get("/store", headers=user.headers, status=200)


@pytest.mark.parametrize(
    "method, path",
    [("GET", "/store"), ("GET", "/store/k"), ("PUT", "/store/k"), ("GET", "/account")],
)
def test_cross_api_unknown_api_key_is_auth01(client, user, db, method, path):
    headers = api_key_headers(secrets.token_urlsafe(32))
    response = client.request(path, method=method, headers=headers, status=401)
    assert_error(response, 401, "AUTH01")
    assert table_counts(db)["items"] == 0


def test_cross_api_bad_bearer_beside_good_api_key_is_auth01(client, user):
    headers = {
        **api_key_headers(new_api_key(client, user, "all")),
        "Authorization": "Bearer " + secrets.token_urlsafe(32),
    }
    assert_error(client.get("/store", headers=headers, status=401), 401, "AUTH01")


def test_cross_api_good_bearer_beside_unknown_api_key_decides(client, user):
    headers = {**user.headers, **api_key_headers("no-such-key")}
    client.get("/store", headers=headers, status=200)


@pytest.mark.parametrize(
    "credential",
    ["cookie", "session-key-query", "api-key-query", "user-token-header"],
)
def test_cross_api_app_only_credentials_never_reach_sync_node_paths(client, user, credential):
    secret = new_api_key(client, user, "all")
    put(client, user, "k", b"v", status=204)
    headers, query = {}, ""
    if credential == "cookie":
        headers["Cookie"] = f"immich_access_token={user.token}"
    elif credential == "session-key-query":
        query = f"?sessionKey={user.token}"
    elif credential == "api-key-query":
        query = f"?apiKey={secret}"
    else:
        headers["x-immich-user-token"] = user.token
    # The credential is good: the App API takes it.
    client.get("/api/users/me" + query, headers=headers, status=200)
    for path in ("/store", "/store/k", "/account"):
        response = client.get(path + query, headers=headers, status=401)
        assert_error(response, 401, "AUTH01")


def test_cross_api_deleting_the_account_removes_its_api_keys(client, user, db):
    secret = new_api_key(client, user, "all")
    client.get("/store", headers=api_key_headers(secret), status=200)
    client.delete("/account", headers=user.headers, status=204)
    assert table_counts(db)["api_keys"] == 0
    response = client.get("/store", headers=api_key_headers(secret), status=401)
    assert_error(response, 401, "AUTH01")


# ==================================================================================================
# App API: concurrency
# ==================================================================================================


def test_app_concurrency_admin_sign_up_race_has_one_winner(serve, db):
    live = serve(threads=8)
    callers = 8
    barrier = threading.Barrier(callers)
    answers: list[tuple[int, dict] | None] = [None] * callers
    errors: list[BaseException] = []

    def sign_up(number: int) -> None:
        conn = live.connect()
        try:
            conn.connect()  # Connected before the barrier, so that the requests race.
            body = {"email": f"admin{number}@example.org", "password": PASSWORD, "name": "Admin"}
            barrier.wait(timeout=10)
            conn.request(
                "POST", "/api/auth/admin-sign-up", json.dumps(body).encode(),
                {"Content-Type": "application/json"},
            )  # fmt: skip
            response = conn.getresponse()
            answers[number] = (response.status, json.loads(response.read()))
        except BaseException as error:
            errors.append(error)
        finally:
            conn.close()

    threads = [threading.Thread(target=sign_up, args=(n,), daemon=True) for n in range(callers)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "a caller did not finish in time"
    assert not errors, errors

    winners = [number for number, (status, _) in enumerate(answers) if status == 201]
    assert len(winners) == 1
    [winner] = winners
    assert answers[winner][1]["email"] == f"admin{winner}@example.org"
    assert answers[winner][1]["isAdmin"] is True
    for number, (status, body) in enumerate(answers):
        if number != winner:
            assert status == 400
            assert body["message"] == "The server already has an admin"
    assert db.execute("SELECT name FROM users").fetchall() == [(f"admin{winner}@example.org",)]


# ==================================================================================================
# Migrations
# ==================================================================================================

#: A store value with every byte value, so that nothing may be decoded or re-encoded.
EVERY_BYTE = bytes(range(256)) * 3


def iso_ms(ms: int) -> str:
    """Format milliseconds since the epoch as the App API does: UTC ISO 8601 with milliseconds."""
    moment = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def dump_database(path: str) -> tuple[int, list[str]]:
    """Return the schema version and the whole database as SQL, for before/after comparisons."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        return version, list(conn.iterdump())
    finally:
        conn.close()


class V1Data:
    """What build_v1_database wrote by hand, to be read back through the APIs."""

    def __init__(self, now_ms: int) -> None:
        day = 86_400_000
        #: user id -> (row id, created_ms)
        self.users = {
            "alice@example.org": (1, now_ms - 30 * day),
            "bob": (2, now_ms - 20 * day),
            "@odd": (3, now_ms - 10 * day),
            "zoë@home@example.org": (4, now_ms - 5 * day),
        }
        #: session token -> (public id, user id, created_ms, expires_ms)
        self.sessions = {
            secrets.token_urlsafe(32): (str(uuid.uuid4()), name, now_ms - age, now_ms + 10 * day)
            for name, age in [
                ("alice@example.org", 3 * day),
                ("bob", 2 * day),
                ("bob", day),
                ("@odd", day // 2),
            ]
        }
        #: key -> (value, store token, meta, {user id: level})
        self.items = {
            "notes/alice": (EVERY_BYTE, "tok-alice-1", "v=1; kind=notes",
                            {"alice@example.org": "OWN", "bob": "READ"}),
            "shared": (b"shared \xe2\x82\xac value", "tok-shared-7", None,
                       {"bob": "OWN", "alice@example.org": "WRITE", "@odd": "OWN"}),
            "empty": (b"", "tok-empty-1", "", {"@odd": "OWN"}),
        }  # fmt: skip
        self.reset_token = secrets.token_urlsafe(32)
        self.reset_expires_ms = now_ms + 3_600_000

    def token_of(self, name: str) -> str:
        """The newest session token of a user."""
        tokens = [(s[2], t) for t, s in self.sessions.items() if s[1] == name]
        return max(tokens)[1]


def build_v1_database(path: str, now_ms: int) -> V1Data:
    """Make a database of schema version 1 (the core schema) and fill it by hand, as v1 did."""
    data = V1Data(now_ms)
    hasher = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        assert syncnode.migrate(conn, syncnode.SCHEMA[:1]) == 1
        conn.execute("PRAGMA foreign_keys = ON")
        row_ids = {name: row_id for name, (row_id, _) in data.users.items()}
        for name, (row_id, created_ms) in data.users.items():
            conn.execute(
                "INSERT INTO users (id, name, password_hash, created_ms) VALUES (?, ?, ?, ?)",
                (row_id, name, hasher.hash(PASSWORD), created_ms),
            )
        for token, (public_id, name, created_ms, expires_ms) in data.sessions.items():
            conn.execute(
                "INSERT INTO sessions (public_id, user_id, token_digest, created_ms, expires_ms) "
                "VALUES (?, ?, ?, ?, ?)",
                (public_id, row_ids[name], hashlib.sha256(token.encode()).digest(), created_ms,
                 expires_ms),
            )  # fmt: skip
        for key, (value, token, meta, holders) in data.items.items():
            item_id = conn.execute(
                "INSERT INTO items (key, token, meta, updated_ms, size, value) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (key, token, meta or None, now_ms - 1000, len(value), value),
            ).lastrowid
            for name, level in holders.items():
                conn.execute(
                    "INSERT INTO permissions (item_id, user_id, level) VALUES (?, ?, ?)",
                    (item_id, row_ids[name], syncnode.LEVELS[level]),
                )
        conn.execute(
            "INSERT INTO reset_tokens (user_id, token_digest, expires_ms) VALUES (?, ?, ?)",
            (row_ids["bob"], hashlib.sha256(data.reset_token.encode()).digest(),
             data.reset_expires_ms),
        )  # fmt: skip
        conn.execute(
            "INSERT INTO attempts (kind, subject, at_ms) VALUES ('login_id', 'bob', ?)",
            (now_ms - 1000,),
        )
    finally:
        conn.close()
    return data


@pytest.fixture
def v1_data(db_path, clock) -> V1Data:
    return build_v1_database(db_path, int(clock.now * 1000))


def test_migration_v1_database_reaches_the_newest_version(v1_data, app, db):
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(syncnode.SCHEMA)
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"users", "sessions", "reset_tokens", "items", "permissions", "api_keys"} <= tables


def test_migration_v1_users_get_uuids_names_and_update_times(v1_data, app, db):
    rows = db.execute(
        "SELECT id, name, uuid, display_name, created_ms, updated_ms FROM users ORDER BY id"
    ).fetchall()
    assert [(row[0], row[1], row[4]) for row in rows] == [
        (row_id, name, created_ms) for name, (row_id, created_ms) in v1_data.users.items()
    ]
    uuids = [row[2] for row in rows]
    assert all(UUID4_TEXT.fullmatch(value) for value in uuids), uuids
    assert len(set(uuids)) == len(uuids)
    assert [row[3] for row in rows] == ["alice", "bob", "@odd", "zoë@home"]
    assert all(row[5] == row[4] for row in rows)


def test_migration_v1_sessions_get_device_fields_and_update_times(v1_data, app, db):
    rows = db.execute(
        "SELECT public_id, created_ms, updated_ms, expires_ms, parent_id, device_type, device_os,"
        " app_version FROM sessions ORDER BY id"
    ).fetchall()
    assert rows == [
        (public_id, created_ms, created_ms, expires_ms, None, "", "", None)
        for public_id, _, created_ms, expires_ms in v1_data.sessions.values()
    ]


def test_migration_v1_sessions_authenticate_on_both_apis(v1_data, client, db, clock):
    for token, (public_id, name, created_ms, expires_ms) in v1_data.sessions.items():
        client.get("/store", headers=auth_headers(token), status=200)
        me = client.get("/api/users/me", headers=auth_headers(token), status=200).json
        public_user_id, display_name = db.execute(
            "SELECT uuid, display_name FROM users WHERE name = ?", (name,)
        ).fetchone()
        created_user_ms = v1_data.users[name][1]
        assert me == {
            "id": public_user_id,
            "name": display_name,
            "email": name,
            "shouldChangePassword": False,
            "isAdmin": name == "alice@example.org",
            "createdAt": iso_ms(created_user_ms),
            "deletedAt": None,
            "updatedAt": iso_ms(created_user_ms),
            "status": "active",
        }
        app_sessions = client.get("/api/sessions", headers=auth_headers(token)).json
        [app_current] = [entry for entry in app_sessions if entry["current"]]
        assert app_current["id"] == public_id
        assert app_current["createdAt"] == iso_ms(created_ms)
        # The first use over an hour after the last refresh moved updatedAt to now.
        assert app_current["updatedAt"] == iso_ms(int(clock.now * 1000))
        assert app_current["expiresAt"] == iso_ms(expires_ms)
        assert app_current["deviceType"] == "" and app_current["appVersion"] is None


def test_migration_v1_sessions_are_listed_on_the_sync_node_api(v1_data, client):
    for token, (public_id, _, created_ms, expires_ms) in v1_data.sessions.items():
        listing = client.get("/account", headers=auth_headers(token), status=200).json
        [current] = [entry for entry in listing if entry["current"]]
        assert current["id"] == public_id
        assert current["expiration"] == expires_ms and current["createdAt"] == created_ms


def test_migration_v1_values_read_back_with_tokens_and_permissions(v1_data, client):
    for key, (value, token, meta, holders) in v1_data.items.items():
        expected_holders = [
            {"user": name, "permission": level} for name, level in sorted(holders.items())
        ]
        for name, level in holders.items():
            headers = auth_headers(v1_data.token_of(name))
            response = client.get(f"/store/{key}", headers=headers, status=200)
            assert response.body == value
            assert response.headers["X-Sync-Token"] == token
            assert response.headers.get("X-Sync-Meta") == (meta or None)
            assert client.get(f"/permission/{key}", headers=headers).json == expected_holders
            listed = client.get("/store", headers=headers).json
            assert {"key": key, "permission": level, "token": token} in listed


def test_migration_v1_tokens_still_guard_updates(v1_data, client):
    alice = User("alice@example.org", v1_data.token_of("alice@example.org"))
    assert_error(put(client, alice, "shared", b"new", token="stale", status=409), 409, "KEY01")
    response = put(client, alice, "shared", b"new", token="tok-shared-7", status=204)
    assert response.headers["X-Sync-Token"] != "tok-shared-7"
    assert client.get("/store/shared", headers=alice.headers).body == b"new"


def test_migration_v1_passwords_and_reset_token_still_work(v1_data, client):
    for name in v1_data.users:
        client.post_json("/auth", {"id": name, "password": PASSWORD}, status=200)
        client.post_json("/api/auth/login", {"email": name, "password": PASSWORD}, status=201)
        client.reset()
    reset = {**auth_headers(v1_data.reset_token), "Content-Type": "application/json"}
    client.post("/password", json.dumps({"password": "a new password"}), headers=reset, status=204)
    client.post_json("/auth", {"id": "bob", "password": "a new password"}, status=200)


def test_migration_v1_users_keep_their_uuids_when_reopened(v1_data, make_app, db_path, db):
    make_app().close()
    first = db.execute("SELECT name, uuid, display_name FROM users ORDER BY id").fetchall()
    make_app().close()
    assert db.execute("SELECT name, uuid, display_name FROM users ORDER BY id").fetchall() == first


def test_migration_twice_is_a_no_op(v1_data, db_path):
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        assert syncnode.migrate(conn) == len(syncnode.SCHEMA)
        once = dump_database(db_path)
        assert syncnode.migrate(conn) == len(syncnode.SCHEMA)
    finally:
        conn.close()
    assert once[0] == len(syncnode.SCHEMA)
    assert dump_database(db_path) == once


def test_migration_too_new_database_raises_and_changes_nothing(make_app, db_path):
    client = webtest.TestApp(make_app())
    client.post_json("/account", {"id": "alice", "password": PASSWORD}, status=200)
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute(f"PRAGMA user_version = {len(syncnode.SCHEMA) + 1}")
    conn.close()
    before = dump_database(db_path)
    with pytest.raises(syncnode.DatabaseTooNew):
        syncnode.create_app(db_path, clock=FakeClock(), **CHEAP_HASHING)
    assert dump_database(db_path) == before


@pytest.mark.parametrize("start", [0, 1], ids=["from-empty", "from-v1"])
def test_migration_failing_step_rolls_back_whole(db_path, clock, start):
    if start:
        build_v1_database(db_path, int(clock.now * 1000))
    before = dump_database(db_path)
    failing = (
        "CREATE TABLE extra (a);\n"
        "INSERT INTO extra VALUES (1);\n"
        "INSERT INTO no_such_table VALUES (1);\n"
    )
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError):
            syncnode.migrate(conn, [*syncnode.SCHEMA, failing])
        assert not conn.in_transaction
    finally:
        conn.close()
    assert dump_database(db_path) == before
    assert before[0] == start


def open_descriptors(path: str) -> list[str]:
    """The file descriptors of this process open on a database file or its -wal and -shm."""
    names = {os.path.realpath(path) + suffix for suffix in ("", "-wal", "-shm")}
    folder = "/proc/self/fd"
    return [fd for fd in os.listdir(folder) if os.path.realpath(f"{folder}/{fd}") in names]


def make_too_new_database(path: str) -> None:
    """A database in SQLite's default rollback-journal mode, one schema version ahead."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE future (a)")
    conn.execute("INSERT INTO future VALUES ('from a newer syncnode')")
    conn.execute(f"PRAGMA user_version = {len(syncnode.SCHEMA) + 1}")
    conn.close()


def test_migration_too_new_database_file_is_left_byte_for_byte(db_path):
    make_too_new_database(db_path)
    with open(db_path, "rb") as file:
        before = file.read()
    with pytest.raises(syncnode.DatabaseTooNew):
        syncnode.create_app(db_path, clock=FakeClock(), **CHEAP_HASHING)
    with open(db_path, "rb") as file:
        assert file.read() == before


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_migration_refused_database_leaves_no_connection_open(db_path):
    make_too_new_database(db_path)
    with pytest.raises(syncnode.DatabaseTooNew):
        syncnode.create_app(db_path, clock=FakeClock(), **CHEAP_HASHING)
    assert open_descriptors(db_path) == []
