"""Tests for syncnode, black box over WSGI unless a promise needs the database or a real server.

Areas, each behind a banner: accounts, sessions, passwords and reset, throttling, store,
permissions, health, errors and routing, secrets, embedding, real server, CLI, properties.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import sqlite3
import threading

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


def put(client, user: User, key: str, value: bytes = b"v", token: str | None = None, **kw):
    """PUT a value as the user, with X-Sync-Token when given; return the response."""
    headers = dict(user.headers)
    if token is not None:
        headers["X-Sync-Token"] = token
    headers.update(kw.pop("headers", {}))
    return client.put(f"/store/{key}", value, headers=headers, **kw)


def share(client, owner: User, key: str, grants: dict[str, str], **kw):
    """Grant permissions on a key as its owner; return the response."""
    body = [{"user": name, "permission": level} for name, level in grants.items()]
    return client.put_json(f"/permission/{key}", body, headers=owner.headers, **kw)


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
