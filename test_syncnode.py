"""Tests for syncnode, black box over WSGI unless a promise needs the database or a real server.

Areas, each behind a banner: accounts, sessions, passwords and reset, throttling, store,
permissions, health, errors and routing, secrets, embedding, real server, CLI, properties.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import sqlite3
import urllib.parse

import argon2
import pytest
import webtest

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
