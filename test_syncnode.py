"""Tests for syncnode, black box over WSGI unless a promise needs the database or a real server.

Areas, each behind a banner, in the order of the module: fixtures and shared helpers; settings;
errors and routing; what the store keeps, over HTTP: accounts (invites), sessions, passwords and
reset (reset mail), the store (streaming large values, conditional requests, batch, change feed,
long-poll, listing and paging, quotas, faults and the disk floor), permissions, health; identity
(throttling, secrets, hashing slots); the HTTP layer (CORS, a browser, the real server, slow and
stalled clients, type confusion over the served document); the App API (wire format,
credentials, auth, API keys, sessions, users, server, concurrency, a real @immich/sdk client,
cross-API credentials); the OpenAPI document and schemathesis against a live server; the app
factory and embedding; migrations; the CLI and operations (admin commands, backup and restore,
housekeeping, access log, shutdown and restarts); properties; the README's contract and curl
session.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import copy
import dataclasses
import datetime
import email
import email.policy
import errno
import getpass
import hashlib
import html
import http.client
import http.server
import importlib
import importlib.util
import io
import itertools
import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import typing
import unicodedata
import urllib.parse
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from functools import cache
from pathlib import Path
from typing import Any, NoReturn

import argon2
import bottle
import jsonschema
import pytest
import schemathesis
import waitress.server
import webob
import webtest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import syncnode

# ==================================================================================================
# Fixtures and shared helpers
# ==================================================================================================

PASSWORD = "correct horse"
NEW_PASSWORD = "battery staple"

#: Argon2 parameters that make a hash take well under a millisecond.
CHEAP_HASHING = {"argon2_time_cost": 1, "argon2_memory_cost": 8, "argon2_parallelism": 1}

#: What a session or reset token looks like inside a log line: 256 bits of URL-safe base64.
TOKEN_TEXT = re.compile(r"[A-Za-z0-9_-]{43,}")
#: A lower-case version 4 UUID, the shape of every App API id.
UUID4_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")

SYNCNODE_PY = os.path.abspath(syncnode.__file__)


def repository_file(name: str) -> Path:
    """A file of the repository, beside this one (resolved when a test asks, not at import)."""
    return Path(__file__).resolve().parent / name


# The app, its database and its users --------------------------------------------------------------


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


# The database: each test that takes one runs on SQLite and again on PostgreSQL ---------------


#: Fixtures that make a SQLite file misbehave (read-only, at the disk floor, of an old schema,
#: a backup): a test that takes one runs on SQLite only, as if marked sqlite.
SQLITE_FIXTURES = {"read_only", "floor", "v1_data", "restorable"}


def pytest_generate_tests(metafunc) -> None:
    """Run every test that takes a database once per kind (SQLite only when marked sqlite)."""
    if "database_kind" in metafunc.fixturenames:
        sqlite_only = metafunc.definition.get_closest_marker("sqlite") is not None or bool(
            SQLITE_FIXTURES & set(metafunc.fixturenames)
        )
        kinds = ["sqlite"] if sqlite_only else ["sqlite", "postgresql"]
        metafunc.parametrize("database_kind", kinds, indirect=True)


@pytest.fixture
def database_kind(request) -> str:
    return request.param


@dataclass
class PostgreSQLCluster:
    """A throwaway PostgreSQL server of the test session, on 127.0.0.1."""

    folder: Path
    port: int
    run_as: list[str]

    def url(self, schema: str | None = None, database: str = "postgres") -> str:
        """The URL of a database (in one schema of it, with schema)."""
        options = f"?options=-csearch_path%3D{schema}" if schema else ""
        return f"postgresql://syncnode@127.0.0.1:{self.port}/{database}{options}"

    def admin(self):
        """A connection of the superuser, in autocommit mode."""
        import psycopg

        return psycopg.connect(self.url(), autocommit=True)


def postgresql_programs() -> Path | None:
    """The folder of Debian's PostgreSQL server programs, newest first; None without one."""
    folders = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    return next((folder for folder in reversed(folders) if (folder / "initdb").exists()), None)


@pytest.fixture(scope="session")
def postgresql() -> Iterator[PostgreSQLCluster]:
    """Start a PostgreSQL server in a temporary folder for the session and stop it after.

    As root the server runs as the postgres user (PostgreSQL refuses root). fsync is off:
    these tests check behaviour, not durability.
    """
    programs = postgresql_programs()
    if programs is None or importlib.util.find_spec("psycopg") is None:
        skip_or_fail("PostgreSQL's server (Debian's postgresql) or psycopg is not installed")
    folder = Path(tempfile.mkdtemp(prefix="syncnode-postgresql-"))
    run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if run_as:
        shutil.chown(folder, "postgres")
    port = free_port()
    data = folder / "data"
    subprocess.run(
        [*run_as, programs / "initdb", "-D", data, "-U", "syncnode", "--auth=trust",
         "-E", "UTF8", "--no-locale", "--no-sync"],
        check=True, capture_output=True,
    )  # fmt: skip
    settings = f"-k {folder} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [*run_as, programs / "pg_ctl", "-D", data, "-o", settings, "-l", folder / "log",
         "-w", "start"],
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        yield PostgreSQLCluster(folder, port, run_as)
    finally:
        subprocess.run(
            [*run_as, programs / "pg_ctl", "-D", data, "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def db_path(request, database_kind, tmp_path) -> Iterator[str]:
    """The test's database: a file, or a schema of its own on the session's PostgreSQL."""
    if database_kind == "sqlite":
        yield str(tmp_path / "syncnode.db")
        return
    with postgresql_schema(request.getfixturevalue("postgresql")) as url:
        yield url


@contextlib.contextmanager
def postgresql_schema(cluster: PostgreSQLCluster) -> Iterator[str]:
    """Make a schema of its own for a test and drop it after; yield its URL."""
    schema = f"test_{uuid.uuid4().hex}"
    with cluster.admin() as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    yield cluster.url(schema)
    with cluster.admin() as admin:
        admin.execute("SET lock_timeout = 10000")
        admin.execute(f"DROP SCHEMA {schema} CASCADE")


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
    """A second connection to the test's database, for promises HTTP cannot show.

    On PostgreSQL it is syncnode's own connection class, which takes the same SQL.
    """
    if syncnode.is_postgresql(db_path):
        conn = syncnode.PostgreSQLConnection(db_path, syncnode.Settings(database=db_path), {})
    else:
        conn = sqlite3.connect(db_path, isolation_level=None)
    yield conn
    conn.close()


def bearer_headers(token: str) -> dict[str, str]:
    """Return the headers that carry a session (or reset) token as a bearer token."""
    return {"Authorization": f"Bearer {token}"}


class User:
    """A registered user: its id, session token and the headers that carry the token."""

    def __init__(self, name: str, token: str) -> None:
        self.name = name
        self.token = token
        self.headers = bearer_headers(token)


def register_user(client, name: str = "alice", password: str = PASSWORD, prefix: str = "") -> User:
    """Register a user through POST /account (under a mount prefix if given) and return it."""
    response = client.post_json(f"{prefix}/account", {"id": name, "password": password})
    return User(name, response.json["token"])


@pytest.fixture
def make_user(client):
    """Register users on the test's app."""

    def make(name: str = "alice", password: str = PASSWORD) -> User:
        return register_user(client, name, password)

    return make


@pytest.fixture
def user(make_user) -> User:
    return make_user("alice")


@pytest.fixture
def other(make_user) -> User:
    return make_user("bob")


# Requests -----------------------------------------------------------------------------------------


def quote(key: str) -> str:
    """Percent-encode a key for a URL path, leaving slashes and existing escapes as they are."""
    return urllib.parse.quote(key, safe="/%")


def put(
    client,
    user: User,
    key: str,
    value: bytes = b"v",
    token: str | None = None,
    meta: str | None = None,
    **kw,
):
    """PUT a value as the user, with the X-Sync-Token and X-Sync-Meta given; return the response."""
    headers = dict(user.headers)
    if token is not None:
        headers["X-Sync-Token"] = token
    if meta is not None:
        headers["X-Sync-Meta"] = meta
    headers.update(kw.pop("headers", {}))
    return client.put(f"/store/{quote(key)}", value, headers=headers, **kw)


def deleting(client, user: User, key: str, token: str, **kw):
    """DELETE a key as the user with its current token; return the response."""
    return client.delete(f"/store/{key}", headers={**user.headers, "X-Sync-Token": token}, **kw)


def share(client, owner: User, key: str, grants: dict[str, str], **kw):
    """Grant permissions on a key as its owner; return the response."""
    body = [{"user": name, "permission": level} for name, level in grants.items()]
    return client.put_json(f"/permission/{quote(key)}", body, headers=owner.headers, **kw)


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


def api_key_headers(secret: str) -> dict[str, str]:
    """Return the headers that carry an API key."""
    return {"x-api-key": secret}


@dataclass(frozen=True)
class ApiKey:
    """An API key: its secret and its public id."""

    secret: str
    id: str

    @property
    def headers(self) -> dict[str, str]:
        return api_key_headers(self.secret)


def create_api_key(client, owner: User, *permissions: str) -> ApiKey:
    """Create an API key with the owner's session and the permissions (all if none are given).

    The App API's own tests use make_key, which also checks the answer against its schema.
    """
    body = {"name": "test key", "permissions": list(permissions or ("all",))}
    response = client.post_json("/api/api-keys", body, headers=owner.headers, status=201)
    return ApiKey(response.json["secret"], response.json["apiKey"]["id"])


def app_login_token(client: webtest.TestApp, name: str, password: str = PASSWORD) -> str:
    """Log in on /api/auth/login and return the access token; the login cookies are dropped.

    The App API's own tests use app_login, which also checks the answer against its schema.
    """
    response = client.post_json("/api/auth/login", {"email": name, "password": password})
    assert response.status_int == 201
    client.reset()  # Forget the immich_access_token cookie, so that it authenticates nothing.
    return response.json["accessToken"]


def explode(*args, **kwargs):
    """Stand in for a storage function and fail the way a bug would."""
    raise RuntimeError("boom with secret detail")


# Answers and what the database holds --------------------------------------------------------------


def assert_error(response, status: int, code: str) -> None:
    """Assert a contract error answer: status, JSON type, code and a message sentence."""
    assert response.status_int == status
    assert response.content_type == "application/json"
    assert response.json["code"] == code
    assert isinstance(response.json["message"], str) and response.json["message"]
    if code == "AUTH01":
        assert response.headers["WWW-Authenticate"] == "Bearer"


def table_names(db) -> list[str]:
    """The tables of the test's database."""
    if isinstance(db, syncnode.PostgreSQLConnection):
        query = (
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        )
    else:
        query = "SELECT name FROM sqlite_master WHERE type = 'table'"
    return sorted(row[0] for row in db.execute(query))


def stored_bytes(db, db_path: str) -> bytes:
    """All that the database holds: SQLite's file and -wal, or every row of every table."""
    if isinstance(db, syncnode.PostgreSQLConnection):
        tables = table_names(db)
        rows = (row for table in tables for row in db.execute(f"SELECT * FROM {table}"))
        return b"".join(repr(row).encode() for row in rows)
    contents = b""
    for path in (db_path, db_path + "-wal"):
        with open(path, "rb") as file:
            contents += file.read()
    return contents


def table_counts(db) -> dict[str, int]:
    """Count the rows of every table, to show that a refused request changed nothing."""
    tables = table_names(db)
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


def feed_state(db) -> dict[str, list]:
    """Every row the store and the change feed answer from, to show a refusal changed nothing."""
    return {
        **snapshot(db),
        "sync_state": db.execute("SELECT seq, floor FROM sync_state").fetchall(),
        "permission_seqs": db.execute(
            "SELECT item_id, user_id, seq FROM permissions ORDER BY item_id, user_id"
        ).fetchall(),
        "tombstones": db.execute(
            "SELECT user_id, key, seq, created_ms FROM tombstones ORDER BY user_id, key"
        ).fetchall(),
    }


def logged_tokens(caplog) -> list[str]:
    """Return every token-like string in the captured log lines."""
    return [token for record in caplog.records for token in TOKEN_TEXT.findall(record.getMessage())]


def token_digest(token: str) -> bytes:
    """Return the SHA-256 digest under which a token or secret is stored."""
    return hashlib.sha256(token.encode()).digest()


def stored_hash(db, name: str = "alice") -> str:
    """Return the stored password hash of a user."""
    return db.execute("SELECT password_hash FROM users WHERE name = ?", (name,)).fetchone()[0]


def reset_digests(db) -> list[bytes]:
    """Return the digests of the stored reset tokens."""
    return [row[0] for row in db.execute("SELECT token_digest FROM reset_tokens ORDER BY user_id")]


def row_ids(db, table: str) -> list[int]:
    """Return the row ids of a table, lowest first."""
    return [row[0] for row in db.execute(f"SELECT id FROM {table} ORDER BY id")]


def user_row_id(db, name: str) -> int:
    """Return the users.id of a user."""
    return db.execute("SELECT id FROM users WHERE name = ?", (name,)).fetchone()[0]


def now_ms(clock) -> int:
    """Return the fake clock's time in milliseconds, as the server reads it."""
    return int(clock.now * 1000)


# The sync protocol --------------------------------------------------------------------------------


def token_of(response) -> str:
    """Return the X-Sync-Token of an answer."""
    return response.headers["X-Sync-Token"]


def current_seq(client, user: User) -> int:
    """Return the X-Sync-Seq of a plain GET /store, the cursor a client keeps."""
    return int(client.get("/store", headers=user.headers).headers["X-Sync-Seq"])


def changes(client, user: User, since: int, **query) -> list[dict]:
    """Return the entries of GET /store?since=... (one page, no wait)."""
    return client.get("/store", {"since": since, **query}, headers=user.headers).json


def next_link(response) -> str | None:
    """Return the URL of the answer's Link: <URL>; rel="next", or None without one."""
    value = response.headers.get("Link")
    if value is None:
        return None
    match = re.fullmatch(r'<([^<>]*)>; rel="next"', value)
    assert match, f"malformed Link header {value!r}"
    return match.group(1)


def follow_pages(client, user: User, url: str) -> list[dict]:
    """GET the URL and every page its Link headers lead to; return the entries of them all."""
    entries: list[dict] = []
    for _ in range(1000):
        response = client.get(url, headers=user.headers)
        entries += response.json
        url = next_link(response)
        if url is None:
            return entries
    raise AssertionError("the Link headers never ended")


def escaped(key: str) -> str:
    """Escape the percent signs of a key for put() and share(), which keep %XX as it is."""
    return key.replace("%", "%25")


def seed(client, user: User, keys: list[str]) -> dict[str, str]:
    """Create the keys in one POST /batch (one commit, in this order); return their tokens."""
    operations = [{"method": "PUT", "key": key, "token": None, "value": ""} for key in keys]
    response = client.post_json("/batch", {"operations": operations}, headers=user.headers)
    return {result["key"]: result["token"] for result in response.json["results"]}


def live(key: str, permission: str, token: str, seq: int) -> dict:
    """A live entry of the change feed."""
    return {"key": key, "permission": permission, "token": token, "seq": seq}


def gone(key: str, seq: int) -> dict:
    """A tombstone entry of the change feed."""
    return {"key": key, "deleted": True, "seq": seq}


# Failed logins ------------------------------------------------------------------------------------

#: Where the failed logins of fail_logins do not come from.
ELSEWHERE = {"REMOTE_ADDR": "198.51.100.9"}


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


def assert_throttled(response, window: int) -> None:
    """Assert an AUTH02 answer whose Retry-After is whole seconds within the window."""
    assert_error(response, 429, "AUTH02")
    retry_after = response.headers["Retry-After"]
    assert retry_after.isdigit() and 0 < int(retry_after) <= window


# Mounting under a prefix --------------------------------------------------------------------------


def mount_with_bottle(prefix: str) -> Callable:
    """Return a function that mounts an app on a new bottle app at the prefix."""

    def mount(wsgi_app: Callable) -> bottle.Bottle:
        parent = bottle.Bottle()
        with warnings.catch_warnings():
            # Bottle 0.13 warns that a prefix without a trailing slash falls back to a plain
            # WSGI mount; that fallback is one of the cases under test, and the mount the README
            # shows.
            warnings.simplefilter("ignore", DeprecationWarning)
            parent.mount(prefix, wsgi_app)
        return parent

    return mount


def mount_with_dispatcher(wsgi_app: Callable) -> Callable:
    """A minimal WSGI router: shift /sync from PATH_INFO to SCRIPT_NAME, else answer 404."""

    def dispatch(environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path != "/sync" and not path.startswith("/sync/"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"Nothing here."]
        script_name = environ.get("SCRIPT_NAME", "") + "/sync"
        inner = {**environ, "SCRIPT_NAME": script_name, "PATH_INFO": path[len("/sync") :]}
        return wsgi_app(inner, start_response)

    return dispatch


def mounted(app, prefix: str = "/sync") -> webtest.TestApp:
    """Return a client for the app mounted in a parent bottle app, as the README shows."""
    return webtest.TestApp(mount_with_bottle(prefix)(app))


# Real servers and processes -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Reply:
    """An answer read off a real socket, shaped like webtest's so that assert_error takes it."""

    status_int: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get_content_type()

    @property
    def json(self):
        return json.loads(self.body)


def call(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: bytes | Iterable[bytes] | None = None,
    headers: dict[str, str] | None = None,
    **kw,
) -> Reply:
    """Send one request on a connection and read the whole answer."""
    conn.request(method, path, body, headers or {}, **kw)
    response = conn.getresponse()
    return Reply(response.status, response.headers, response.read())


class RealServer:
    """A server on a port of 127.0.0.1: connections to it, one-off requests, registration."""

    port: int

    def connect(self, timeout: float = 10) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body=None, headers=None, **kw) -> Reply:
        """Send one request on a fresh connection."""
        conn = self.connect()
        try:
            return call(conn, method, path, body, headers, **kw)
        finally:
            conn.close()

    def register(self, name: str) -> User:
        """Register a user through POST /account and return it."""
        body = json.dumps({"id": name, "password": PASSWORD}).encode()
        reply = self.request("POST", "/account", body, {"Content-Type": "application/json"})
        assert reply.status_int == 200, reply.body
        return User(name, reply.json["token"])


class LiveServer(RealServer):
    """A WSGI app served by waitress on 127.0.0.1 (port 0) from a daemon thread."""

    def __init__(self, wsgi_app: Callable, threads: int, plain: bool = False) -> None:
        self.socket_map: dict = {}
        context = getattr(wsgi_app, "context", None)
        if context is not None and not plain:  # syncnode's own, as `python syncnode.py` runs it
            settings = dataclasses.replace(
                context.settings, host="127.0.0.1", port=0, threads=threads
            )
            self.server = syncnode.make_server(settings, wsgi_app, self.socket_map)
        else:
            # Reading ahead is how waitress sees a client leave (waitress.client_disconnected).
            self.server = waitress.server.create_server(
                wsgi_app, map=self.socket_map, host="127.0.0.1", port=0, threads=threads,
                channel_request_lookahead=1,
            )  # fmt: skip
        self.app = wsgi_app
        self.port = self.server.effective_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.run, name="waitress-loop", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop the loop thread and the worker threads, then close the server's sockets.

        The loop runs while its socket map holds anything, and only the loop thread may touch
        the map, so a thunk (the trigger runs thunks in that thread) empties it. The sockets
        are closed once no thread of the server is left: closing the trigger's pipe from the
        thunk would race with this thread's write that wakes the loop.
        """
        sockets: list = []

        def empty_map() -> None:
            sockets.extend(self.socket_map.values())
            self.socket_map.clear()
            sockets.extend(getattr(self.server, "sleeping", {}).values())  # parked long-polls

        self.server.trigger.pull_trigger(empty_map)
        self.thread.join(timeout=5)
        self.server.task_dispatcher.shutdown(timeout=5)
        assert not self.thread.is_alive(), "the waitress loop did not stop"
        assert not self.server.task_dispatcher.threads, "waitress worker threads did not stop"
        for each in sockets:
            each.close()


@pytest.fixture
def start_server(make_app):
    """Serve a WSGI app on waitress (127.0.0.1, port 0) from a thread; stop it at teardown.

    Without an app it serves a new syncnode app with the given settings. The server runs as many
    threads as the app's threads setting, as `python syncnode.py` does, unless server_threads
    says otherwise; the app's own bounds (hashing requests, long-polls) follow its setting.
    A syncnode app runs on syncnode's own server unless plain asks for waitress's.
    """
    servers: list[LiveServer] = []

    def start(
        wsgi_app: Callable | None = None,
        *,
        server_threads: int | None = None,
        plain: bool = False,
        **settings,
    ) -> LiveServer:
        wsgi_app = wsgi_app or make_app(**settings)
        if server_threads is None:
            server_threads = wsgi_app.context.settings.threads
        server = LiveServer(wsgi_app, server_threads, plain)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def live_server(start_server) -> LiveServer:
    return start_server(server_threads=8)


def run_threads(targets: list[Callable[[], None]], timeout: float = 10) -> None:
    """Run each target in a thread, join all within the timeout, re-raise the first error."""
    errors: list[BaseException] = []

    def guard(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=guard, args=(target,), daemon=True) for target in targets]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish in time"
    if errors:
        raise errors[0]


def live_put(live: RealServer, user: User, key: str, value: bytes) -> Reply:
    """PUT a value without a token (a create) as the user."""
    return live.request("PUT", f"/store/{key}", value, user.headers)


def live_json(server: RealServer, method: str, path: str, body, headers: dict) -> Reply:
    """Send a JSON body on a fresh connection."""
    headers = {**headers, "Content-Type": "application/json"}
    return server.request(method, path, json.dumps(body).encode(), headers)


def live_login(server: RealServer, name: str, password: str = PASSWORD) -> User:
    """Start another session for the user on the live server."""
    reply = live_json(server, "POST", "/auth", {"id": name, "password": password}, {})
    assert reply.status_int == 200, reply.body
    return User(name, reply.json["token"])


def free_port() -> int:
    """Return a port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout: float = 5.0, what: str = "the condition") -> None:
    """Poll a condition until it holds; fail the test after the timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def skip_or_fail(reason: str) -> NoReturn:
    """Skip for a missing tool on a developer's machine; on CI (CI set) fail instead."""
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason} (CI is set, so this fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


def cheap_environ() -> dict[str, str]:
    """SYNCNODE_* variables for cheap Argon2 hashing."""
    return {f"SYNCNODE_{name.upper()}": str(value) for name, value in CHEAP_HASHING.items()}


def cli_env(**variables: str) -> dict[str, str]:
    """This environment without SYNCNODE_* variables, plus cheap Argon2 and the given ones."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("SYNCNODE_")}
    env.update(cheap_environ())
    env["PYTHONPATH"] = os.path.dirname(SYNCNODE_PY)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return {**env, **variables}


def run_cli(
    cwd, *args: str, stdin: str = "", timeout: float = 30, **variables: str
) -> subprocess.CompletedProcess:
    """Run `python syncnode.py ARGS` to its end with the given standard input."""
    return subprocess.run(
        [sys.executable, SYNCNODE_PY, *args],
        cwd=cwd,
        env=cli_env(**variables),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# The App API --------------------------------------------------------------------------------------

APP_NEW_PASSWORD = "battery staple horse"

APP_JSON = "application/json; charset=utf-8"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
#: The start of the fake clock (1.8e9 s) as the App API writes it.
CLOCK_START = "2027-01-15T08:00:00.000Z"
APP_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    507: "Insufficient Storage",
}
#: README, App API: the document's enum, then the store permissions appended when served.
SERVED_PERMISSIONS = [
    "all", "apiKey.create", "apiKey.read", "apiKey.update", "apiKey.delete",
    "auth.changePassword", "authDevice.delete", "session.create", "session.read",
    "session.update", "session.delete", "systemMetadata.read", "systemMetadata.update",
    "user.read", "user.update", "server.about", "adminUser.create", "adminUser.read",
    "adminUser.update", "adminUser.delete", "store.read", "store.write", "store.own",
]  # fmt: skip
#: Optional properties the App API always sends; every other optional one is absent.
PRESENT_OPTIONAL = {"SessionResponseDto": {"expiresAt"}, "SessionCreateResponseDto": {"expiresAt"}}
LOGIN_EMPTY = [
    "email should not be empty",
    "email must be an email",
    "password should not be empty",
    "password must be a string",
]


@cache
def app_document() -> dict:
    """The App API's document (Immich's) as the repository carries it, read once when first needed.

    It is spec/app-api-openapi.json made Draft 2020-12: nullable as a type, store.* in the enum.
    """
    document = json.loads(repository_file("spec/app-api-openapi.json").read_text())

    def convert(node: Any) -> None:
        if isinstance(node, dict):
            if node.pop("nullable", False):
                node["type"] = [node["type"], "null"]
            for value in node.values():
                convert(value)
        elif isinstance(node, list):
            for value in node:
                convert(value)

    convert(document)
    document["components"]["schemas"]["Permission"]["enum"] += [
        "store.read",
        "store.write",
        "store.own",
    ]
    return document


def app_schemas() -> dict:
    """The schemas of the App API's document."""
    return app_document()["components"]["schemas"]


def assert_exact_keys(value: dict, name: str) -> None:
    """Assert an object has exactly its schema's keys, well-formed ids and timestamps."""
    schemas = app_schemas()
    schema = schemas[name]
    assert set(value) == set(schema["required"]) | PRESENT_OPTIONAL.get(name, set()), name
    for key, item in value.items():
        prop = schema["properties"][key]
        if "$ref" in prop and schemas[prop["$ref"].rpartition("/")[2]]["type"] == "object":
            assert_exact_keys(item, prop["$ref"].rpartition("/")[2])
        if key.endswith("At") and item is not None:
            assert TIMESTAMP.fullmatch(item), (key, item)
        if key in ("id", "userId"):
            assert UUID4_TEXT.fullmatch(item), (key, item)


def assert_schema(response, schema: str | list[str]) -> Any:
    """Validate a JSON answer against its schema (a name, or [name] for an array); return it.

    Checks the App API's JSON type and x-immich-cid, the document's schema with jsonschema
    (Draft 2020-12) and the exact key set the App API sends.
    """
    assert response.headers["Content-Type"] == APP_JSON
    assert response.headers.get("x-immich-cid")
    body = response.json
    is_array = isinstance(schema, list)
    name = schema[0] if is_array else schema
    ref = {"$ref": f"#/components/schemas/{name}"}
    target = {"type": "array", "items": ref} if is_array else ref
    jsonschema.Draft202012Validator(
        {**target, "components": app_document()["components"]}
    ).validate(body)
    for item in body if is_array else [body]:
        assert_exact_keys(item, name)
    return body


def assert_app_error(response, status: int, message: str | list[str]) -> None:
    """Assert Immich's error body: exact keys in order, correlationId equal to x-immich-cid."""
    assert response.status_int == status
    assert response.headers["Content-Type"] == APP_JSON
    cid = response.headers["x-immich-cid"]
    assert list(response.json) == ["message", "error", "statusCode", "correlationId"]
    assert response.json == {
        "message": message,
        "error": APP_REASONS[status],
        "statusCode": status,
        "correlationId": cid,
    }


def app_login(client, email: str = "alice", password: str = PASSWORD, **kw):
    """POST /api/auth/login and return the response, leaving no cookie in the client's jar."""
    response = client.post_json("/api/auth/login", {"email": email, "password": password}, **kw)
    client.reset()
    if response.status_int == 201:
        assert_schema(response, "LoginResponseDto")
    return response


def make_key(client, headers: dict, permissions=("all",), **fields) -> tuple[str, dict]:
    """Create an API key with the given credentials; return its secret and APIKeyResponseDto."""
    body = {"permissions": list(permissions), **fields}
    response = client.post_json("/api/api-keys", body, headers=headers, status=201)
    created = assert_schema(response, "APIKeyCreateResponseDto")
    return created["secret"], created["apiKey"]


def my_user(client, headers: dict) -> dict:
    """Return GET /api/users/me, checked against its schema."""
    return assert_schema(client.get("/api/users/me", headers=headers), "UserAdminResponseDto")


def make_child(client, headers: dict, **body) -> dict:
    """POST /api/sessions and return the child session with its token, checked."""
    response = client.post_json("/api/sessions", body, headers=headers, status=201)
    return assert_schema(response, "SessionCreateResponseDto")


def session_id_of(db, token: str) -> str:
    """Return the public id of the session behind a token."""
    query = "SELECT public_id FROM sessions WHERE token_digest = ?"
    return db.execute(query, (token_digest(token),)).fetchone()[0]


def app_state(db) -> dict[str, list]:
    """Every row of every table but the login counters, to show a refused call changed nothing."""
    tables = table_names(db)
    return {
        table: sorted(db.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
        for table in tables
        if table != "attempts"
    }


def sessions_listing(client, headers: dict) -> list[dict]:
    """Return GET /api/sessions, checked against its schema."""
    return assert_schema(client.get("/api/sessions", headers=headers), ["SessionResponseDto"])


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
    readme = repository_file("README.md").read_text(encoding="utf-8")
    for item in syncnode.dataclasses.fields(syncnode.Settings):
        assert f"`--{item.name.replace('_', '-')}`" in readme
        assert f"`SYNCNODE_{item.name.upper()}`" in readme


def test_settings_flags_beat_environment_beat_defaults():
    environ = {"SYNCNODE_PORT": "9000", "SYNCNODE_REGISTRATION": "closed"}
    settings = syncnode.parse_args(["--port", "9100"], environ)
    assert (settings.port, settings.registration, settings.host) == (9100, "closed", "127.0.0.1")


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


#: What Firefox sends for a page.
BROWSER_ACCEPT = (
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
)


def test_routing_root_for_a_browser_is_a_page_linking_the_document(client):
    response = client.get("/", headers={"Accept": BROWSER_ACCEPT})
    assert response.status_int == 200
    assert response.content_type == "text/html"
    assert re.search(r'href="[^"]*openapi\.json"', response.text)
    assert "/api" in response.text


def test_routing_root_for_a_program_is_json_err01(client):
    # Without an Accept header: test_routing_unknown_path_is_json_err01, path "/".
    headers = {"Accept": "application/json"}
    assert_error(client.get("/", headers=headers, status=404), 404, "ERR01")


def test_errors_unexpected_failure_is_err02_and_logged(app, client, user, monkeypatch, caplog):
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
    "raw",
    [
        pytest.param(b"\x00\x01\x02", id="binary"),
        pytest.param(b'{"a": 1}' * 1000, id="repeated-json"),
        pytest.param(base64.b64encode(os.urandom(300)), id="base64"),
    ],
)
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
        pytest.param({"id": "", "password": PASSWORD}, id="empty-id"),
        pytest.param({"id": "   ", "password": PASSWORD}, id="blank-id"),
        pytest.param({"id": "a b", "password": PASSWORD}, id="space"),
        pytest.param({"id": "a\u00a0b", "password": PASSWORD}, id="nbsp"),
        pytest.param({"id": "a\x00b", "password": PASSWORD}, id="nul"),
        pytest.param({"id": "a\x85b", "password": PASSWORD}, id="c1-control"),
        pytest.param({"id": "x" * 255, "password": PASSWORD}, id="id-255-chars"),
        pytest.param({"id": "alice", "password": "short"}, id="password-5"),
        pytest.param({"id": "alice", "password": "1234567"}, id="password-7"),
        pytest.param({"id": "alice", "password": "p" * 1025}, id="password-1025"),
        pytest.param({"id": "alice"}, id="no-password"),
        pytest.param({"password": PASSWORD}, id="no-id"),
        pytest.param({"id": 5, "password": PASSWORD}, id="id-number"),
        pytest.param({"id": "alice", "password": None}, id="password-null"),
        pytest.param(["alice", PASSWORD], id="array"),
        pytest.param("alice", id="string"),
        pytest.param(None, id="null"),
    ],
)
def test_account_register_bad_credentials_are_acct02(client, db, body):
    response = client.post("/account", json.dumps(body), status=400)
    assert_error(response, 400, "ACCT02")
    assert table_counts(db)["users"] == 0


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"{", id="cut"),
        pytest.param(b"not json", id="text"),
        pytest.param(b"\xff\xfe", id="bytes"),
        pytest.param(b"", id="empty"),
    ],
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


@pytest.mark.sqlite
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


# Invisible characters in ids ----------------------------------------------------------------------


INVISIBLE = [
    pytest.param("\u200b", id="zero-width-space"),
    pytest.param("\ufeff", id="bom"),
    pytest.param("\u202e", id="rtl-override"),
    pytest.param("\u00ad", id="soft-hyphen"),
    pytest.param("\u2060", id="word-joiner"),
]


@pytest.mark.parametrize("char", INVISIBLE)
def test_account_register_invisible_format_character_is_acct02(client, db, char):
    response = client.post_json(
        "/account", {"id": f"ali{char}ce", "password": PASSWORD}, status=400
    )
    assert_error(response, 400, "ACCT02")
    assert table_counts(db)["users"] == 0


def test_account_register_ordinary_non_ascii_letters_are_accepted(client, db):
    client.post_json("/account", {"id": "zoë", "password": PASSWORD}, status=200)
    assert db.execute("SELECT name FROM users").fetchall() == [("zoë",)]


# Row ids are never reused -------------------------------------------------------------------------


def test_ids_user_id_of_a_deleted_account_is_never_reused(client, make_user, db):
    make_user("a")
    b = make_user("b")
    used = row_ids(db, "users")
    client.delete("/account", headers=b.headers, status=204)
    make_user("c")
    assert user_row_id(db, "c") > max(used)


def test_ids_session_id_of_an_ended_session_is_never_reused(client, user, db):
    newest = client.post_json("/auth", {"id": "alice", "password": PASSWORD}).json["token"]
    used = row_ids(db, "sessions")
    client.delete("/auth", headers={"Authorization": f"Bearer {newest}"}, status=204)
    token = client.post_json("/auth", {"id": "alice", "password": PASSWORD}).json["token"]
    query = "SELECT id FROM sessions WHERE token_digest = ?"
    assert db.execute(query, (token_digest(token),)).fetchone()[0] > max(used)


def test_ids_api_key_id_of_a_deleted_key_is_never_reused(client, user, db):
    create_api_key(client, user)
    newest = create_api_key(client, user).id
    used = row_ids(db, "api_keys")
    client.delete(f"/api/api-keys/{newest}", headers=user.headers, status=204)
    made = create_api_key(client, user).id
    query = "SELECT id FROM api_keys WHERE public_id = ?"
    assert db.execute(query, (made,)).fetchone()[0] > max(used)


# ==================================================================================================
# Accounts: invites
# ==================================================================================================


@pytest.fixture
def inviting(make_app, client, user, other):
    """A server that takes invites, where alice (the oldest account) is the admin."""
    return webtest.TestApp(make_app(registration="invite"))


def test_invite_registration_without_a_code_is_acct01(inviting, db):
    before = snapshot(db)
    response = inviting.post_json("/account", {"id": "carol", "password": PASSWORD}, status=403)
    assert_error(response, 403, "ACCT01")
    assert snapshot(db) == before


@pytest.mark.parametrize(
    "code",
    [
        pytest.param("no-such-code", id="unknown"),
        pytest.param("", id="empty"),
        pytest.param(5, id="int"),
        pytest.param(None, id="null"),
    ],
)
def test_invite_registration_with_a_bad_code_is_acct01(inviting, db, code):
    before = snapshot(db)
    body = {"id": "carol", "password": PASSWORD, "invite": code}
    assert_error(inviting.post_json("/account", body, status=403), 403, "ACCT01")
    assert snapshot(db) == before


def test_invite_from_the_cli_registers_once(make_app, clock, tmp_path, db_path, db):
    clock.now = time.time()  # the code's lifetime runs on the command's real clock
    result = run_cli(tmp_path, "--database", db_path, "invite")
    assert result.returncode == 0
    code = result.stdout.removesuffix("\n")
    assert re.fullmatch(r"[A-Za-z0-9_-]{16,}", code) and code not in result.stderr
    client = webtest.TestApp(make_app(registration="invite"))
    body = {"id": "carol", "password": PASSWORD, "invite": code}
    client.post_json("/account", body, status=200)
    again = client.post_json("/account", {**body, "id": "dave"}, status=403)
    assert_error(again, 403, "ACCT01")
    assert db.execute("SELECT name FROM users").fetchall() == [("carol",)]


def test_invite_minted_by_the_admin_registers_once(inviting, user, clock, db):
    response = inviting.post("/invite", headers=user.headers, status=200)
    assert response.content_type == "application/json"
    assert set(response.json) == {"invite", "expiration"}
    assert response.json["expiration"] == int(clock.now * 1000) + 7 * 86400 * 1000
    body = {"id": "carol", "password": PASSWORD, "invite": response.json["invite"]}
    assert set(inviting.post_json("/account", body, status=200).json) == {"token", "expiration"}
    assert_error(inviting.post_json("/account", {**body, "id": "dave"}, status=403), 403, "ACCT01")
    assert table_counts(db)["users"] == 3


def test_invite_minting_by_a_non_admin_is_perm01(inviting, other, db):
    assert_error(inviting.post("/invite", headers=other.headers, status=403), 403, "PERM01")
    assert table_counts(db)["invites"] == 0


def test_invite_minting_with_an_api_key_is_perm01(inviting, user, db):
    body = {"name": "key", "permissions": ["all"]}
    key = inviting.post_json("/api/api-keys", body, headers=user.headers, status=201).json["secret"]
    response = inviting.post("/invite", headers={"x-api-key": key}, status=403)
    assert_error(response, 403, "PERM01")
    assert table_counts(db)["invites"] == 0


def test_invite_minting_without_credentials_is_auth01(inviting, db):
    assert_error(inviting.post("/invite", status=401), 401, "AUTH01")
    assert table_counts(db)["invites"] == 0


def test_invite_expired_code_is_acct01(make_app, user, clock, db):
    inviting = webtest.TestApp(make_app(registration="invite", invite_ttl=60))
    code = inviting.post("/invite", headers=user.headers).json["invite"]
    clock.advance(60)
    before = snapshot(db)
    body = {"id": "carol", "password": PASSWORD, "invite": code}
    assert_error(inviting.post_json("/account", body, status=403), 403, "ACCT01")
    assert snapshot(db) == before


@pytest.mark.parametrize(
    "refused, status, code",
    [
        pytest.param({"id": "carol", "password": "short"}, 400, "ACCT02", id="bad-password"),
        pytest.param({"id": "BOB", "password": PASSWORD}, 409, "ACCT03", id="taken-id"),
    ],
)
def test_invite_refused_registration_keeps_the_code(inviting, user, db, refused, status, code):
    invite = inviting.post("/invite", headers=user.headers).json["invite"]
    response = inviting.post_json("/account", {**refused, "invite": invite}, status=status)
    assert_error(response, status, code)
    assert table_counts(db)["invites"] == 1
    body = {"id": "carol", "password": PASSWORD, "invite": invite}
    inviting.post_json("/account", body, status=200)


# A stranger learns nothing of taken ids -----------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"invite": "wrong"}, id="wrong-invite"),
        pytest.param({"invite": ""}, id="empty-invite"),
        pytest.param({}, id="no-invite"),
    ],
)
def test_invite_taken_id_without_a_valid_invite_is_acct01(inviting, db, fields):
    before = snapshot(db)
    body = {"id": "bob", "password": PASSWORD, **fields}
    response = inviting.post_json("/account", body, status=403)
    assert_error(response, 403, "ACCT01")
    assert snapshot(db) == before


def test_invite_taken_id_with_a_valid_invite_is_acct03_and_keeps_the_invite(inviting, clock, db):
    code, _ = syncnode.create_invite(db, now_ms(clock), 3600_000)
    body = {"id": "bob", "password": PASSWORD, "invite": code}
    response = inviting.post_json("/account", body, status=409)
    assert_error(response, 409, "ACCT03")
    assert table_counts(db)["invites"] == 1
    inviting.post_json("/account", {**body, "id": "carol"}, status=200)
    assert user_row_id(db, "carol")


def test_invite_new_id_with_a_valid_invite_registers_once(inviting, user, db):
    code = inviting.post("/invite", headers=user.headers, status=200).json["invite"]
    body = {"id": "carol", "password": PASSWORD, "invite": code}
    assert set(inviting.post_json("/account", body, status=200).json) == {"token", "expiration"}
    again = inviting.post_json("/account", {**body, "id": "dave"}, status=403)
    assert_error(again, 403, "ACCT01")
    assert table_counts(db)["invites"] == 0
    assert db.execute("SELECT count(*) FROM users WHERE name = 'dave'").fetchone()[0] == 0


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
    "body",
    [
        pytest.param({"id": "alice", "password": "wrong password"}, id="wrong-password"),
        pytest.param({"id": "nobody", "password": PASSWORD}, id="unknown-id"),
    ],
)
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
        pytest.param(None, id="missing"),
        pytest.param("", id="empty"),
        pytest.param("Bearer", id="scheme-only"),
        pytest.param("Bearer ", id="scheme-space"),
        pytest.param("Basic dXNlcjpwYXNz", id="basic"),
        pytest.param("Bearer not a token", id="spaces"),
        pytest.param("Bearer " + "A" * 43, id="unknown"),
        pytest.param("Bearer " + "A" * 600, id="too-long"),
        pytest.param("Bearer tök€n", id="non-ascii"),
        pytest.param("Token abc", id="other-scheme"),
    ],
)
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
    client.post_json(
        "/password", {"password": NEW_PASSWORD}, headers=bearer_headers(second), status=204
    )
    for token in (user.token, third):
        assert_error(client.get("/store", headers=bearer_headers(token), status=401), 401, "AUTH01")
    client.get("/store", headers=bearer_headers(second), status=200)
    client.get("/store", headers=other.headers, status=200)
    digests = {row[0] for row in db.execute("SELECT token_digest FROM sessions")}
    assert digests == {token_digest(second), token_digest(other.token)}


def test_password_change_deletes_a_pending_reset_token(client, user, db, caplog):
    reset = request_reset(client, caplog)
    client.post_json("/password", {"password": NEW_PASSWORD}, headers=user.headers, status=204)
    assert table_counts(db)["reset_tokens"] == 0
    before = snapshot(db)
    response = client.post_json(
        "/password", {"password": "third password"}, headers=bearer_headers(reset), status=401
    )
    assert_error(response, 401, "AUTH01")
    assert snapshot(db) == before


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"not json", id="text"),
        pytest.param(b'{"password": ', id="cut"),
        pytest.param(b"\xff\xfe", id="bytes"),
        pytest.param(b"[]", id="array"),
        pytest.param(b'"correct horse"', id="string"),
        pytest.param(b"null", id="null"),
        pytest.param(b"{}", id="no-password"),
        pytest.param(b'{"pass": "correct horse"}', id="misspelt-field"),
        pytest.param(b'{"password": 12345678}', id="password-number"),
        pytest.param(b'{"password": null}', id="password-null"),
        pytest.param(b'{"password": ["correct horse"]}', id="password-array"),
    ],
)
def test_password_change_bad_body_is_req01(client, user, db, raw):
    before = snapshot(db)
    response = client.post("/password", raw, headers=user.headers, status=400)
    assert_error(response, 400, "REQ01")
    assert snapshot(db) == before


@pytest.mark.parametrize(
    "password",
    [
        pytest.param("", id="empty"),
        pytest.param("p" * 7, id="7-chars"),
        pytest.param("p" * 1025, id="1025-chars"),
    ],
)
def test_password_change_bad_length_is_acct02(client, user, db, password):
    before = snapshot(db)
    response = client.post_json(
        "/password", {"password": password}, headers=user.headers, status=400
    )
    assert_error(response, 400, "ACCT02")
    assert snapshot(db) == before
    login(client, "alice", PASSWORD, status=200)


@pytest.mark.parametrize(
    "password",
    [
        pytest.param("p" * 8, id="8"),
        pytest.param("p" * 1024, id="1024"),
        pytest.param("ü" * 8, id="non-ascii"),
    ],
)
def test_password_change_edge_lengths_are_accepted(client, user, password):
    client.post_json("/password", {"password": password}, headers=user.headers, status=204)
    login(client, "alice", password, status=200)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing"),
        pytest.param(bearer_headers("A" * 43), id="unknown"),
        pytest.param({"Authorization": "Basic YWxpY2U6Y29ycmVjdCBob3JzZQ=="}, id="basic"),
        pytest.param({"Authorization": "Bearer"}, id="scheme-only"),
    ],
)
def test_password_change_without_a_valid_token_is_auth01(client, user, db, headers):
    before = snapshot(db)
    response = client.post_json(
        "/password", {"password": NEW_PASSWORD}, headers=headers, status=401
    )
    assert_error(response, 401, "AUTH01")
    assert snapshot(db) == before


def test_password_change_authentication_comes_before_the_body(client, user):
    response = client.post("/password", b"not json", headers=bearer_headers("A" * 43), status=401)
    assert_error(response, 401, "AUTH01")


def test_password_change_with_expired_session_is_auth01_and_purges_it(make_app, clock, db):
    client = webtest.TestApp(make_app(session_ttl=60))
    token = client.post_json("/account", {"id": "alice", "password": PASSWORD}).json["token"]
    old_hash = stored_hash(db)
    clock.advance(60)
    response = client.post_json(
        "/password", {"password": NEW_PASSWORD}, headers=bearer_headers(token), status=401
    )
    assert_error(response, 401, "AUTH01")
    assert table_counts(db)["sessions"] == 0
    assert stored_hash(db) == old_hash


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("nobody", id="unknown"),
        pytest.param("nobody@example.org", id="unknown-email"),
        pytest.param("", id="empty"),
        pytest.param("   ", id="blank"),
        pytest.param("a b", id="space"),
        pytest.param("a\x00b", id="nul"),
        pytest.param("x" * 255, id="255-chars"),
    ],
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
    assert db.execute("SELECT token_digest FROM reset_tokens").fetchall() == [
        (token_digest(token),)
    ]


def test_reset_token_is_stored_only_as_digest(client, user, db, db_path, caplog):
    token = request_reset(client, caplog)
    [(stored,)] = db.execute("SELECT token_digest FROM reset_tokens").fetchall()
    assert stored == token_digest(token)
    assert token.encode() not in stored_bytes(db, db_path)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(" ALICE ", id="spaces"),
        pytest.param("Alice", id="case"),
        pytest.param("\tａｌｉｃｅ\n", id="nfkc"),
    ],
)
def test_reset_request_normalises_the_id(client, user, db, caplog, name):
    token = request_reset(client, caplog, name)
    user_id = db.execute("SELECT id FROM users WHERE name = 'alice'").fetchone()[0]
    assert db.execute("SELECT user_id, token_digest FROM reset_tokens").fetchall() == [
        (user_id, token_digest(token))
    ]


def test_reset_second_request_replaces_the_first(client, user, db, caplog):
    first = request_reset(client, caplog)
    second = request_reset(client, caplog)
    assert first != second
    assert table_counts(db)["reset_tokens"] == 1
    before = snapshot(db)
    response = client.post_json(
        "/password", {"password": NEW_PASSWORD}, headers=bearer_headers(first), status=401
    )
    assert_error(response, 401, "AUTH01")
    assert snapshot(db) == before
    assert reset_digests(db) == [token_digest(second)]


def test_reset_token_sets_the_password_and_revokes_every_session(client, user, other, db, caplog):
    second = login(client, "alice", PASSWORD).json["token"]
    token = request_reset(client, caplog)
    response = client.post_json(
        "/password", {"password": NEW_PASSWORD}, headers=bearer_headers(token), status=204
    )
    assert response.body == b""
    for session in (user.token, second):
        assert_error(
            client.get("/store", headers=bearer_headers(session), status=401), 401, "AUTH01"
        )
    client.get("/store", headers=other.headers, status=200)
    assert [row[0] for row in db.execute("SELECT token_digest FROM sessions")] == [
        token_digest(other.token)
    ]
    assert table_counts(db)["reset_tokens"] == 0
    assert_error(login(client, "alice", PASSWORD, status=401), 401, "AUTH01")
    login(client, "alice", NEW_PASSWORD, status=200)


def test_reset_token_works_only_once(client, user, db, caplog):
    token = request_reset(client, caplog)
    client.post_json(
        "/password", {"password": NEW_PASSWORD}, headers=bearer_headers(token), status=204
    )
    before = snapshot(db)
    response = client.post_json(
        "/password", {"password": "third password"}, headers=bearer_headers(token), status=401
    )
    assert_error(response, 401, "AUTH01")
    assert snapshot(db) == before
    login(client, "alice", NEW_PASSWORD, status=200)


@pytest.mark.parametrize(
    "method, path",
    [
        pytest.param("GET", "/store", id="list"),
        pytest.param("GET", "/store/k", id="get"),
        pytest.param("PUT", "/store/k", id="put"),
        pytest.param("DELETE", "/store/k", id="delete"),
        pytest.param("GET", "/permission/k", id="permissions"),
        pytest.param("GET", "/account", id="sessions"),
        pytest.param("DELETE", "/account", id="delete-account"),
        pytest.param("DELETE", "/auth", id="logout"),
    ],
)
def test_reset_token_is_auth01_everywhere_but_password(client, user, db, caplog, method, path):
    put(client, user, "k")
    token = request_reset(client, caplog)
    before = snapshot(db)
    response = client.request(path, method=method, headers=bearer_headers(token), status=401)
    assert_error(response, 401, "AUTH01")
    assert snapshot(db) == before
    assert reset_digests(db) == [token_digest(token)]


def test_reset_token_expires_after_reset_ttl(client, user, clock, db, caplog):
    token = request_reset(client, caplog)
    clock.advance(3600)
    before = snapshot(db)
    response = client.post_json(
        "/password", {"password": NEW_PASSWORD}, headers=bearer_headers(token), status=401
    )
    assert_error(response, 401, "AUTH01")
    after = snapshot(db)
    assert after["reset_tokens"] == []  # expired, and purged by housekeeping
    assert {**after, "reset_tokens": None} == {**before, "reset_tokens": None}
    login(client, "alice", PASSWORD, status=200)


def test_reset_token_works_until_reset_ttl(client, user, clock, caplog):
    token = request_reset(client, caplog)
    clock.advance(3599)
    client.post_json(
        "/password", {"password": NEW_PASSWORD}, headers=bearer_headers(token), status=204
    )
    login(client, "alice", NEW_PASSWORD, status=200)


def test_reset_token_expiry_follows_the_setting(make_app, clock, caplog):
    client = webtest.TestApp(make_app(reset_ttl=60))
    client.post_json("/account", {"id": "alice", "password": PASSWORD})
    token = request_reset(client, caplog)
    clock.advance(60)
    response = client.post_json(
        "/password", {"password": NEW_PASSWORD}, headers=bearer_headers(token), status=401
    )
    assert_error(response, 401, "AUTH01")


def test_reset_token_refused_body_does_not_spend_it(client, user, db, caplog):
    token = request_reset(client, caplog)
    before = snapshot(db)
    response = client.post_json(
        "/password", {"password": "short"}, headers=bearer_headers(token), status=400
    )
    assert_error(response, 400, "ACCT02")
    response = client.post("/password", b"[]", headers=bearer_headers(token), status=400)
    assert_error(response, 400, "REQ01")
    assert snapshot(db) == before
    assert reset_digests(db) == [token_digest(token)]


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"not json", id="text"),
        pytest.param(b'{"id": ', id="cut"),
        pytest.param(b"\xff\xfe", id="bytes"),
        pytest.param(b"[]", id="array"),
        pytest.param(b'"alice"', id="string"),
        pytest.param(b"null", id="null"),
        pytest.param(b"{}", id="no-id"),
        pytest.param(b'{"user": "alice"}', id="misspelt-field"),
        pytest.param(b'{"id": 5}', id="id-number"),
        pytest.param(b'{"id": null}', id="id-null"),
        pytest.param(b'{"id": ["alice"]}', id="id-array"),
    ],
)
def test_reset_request_malformed_body_is_req01(client, user, db, caplog, raw):
    before, counts = snapshot(db), table_counts(db)
    response = client.post("/resetpassword", raw, status=400)
    assert_error(response, 400, "REQ01")
    assert snapshot(db) == before
    assert table_counts(db) == counts
    assert logged_tokens(caplog) == []


# The same answer, the token made off the request path ---------------------------------------------


class Driven:
    """One POST /resetpassword driven through the WSGI interface by hand, with the number of
    reset tokens stored after start_response, after the body was read and after close()."""

    def __init__(self, app, db, name: str) -> None:
        environ = webob.Request.blank(
            "/resetpassword",
            method="POST",
            body=json.dumps({"id": name}).encode(),
            content_type="application/json",
            remote_addr="192.0.2.1",
        ).environ
        started: list[tuple[str, list]] = []

        def start_response(status, headers, exc_info=None):
            started.append((status, list(headers)))
            return lambda data: None

        def tokens() -> int:
            return table_counts(db)["reset_tokens"]

        chunks = app(environ, start_response)
        assert started, "start_response was not called before the body was returned"
        self.tokens_when_started = tokens()
        self.body = b"".join(chunks)
        self.tokens_before_close = tokens()
        if hasattr(chunks, "close"):
            chunks.close()
        self.tokens_after_close = tokens()
        [(self.status, self.headers)] = started


def test_reset_request_token_is_made_only_after_the_answer(app, user, db):
    driven = Driven(app, db, "alice")
    assert driven.status.startswith("204")
    assert (driven.tokens_when_started, driven.tokens_before_close) == (0, 0)
    assert driven.tokens_after_close == 1


def test_reset_request_answer_is_identical_for_known_and_unknown_ids(app, user, db):
    known, unknown = Driven(app, db, "alice"), Driven(app, db, "nobody")
    assert (known.status, known.headers, known.body) == (
        unknown.status,
        unknown.headers,
        unknown.body,
    )


def test_reset_request_token_is_logged_by_the_time_webtest_returns(client, user, db, caplog):
    with caplog.at_level(logging.WARNING, logger="syncnode"):
        token = request_reset(client, caplog, "alice")
    assert reset_digests(db) == [token_digest(token)]
    headers = {"Authorization": f"Bearer {token}"}
    client.post_json("/password", {"password": "new password 1"}, headers=headers, status=204)


# ==================================================================================================
# Passwords and reset: reset mail
# ==================================================================================================


SMTP_FROM = "syncnode@example.org"


class MailBox:
    """An aiosmtpd handler that keeps every message and every login it receives."""

    def __init__(self) -> None:
        self.port = 0
        self.envelopes: list = []
        self.logins: list[tuple[bytes, bytes]] = []

    async def handle_DATA(self, server, session, envelope) -> str:
        self.envelopes.append(envelope)
        return "250 Message accepted for delivery"

    def authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        self.logins.append((auth_data.login, auth_data.password))
        success = self.logins[-1] == (b"mailer", b"mail secret")
        return AuthResult(success=success, handled=False)  # handled=False: aiosmtpd answers 535

    def wait(self) -> email.message.EmailMessage:
        """Wait (at most 5 s) for the first message and return it parsed."""
        wait_for(lambda: self.envelopes, what="the reset mail")
        return email.message_from_bytes(self.envelopes[0].content, policy=email.policy.default)


@pytest.fixture
def mailbox():
    """A mail server on 127.0.0.1 that accepts every message, and logins as mailer."""
    box = MailBox()
    box.port = free_port()
    controller = Controller(
        box,
        hostname="127.0.0.1",
        port=box.port,
        authenticator=box.authenticate,
        auth_require_tls=False,
    )
    controller.start()
    yield box
    controller.stop()


@pytest.fixture
def mail_attempts(monkeypatch):
    """Record the (address, token) of each reset mail syncnode sends, and send it as usual."""
    attempts = []
    send = syncnode.send_reset_mail

    def recording_send(settings, address, token):
        attempts.append((address, token))
        send(settings, address, token)

    monkeypatch.setattr(syncnode, "send_reset_mail", recording_send)
    return attempts


def mail_settings(port: int, **settings) -> dict:
    """Settings that send reset mails to 127.0.0.1:port without TLS."""
    return {
        "smtp_host": "127.0.0.1",
        "smtp_port": port,
        "smtp_security": "none",
        "smtp_from": SMTP_FROM,
        **settings,
    }


def mail_token(message: email.message.EmailMessage) -> str:
    """Return the one reset token on a line of its own in a mail's text."""
    lines = message.get_content().splitlines()
    (token,) = [line for line in lines if re.fullmatch(r"[A-Za-z0-9_-]{43}", line)]
    return token


def join_mail_threads(timeout: float = 5.0) -> None:
    """Wait for syncnode's mail threads to end, so that their log lines are written."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread.name == "syncnode-mail":
            thread.join(max(0.0, deadline - time.monotonic()))
            assert not thread.is_alive(), "a reset mail was still being sent"


def syncnode_lines(caplog, level: int = logging.DEBUG) -> list[str]:
    """Return the messages syncnode's loggers wrote at the level or above."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith("syncnode") and record.levelno >= level
    ]


def test_reset_mail_goes_to_the_address_with_the_token(make_app, mailbox, db):
    client = webtest.TestApp(make_app(**mail_settings(mailbox.port)))
    register_user(client, "alice@example.org")
    client.post_json("/resetpassword", {"id": " Alice@Example.ORG"}, status=204)
    message = mailbox.wait()
    assert mailbox.envelopes[0].mail_from == SMTP_FROM
    assert mailbox.envelopes[0].rcpt_tos == ["alice@example.org"]
    assert (message["From"], message["To"]) == (SMTP_FROM, "alice@example.org")
    assert message.get_content_type() == "text/plain"
    token = mail_token(message)
    digest = db.execute("SELECT token_digest FROM reset_tokens").fetchone()[0]
    assert digest == hashlib.sha256(token.encode()).digest()


def test_reset_mail_reaches_an_address_that_is_not_ascii(make_app, mailbox):
    client = webtest.TestApp(make_app(**mail_settings(mailbox.port)))
    register_user(client, "zoë@exämple.org")
    client.post_json("/resetpassword", {"id": "ZOË@EXÄMPLE.ORG"}, status=204)
    message = mailbox.wait()
    assert mailbox.envelopes[0].rcpt_tos == ["zoë@exämple.org"]
    assert message["To"] == "zoë@exämple.org"
    assert mail_token(message)


def test_reset_mail_token_sets_the_password_once(make_app, mailbox):
    client = webtest.TestApp(make_app(**mail_settings(mailbox.port)))
    register_user(client, "alice@example.org")
    client.post_json("/resetpassword", {"id": "alice@example.org"}, status=204)
    token = mail_token(mailbox.wait())
    client.post_json(
        "/password", {"password": NEW_PASSWORD}, headers=bearer_headers(token), status=204
    )
    client.post_json("/auth", {"id": "alice@example.org", "password": NEW_PASSWORD}, status=200)
    again = client.post_json(
        "/password", {"password": PASSWORD}, headers=bearer_headers(token), status=401
    )
    assert_error(again, 401, "AUTH01")


def test_reset_mail_token_is_in_no_log_line(make_app, mailbox, caplog):
    client = webtest.TestApp(make_app(**mail_settings(mailbox.port)))
    register_user(client, "alice@example.org")
    with caplog.at_level(logging.DEBUG, logger="syncnode"):
        client.post_json("/resetpassword", {"id": "alice@example.org"}, status=204)
        token = mail_token(mailbox.wait())
        join_mail_threads()
    lines = syncnode_lines(caplog)
    assert any("alice@example.org" in line for line in lines)  # the line saying it was sent
    assert not [line for line in lines if token in line]


def test_reset_mail_request_answers_while_the_mail_server_stalls(make_app, caplog):
    with socket.socket() as silent:  # accepts connections, never greets
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        client = webtest.TestApp(make_app(**mail_settings(silent.getsockname()[1])))
        register_user(client, "alice@example.org")
        started = time.monotonic()
        client.post_json("/resetpassword", {"id": "alice@example.org"}, status=204)
        assert time.monotonic() - started < 5  # smtplib would wait 30 s for the greeting
    join_mail_threads()


def test_reset_mail_id_that_is_no_address_gets_the_log_line(
    make_app, mailbox, mail_attempts, caplog
):
    client = webtest.TestApp(make_app(**mail_settings(mailbox.port)))
    register_user(client, "alice")
    with caplog.at_level(logging.WARNING, logger="syncnode"):
        client.post_json("/resetpassword", {"id": "alice"}, status=204)
    (line,) = syncnode_lines(caplog, logging.WARNING)
    token = line.rsplit(" ", 1)[-1]
    assert "alice" in line
    assert mail_attempts == []
    client.post_json(
        "/password", {"password": NEW_PASSWORD}, headers=bearer_headers(token), status=204
    )


def test_reset_mail_server_down_logs_an_error_without_the_token(make_app, mail_attempts, caplog):
    client = webtest.TestApp(make_app(**mail_settings(free_port())))  # nothing listens there
    register_user(client, "alice@example.org")
    with caplog.at_level(logging.DEBUG, logger="syncnode"):
        client.post_json("/resetpassword", {"id": "alice@example.org"}, status=204)
        join_mail_threads()
    ((address, token),) = mail_attempts
    (error,) = syncnode_lines(caplog, logging.ERROR)
    assert address in error
    assert not [line for line in syncnode_lines(caplog) if token in line]


def test_reset_mail_logs_in_with_the_smtp_user_and_password(make_app, mailbox, caplog):
    settings = mail_settings(mailbox.port, smtp_user="mailer", smtp_password="mail secret")
    client = webtest.TestApp(make_app(**settings))
    register_user(client, "alice@example.org")
    with caplog.at_level(logging.DEBUG, logger="syncnode"):
        client.post_json("/resetpassword", {"id": "alice@example.org"}, status=204)
        mail_token(mailbox.wait())
        join_mail_threads()
    assert mailbox.logins == [(b"mailer", b"mail secret")]
    assert not [line for line in syncnode_lines(caplog) if "mail secret" in line]


def test_reset_mail_refused_smtp_login_logs_an_error_and_sends_nothing(make_app, mailbox, caplog):
    settings = mail_settings(mailbox.port, smtp_user="mailer", smtp_password="wrong secret")
    client = webtest.TestApp(make_app(**settings))
    register_user(client, "alice@example.org")
    with caplog.at_level(logging.DEBUG, logger="syncnode"):
        client.post_json("/resetpassword", {"id": "alice@example.org"}, status=204)
        join_mail_threads()
    assert set(mailbox.logins) == {(b"mailer", b"wrong secret")}  # smtplib tries each method
    assert mailbox.envelopes == []
    assert len(syncnode_lines(caplog, logging.ERROR)) == 1
    assert not [line for line in syncnode_lines(caplog) if "wrong secret" in line]


def test_reset_mail_starttls_is_never_skipped(make_app, mailbox, caplog):
    """A server that offers no STARTTLS gets no mail in clear text."""
    client = webtest.TestApp(make_app(**mail_settings(mailbox.port, smtp_security="starttls")))
    register_user(client, "alice@example.org")
    with caplog.at_level(logging.DEBUG, logger="syncnode"):
        client.post_json("/resetpassword", {"id": "alice@example.org"}, status=204)
        join_mail_threads()
    assert mailbox.envelopes == []
    assert len(syncnode_lines(caplog, logging.ERROR)) == 1


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
    "token",
    [
        pytest.param(None, id="missing"),
        pytest.param("stale", id="wrong"),
        pytest.param("", id="empty"),
        pytest.param("tök€n", id="non-ascii"),
    ],
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


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(None, id="missing"),
        pytest.param("stale", id="wrong"),
    ],
)
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
    "path",
    [
        pytest.param("", id="empty"),
        pytest.param("%00", id="nul"),
        pytest.param("a%0Ab", id="newline"),
        pytest.param("a%7Fb", id="del"),
        pytest.param("%C2%85", id="c1"),
        pytest.param("%FF", id="invalid-utf8"),
        pytest.param("%C3", id="truncated-utf8"),
    ],
)
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
        pytest.param("é".encode().decode("latin-1"), 400, "REQ01", id="non-ascii"),
        pytest.param("tab\there", 400, "REQ01", id="control"),
        pytest.param("x" * 8193, 413, "SIZE01", id="over-8192"),
    ],
)
def test_store_bad_meta_is_refused(client, user, db, meta, status, code):
    response = put(client, user, "k", headers={"X-Sync-Meta": meta}, status=status)
    assert_error(response, status, code)
    assert table_counts(db)["items"] == 0


def test_store_meta_of_8192_printable_bytes_is_kept(client, user):
    meta = ("".join(chr(c) for c in range(0x20, 0x7F)) * 100)[:8192]
    put(client, user, "k", headers={"X-Sync-Meta": meta}, status=204)
    assert client.get("/store/k", headers=user.headers).headers["X-Sync-Meta"] == meta


@pytest.mark.sqlite
def test_store_put_on_low_disk_is_disk01(make_app, db):
    client = webtest.TestApp(make_app())
    token = client.post_json("/account", {"id": "alice", "password": PASSWORD}).json["token"]
    low = webtest.TestApp(make_app(min_free_bytes=2**62))
    response = low.put("/store/k", b"v", headers={"Authorization": f"Bearer {token}"}, status=507)
    assert_error(response, 507, "DISK01")
    assert table_counts(db)["items"] == 0


@pytest.mark.sqlite
def test_store_values_are_rows_not_files(client, user, tmp_path):
    put(client, user, "k", b"x" * 10_000)
    names = {path.name for path in tmp_path.iterdir()}
    assert names <= {"syncnode.db", "syncnode.db-wal", "syncnode.db-shm"}


# ==================================================================================================
# Store: streaming large values
# ==================================================================================================


#: A value large enough to stream in chunks rather than travel whole.
LARGE = syncnode.STREAM_FROM_BYTES * 4 + 12345


def test_stream_large_value_round_trips_and_is_stored_as_one_row(client, user, db):
    value = os.urandom(LARGE)
    token = put(client, user, "big", value, status=204).headers["X-Sync-Token"]
    response = client.get("/store/big", headers=user.headers)
    assert response.body == value
    assert response.headers["Content-Length"] == str(LARGE)
    assert response.headers["X-Sync-Token"] == token
    assert db.execute("SELECT size, length(value) FROM items").fetchone() == (LARGE, LARGE)


def test_stream_large_value_is_never_whole_in_memory(app, user, tmp_path):
    """An 8 MiB value goes in from a file and out in chunks with at most a few chunks of
    Python memory at a time, on either database."""
    import tracemalloc

    size = 8 * 1024 * 1024
    source = tmp_path / "value"
    source.write_bytes(os.urandom(size))
    put_request = webob.Request.blank(
        "/store/big",
        method="PUT",
        headers={**user.headers, "Content-Type": "application/octet-stream"},
    )
    get_request = webob.Request.blank("/store/big", headers=user.headers)
    with open(source, "rb") as body:
        put_request.body_file, put_request.content_length = body, size
        tracemalloc.start()
        try:
            status, _, written = put_request.call_application(app)
            b"".join(written)
            stored_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            status_get, _, chunks = get_request.call_application(app)
            digest, received = hashlib.sha256(), 0
            for chunk in chunks:
                digest.update(chunk)
                received += len(chunk)
            if hasattr(chunks, "close"):
                chunks.close()
            read_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert (status, status_get, received) == ("204 No Content", "200 OK", size)
    assert digest.digest() == hashlib.sha256(source.read_bytes()).digest()
    print(f"peak Python memory: {stored_peak / 2**20:.2f} MiB in, {read_peak / 2**20:.2f} MiB out")
    assert stored_peak < size / 4 and read_peak < size / 4


def test_stream_large_update_replaces_the_whole_value(client, user, db):
    first = put(client, user, "big", b"a" * LARGE).headers["X-Sync-Token"]
    shorter = os.urandom(LARGE // 2)
    put(client, user, "big", shorter, token=first, status=204)
    assert client.get("/store/big", headers=user.headers).body == shorter
    assert db.execute("SELECT size, length(value) FROM items").fetchone() == (len(shorter),) * 2


def test_stream_large_value_over_the_limit_is_size01_and_nothing_stored(make_app, db):
    client = webtest.TestApp(make_app(max_value_bytes=LARGE))
    owner = User(
        "alice", client.post_json("/account", {"id": "alice", "password": PASSWORD}).json["token"]
    )
    put(client, owner, "fits", b"x" * LARGE, status=204)
    assert_error(put(client, owner, "big", b"x" * (LARGE + 1), status=413), 413, "SIZE01")
    assert [row[0] for row in db.execute("SELECT key FROM items")] == ["fits"]


def test_stream_large_value_with_stale_token_stores_nothing(client, user, db):
    put(client, user, "big", b"a" * LARGE)
    before = snapshot(db)
    assert_error(put(client, user, "big", b"b" * LARGE, token="stale", status=409), 409, "KEY01")
    assert snapshot(db) == before


def test_stream_head_of_large_value_ends_its_read_transaction(app, client, user):
    put(client, user, "big", b"a" * LARGE)
    response = client.head("/store/big", headers=user.headers)
    assert response.headers["Content-Length"] == str(LARGE) and response.body == b""
    assert not app.context.connection().in_transaction
    put(client, user, "next", b"b", status=204)  # the thread's connection is usable again


def test_stream_read_is_not_torn_by_a_concurrent_update(app, user, client):
    old, new = b"o" * LARGE, b"n" * LARGE
    token = put(client, user, "big", old).headers["X-Sync-Token"]
    environ = webtest.TestRequest.blank(
        "/store/big", headers=user.headers, environ={"REQUEST_METHOD": "GET"}
    ).environ
    body = app(environ, lambda status, headers, exc_info=None: None)
    chunks = iter(body)
    first = next(chunks)  # the answer is streaming from its snapshot
    writer = threading.Thread(
        target=lambda: webtest.TestApp(app).put(
            "/store/big", new, headers={**user.headers, "X-Sync-Token": token}, status=204
        )
    )
    writer.start()
    writer.join(timeout=10)
    assert not writer.is_alive()
    rest = b"".join(chunks)
    body.close()
    assert first + rest == old  # the old value, whole
    assert client.get("/store/big", headers=user.headers).body == new  # then the new one, whole


def test_stream_read_over_a_real_server_is_not_torn(live_server):
    owner = live_server.register("alice")
    old, new = os.urandom(LARGE), os.urandom(LARGE)
    token = live_server.request("PUT", "/store/big", old, owner.headers).headers["X-Sync-Token"]
    reader = live_server.connect()
    reader.request("GET", "/store/big", headers=owner.headers)
    response = reader.getresponse()
    first = response.read(1000)
    reply = live_server.request("PUT", "/store/big", new, {**owner.headers, "X-Sync-Token": token})
    assert reply.status_int == 204
    assert first + response.read() == old
    reader.close()
    assert live_server.request("GET", "/store/big", headers=owner.headers).body == new


# ==================================================================================================
# Store: conditional requests
# ==================================================================================================


#: Each way a client or a proxy may spell the entity tag of token T.
TAG_FORMS = [
    pytest.param('"T"', id="strong"),
    pytest.param('W/"T"', id="weak"),
    pytest.param('"T-gzip"', id="gzip"),
    pytest.param('"T-br"', id="br"),
    pytest.param('"T-zstd"', id="zstd"),
    pytest.param('"T-deflate"', id="deflate"),
    pytest.param('W/"T-gzip"', id="weak-gzip"),
]


def test_conditional_get_matching_tag_is_304(client, user):
    token = token_of(put(client, user, "k", b"value", headers={"X-Sync-Meta": "m"}))
    response = client.get("/store/k", headers={**user.headers, "If-None-Match": f'"{token}"'})
    assert response.status_int == 304
    assert response.body == b""
    assert response.headers["ETag"] == f'"{token}"'
    assert response.headers["X-Sync-Token"] == token
    assert "Content-Type" not in response.headers


@pytest.mark.parametrize(
    "form",
    [
        *TAG_FORMS,
        pytest.param('"other", "T"', id="list"),
        pytest.param("*", id="star"),
    ],
)
def test_conditional_get_if_none_match_forms_are_304(client, user, form):
    token = token_of(put(client, user, "k"))
    tag = form.replace("T", token)
    response = client.get("/store/k", headers={**user.headers, "If-None-Match": tag})
    assert response.status_int == 304
    assert response.headers["X-Sync-Token"] == token


def test_conditional_get_stale_tag_is_200_with_the_value(client, user):
    old = token_of(put(client, user, "k", b"one"))
    new = token_of(put(client, user, "k", b"two", old))
    response = client.get("/store/k", headers={**user.headers, "If-None-Match": f'"{old}"'})
    assert response.status_int == 200
    assert response.body == b"two"
    assert response.headers["ETag"] == f'"{new}"'


def test_conditional_get_on_invisible_key_is_err01(client, user, other):
    token = token_of(put(client, other, "k"))
    response = client.get("/store/k", headers={**user.headers, "If-None-Match": f'"{token}"'},
                          status=404)  # fmt: skip
    assert_error(response, 404, "ERR01")


def test_conditional_304_and_head_of_a_streamed_value_end_their_read(client, user):
    token = token_of(put(client, user, "big", os.urandom(300 * 1024)))
    client.get("/store/big", headers={**user.headers, "If-None-Match": f'"{token}"'}, status=304)
    client.head("/store/big", headers=user.headers, status=200)
    put(client, user, "big", b"small", token, status=204)


def test_conditional_values_carry_no_cache_no_transform(client, user):
    written = put(client, user, "k")
    read = client.get("/store/k", headers=user.headers)
    assert read.headers["Cache-Control"] == "no-cache, no-transform"
    assert written.headers["Cache-Control"] == "no-cache, no-transform"


def test_conditional_head_answers_the_headers_of_get(client, user):
    put(client, user, "k", b"12345", headers={"X-Sync-Meta": "text/plain"})
    get = client.get("/store/k", headers=user.headers)
    head = client.head("/store/k", headers=user.headers)
    assert head.body == b""
    assert dict(head.headers) == dict(get.headers)


def test_conditional_head_with_matching_tag_is_304(client, user):
    token = token_of(put(client, user, "k"))
    response = client.head("/store/k", headers={**user.headers, "If-None-Match": f'"{token}"'})
    assert response.status_int == 304
    assert response.headers["ETag"] == f'"{token}"'


@pytest.mark.parametrize("form", TAG_FORMS)
def test_conditional_put_if_match_forms_update(client, user, db, form):
    token = token_of(put(client, user, "k", b"old"))
    response = put(client, user, "k", b"new", headers={"If-Match": form.replace("T", token)})
    assert response.status_int == 204
    assert token_of(response) != token
    assert db.execute("SELECT value, token FROM items").fetchall() == [(b"new", token_of(response))]


@pytest.mark.parametrize("form", TAG_FORMS)
def test_conditional_delete_if_match_forms_delete(client, user, db, form):
    token = token_of(put(client, user, "k"))
    headers = {**user.headers, "If-Match": form.replace("T", token)}
    client.delete("/store/k", headers=headers, status=204)
    assert db.execute("SELECT count(*) FROM items").fetchone() == (0,)


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
def test_conditional_stale_if_match_is_key01(client, user, db, method):
    old = token_of(put(client, user, "k"))
    put(client, user, "k", b"v2", old)
    before = feed_state(db)
    headers = {**user.headers, "If-Match": f'"{old}"'}
    response = client.request("/store/k", method=method, body=b"v3", headers=headers, status=409)
    assert_error(response, 409, "KEY01")
    assert feed_state(db) == before


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
def test_conditional_if_match_and_different_x_sync_token_is_req01(client, user, db, method):
    token = token_of(put(client, user, "k"))
    before = feed_state(db)
    headers = {**user.headers, "If-Match": f'"{token}"', "X-Sync-Token": "something-else"}
    response = client.request("/store/k", method=method, body=b"v2", headers=headers, status=400)
    assert_error(response, 400, "REQ01")
    assert feed_state(db) == before


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
def test_conditional_if_match_and_same_x_sync_token_is_accepted(client, user, method):
    token = token_of(put(client, user, "k"))
    headers = {**user.headers, "If-Match": f'W/"{token}-gzip"', "X-Sync-Token": token}
    response = client.request("/store/k", method=method, body=b"v2", headers=headers)
    assert response.status_int == 204


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
def test_conditional_if_match_star_is_req01(client, user, db, method):
    put(client, user, "k")
    before = feed_state(db)
    headers = {**user.headers, "If-Match": "*"}
    response = client.request("/store/k", method=method, body=b"v2", headers=headers, status=400)
    assert_error(response, 400, "REQ01")
    assert feed_state(db) == before


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
def test_conditional_if_match_on_a_missing_key_is_refused(client, user, db, method):
    before = feed_state(db)
    headers = {**user.headers, "If-Match": '"some-token"'}
    status, code = (409, "KEY01") if method == "PUT" else (404, "ERR01")
    response = client.request("/store/k", method=method, body=b"v", headers=headers, status=status)
    assert_error(response, status, code)
    assert feed_state(db) == before


def test_conditional_put_if_none_match_star_creates(client, user, db):
    response = put(client, user, "k", b"new", headers={"If-None-Match": "*"})
    assert response.status_int == 204
    assert db.execute("SELECT key, value, token FROM items").fetchall() == [
        ("k", b"new", token_of(response))
    ]


@pytest.mark.parametrize("holder", ["owner", "reader", "stranger"])
def test_conditional_put_if_none_match_star_on_existing_key_is_key01(
    client, user, other, db, holder
):
    token = token_of(put(client, user, "k"))
    if holder == "reader":
        share(client, user, "k", {"bob": "READ"})
    caller, sent = (user, token) if holder == "owner" else (other, None)
    before = feed_state(db)
    response = put(client, caller, "k", b"x", sent, headers={"If-None-Match": "*"}, status=409)
    assert_error(response, 409, "KEY01")
    assert feed_state(db) == before


# ==================================================================================================
# Store: batch
# ==================================================================================================


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def batch(client, user: User, operations: list, **kw):
    """POST /batch as the user; return the response."""
    return client.post_json("/batch", {"operations": operations}, headers=user.headers, **kw)


def put_op(key: str, value: bytes = b"v", token: str | None = None, meta: str | None = None):
    return {"method": "PUT", "key": key, "token": token, "value": b64(value), "meta": meta}


def delete_op(key: str, token: str | None) -> dict:
    return {"method": "DELETE", "key": key, "token": token}


def test_batch_applies_every_operation_and_answers_tokens_in_order(client, user, db):
    old = token_of(put(client, user, "old"))
    gone_token = token_of(put(client, user, "gone"))
    operations = [
        put_op("new", b"created", meta="text/plain"),
        put_op("old", b"updated", old),
        delete_op("gone", gone_token),
    ]
    response = batch(client, user, operations)
    results = response.json["results"]
    assert [result["key"] for result in results] == ["new", "old", "gone"]
    assert results[2]["token"] is None
    assert db.execute("SELECT key, value, meta, token FROM items ORDER BY key").fetchall() == [
        ("new", b"created", "text/plain", results[0]["token"]),
        ("old", b"updated", None, results[1]["token"]),
    ]
    assert results[1]["token"] != old
    assert response.json == {"results": results}


def test_batch_gives_each_changed_key_its_own_seq(client, user):
    token = token_of(put(client, user, "b"))
    cursor = current_seq(client, user)
    results = batch(client, user, [put_op("a"), delete_op("b", token), put_op("c")]).json["results"]
    assert changes(client, user, cursor) == [
        live("a", "OWN", results[0]["token"], cursor + 1),
        gone("b", cursor + 2),
        live("c", "OWN", results[2]["token"], cursor + 3),
    ]


def test_batch_empty_list_changes_nothing(client, user, db):
    before = feed_state(db)
    assert batch(client, user, []).json == {"results": []}
    assert feed_state(db) == before


def test_batch_of_100_operations_is_accepted(client, user, db):
    response = batch(client, user, [put_op(f"k{number:03}") for number in range(100)])
    assert len(response.json["results"]) == 100
    assert db.execute("SELECT count(*) FROM items").fetchone() == (100,)


def test_batch_of_101_operations_is_req01(client, user, db):
    before = feed_state(db)
    response = batch(client, user, [put_op(f"k{number:03}") for number in range(101)], status=400)
    assert_error(response, 400, "REQ01")
    assert feed_state(db) == before


def test_batch_value_at_the_size_limit_is_accepted(make_app, db):
    client = webtest.TestApp(make_app(max_value_bytes=10))
    alice = register_user(client, "alice")
    batch(client, alice, [put_op("ten", b"x" * 10), put_op("empty", b"")])
    assert db.execute("SELECT key, value FROM items ORDER BY key").fetchall() == [
        ("empty", b""),
        ("ten", b"x" * 10),
    ]


def test_batch_repeated_key_is_req01_at_the_repeat(client, user, db):
    before = feed_state(db)
    operations = [put_op("a"), put_op("b"), delete_op("a", None)]
    response = batch(client, user, operations, status=400)
    assert_error(response, 400, "REQ01")
    assert response.json["index"] == 2
    assert feed_state(db) == before


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"not json", id="text"),
        pytest.param(b"[]", id="array"),
        pytest.param(b"{}", id="no-operations"),
        pytest.param(b'{"operations": {}}', id="object"),
        pytest.param(b'{"operations": null}', id="null"),
    ],
)
def test_batch_malformed_body_is_req01(client, user, db, body):
    before = feed_state(db)
    response = client.post("/batch", body, headers=user.headers, status=400)
    assert_error(response, 400, "REQ01")
    assert feed_state(db) == before


def test_batch_needs_authentication(client, db):
    response = client.post_json("/batch", {"operations": [put_op("k")]}, status=401)
    assert_error(response, 401, "AUTH01")
    assert db.execute("SELECT count(*) FROM items").fetchone() == (0,)


#: name: (the failing operation, put at index 1 after a valid PUT, expected status and code).
FAILING_OPERATIONS = {
    "stale-token": (put_op("mine", token="stale"), 409, "KEY01"),
    "create-over-existing": (put_op("mine"), 409, "KEY01"),
    "create-over-invisible": (put_op("bobs"), 409, "KEY01"),
    "create-with-token": (put_op("absent", token="t"), 409, "KEY01"),
    "create-with-empty-token": (put_op("absent", token=""), 409, "KEY01"),
    "read-holder-put": (put_op("shared-read", token="{read}"), 403, "PERM01"),
    "write-holder-delete": (delete_op("shared-write", "{write}"), 403, "PERM01"),
    "delete-missing": (delete_op("absent", "t"), 404, "ERR01"),
    "delete-invisible": (delete_op("bobs", "{bobs}"), 404, "ERR01"),
    "delete-stale": (delete_op("mine", "stale"), 409, "KEY01"),
    "delete-no-token": (delete_op("mine", None), 409, "KEY01"),
    "too-large": (put_op("big", b"x" * 11), 413, "SIZE01"),
    "meta-too-large": (put_op("m", meta="m" * 8193), 413, "SIZE01"),
    "bad-base64": ({"method": "PUT", "key": "x", "token": None, "value": "***"}, 400, "REQ01"),
    "unpadded-base64": ({"method": "PUT", "key": "x", "token": None, "value": "dg"}, 400, "REQ01"),
    "no-value": ({"method": "PUT", "key": "x", "token": None}, 400, "REQ01"),
    "bad-meta": (put_op("x", meta="tab\there"), 400, "REQ01"),
    "meta-number": ({**put_op("x"), "meta": 5}, 400, "REQ01"),
    "empty-key": (put_op(""), 400, "REQ01"),
    "control-key": (put_op("a\nb"), 400, "REQ01"),
    "long-key": (put_op("k" * 1025), 400, "REQ01"),
    "key-number": ({**put_op("x"), "key": 5}, 400, "REQ01"),
    "token-number": ({**put_op("x"), "token": 5}, 400, "REQ01"),
    "method-get": ({**put_op("x"), "method": "GET"}, 400, "REQ01"),
    "method-lower": ({**put_op("x"), "method": "put"}, 400, "REQ01"),
    "not-object": ("PUT x", 400, "REQ01"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(FAILING_OPERATIONS))
def test_batch_failing_operation_applies_nothing(make_app, db, name):
    client = webtest.TestApp(make_app(max_value_bytes=10))
    alice, bob = register_user(client, "alice"), register_user(client, "bob")
    tokens = {"mine": token_of(put(client, alice, "mine"))}
    tokens["bobs"] = token_of(put(client, bob, "bobs"))
    for key, level in [("read", "READ"), ("write", "WRITE")]:
        tokens[key] = token_of(put(client, bob, f"shared-{key}"))
        share(client, bob, f"shared-{key}", {"alice": level})
    failing, status, code = FAILING_OPERATIONS[name]
    if isinstance(failing, dict) and isinstance(failing.get("token"), str):
        failing = {**failing, "token": failing["token"].format(**tokens)}
    before = feed_state(db)
    response = batch(client, alice, [put_op("first"), failing, put_op("last")], status=status)
    assert_error(response, status, code)
    assert response.json["index"] == 1
    assert feed_state(db) == before


def test_batch_shape_error_comes_before_any_store_check(client, user, db):
    before = feed_state(db)
    operations = [delete_op("missing", "t"), put_op("x", meta="\x01")]
    response = batch(client, user, operations, status=400)
    assert_error(response, 400, "REQ01")
    assert response.json["index"] == 1
    assert feed_state(db) == before


def test_batch_store_write_api_key_may_put(client, user, db):
    token = token_of(put(client, user, "k"))
    key = create_api_key(client, user, "store.write").headers
    response = client.post_json(
        "/batch", {"operations": [put_op("new"), put_op("k", b"2", token)]}, headers=key
    )
    assert [result["key"] for result in response.json["results"]] == ["new", "k"]
    assert db.execute("SELECT key, value FROM items ORDER BY key").fetchall() == [
        ("k", b"2"),
        ("new", b"v"),
    ]


def test_batch_store_write_api_key_delete_is_perm01_at_its_index(client, user, db):
    token = token_of(put(client, user, "k"))
    key = create_api_key(client, user, "store.write").headers
    before = feed_state(db)
    operations = [put_op("new"), put_op("other"), delete_op("k", token)]
    response = client.post_json("/batch", {"operations": operations}, headers=key, status=403)
    assert_error(response, 403, "PERM01")
    assert response.json["index"] == 2
    assert feed_state(db) == before


def test_batch_store_read_api_key_is_perm01(client, user, db):
    key = create_api_key(client, user, "store.read").headers
    before = feed_state(db)
    response = client.post_json("/batch", {"operations": [put_op("new")]}, headers=key, status=403)
    assert_error(response, 403, "PERM01")
    assert feed_state(db) == before


# ==================================================================================================
# Store: change feed
# ==================================================================================================


DAY = 86400


@pytest.mark.parametrize(
    "method, url",
    [
        pytest.param("GET", "/store", id="listing"),
        pytest.param("GET", "/store?prefix=n", id="prefix"),
        pytest.param("GET", "/store?limit=1", id="limit"),
        pytest.param("GET", "/store?limit=1&after=a", id="after"),
        pytest.param("GET", "/store?since=1", id="feed"),
        pytest.param("GET", "/store?since=1&limit=1&prefix=n", id="feed-page"),
        pytest.param("HEAD", "/store", id="head"),
    ],
)
def test_feed_every_store_listing_carries_x_sync_seq(client, user, method, url):
    put(client, user, "notes")
    put(client, user, "other")
    expected = current_seq(client, user)
    response = client.request(url, method=method, headers=user.headers)
    assert response.status_int == 200
    assert re.fullmatch(r"[0-9]+", response.headers["X-Sync-Seq"])
    assert int(response.headers["X-Sync-Seq"]) == expected


def test_feed_seq_grows_with_every_kind_of_change(client, user, other):
    seqs = [current_seq(client, user)]
    token = token_of(put(client, user, "k"))
    seqs.append(current_seq(client, user))
    token = token_of(put(client, user, "k", b"v2", token))
    seqs.append(current_seq(client, user))
    share(client, user, "k", {"bob": "READ"})
    seqs.append(current_seq(client, user))
    share(client, user, "k", {"bob": "WRITE"})
    seqs.append(current_seq(client, user))
    client.delete("/permission/k?users=bob", headers=user.headers)
    seqs.append(current_seq(client, user))
    client.delete("/store/k", headers={**user.headers, "X-Sync-Token": token})
    seqs.append(current_seq(client, user))
    assert seqs == sorted(set(seqs)), seqs


def test_feed_since_answers_only_later_changes_by_seq(client, user):
    put(client, user, "a")
    b = put(client, user, "b")
    cursor = current_seq(client, user)
    b2 = put(client, user, "b", b"new", token_of(b))
    c = put(client, user, "c")
    response = client.get(f"/store?since={cursor}", headers=user.headers)
    seq = int(response.headers["X-Sync-Seq"])
    assert response.json == [
        live("b", "OWN", token_of(b2), seq - 1),
        live("c", "OWN", token_of(c), seq),
    ]


def test_feed_x_sync_cursor_header_acts_as_since(client, user):
    put(client, user, "a")
    cursor = current_seq(client, user)
    b = put(client, user, "b")
    by_header = client.get("/store", headers={**user.headers, "X-Sync-Cursor": str(cursor)})
    by_query = client.get(f"/store?since={cursor}", headers=user.headers)
    assert by_header.json == by_query.json == [live("b", "OWN", token_of(b), cursor + 1)]
    assert by_header.headers["X-Sync-Cursor"] == by_query.headers["X-Sync-Cursor"]
    both = client.get(
        f"/store?since={cursor}", headers={**user.headers, "X-Sync-Cursor": str(cursor)}
    )
    assert both.json == by_query.json


@pytest.mark.parametrize(
    "sent",
    ["", "x", "-1", "1.5", " 1", "١", str(2**62 + 1)],
    ids=["empty", "word", "negative", "fraction", "space", "arabic-digit", "past-2**62"],
)
def test_feed_x_sync_cursor_header_malformed_is_req01(client, user, db, sent):
    put(client, user, "a")
    before = snapshot(db)
    headers = {**user.headers, "X-Sync-Cursor": sent.encode().decode("latin-1")}
    response = client.get("/store", headers=headers, status=400)
    assert_error(response, 400, "REQ01")
    assert snapshot(db) == before


def test_feed_x_sync_cursor_header_at_its_bound_is_a_cursor_past_the_server(client, user):
    headers = {**user.headers, "X-Sync-Cursor": str(2**62)}
    response = client.get("/store", headers=headers, status=410)
    assert_error(response, 410, "SYNC01")  # taken as a cursor: newer than the server's


def test_feed_x_sync_cursor_header_that_differs_from_since_is_req01(client, user):
    cursor = current_seq(client, user)
    headers = {**user.headers, "X-Sync-Cursor": str(cursor + 1)}
    response = client.get(f"/store?since={cursor}", headers=headers, status=400)
    assert_error(response, 400, "REQ01")
    assert "X-Sync-Cursor" in response.json["message"]


def test_feed_x_sync_cursor_header_with_after_is_req01(client, user):
    headers = {**user.headers, "X-Sync-Cursor": "0"}
    assert_error(client.get("/store?after=a", headers=headers, status=400), 400, "REQ01")


def test_feed_since_zero_lists_every_held_key(client, user):
    put(client, user, "b")
    put(client, user, "a")
    entries = changes(client, user, 0)
    assert [entry["key"] for entry in entries] == ["b", "a"]
    assert {entry["key"]: entry["token"] for entry in entries} == {
        entry["key"]: entry["token"] for entry in client.get("/store", headers=user.headers).json
    }


def test_feed_answers_one_entry_per_key_with_its_latest_state(client, user):
    cursor = current_seq(client, user)
    a = put(client, user, "a")
    b = put(client, user, "b")
    a = put(client, user, "a", b"2", token_of(a))
    b = put(client, user, "b", b"2", token_of(b))
    a = put(client, user, "a", b"3", token_of(a))
    entries = changes(client, user, cursor)
    assert [entry["key"] for entry in entries] == ["b", "a"]
    assert [entry["token"] for entry in entries] == [token_of(b), token_of(a)]
    assert entries[0]["seq"] < entries[1]["seq"] == current_seq(client, user)


def test_feed_delete_answers_a_tombstone_to_every_holder(client, user, other):
    token = token_of(put(client, user, "k"))
    share(client, user, "k", {"bob": "READ"})
    cursor = current_seq(client, user)
    client.delete("/store/k", headers={**user.headers, "X-Sync-Token": token})
    seq = current_seq(client, user)
    assert changes(client, user, cursor) == [gone("k", seq)]
    assert changes(client, other, cursor) == [gone("k", seq)]


def test_feed_grant_reaches_only_the_grantee(client, user, other):
    token = token_of(put(client, user, "k"))
    cursor = current_seq(client, user)
    share(client, user, "k", {"bob": "READ"})
    assert changes(client, other, cursor) == [live("k", "READ", token, cursor + 1)]
    assert changes(client, user, cursor) == []


def test_feed_permission_change_reaches_that_holder(client, user, other):
    token = token_of(put(client, user, "k"))
    share(client, user, "k", {"bob": "READ"})
    cursor = current_seq(client, user)
    share(client, user, "k", {"bob": "WRITE"})
    assert changes(client, other, cursor) == [live("k", "WRITE", token, cursor + 1)]
    assert changes(client, user, cursor) == []


def test_feed_unchanged_grant_takes_no_seq(client, user, other, db):
    put(client, user, "k")
    share(client, user, "k", {"bob": "READ"})
    before = feed_state(db)
    share(client, user, "k", {"bob": "READ"})
    assert feed_state(db) == before


def test_feed_revoke_answers_a_tombstone_to_the_revoked_user(client, user, other):
    put(client, user, "k")
    share(client, user, "k", {"bob": "WRITE"})
    cursor = current_seq(client, user)
    client.delete("/permission/k?users=bob", headers=user.headers)
    assert changes(client, other, cursor) == [gone("k", cursor + 1)]
    assert changes(client, user, cursor) == []


def test_feed_holder_leaving_a_key_gets_a_tombstone(client, user, other):
    put(client, user, "k")
    share(client, user, "k", {"bob": "READ"})
    cursor = current_seq(client, user)
    client.delete("/permission/k?users=bob", headers=other.headers)
    assert changes(client, other, cursor) == [gone("k", cursor + 1)]
    assert changes(client, user, cursor) == []


def test_feed_update_by_a_writer_reaches_every_holder(client, user, other):
    token = token_of(put(client, user, "k"))
    share(client, user, "k", {"bob": "WRITE"})
    cursor = current_seq(client, user)
    new = token_of(put(client, other, "k", b"bob's", token))
    assert changes(client, user, cursor) == [live("k", "OWN", new, cursor + 1)]
    assert changes(client, other, cursor) == [live("k", "WRITE", new, cursor + 1)]


@pytest.mark.sqlite
def test_store_update_is_one_statement_of_its_own_when_no_poll_waits(app, client, user, other, db):
    token = token_of(put(client, user, "k"))
    share(client, user, "k", {"bob": "READ"})
    seq = current_seq(client, user)
    statements: list[str] = []
    conn = app.context.connection()  # the connection webtest's requests use (same thread)
    conn.set_trace_callback(statements.append)
    try:
        new = token_of(put(client, user, "k", b"new", token))
    finally:
        conn.set_trace_callback(None)
    # SQLite traces a statement again for each statement of a trigger it runs.
    statements = [sql for n, sql in enumerate(statements) if n == 0 or statements[n - 1] != sql]
    writes = [sql for sql in statements if not sql.lstrip().upper().startswith("SELECT")]
    assert len(writes) == 1 and writes[0].lstrip().startswith("UPDATE items"), statements
    assert not any("BEGIN" in sql or "COMMIT" in sql for sql in statements), statements
    assert len(statements) == 2, "the session, then the update; no holders looked up"
    # The trigger gave every holder's row the new change number, in the same statement.
    rows = db.execute(
        "SELECT users.name, permissions.seq FROM permissions "
        "JOIN users ON users.id = permissions.user_id ORDER BY users.name"
    ).fetchall()
    assert [tuple(row) for row in rows] == [("alice", seq + 1), ("bob", seq + 1)]
    assert db.execute("SELECT seq FROM sync_state").fetchone()[0] == seq + 1
    assert changes(client, other, seq) == [live("k", "READ", new, seq + 1)]


def queue_puts(app, puts: list[tuple[User, str, bytes, str]]) -> list:
    """Send PUTs (user, key, value, token) from threads of their own while the app's write
    lock is held, until all wait for one batch; release it, and return their answers."""
    lock, answers = app.context.db.write_lock, [None] * len(puts)

    def send(index: int, user: User, key: str, value: bytes, token: str) -> None:
        answers[index] = put(webtest.TestApp(app), user, key, value, token, status="*")

    threads = [
        threading.Thread(target=send, args=(index, *args)) for index, args in enumerate(puts)
    ]
    with lock:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while lock.queued() < len(puts) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert lock.queued() == len(puts), "the PUTs did not all queue"
    for thread in threads:
        thread.join(10)
    return answers


def count_batches(monkeypatch) -> list[int]:
    """Record the size of each batch of writes run together in one transaction."""
    sizes: list[int] = []
    run_batch = syncnode.run_batch

    def counted(conn, batch):
        sizes.append(len(batch))
        return run_batch(conn, batch)

    monkeypatch.setattr(syncnode, "run_batch", counted)
    return sizes


@pytest.mark.sqlite
def test_store_updates_queued_meanwhile_share_one_commit(app, client, make_user, db, monkeypatch):
    users = [make_user(name) for name in ("alice", "bob", "carol")]
    tokens = [token_of(put(client, user, f"k-{user.name}")) for user in users]
    seq = current_seq(client, users[0])
    batches = count_batches(monkeypatch)
    answers = queue_puts(
        app,
        [
            (user, f"k-{user.name}", user.name.encode(), token)
            for user, token in zip(users, tokens, strict=True)
        ],
    )
    assert batches == [3]
    assert [answer.status_int for answer in answers] == [204, 204, 204]
    stored = dict(db.execute("SELECT key, token FROM items").fetchall())
    assert stored == {f"k-{user.name}": token_of(a) for user, a in zip(users, answers, strict=True)}
    assert db.execute("SELECT seq FROM sync_state").fetchone()[0] == seq + 3
    numbers = sorted(row[0] for row in db.execute("SELECT seq FROM permissions"))
    assert numbers == [seq + 1, seq + 2, seq + 3]  # each update a change of its own
    for user, answer in zip(users, answers, strict=True):
        [entry] = changes(client, user, seq)
        assert entry["token"] == token_of(answer)
        assert client.get(f"/store/k-{user.name}", headers=user.headers).body == user.name.encode()


@pytest.mark.sqlite
def test_store_racing_updates_in_one_batch_let_one_win(app, client, user, other, db, monkeypatch):
    token = token_of(put(client, user, "k"))
    share(client, user, "k", {"bob": "WRITE"})
    seq = current_seq(client, user)
    batches = count_batches(monkeypatch)
    answers = queue_puts(app, [(user, "k", b"alice's", token), (other, "k", b"bob's", token)])
    assert batches == [2]
    assert sorted(answer.status_int for answer in answers) == [204, 409]
    [winner] = [answer for answer in answers if answer.status_int == 204]
    [loser] = [answer for answer in answers if answer.status_int == 409]
    assert loser.json["code"] == "KEY01"
    assert db.execute("SELECT token FROM items").fetchone()[0] == token_of(winner)
    assert db.execute("SELECT seq FROM sync_state").fetchone()[0] == seq + 1


@pytest.mark.sqlite
def test_store_batch_with_a_failing_update_rolls_back_and_each_runs_alone(
    app, client, make_user, db, monkeypatch
):
    users = [make_user(name) for name in ("alice", "bob", "carol")]
    tokens = [token_of(put(client, user, f"k-{user.name}")) for user in users]
    seq = current_seq(client, users[0])
    db.execute(
        "CREATE TRIGGER refuse_bob BEFORE UPDATE OF token ON items WHEN old.key = 'k-bob' "
        "BEGIN SELECT RAISE(ABORT, 'refused'); END"
    )
    batches = count_batches(monkeypatch)
    answers = queue_puts(
        app,
        [
            (user, f"k-{user.name}", b"new", token)
            for user, token in zip(users, tokens, strict=True)
        ],
    )
    assert batches == [3]  # rolled back whole, then each alone
    alice, bob, carol = answers
    assert (alice.status_int, carol.status_int) == (204, 204)
    assert bob.status_int >= 500 and bob.json["code"] == "ERR02"
    stored = dict(db.execute("SELECT key, token FROM items").fetchall())
    assert stored == {"k-alice": token_of(alice), "k-bob": tokens[1], "k-carol": token_of(carol)}
    assert db.execute("SELECT seq FROM sync_state").fetchone()[0] == seq + 2


def test_store_any_write_of_a_token_reaches_every_holders_feed(client, user, other, db):
    put(client, user, "k")
    put(client, user, "mine")
    share(client, user, "k", {"bob": "WRITE"})
    seq = current_seq(client, user)
    with syncnode.transaction(db, write=True):  # beside the app, as another tool would
        db.execute("UPDATE items SET token = 'by-hand' WHERE key = ?", ("k",))
    assert db.execute("SELECT seq FROM sync_state").fetchone()[0] == seq + 1
    assert changes(client, user, seq) == [live("k", "OWN", "by-hand", seq + 1)]
    assert changes(client, other, seq) == [live("k", "WRITE", "by-hand", seq + 1)]
    with syncnode.transaction(db, write=True):  # a change of what no token names: no seq
        db.execute("UPDATE items SET updated_ms = updated_ms + 1 WHERE key = ?", ("mine",))
    assert db.execute("SELECT seq FROM sync_state").fetchone()[0] == seq + 1


def test_feed_account_deletion_buries_the_keys_it_alone_owned(client, user, other):
    put(client, other, "bobs")
    share(client, other, "bobs", {"alice": "READ"})
    shared = token_of(put(client, other, "shared"))
    share(client, other, "shared", {"alice": "OWN"})
    cursor = current_seq(client, user)
    client.delete("/account", headers=other.headers, status=204)
    assert changes(client, user, cursor) == [gone("bobs", cursor + 1)]
    assert client.get("/store", headers=user.headers).json == [
        {"key": "shared", "permission": "OWN", "token": shared}
    ]


def test_feed_regrant_leaves_one_live_entry(client, user, other):
    token = token_of(put(client, user, "k"))
    cursor = current_seq(client, user)
    share(client, user, "k", {"bob": "READ"})
    client.delete("/permission/k?users=bob", headers=user.headers)
    share(client, user, "k", {"bob": "WRITE"})
    assert changes(client, other, cursor) == [live("k", "WRITE", token, cursor + 3)]


def test_feed_recreated_key_leaves_one_live_entry(client, user):
    token = token_of(put(client, user, "k"))
    cursor = current_seq(client, user)
    client.delete("/store/k", headers={**user.headers, "X-Sync-Token": token})
    new = token_of(put(client, user, "k"))
    assert changes(client, user, cursor) == [live("k", "OWN", new, cursor + 2)]


def test_feed_refused_writes_take_no_seq(client, make_user, user, other, db):
    token = token_of(put(client, user, "k"))
    share(client, user, "k", {"bob": "READ"})
    carol = make_user("carol")
    before = feed_state(db)
    put(client, user, "k", b"x", "stale", status=409)
    put(client, other, "k", b"x", token, status=403)
    put(client, carol, "k", b"x", status=409)
    client.delete("/store/k", headers={**user.headers, "X-Sync-Token": "stale"}, status=409)
    share(client, other, "k", {"bob": "OWN"}, status=403)
    client.delete("/permission/k?users=alice", headers=user.headers, status=409)
    assert feed_state(db) == before


def test_feed_since_current_seq_is_empty(client, user):
    put(client, user, "k")
    cursor = current_seq(client, user)
    response = client.get(f"/store?since={cursor}", headers=user.headers)
    assert response.json == []
    assert response.headers["X-Sync-Seq"] == str(cursor)


@pytest.mark.parametrize(
    "ahead",
    [
        pytest.param(1, id="next"),
        pytest.param(2**40, id="far"),
    ],
)
def test_feed_since_beyond_current_seq_is_sync01(client, user, ahead):
    cursor = current_seq(client, user)
    response = client.get(f"/store?since={cursor + ahead}", headers=user.headers, status=410)
    assert_error(response, 410, "SYNC01")


def test_feed_tombstones_are_kept_for_90_days_by_default(make_app, clock):
    client = webtest.TestApp(make_app(session_ttl=365 * DAY))
    alice = register_user(client, "alice")
    token = token_of(put(client, alice, "k"))
    cursor = current_seq(client, alice)
    client.delete("/store/k", headers={**alice.headers, "X-Sync-Token": token})
    clock.advance(90 * DAY - 3600)
    client.get("/health")  # housekeeping runs here
    assert changes(client, alice, cursor) == [gone("k", cursor + 1)]


def test_feed_cursor_older_than_purged_tombstones_is_sync01(make_app, clock):
    client = webtest.TestApp(make_app(session_ttl=365 * DAY))
    alice = register_user(client, "alice")
    token = token_of(put(client, alice, "k"))
    cursor = current_seq(client, alice)
    client.delete("/store/k", headers={**alice.headers, "X-Sync-Token": token})
    clock.advance(90 * DAY + 3600)
    client.get("/health")  # housekeeping runs here
    response = client.get(f"/store?since={cursor}", headers=alice.headers, status=410)
    assert_error(response, 410, "SYNC01")


def test_feed_cursor_after_purged_tombstones_still_answers(make_app, clock):
    client = webtest.TestApp(make_app(tombstone_ttl=3600))
    alice = register_user(client, "alice")
    token = token_of(put(client, alice, "k"))
    client.delete("/store/k", headers={**alice.headers, "X-Sync-Token": token})
    cursor = current_seq(client, alice)
    clock.advance(7200)
    later = put(client, alice, "later")  # housekeeping purges the tombstone first
    assert changes(client, alice, cursor) == [live("later", "OWN", token_of(later), cursor + 1)]


def test_feed_purge_waits_for_housekeeping_every_10_minutes(make_app, clock):
    client = webtest.TestApp(make_app(tombstone_ttl=3600))
    alice = register_user(client, "alice")  # housekeeping ran now
    token = token_of(put(client, alice, "k"))
    cursor = current_seq(client, alice)
    client.delete("/store/k", headers={**alice.headers, "X-Sync-Token": token})
    clock.advance(3600 - 300)
    client.get("/health")  # housekeeping: the tombstone is 55 minutes old and stays
    clock.advance(360)
    # The tombstone is past its ttl, but the next housekeeping is 4 minutes away.
    assert changes(client, alice, cursor) == [gone("k", cursor + 1)]
    clock.advance(300)
    client.get("/health")
    response = client.get(f"/store?since={cursor}", headers=alice.headers, status=410)
    assert_error(response, 410, "SYNC01")


# Tombstones per user ------------------------------------------------------------------------------


class Pile:
    """Alice created and deleted 12 keys she shared with no one; housekeeping has run since."""

    def __init__(self, make_app, clock) -> None:
        self.client = webtest.TestApp(make_app(tombstones_per_user=5))
        self.alice, self.bob = (
            register_user(self.client, "alice"),
            register_user(self.client, "bob"),
        )
        put(self.client, self.bob, "bobs")
        self.bob_cursor = current_seq(self.client, self.bob)
        tokens = seed(self.client, self.alice, [f"gone/{number:02d}" for number in range(12)])
        self.before = current_seq(self.client, self.alice)
        for key, token in tokens.items():
            headers = {**self.alice.headers, "X-Sync-Token": token}
            self.client.delete(f"/store/{key}", headers=headers, status=204)
        self.after = current_seq(self.client, self.alice)
        clock.advance(syncnode.HOUSEKEEPING_MS / 1000 + 1)
        self.client.get("/health", status=200)  # housekeeping runs here


@pytest.fixture
def pile(make_app, clock) -> Pile:
    return Pile(make_app, clock)


def test_tombstones_per_user_keeps_at_most_the_setting(pile, db):
    query = "SELECT count(*) FROM tombstones WHERE user_id = ?"
    assert db.execute(query, (user_row_id(db, "alice"),)).fetchone()[0] <= 5


def test_tombstones_per_user_cursor_before_the_deletions_is_sync01(pile):
    url = f"/store?since={pile.before}"
    response = pile.client.get(url, headers=pile.alice.headers, status=410)
    assert_error(response, 410, "SYNC01")


def test_tombstones_per_user_cursor_after_the_deletions_still_answers(pile):
    url = f"/store?since={pile.after}"
    response = pile.client.get(url, headers=pile.alice.headers, status=200)
    assert response.json == []


def test_tombstones_per_user_leave_other_users_cursors_alone(pile):
    url = f"/store?since={pile.bob_cursor}"
    response = pile.client.get(url, headers=pile.bob.headers, status=200)
    assert response.json == []


# ==================================================================================================
# Store: long-poll
# ==================================================================================================


class LongPoll:
    """A GET /store long-poll run in a thread on its own connection, timed from send to answer."""

    def __init__(
        self, server: RealServer, headers: dict[str, str], url: str, socket_timeout: float = 10
    ) -> None:
        self.answer: Reply | None = None
        self.error: BaseException | None = None
        self.done_at = 0.0
        self.started_at = time.monotonic()
        args = (server, headers, url, socket_timeout)
        self.thread = threading.Thread(target=self.run, args=args, daemon=True)
        self.thread.start()

    def run(
        self, server: RealServer, headers: dict[str, str], url: str, socket_timeout: float
    ) -> None:
        conn = server.connect(timeout=socket_timeout)
        try:
            self.answer = call(conn, "GET", url, headers=headers)
        except BaseException as error:  # re-raised by result()
            self.error = error
        finally:
            conn.close()
        self.done_at = time.monotonic()

    def result(self, timeout: float = 10) -> Reply:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the long-poll did not answer within {timeout} s"
        if self.error is not None:
            raise self.error
        return self.answer


def wait_for_waiters(server: LiveServer, count: int) -> None:
    """Block until the app holds `count` long-polls (a synchronisation aid, not a check)."""
    deadline = time.monotonic() + 5
    while server.app.context.waiters.waiting != count:
        assert time.monotonic() < deadline, "the long-poll never started waiting"
        time.sleep(0.005)


def count_feed_queries(monkeypatch) -> collections.Counter:
    """Count from now on each user's change-feed queries (a poll's runs), by user row id."""
    queries: collections.Counter = collections.Counter()
    original = syncnode.list_changes

    def counted(conn, user_id, *args, **kwargs):
        queries[user_id] += 1
        return original(conn, user_id, *args, **kwargs)

    monkeypatch.setattr(syncnode, "list_changes", counted)
    return queries


def test_longpoll_answers_at_once_when_changes_exist(client, user):
    put(client, user, "k")
    started = time.monotonic()
    response = client.get("/store?since=0&wait=60", headers=user.headers)
    assert [entry["key"] for entry in response.json] == ["k"]
    assert time.monotonic() - started < 1


def test_longpoll_wakes_within_a_moment_of_a_commit(start_server):
    server = start_server()
    alice = server.register("alice")
    cursor = int(server.request("GET", "/store", headers=alice.headers).headers["X-Sync-Seq"])
    waiter = LongPoll(server, alice.headers, f"/store?since={cursor}&wait=5")
    wait_for_waiters(server, 1)
    committing = time.monotonic()
    written = server.request("PUT", "/store/k", b"v", alice.headers)
    committed = time.monotonic()
    answer = waiter.result()
    assert written.status_int == 204
    assert answer.status_int == 200
    assert answer.json == [live("k", "OWN", written.headers["X-Sync-Token"], cursor + 1)]
    # Measured from before the PUT was sent, so the PUT's own time counts against the bound.
    woke_after = waiter.done_at - committing
    print(f"long-poll woke {woke_after * 1000:.1f} ms after the PUT was sent "
          f"({(waiter.done_at - committed) * 1000:.1f} ms after its answer)")  # fmt: skip
    assert woke_after < 0.5


def test_longpoll_wakes_when_a_key_is_shared_with_the_caller(start_server):
    server = start_server()
    alice, bob = server.register("alice"), server.register("bob")
    assert server.request("PUT", "/store/k", b"v", alice.headers).status_int == 204
    cursor = int(server.request("GET", "/store", headers=bob.headers).headers["X-Sync-Seq"])
    waiter = LongPoll(server, bob.headers, f"/store?since={cursor}&wait=5")
    wait_for_waiters(server, 1)
    grant = json.dumps([{"user": "bob", "permission": "READ"}]).encode()
    assert server.request("PUT", "/permission/k", grant, alice.headers).status_int == 204
    answer = waiter.result()
    assert [(entry["key"], entry["permission"]) for entry in answer.json] == [("k", "READ")]
    assert answer.json[0]["seq"] == cursor + 1
    assert waiter.done_at - waiter.started_at < 4


def test_longpoll_ignores_changes_the_caller_cannot_see(start_server):
    server = start_server()
    alice, bob = server.register("alice"), server.register("bob")
    cursor = int(server.request("GET", "/store", headers=alice.headers).headers["X-Sync-Seq"])
    waiter = LongPoll(server, alice.headers, f"/store?since={cursor}&wait=1")
    wait_for_waiters(server, 1)
    assert server.request("PUT", "/store/bobs", b"v", bob.headers).status_int == 204
    answer = waiter.result()
    assert answer.status_int == 200
    assert answer.json == []
    assert waiter.done_at - waiter.started_at >= 0.95
    assert int(answer.headers["X-Sync-Seq"]) >= cursor


#: The two ways a poll waits, each with room for one waiting poll: parked by syncnode's own
#: server (max_waiters), or holding a thread of another server (half the threads).
ONE_PLACE = [
    pytest.param({"max_waiters": 1}, id="parked"),
    pytest.param({"threads": 2, "plain": True}, id="holding-a-thread"),
]


@pytest.mark.parametrize("one_place", ONE_PLACE)
def test_longpoll_past_max_waiting_answers_at_once(start_server, one_place):
    server = start_server(**one_place)
    alice = server.register("alice")
    cursor = int(server.request("GET", "/store", headers=alice.headers).headers["X-Sync-Seq"])
    first = LongPoll(server, alice.headers, f"/store?since={cursor}&wait=5")
    wait_for_waiters(server, 1)
    started = time.monotonic()
    second = server.request("GET", f"/store?since={cursor}&wait=5", headers=alice.headers)
    assert time.monotonic() - started < 1
    assert second.status_int == 200
    assert second.json == []
    assert first.thread.is_alive(), "the first long-poll should still be waiting"
    assert server.request("PUT", "/store/k", b"v", alice.headers).status_int == 204
    assert [entry["key"] for entry in first.result().json] == ["k"]


def test_longpoll_wakes_only_the_users_a_change_concerns(start_server, monkeypatch):
    server = start_server(threads=8)
    alice, bob = server.register("alice"), server.register("bob")
    queries = count_feed_queries(monkeypatch)
    bob_id = (
        server.app.context.connection()
        .execute("SELECT id FROM users WHERE name = 'bob'")
        .fetchone()[0]
    )
    cursor = server.request("GET", "/store", headers=bob.headers).headers["X-Sync-Seq"]
    started = time.monotonic()
    poll = LongPoll(server, bob.headers, f"/store?since={cursor}&wait=10")
    wait_for_waiters(server, 1)
    for number in range(5):  # alice's own keys: nothing bob can see
        assert server.request("PUT", f"/store/own/{number}", b"v", alice.headers).status_int == 204
    seen = queries[bob_id]
    elapsed = time.monotonic() - started  # measured after the count, so the bound is safe
    assert elapsed < 4.5, "too slow to tell wake-ups from the once-a-second re-check"
    # Bob's poll queried once when it began, and at most once a second since: a wake-up for
    # each of alice's writes would add five.
    assert seen <= 1 + int(elapsed), "bob's long-poll woke for changes he cannot see"
    assert server.request("PUT", "/store/shared", b"v", alice.headers).status_int == 204
    grant = json.dumps([{"user": "bob", "permission": "READ"}]).encode()
    assert server.request("PUT", "/permission/shared", grant, alice.headers).status_int == 204
    assert [entry["key"] for entry in poll.result().json] == ["shared"]


def test_longpoll_update_of_a_shared_key_wakes_its_holders_only_and_at_once(
    start_server, monkeypatch
):
    monkeypatch.setattr(syncnode, "WATCH_SECONDS", 30)  # only the commit's own wake-up counts
    server = start_server(threads=8)
    alice, bob, carol = (server.register(name) for name in ("alice", "bob", "carol"))
    token = server.request("PUT", "/store/shared", b"v", alice.headers).headers["X-Sync-Token"]
    grant = json.dumps([{"user": "bob", "permission": "READ"}]).encode()
    assert server.request("PUT", "/permission/shared", grant, alice.headers).status_int == 204
    ids = dict(server.app.context.connection().execute("SELECT name, id FROM users").fetchall())
    queries = count_feed_queries(monkeypatch)
    cursor = server.request("GET", "/store", headers=bob.headers).headers["X-Sync-Seq"]
    bobs = LongPoll(server, bob.headers, f"/store?since={cursor}&wait=20")
    carols = LongPoll(server, carol.headers, f"/store?since={cursor}&wait=20")
    wait_for_waiters(server, 2)
    deadline = time.monotonic() + 5
    while not (queries[ids["bob"]] and queries[ids["carol"]]) and time.monotonic() < deadline:
        time.sleep(0.01)  # (each poll's first run)
    before = dict(queries)
    headers = {**alice.headers, "X-Sync-Token": token}
    updated = server.request("PUT", "/store/shared", b"new", headers)
    assert updated.status_int == 204
    answer = bobs.result(timeout=5)
    assert bobs.done_at - bobs.started_at < 5, "woken by the commit, not by the watcher"
    assert [(entry["key"], entry["token"]) for entry in answer.json] == [
        ("shared", updated.headers["X-Sync-Token"])
    ]
    assert carols.thread.is_alive(), "carol holds nothing the update changed"
    assert queries[ids["bob"]] == before[ids["bob"]] + 1
    assert queries[ids["carol"]] == before[ids["carol"]], "carol's poll woke for nothing"


def test_longpoll_holders_lookup_failing_wakes_every_poll_to_look(start_server, monkeypatch):
    monkeypatch.setattr(syncnode, "WATCH_SECONDS", 30)
    server = start_server(threads=8)
    alice, bob = server.register("alice"), server.register("bob")
    token = server.request("PUT", "/store/shared", b"v", alice.headers).headers["X-Sync-Token"]
    grant = json.dumps([{"user": "bob", "permission": "READ"}]).encode()
    assert server.request("PUT", "/permission/shared", grant, alice.headers).status_int == 204

    def failing(conn, item_ids):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(syncnode, "item_holders", failing)
    cursor = server.request("GET", "/store", headers=bob.headers).headers["X-Sync-Seq"]
    poll = LongPoll(server, bob.headers, f"/store?since={cursor}&wait=20")
    wait_for_waiters(server, 1)
    updated = server.request(
        "PUT", "/store/shared", b"new", {**alice.headers, "X-Sync-Token": token}
    )
    assert updated.status_int == 204, "the write stands; only the wake-up lost its precision"
    assert [entry["key"] for entry in poll.result(timeout=5).json] == ["shared"]
    assert poll.done_at - poll.started_at < 5


@pytest.mark.parametrize("one_place", ONE_PLACE)
def test_longpoll_declined_past_max_waiting_says_busy_with_retry_after(start_server, one_place):
    server = start_server(**one_place)
    alice = server.register("alice")
    cursor = int(server.request("GET", "/store", headers=alice.headers).headers["X-Sync-Seq"])
    first = LongPoll(server, alice.headers, f"/store?since={cursor}&wait=5")
    wait_for_waiters(server, 1)
    declined = server.request("GET", f"/store?since={cursor}&wait=5", headers=alice.headers)
    assert (declined.status_int, declined.json) == (200, [])
    assert declined.headers["X-Sync-Wait-Declined"] == "busy"
    assert declined.headers["Retry-After"] == "1"
    server.request("PUT", "/store/k", b"v", alice.headers)
    assert "X-Sync-Wait-Declined" not in first.result().headers


@pytest.mark.parametrize("one_place", ONE_PLACE)
def test_longpoll_not_declined_without_wait_or_with_changes(start_server, one_place):
    server = start_server(**one_place)
    alice, other = server.register("alice"), server.register("bob")
    cursor = int(server.request("GET", "/store", headers=alice.headers).headers["X-Sync-Seq"])
    first = LongPoll(server, alice.headers, f"/store?since={cursor}&wait=5")
    wait_for_waiters(server, 1)
    no_wait = server.request("GET", f"/store?since={cursor}", headers=alice.headers)
    assert "X-Sync-Wait-Declined" not in no_wait.headers and "Retry-After" not in no_wait.headers
    # bob's change does not concern alice's waiter
    bob_cursor = server.request("GET", "/store", headers=other.headers).headers["X-Sync-Seq"]
    server.request("PUT", "/store/b", b"v", other.headers)
    changes = server.request("GET", f"/store?since={bob_cursor}&wait=5", headers=other.headers)
    assert [entry["key"] for entry in changes.json] == ["b"]
    assert "X-Sync-Wait-Declined" not in changes.headers
    server.request("PUT", "/store/k", b"v", alice.headers)
    first.result()


def test_longpoll_declined_while_stopping_says_stopping(start_server):
    server = start_server(threads=4)
    alice = server.register("alice")
    cursor = int(server.request("GET", "/store", headers=alice.headers).headers["X-Sync-Seq"])
    server.app.context.waiters.stop()
    declined = server.request("GET", f"/store?since={cursor}&wait=5", headers=alice.headers)
    assert (declined.status_int, declined.json) == (200, [])
    assert declined.headers["X-Sync-Wait-Declined"] == "stopping"


@pytest.mark.parametrize("one_place", ONE_PLACE)
def test_longpoll_of_a_client_that_left_frees_its_place_within_a_second(start_server, one_place):
    server = start_server(**one_place)
    alice = server.register("alice")
    cursor = int(server.request("GET", "/store", headers=alice.headers).headers["X-Sync-Seq"])
    sock = socket.create_connection(("127.0.0.1", int(server.port)), timeout=5)
    request = f"GET /store?since={cursor}&wait=30 HTTP/1.1\r\nHost: x\r\n"
    request += f"Authorization: {alice.headers['Authorization']}\r\n\r\n"
    sock.sendall(request.encode())
    wait_for_waiters(server, 1)
    sock.close()
    deadline = time.monotonic() + 1.5
    while server.app.context.waiters.waiting and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.app.context.waiters.waiting == 0
    second = LongPoll(server, alice.headers, f"/store?since={cursor}&wait=5")
    wait_for_waiters(server, 1)  # the place was free again: this one waits
    server.request("PUT", "/store/k", b"v", alice.headers)
    assert [entry["key"] for entry in second.result().json] == ["k"]


# Long-polls at scale, and across processes -------------------------------------------------------


def test_a_thousand_long_polls_wait_on_the_default_server_without_threads(start_server):
    limit = syncnode.open_files_limit()  # make_server raises it the same way
    assert limit >= 2300, f"the open-files limit ({limit}) cannot hold 1,000 polls and clients"
    server = start_server()  # the default settings: 4 threads, max_waiters 1,000
    waiters = server.app.context.waiters
    alice = server.register("alice")
    users = [server.register(f"user{number}") for number in range(100)]
    cursors = {
        user.name: server.request("GET", "/store", headers=user.headers).headers["X-Sync-Seq"]
        for user in users
    }
    threads_before = threading.active_count()
    clients = Clients(server)
    try:
        polls = []
        for number in range(1000):
            user = users[number % 100]
            sock = clients.open(timeout=30)
            path = f"/store?since={cursors[user.name]}&wait=50"
            sock.sendall(raw_request("GET", path, user.headers))
            polls.append((user, sock))
        wait_for(lambda: waiters.waiting == 1000, timeout=60, what="1,000 waiting polls")
        # They hold no thread (the watcher is one per process), and other requests get answers.
        assert threading.active_count() <= threads_before + 1
        assert waiters.holding == 0 and waiters.parked == 1000
        # Their sockets sleep out of the main loop's map, so its passes do not grow with them.
        wait_for(lambda: len(server.server.sleeping) == 1000, what="the polls' sockets to sleep")
        assert not set(server.server.sleeping) & set(server.socket_map)
        assert server.request("GET", "/health").status_int == 200
        declined = server.request("GET", "/store?since=0&wait=5", headers=alice.headers)
        assert declined.status_int == 200, declined.body
        assert declined.headers["X-Sync-Wait-Declined"] == "busy"
        assert declined.headers["Retry-After"] == "1"
        # One write to a key shared with half of the users answers their 500 polls alone.
        sharers = users[:50]
        assert server.request("PUT", "/store/shared", b"v", alice.headers).status_int == 204
        grant = json.dumps([{"user": user.name, "permission": "READ"} for user in sharers])
        reply = server.request("PUT", "/permission/shared", grant.encode(), alice.headers)
        assert reply.status_int == 204, reply.body
        for user, sock in polls:
            if user in sharers:
                answer = read_answer(sock, timeout=30)
                assert answer.status == 200
                assert [entry["key"] for entry in answer.json] == ["shared"]
        wait_for(lambda: waiters.waiting == 500, timeout=10, what="the other polls alone")
        waiters.stop()  # the rest answer at once, with nothing new
        for user, sock in polls:
            if user not in sharers:
                answer = read_answer(sock, timeout=30)
                assert (answer.status, answer.json) == (200, [])
        assert waiters.waiting == 0
    finally:
        clients.close()


def test_a_parked_poll_whose_credential_died_while_it_waited_frees_its_place(start_server):
    server = start_server(max_waiters=1)
    alice = server.register("alice")
    cursor = server.request("GET", "/store", headers=alice.headers).headers["X-Sync-Seq"]
    poll = LongPoll(server, alice.headers, f"/store?since={cursor}&wait=10")
    wait_for_waiters(server, 1)
    assert server.request("DELETE", "/auth", headers=alice.headers).status_int == 204
    assert poll.result().status_int == 401  # answered before the poll's handler ran again
    # The server frees the place once it has written that answer.
    wait_for(lambda: server.app.context.waiters.waiting == 0, what="the poll's place")
    again = server.register("bob")
    cursor = server.request("GET", "/store", headers=again.headers).headers["X-Sync-Seq"]
    second = LongPoll(server, again.headers, f"/store?since={cursor}&wait=10")
    wait_for_waiters(server, 1)  # the one place is free again
    server.request("PUT", "/store/k", b"v", again.headers)
    assert [entry["key"] for entry in second.result().json] == ["k"]


def test_a_parked_poll_answers_once_its_wait_is_over(start_server):
    server = start_server()
    alice = server.register("alice")
    cursor = server.request("GET", "/store", headers=alice.headers).headers["X-Sync-Seq"]
    poll = LongPoll(server, alice.headers, f"/store?since={cursor}&wait=1")
    answer = poll.result(timeout=5)
    assert (answer.status_int, answer.json) == (200, [])
    assert answer.headers["X-Sync-Cursor"] == cursor
    assert 0.95 <= poll.done_at - poll.started_at < 4
    assert server.app.context.waiters.waiting == 0


def test_pipelined_requests_behind_a_parked_poll_are_answered_after_it(start_server):
    server = start_server()
    alice = server.register("alice")
    cursor = server.request("GET", "/store", headers=alice.headers).headers["X-Sync-Seq"]
    clients = Clients(server)
    try:
        sock = clients.open()
        poll = raw_request("GET", f"/store?since={cursor}&wait=10", alice.headers)
        sock.sendall(poll + raw_request("GET", "/health"))
        wait_for_waiters(server, 1)
        assert server.request("PUT", "/store/k", b"v", alice.headers).status_int == 204
        first, second = read_answer(sock, timeout=5), read_answer(sock, timeout=5)
        assert first.status == 200 and [entry["key"] for entry in first.json] == ["k"]
        assert (second.status, second.json) == (200, {"database": True, "disk": True})
    finally:
        clients.close()


def test_plain_listing_json_is_what_json_dumps_writes():
    keys = ["plain", 'quote"d', "back\\slash", "line\nbreak", "tab\t", "\u2028sep", "ünï", "🙂"]
    items = [
        syncnode.Item(key, level, f"tok-{number}_x", None, None, None)
        for number, (key, level) in enumerate(zip(keys, [1, 2, 3] * 3, strict=False))
    ]
    expected = json.dumps(
        [syncnode.item_json(item, False) for item in items],
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode()
    assert syncnode.plain_listing_json(items) == expected
    assert syncnode.plain_listing_json([]) == b"[]"


def send_sleeping_poll(server: LiveServer, sock: socket.socket, user: User, since: str, wait: int):
    """Send a long-poll on the socket and wait until the server has put its connection to
    sleep (out of the main loop)."""
    sock.sendall(raw_request("GET", f"/store?since={since}&wait={wait}", user.headers))
    wait_for(lambda: len(server.server.sleeping) == 1, what="the poll to sleep")


def test_a_request_sent_behind_a_sleeping_poll_is_answered_after_it(start_server):
    server = start_server()
    alice = server.register("alice")
    cursor = server.request("GET", "/store", headers=alice.headers).headers["X-Sync-Seq"]
    clients = Clients(server)
    try:
        sock = clients.open()
        send_sleeping_poll(server, sock, alice, cursor, wait=10)
        sock.sendall(raw_request("GET", "/health"))  # while it sleeps
        time.sleep(0.6)  # the server sees the data, and the poll goes on waiting
        assert server.app.context.waiters.waiting == 1
        assert server.request("PUT", "/store/k", b"v", alice.headers).status_int == 204
        first, second = read_answer(sock, timeout=5), read_answer(sock, timeout=5)
        assert first.status == 200 and [entry["key"] for entry in first.json] == ["k"]
        assert (second.status, second.json) == (200, {"database": True, "disk": True})
    finally:
        clients.close()


@pytest.mark.parametrize("leave", ["close", "reset", "half-close"])
def test_a_sleeping_poll_whose_client_sent_more_and_left_frees_its_place(start_server, leave):
    server = start_server(max_waiters=1)
    alice = server.register("alice")
    cursor = server.request("GET", "/store", headers=alice.headers).headers["X-Sync-Cursor"]
    sock = socket.create_connection(("127.0.0.1", int(server.port)), timeout=5)
    try:
        send_sleeping_poll(server, sock, alice, cursor, wait=30)
        sock.sendall(b"GET /hea")  # the start of a pipelined request, then the client goes
        time.sleep(0.3)
        if leave == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if leave == "half-close":
            sock.shutdown(socket.SHUT_WR)
        else:
            sock.close()
        wait_for(lambda: server.app.context.waiters.waiting == 0, timeout=2, what="the place")
    finally:
        sock.close()
    second = LongPoll(server, alice.headers, f"/store?since={cursor}&wait=5")
    wait_for_waiters(server, 1)  # admitted: the one place is free again
    server.request("PUT", "/store/k", b"v", alice.headers)
    assert [entry["key"] for entry in second.result().json] == ["k"]


def test_an_urgent_byte_to_a_sleeping_poll_does_not_end_it(start_server):
    server = start_server()
    alice = server.register("alice")
    cursor = server.request("GET", "/store", headers=alice.headers).headers["X-Sync-Cursor"]
    clients = Clients(server)
    try:
        sock = clients.open()
        send_sleeping_poll(server, sock, alice, cursor, wait=10)
        sock.send(b"!", socket.MSG_OOB)
        time.sleep(0.6)  # the server looks at its sleeping polls meanwhile
        assert server.request("PUT", "/store/k", b"v", alice.headers).status_int == 204
        answer = read_answer(sock, timeout=5)
        assert answer.status == 200 and [entry["key"] for entry in answer.json] == ["k"]
    finally:
        clients.close()


@pytest.fixture
def two_processes(start_server, make_app):
    """A served app, and a second app on the same database: another process, as far as
    long-polls can tell (its own connections, write lock and waiters)."""
    server = start_server()
    other = start_server(make_app())
    yield server, other
    server.app.context.waiters.stop()


def test_a_commit_in_another_process_wakes_the_polls_it_concerns_at_once(two_processes):
    server, other = two_processes
    alice, bob = server.register("alice"), server.register("bob")
    cursor = server.request("GET", "/store", headers=alice.headers).headers["X-Sync-Seq"]
    poll = LongPoll(server, alice.headers, f"/store?since={cursor}&wait=20", socket_timeout=25)
    wait_for_waiters(server, 1)
    started = time.monotonic()
    written = other.request("PUT", "/store/k", b"v", alice.headers)
    assert written.status_int == 204
    answer = poll.result()
    assert [entry["key"] for entry in answer.json] == ["k"]
    print(f"woken {1000 * (poll.done_at - started):.0f} ms after the other process's PUT")
    assert poll.done_at - started < 5, "woken by the wait running out, not by the watcher"
    assert server.app.context.waiters.waiting == 0
    assert bob.name == "bob"


def test_a_commit_in_another_process_leaves_other_users_polls_asleep(two_processes, monkeypatch):
    server, other = two_processes
    alice, bob = server.register("alice"), server.register("bob")
    queries = count_feed_queries(monkeypatch)
    cursor = server.request("GET", "/store", headers=bob.headers).headers["X-Sync-Seq"]
    poll = LongPoll(server, bob.headers, f"/store?since={cursor}&wait=20", socket_timeout=25)
    wait_for_waiters(server, 1)
    wait_for(lambda: queries, what="bob's poll to look once")
    (bob_id,) = queries
    for number in range(5):  # alice's own keys, written in the other process
        reply = other.request("PUT", f"/store/own/{number}", b"v", alice.headers)
        assert reply.status_int == 204
    time.sleep(0.3)  # several looks of the watcher
    assert queries[bob_id] == 1, "bob's poll queried for changes he cannot see"
    assert poll.thread.is_alive()
    other.request("PUT", "/store/shared", b"v", alice.headers)
    grant = json.dumps([{"user": "bob", "permission": "READ"}]).encode()
    assert other.request("PUT", "/permission/shared", grant, alice.headers).status_int == 204
    assert [entry["key"] for entry in poll.result().json] == ["shared"]


def test_a_session_ended_in_another_process_ends_its_poll(two_processes):
    server, other = two_processes
    alice = server.register("alice")
    cursor = server.request("GET", "/store", headers=alice.headers).headers["X-Sync-Seq"]
    poll = LongPoll(server, alice.headers, f"/store?since={cursor}&wait=20", socket_timeout=25)
    wait_for_waiters(server, 1)
    started = time.monotonic()
    assert other.request("DELETE", "/auth", headers=alice.headers).status_int == 204
    answer = poll.result()
    assert answer.status_int == 401 and answer.json["code"] == "AUTH01"
    assert poll.done_at - started < PROMPTLY


# Long-polls end when their credential dies --------------------------------------------------------


#: How soon a long-poll must answer once its credential has died, in seconds.
PROMPTLY = 2.0


@pytest.fixture
def poll_server(start_server):
    """A live server; at teardown its polls answer at once, so that a failing test ends fast."""
    server = start_server(threads=4)
    yield server
    server.app.context.waiters.stop()


def start_poll(server, headers: dict[str, str]) -> LongPoll:
    """Start a 20 s long-poll from the caller's current cursor; return once it waits."""
    listing = server.request("GET", "/store", headers=headers)
    assert listing.status_int == 200, listing.body
    url = f"/store?since={listing.headers['X-Sync-Seq']}&wait=20"
    poll = LongPoll(server, headers, url, socket_timeout=25)
    wait_for_waiters(server, 1)
    return poll


# Each way to kill a poll's credential: given the server, the poll's user and a second session
# of that user, return the poll's headers and the request that kills its credential.
Kill = tuple[dict[str, str], Callable[[], Reply]]


def account_deleted(server, alice: User, second: User) -> Kill:
    return alice.headers, lambda: server.request("DELETE", "/account", headers=second.headers)


def session_ended(server, alice: User, second: User) -> Kill:
    return alice.headers, lambda: server.request("DELETE", "/auth", headers=alice.headers)


def password_changed(server, alice: User, second: User) -> Kill:
    body = {"password": "new password 1"}
    return alice.headers, lambda: live_json(server, "POST", "/password", body, second.headers)


def api_key_deleted(server, alice: User, second: User) -> Kill:
    body = {"name": "k", "permissions": ["store.read"]}
    created = live_json(server, "POST", "/api/api-keys", body, second.headers)
    assert created.status_int == 201, created.body
    path = f"/api/api-keys/{created.json['apiKey']['id']}"
    key = {"x-api-key": created.json["secret"]}
    return key, lambda: server.request("DELETE", path, headers=second.headers)


@pytest.mark.parametrize(
    "kill",
    [
        pytest.param(account_deleted, id="account-deleted"),
        pytest.param(session_ended, id="session-ended-by-its-token"),
        pytest.param(password_changed, id="password-changed"),
        pytest.param(api_key_deleted, id="api-key-deleted"),
    ],
)
def test_longpoll_dead_credential_answers_auth01_promptly(poll_server, kill):
    alice = poll_server.register("alice")
    second = live_login(poll_server, "alice")
    headers, killing = kill(poll_server, alice, second)
    poll = start_poll(poll_server, headers)
    started = time.monotonic()
    assert killing().status_int == 204
    answer = poll.result(timeout=PROMPTLY + 1)
    assert poll.done_at - started < PROMPTLY
    assert_error(answer, 401, "AUTH01")


def test_longpoll_deleted_account_never_answers_a_new_users_keys(poll_server):
    xavier = poll_server.register("xavier")
    second = live_login(poll_server, "xavier")
    poll = start_poll(poll_server, xavier.headers)
    assert poll_server.request("DELETE", "/account", headers=second.headers).status_int == 204
    yvonne = poll_server.register("yvonne")  # the row id xavier had, if ids were reused
    secrets_of_yvonne = []
    for key in ("yvonne-diary", "yvonne-bank"):
        written = poll_server.request("PUT", f"/store/{key}", b"private", yvonne.headers)
        assert written.status_int == 204
        secrets_of_yvonne += [key, written.headers["X-Sync-Token"]]
    answer = poll.result(timeout=PROMPTLY + 1)
    for secret in secrets_of_yvonne:
        assert secret.encode() not in answer.body, answer.body
    assert_error(answer, 401, "AUTH01")


# ==================================================================================================
# Store: listing and paging
# ==================================================================================================


@pytest.mark.parametrize(
    "query",
    [
        pytest.param("since=abc", id="since-text"),
        pytest.param("since=-1", id="since-negative"),
        pytest.param("since=1.5", id="since-fraction"),
        pytest.param("since=", id="since-empty"),
        pytest.param("since=%D9%A1", id="since-arabic-digit"),
        pytest.param("since=4611686018427387905", id="since-over-2**62"),
        pytest.param("wait=61", id="wait-61"),
        pytest.param("wait=-1", id="wait-negative"),
        pytest.param("wait=abc", id="wait-text"),
        pytest.param("wait=1.5", id="wait-fraction"),
        pytest.param("limit=0", id="limit-0"),
        pytest.param("limit=1001", id="limit-1001"),
        pytest.param("limit=abc", id="limit-text"),
        pytest.param("limit=-1", id="limit-negative"),
        pytest.param("prefix=%01", id="prefix-control"),
        pytest.param("prefix=a%7Fb", id="prefix-del"),
        pytest.param("prefix=" + "x" * 1025, id="prefix-1025"),
        pytest.param("after=%0A", id="after-control"),
        pytest.param("after=" + "x" * 1025, id="after-1025"),
        pytest.param("since=1&after=a", id="since-with-after"),
        pytest.param("since=0&cursor=1", id="cursor-with-since"),
        pytest.param("cursor=-1", id="cursor-negative"),
        pytest.param(f"cursor={2**62 + 1}", id="cursor-over-2**62"),
        pytest.param("cursor=x", id="cursor-text"),
        pytest.param("values=1", id="values-one"),
        pytest.param("values=yes", id="values-yes"),
        pytest.param("values=", id="values-empty"),
    ],
)
def test_listing_malformed_query_is_req01(client, user, query):
    response = client.get(f"/store?{query}", headers=user.headers, status=400)
    assert_error(response, 400, "REQ01")


@pytest.mark.parametrize(
    "query", ["prefix=%FF", "prefix=a%ED%A0%80", "since=%FF", "limit=%FF", "wait=%FF", "after=%FF"]
)
def test_listing_query_that_is_not_utf8_is_req01(client, user, query):
    put(client, user, "k")
    response = client.get(f"/store?{query}", headers=user.headers, status=(200, 400))
    assert_error(response, 400, "REQ01")


@pytest.mark.parametrize(
    "query",
    [
        pytest.param("since=0&wait=60", id="wait-60"),
        pytest.param("since=0&wait=0", id="wait-0"),
        pytest.param("limit=1", id="limit-1"),
        pytest.param("limit=1000", id="limit-1000"),
        pytest.param("prefix=" + "x" * 1024, id="prefix-1024"),
    ],
)
def test_listing_query_edge_values_are_accepted(client, user, query):
    put(client, user, "k")  # so that the long-poll finds a change at once
    response = client.get(f"/store?{query}", headers=user.headers)
    assert response.status_int == 200


def test_listing_malformed_query_without_token_is_auth01(client):
    response = client.get("/store?limit=0", status=401)
    assert_error(response, 401, "AUTH01")


LITERAL_KEYS = ["A1", "a%b", "a*b", "a?b", "a_b", "ab", "axb", "b", "a\\b"]


@pytest.mark.parametrize(
    "prefix, expected",
    [
        pytest.param("a%", ["a%b"], id="percent"),
        pytest.param("a_", ["a_b"], id="underscore"),
        pytest.param("a*", ["a*b"], id="star"),
        pytest.param("a?", ["a?b"], id="question"),
        pytest.param("a\\", ["a\\b"], id="backslash"),
        pytest.param("A", ["A1"], id="case"),
        pytest.param("a", ["a%b", "a*b", "a?b", "a\\b", "a_b", "ab", "axb"], id="plain"),
        pytest.param("%", [], id="bare-percent"),
        pytest.param("", sorted(LITERAL_KEYS), id="empty"),
    ],
)
def test_listing_prefix_matches_literally(client, user, prefix, expected):
    seed(client, user, LITERAL_KEYS)
    response = client.get("/store", {"prefix": prefix}, headers=user.headers)
    assert [entry["key"] for entry in response.json] == expected


def test_listing_prefix_applies_to_the_feed(client, user):
    tokens = seed(client, user, ["a%1", "ab"])
    cursor = current_seq(client, user)
    put(client, user, "ab", b"2", tokens["ab"])
    client.delete("/store/a%251", headers={**user.headers, "X-Sync-Token": tokens["a%1"]})
    new = token_of(put(client, user, escaped("a%2")))
    seq = current_seq(client, user)
    assert changes(client, user, cursor, prefix="a%") == [
        gone("a%1", seq - 1),
        live("a%2", "OWN", new, seq),
    ]


def test_listing_feed_link_keeps_the_prefix(client, user):
    cursor = current_seq(client, user)
    seed(client, user, ["n/1", "o/1", "n/2", "n/3"])
    response = client.get(f"/store?since={cursor}&prefix=n/&limit=2", headers=user.headers)
    url = urllib.parse.urlsplit(next_link(response))
    last = response.json[-1]["seq"]
    assert urllib.parse.parse_qs(url.query) == {
        "limit": ["2"],
        "prefix": ["n/"],
        "since": [str(last)],
    }
    entries = follow_pages(client, user, f"/store?since={cursor}&prefix=n/&limit=2")
    assert [entry["key"] for entry in entries] == ["n/1", "n/2", "n/3"]


def test_listing_limit_caps_and_links_to_the_next_page(client, user):
    seed(client, user, ["e", "d", "c", "b", "a"])
    response = client.get("/store?limit=2", headers=user.headers)
    assert [entry["key"] for entry in response.json] == ["a", "b"]
    seq = response.headers["X-Sync-Seq"]
    link = f'<http://localhost:80/store?limit=2&after=b&cursor={seq}>; rel="next"'
    assert response.headers["Link"] == link
    second = client.get(next_link(response), headers=user.headers)
    assert [entry["key"] for entry in second.json] == ["c", "d"]
    third = client.get(next_link(second), headers=user.headers)
    assert [entry["key"] for entry in third.json] == ["e"]
    assert "Link" not in third.headers


def test_listing_full_last_page_has_no_link(client, user):
    seed(client, user, ["a", "b", "c", "d"])
    second = client.get("/store?limit=2&after=b", headers=user.headers)
    assert [entry["key"] for entry in second.json] == ["c", "d"]
    assert "Link" not in second.headers


def test_listing_link_keeps_the_prefix(client, user):
    seed(client, user, ["n/1", "n/2", "n/3", "o/1"])
    response = client.get("/store?prefix=n/&limit=2", headers=user.headers)
    url = urllib.parse.urlsplit(next_link(response))
    assert url.path == "/store"
    cursor = response.headers["X-Sync-Cursor"]
    assert urllib.parse.parse_qs(url.query) == {
        "limit": ["2"], "prefix": ["n/"], "after": ["n/2"], "cursor": [cursor],
    }  # fmt: skip
    assert follow_pages(client, user, "/store?prefix=n/&limit=2") == (
        client.get("/store?prefix=n/", headers=user.headers).json
    )


def test_listing_pages_keys_with_url_characters(client, user):
    keys = ["a b", "a+b", "a&b", "a=b", "a#b", "a%b", "a%2Fb", "a/b", "a;b", "a<b>", 'a"b', "é",
            "日本"]  # fmt: skip
    seed(client, user, keys)
    entries = follow_pages(client, user, "/store?limit=1")
    assert [entry["key"] for entry in entries] == sorted(keys)


def test_listing_paging_survives_keys_added_and_deleted_between_pages(client, user):
    tokens = seed(client, user, ["b", "d", "f", "h", "j", "l"])
    first = client.get("/store?limit=2", headers=user.headers)
    seen = [entry["key"] for entry in first.json]
    put(client, user, "a")  # before the cursor
    put(client, user, "e")  # ahead of it
    client.delete("/store/b", headers={**user.headers, "X-Sync-Token": tokens["b"]})
    client.delete("/store/h", headers={**user.headers, "X-Sync-Token": tokens["h"]})
    seen += [entry["key"] for entry in follow_pages(client, user, next_link(first))]
    assert len(seen) == len(set(seen))
    assert {"d", "f", "j", "l"} <= set(seen)  # present throughout
    assert seen == sorted(seen)


@pytest.mark.parametrize(
    "mount",
    [
        pytest.param(mount_with_bottle("/sync"), id="bottle-wsgi"),
        pytest.param(mount_with_bottle("/sync/"), id="bottle-routes"),
        pytest.param(mount_with_dispatcher, id="router"),
    ],
)
def test_listing_link_carries_the_mount_prefix(make_app, mount):
    client = webtest.TestApp(mount(make_app()))
    body = {"id": "alice", "password": PASSWORD}
    alice = User("alice", client.post_json("/sync/account", body).json["token"])
    for key in ["a", "b"]:
        client.put(f"/sync/store/{key}", b"v", headers=alice.headers)
    response = client.get("/sync/store?limit=1", headers=alice.headers)
    seq = response.headers["X-Sync-Seq"]
    link = f'<http://localhost:80/sync/store?limit=1&after=a&cursor={seq}>; rel="next"'
    assert response.headers["Link"] == link
    following = client.get(next_link(response), headers=alice.headers)
    assert [entry["key"] for entry in following.json] == ["b"]


def test_listing_every_page_carries_the_first_pages_cursor(client, user):
    seed(client, user, ["c", "b", "a"])
    first = client.get("/store?limit=1", headers=user.headers)
    cursor = first.headers["X-Sync-Cursor"]
    assert cursor == first.headers["X-Sync-Seq"]
    put(client, user, "d")  # a change after the first page: the cursor must not pass it
    second = client.get(next_link(first), headers=user.headers)
    third = client.get(next_link(second), headers=user.headers)
    assert second.headers["X-Sync-Cursor"] == third.headers["X-Sync-Cursor"] == cursor
    assert int(third.headers["X-Sync-Seq"]) > int(cursor)
    feed = client.get(f"/store?since={cursor}", headers=user.headers)
    assert [entry["key"] for entry in feed.json] == ["d"]


def test_listing_feed_page_cursor_is_its_last_change_then_the_servers(client, user):
    cursor = current_seq(client, user)
    seed(client, user, ["c", "a", "b"])
    first = client.get(f"/store?since={cursor}&limit=2", headers=user.headers)
    assert first.headers["X-Sync-Cursor"] == str(first.json[-1]["seq"])
    assert first.headers["X-Sync-Seq"] != first.headers["X-Sync-Cursor"]  # the old pitfall
    last = client.get(
        f"/store?since={first.headers['X-Sync-Cursor']}&limit=2", headers=user.headers
    )
    assert "Link" not in last.headers
    assert last.headers["X-Sync-Cursor"] == last.headers["X-Sync-Seq"]
    empty = client.get(f"/store?since={last.headers['X-Sync-Cursor']}", headers=user.headers)
    assert empty.json == [] and empty.headers["X-Sync-Cursor"] == last.headers["X-Sync-Cursor"]


def test_listing_link_is_absolute_with_the_trusted_proxys_scheme_and_host(make_app):
    client = webtest.TestApp(make_app(trusted_proxies="10.0.0.0/8"))
    alice = register_user(client, "alice")
    for key in ["a", "b"]:
        put(client, alice, key)
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "sync.example.org"}
    proxied = client.get(
        "/store?limit=1", headers={**alice.headers, **forwarded},
        extra_environ={"REMOTE_ADDR": "10.1.2.3"},
    )  # fmt: skip
    assert next_link(proxied).startswith("https://sync.example.org/store?limit=1&after=a")
    direct = client.get(
        "/store?limit=1", headers={**alice.headers, **forwarded},
        extra_environ={"REMOTE_ADDR": "192.0.2.7"},
    )  # fmt: skip
    assert next_link(direct).startswith("http://localhost:80/store?limit=1&after=a")


def test_listing_with_values_syncs_a_thousand_values_in_a_few_requests(client, user):
    values = {f"notes/{number:04}": secrets.token_bytes(1024) for number in range(1000)}
    batch_size = syncnode.MAX_BATCH_OPERATIONS
    keys = list(values)
    for start in range(0, len(keys), batch_size):
        operations = [
            {"method": "PUT", "key": key, "token": None, "value": b64(values[key]), "meta": None}
            for key in keys[start : start + batch_size]
        ]
        client.post_json("/batch", {"operations": operations}, headers=user.headers)
    url, requests, seen = "/store?values=true", 0, {}
    while url:
        page = client.get(url, headers=user.headers)
        requests += 1
        assert requests <= 5, "a fresh device took more than 5 requests"
        for entry in page.json:
            assert entry["key"] not in seen
            seen[entry["key"]] = base64.b64decode(entry["value"])
        url = next_link(page)
    assert seen == values


def test_listing_with_values_marks_a_large_value_and_keeps_meta(client, user):
    large = b"x" * (syncnode.INLINE_VALUE_BYTES + 1)
    edge = b"y" * syncnode.INLINE_VALUE_BYTES
    put(client, user, "large", large, meta="big")
    put(client, user, "edge", edge)
    entries = {entry["key"]: entry for entry in
               client.get("/store?values=true", headers=user.headers).json}  # fmt: skip
    assert entries["large"]["large"] is True and "value" not in entries["large"]
    assert entries["large"]["meta"] == "big"
    assert base64.b64decode(entries["edge"]["value"]) == edge and "large" not in entries["edge"]
    assert entries["edge"]["meta"] is None
    plain = client.get("/store", headers=user.headers).json
    assert all(set(entry) == {"key", "permission", "token"} for entry in plain)


def test_listing_with_values_ends_a_page_at_the_budget(client, user):
    size = syncnode.INLINE_VALUE_BYTES
    count = syncnode.INLINE_BUDGET_BYTES // size + 3
    for number in range(count):
        put(client, user, f"k{number:03}", bytes([number]) * size)
    first = client.get("/store?values=true", headers=user.headers)
    inline = sum(len(base64.b64decode(entry["value"])) for entry in first.json)
    assert syncnode.INLINE_BUDGET_BYTES <= inline < syncnode.INLINE_BUDGET_BYTES + size
    rest = follow_pages(client, user, next_link(first))
    assert [entry["key"] for entry in first.json + rest] == [f"k{n:03}" for n in range(count)]


def test_listing_feed_with_values_carries_changes_and_bare_tombstones(client, user):
    cursor = current_seq(client, user)
    put(client, user, "kept", b"hello", meta="m")
    token = token_of(put(client, user, "gone", b"bye"))
    client.delete("/store/gone", headers={**user.headers, "X-Sync-Token": token})
    feed = client.get(f"/store?since={cursor}&values=true", headers=user.headers).json
    kept, gone = feed
    assert (kept["key"], base64.b64decode(kept["value"]), kept["meta"]) == ("kept", b"hello", "m")
    assert gone == {"key": "gone", "deleted": True, "seq": gone["seq"]}


def test_listing_feed_pages_link_by_seq(client, user):
    cursor = current_seq(client, user)
    seed(client, user, ["c", "a", "b"])
    response = client.get(f"/store?since={cursor}&limit=2", headers=user.headers)
    assert [entry["key"] for entry in response.json] == ["c", "a"]
    last = response.json[-1]["seq"]
    assert (
        response.headers["Link"] == f'<http://localhost:80/store?limit=2&since={last}>; rel="next"'
    )
    second = client.get(next_link(response), headers=user.headers)
    assert [entry["key"] for entry in second.json] == ["b"]
    assert "Link" not in second.headers


def test_listing_feed_paging_survives_changes_between_pages(client, user):
    cursor = current_seq(client, user)
    tokens = seed(client, user, ["a", "b", "c", "d", "e"])
    first = client.get(f"/store?since={cursor}&limit=2", headers=user.headers)
    seen = [entry["key"] for entry in first.json]
    put(client, user, "a", b"2", tokens["a"])  # already paged: comes again with its new state
    client.delete("/store/d", headers={**user.headers, "X-Sync-Token": tokens["d"]})
    new = token_of(put(client, user, "f"))
    rest = follow_pages(client, user, next_link(first))
    seen += [entry["key"] for entry in rest]
    assert seen == ["a", "b", "c", "e", "a", "d", "f"]
    assert rest[-1] == live("f", "OWN", new, current_seq(client, user))


# ==================================================================================================
# Store: quotas
# ==================================================================================================


def usage(client: webtest.TestApp, user: User) -> tuple[int, int]:
    """Return the (keys, bytes) GET /account reports for the user."""
    headers = client.get("/account", headers=user.headers).headers
    return int(headers["X-Sync-Usage-Keys"]), int(headers["X-Sync-Usage-Bytes"])


def test_quota_account_headers_report_usage_and_limits(make_app):
    client = webtest.TestApp(make_app(quota_bytes=1000, quota_keys=5))
    alice, bob = register_user(client, "alice"), register_user(client, "bob")
    put(client, alice, "a/1", b"abc")
    put(client, alice, "a/2", b"defg")
    put(client, bob, "b/1", b"0123456789")
    response = client.get("/account", headers=alice.headers)
    assert response.status_int == 200
    assert response.headers["X-Sync-Usage-Keys"] == "2"
    assert response.headers["X-Sync-Usage-Bytes"] == "7"
    assert response.headers["X-Sync-Quota-Keys"] == "5"
    assert response.headers["X-Sync-Quota-Bytes"] == "1000"
    (session,) = response.json
    assert set(session) == {"id", "expiration", "current", "createdAt"} and session["current"]


def test_quota_usage_counts_only_keys_held_with_own(make_app):
    client = webtest.TestApp(make_app())
    alice, bob = register_user(client, "alice"), register_user(client, "bob")
    put(client, alice, "shared", b"abc")
    put(client, bob, "mine", b"0123456789")
    share(client, alice, "shared", {"bob": "WRITE"})
    assert usage(client, bob) == (1, 10)
    share(client, alice, "shared", {"bob": "OWN"})
    assert usage(client, bob) == (2, 13)
    assert usage(client, alice) == (1, 3)


@pytest.mark.parametrize(
    "settings, limits",
    [
        pytest.param({}, {"X-Sync-Quota-Keys": "100000"}, id="default"),
        pytest.param({"quota_keys": 0}, {}, id="keys-off"),
        pytest.param(
            {"quota_keys": 0, "quota_bytes": 50}, {"X-Sync-Quota-Bytes": "50"}, id="bytes-only"
        ),
    ],
)
def test_quota_headers_name_only_the_limits_that_are_on(make_app, settings, limits):
    client = webtest.TestApp(make_app(**settings))
    alice = register_user(client, "alice")
    headers = client.get("/account", headers=alice.headers).headers
    sent = {name: value for name, value in headers.items() if name.startswith("X-Sync-Quota-")}
    assert sent == limits
    assert (headers["X-Sync-Usage-Keys"], headers["X-Sync-Usage-Bytes"]) == ("0", "0")


def test_quota_create_past_bytes_is_quota01_and_stores_nothing(make_app, db):
    client = webtest.TestApp(make_app(quota_bytes=10))
    alice = register_user(client, "alice")
    put(client, alice, "first", b"123456")
    before = snapshot(db)
    response = put(client, alice, "second", b"12345", status=507)
    assert_error(response, 507, "QUOTA01")
    assert snapshot(db) == before


def test_quota_create_up_to_the_byte_limit_is_accepted(make_app):
    client = webtest.TestApp(make_app(quota_bytes=10))
    alice = register_user(client, "alice")
    put(client, alice, "first", b"123456")
    put(client, alice, "second", b"1234", status=204)
    assert usage(client, alice) == (2, 10)


def test_quota_create_of_a_streamed_value_past_bytes_is_quota01(make_app, db):
    client = webtest.TestApp(make_app(quota_bytes=300 * 1024))
    alice = register_user(client, "alice")
    response = put(client, alice, "big", os.urandom(400 * 1024), status=507)
    assert_error(response, 507, "QUOTA01")
    assert table_counts(db)["items"] == 0


def test_quota_batch_past_bytes_is_quota01_and_stores_nothing(make_app, db):
    client = webtest.TestApp(make_app(quota_bytes=10))
    alice = register_user(client, "alice")
    operations = [
        {"method": "PUT", "key": key, "value": base64.b64encode(value).decode()}
        for key, value in [("a", b"123456"), ("b", b"12345")]
    ]
    before = snapshot(db)
    body = {"operations": operations}
    response = client.post_json("/batch", body, headers=alice.headers, status=507)
    assert_error(response, 507, "QUOTA01")
    assert response.json["index"] == 1
    assert snapshot(db) == before


def test_quota_create_past_keys_is_quota01(make_app, db):
    client = webtest.TestApp(make_app(quota_keys=2))
    alice = register_user(client, "alice")
    put(client, alice, "one")
    put(client, alice, "two")
    before = snapshot(db)
    assert_error(put(client, alice, "three", status=507), 507, "QUOTA01")
    assert snapshot(db) == before


def test_quota_update_growing_past_bytes_is_quota01_and_keeps_the_value(make_app, db):
    client = webtest.TestApp(make_app(quota_bytes=10))
    alice = register_user(client, "alice")
    token = put(client, alice, "k", b"12345").headers["X-Sync-Token"]
    before = snapshot(db)
    response = put(client, alice, "k", b"12345678901", token=token, status=507)
    assert_error(response, 507, "QUOTA01")
    assert snapshot(db) == before
    stored = client.get("/store/k", headers=alice.headers)
    assert (stored.body, stored.headers["X-Sync-Token"]) == (b"12345", token)


def test_quota_write_holder_growing_an_owners_key_is_quota01(make_app, db):
    client = webtest.TestApp(make_app(quota_bytes=10))
    alice, bob = register_user(client, "alice"), register_user(client, "bob")
    token = put(client, alice, "k", b"1234").headers["X-Sync-Token"]
    share(client, alice, "k", {"bob": "WRITE"})
    before = snapshot(db)
    response = put(client, bob, "k", b"12345678901", token=token, status=507)
    assert_error(response, 507, "QUOTA01")
    assert snapshot(db) == before


def test_quota_growth_is_charged_to_owners_not_to_the_writer(make_app):
    client = webtest.TestApp(make_app(quota_bytes=10))
    alice, bob = register_user(client, "alice"), register_user(client, "bob")
    put(client, bob, "mine", b"0123456789")  # bob is at his limit
    token = put(client, alice, "k", b"1").headers["X-Sync-Token"]
    share(client, alice, "k", {"bob": "WRITE"})
    put(client, bob, "k", b"123456789", token=token, status=204)
    assert usage(client, alice) == (1, 9)
    assert usage(client, bob) == (1, 10)


def test_quota_growth_is_checked_for_every_owner(make_app, db):
    client = webtest.TestApp(make_app(quota_bytes=10))
    alice, bob = register_user(client, "alice"), register_user(client, "bob")
    put(client, bob, "mine", b"12345678")
    token = put(client, alice, "k", b"12").headers["X-Sync-Token"]
    share(client, alice, "k", {"bob": "OWN"})  # bob now owns exactly 10 bytes
    before = snapshot(db)
    response = put(client, alice, "k", b"123", token=token, status=507)
    assert_error(response, 507, "QUOTA01")
    assert snapshot(db) == before


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"quota_keys": 1}, id="keys"),
        pytest.param({"quota_bytes": 10}, id="bytes"),
    ],
)
def test_quota_granting_own_past_a_limit_is_quota01(make_app, db, settings):
    client = webtest.TestApp(make_app(**settings))
    alice, bob = register_user(client, "alice"), register_user(client, "bob")
    put(client, alice, "k", b"123456")
    put(client, bob, "mine", b"123456")
    before = snapshot(db)
    response = share(client, alice, "k", {"bob": "OWN"}, status=507)
    assert_error(response, 507, "QUOTA01")
    assert snapshot(db) == before


@pytest.mark.parametrize("level", ["READ", "WRITE"])
def test_quota_granting_read_or_write_past_a_limit_is_allowed(make_app, level):
    client = webtest.TestApp(make_app(quota_keys=1, quota_bytes=10))
    alice, bob = register_user(client, "alice"), register_user(client, "bob")
    put(client, alice, "k", b"123456")
    put(client, bob, "mine", b"123456")
    share(client, alice, "k", {"bob": level}, status=204)
    assert usage(client, bob) == (1, 6)


@pytest.fixture
def over_quota(make_app):
    """alice owns two keys of 20 bytes; then the server restarts with 10 bytes and 1 key each."""
    before = webtest.TestApp(make_app())
    alice = register_user(before, "alice")
    tokens = {key: put(before, alice, key, b"x" * 20).headers["X-Sync-Token"] for key in "ab"}
    return webtest.TestApp(make_app(quota_bytes=10, quota_keys=1)), alice, tokens


@pytest.mark.parametrize(
    "size",
    [
        pytest.param(5, id="shrink"),
        pytest.param(20, id="same-size"),
    ],
)
def test_quota_over_a_lowered_quota_may_still_rewrite_without_growing(over_quota, size):
    client, alice, tokens = over_quota
    put(client, alice, "a", b"y" * size, token=tokens["a"], status=204)
    assert usage(client, alice) == (2, 20 + size)


def test_quota_over_a_lowered_quota_may_still_delete(over_quota):
    client, alice, tokens = over_quota
    client.delete("/store/a", headers={**alice.headers, "X-Sync-Token": tokens["a"]}, status=204)
    assert usage(client, alice) == (1, 20)


def test_quota_over_a_lowered_quota_may_not_grow(over_quota, db):
    client, alice, tokens = over_quota
    before = snapshot(db)
    response = put(client, alice, "a", b"y" * 21, token=tokens["a"], status=507)
    assert_error(response, 507, "QUOTA01")
    assert snapshot(db) == before


def test_quota_over_a_lowered_quota_may_not_create(over_quota, db):
    client, alice, _ = over_quota
    before = snapshot(db)
    assert_error(put(client, alice, "c", b"", status=507), 507, "QUOTA01")
    assert snapshot(db) == before


# Quotas count X-Sync-Meta -------------------------------------------------------------------------


def meta(size: int) -> dict[str, str]:
    """Return an X-Sync-Meta header of `size` printable bytes."""
    return {"X-Sync-Meta": "m" * size}


def test_quota_usage_counts_meta_bytes(client, user):
    put(client, user, "k", b"0123456789", headers=meta(100), status=204)
    assert usage(client, user) == (1, 110)


def test_quota_create_past_bytes_by_its_meta_is_quota01_and_stores_nothing(make_app, db):
    client = webtest.TestApp(make_app(quota_bytes=50))
    alice = register_user(client, "alice")
    response = put(client, alice, "k", b"0123456789", headers=meta(100), status=507)
    assert_error(response, 507, "QUOTA01")
    assert table_counts(db)["items"] == 0
    assert usage(client, alice) == (0, 0)


def test_quota_update_growing_only_the_meta_past_bytes_is_quota01(make_app, db):
    client = webtest.TestApp(make_app(quota_bytes=50))
    alice = register_user(client, "alice")
    token = token_of(put(client, alice, "k", b"0123456789", headers=meta(20), status=204))
    before = snapshot(db)
    response = put(client, alice, "k", b"0123456789", token, headers=meta(45), status=507)
    assert_error(response, 507, "QUOTA01")
    assert snapshot(db) == before
    assert client.get("/store/k", headers=alice.headers).headers["X-Sync-Meta"] == "m" * 20


@pytest.mark.parametrize(
    "headers, size",
    [
        pytest.param(meta(50), 60, id="meta-shorter"),
        pytest.param({}, 10, id="meta-dropped"),
    ],
)
def test_quota_shrinking_the_meta_over_a_lowered_quota_is_allowed(make_app, headers, size):
    unlimited = webtest.TestApp(make_app())
    alice = register_user(unlimited, "alice")
    token = token_of(put(unlimited, alice, "k", b"0123456789", headers=meta(100), status=204))
    client = webtest.TestApp(make_app(quota_bytes=50))
    put(client, alice, "k", b"0123456789", token, headers=headers, status=204)
    assert usage(client, alice) == (1, size)


# ==================================================================================================
# Store: faults and the disk floor
# ==================================================================================================


#: syncnode's own connect, kept before any test replaces it.
REAL_CONNECT = syncnode.connect


def read_only_connect(path: str, settings, write_lock=None, **_):
    """Open a connection as syncnode does, but read-only, as on a file system mounted ro."""
    uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro"
    conn = sqlite3.connect(
        uri,
        uri=True,
        isolation_level=None,
        check_same_thread=False,
        factory=syncnode.SQLiteConnection,
    )
    conn.write_lock = write_lock
    conn.execute(f"PRAGMA busy_timeout = {int(settings.busy_timeout)}")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


@pytest.fixture
def read_only(app, client, user, monkeypatch) -> tuple[User, str]:
    """Alice stored "k"; from now on the app's connections open the database read-only.

    Returns alice and the token of "k".
    """
    token = token_of(put(client, user, "k", b"value"))
    monkeypatch.setattr(syncnode, "connect", read_only_connect)
    app.close()  # the next request opens this thread's connection again
    return user, token


class FullDisk(io.BytesIO):
    """A temporary file on a file system with no space left."""

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_faults_spooling_out_of_space_is_disk01_and_stores_nothing(client, user, db, monkeypatch):
    monkeypatch.setattr(syncnode.tempfile, "TemporaryFile", lambda *args, **kwargs: FullDisk())
    before = snapshot(db)
    body = b"x" * (syncnode.STREAM_FROM_BYTES + 1)  # large enough to be spooled
    assert_error(put(client, user, "big", body, status=507), 507, "DISK01")
    assert snapshot(db) == before


@pytest.mark.sqlite
def test_faults_read_only_connection_recovers_once_the_database_is_writable(
    client, read_only, monkeypatch
):
    alice, _ = read_only
    assert_error(put(client, alice, "new", status=507), 507, "DISK01")
    monkeypatch.setattr(syncnode, "connect", REAL_CONNECT)
    put(client, alice, "new", status=204)  # same thread, same app
    assert client.get("/store/new", headers=alice.headers).body == b"v"


def test_faults_read_only_get_answers_200_when_the_session_is_due_a_refresh(
    client, clock, read_only
):
    alice, _ = read_only
    clock.advance(2 * 3600)
    assert client.get("/store/k", headers=alice.headers).body == b"value"


def test_faults_read_only_listing_answers_200_when_the_session_is_due_a_refresh(
    client, clock, read_only
):
    alice, _ = read_only
    clock.advance(2 * 3600)
    listing = client.get("/store", headers=alice.headers).json
    assert [entry["key"] for entry in listing] == ["k"]


def test_faults_read_only_expired_session_is_auth01(client, clock, read_only):
    alice, _ = read_only
    clock.advance(31 * 86400)
    assert_error(client.get("/store/k", headers=alice.headers, status=401), 401, "AUTH01")


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(
            lambda client, alice, token: put(client, alice, "new", status="*"), id="put-new"
        ),
        pytest.param(
            lambda client, alice, token: put(client, alice, "k", b"changed", token, status="*"),
            id="put-update",
        ),
        pytest.param(
            lambda client, alice, token: deleting(client, alice, "k", token, status="*"),
            id="delete",
        ),
        pytest.param(
            lambda client, alice, token: batch(client, alice, [put_op("new")], status="*"),
            id="batch",
        ),
        pytest.param(
            lambda client, alice, token: client.post_json(
                "/account", {"id": "bob", "password": PASSWORD}, status="*"
            ),
            id="register",
        ),
    ],
)
@pytest.mark.sqlite
def test_faults_read_only_writes_are_disk01(client, read_only, write):
    alice, token = read_only
    assert_error(write(client, alice, token), 507, "DISK01")


# Disk floor ---------------------------------------------------------------------------------------


@dataclass
class Floor:
    """Two apps on one database: one with room to write, one whose floor no disk meets."""

    roomy: webtest.TestApp
    full: webtest.TestApp
    alice: User


@pytest.fixture
def floor(make_app) -> Floor:
    roomy = webtest.TestApp(make_app())
    alice = register_user(roomy, "alice")
    return Floor(roomy, webtest.TestApp(make_app(min_free_bytes=10**18)), alice)


def test_disk_floor_delete_is_allowed(floor):
    token = token_of(put(floor.roomy, floor.alice, "k"))
    deleting(floor.full, floor.alice, "k", token, status=204)
    floor.roomy.get("/store/k", headers=floor.alice.headers, status=404)


def test_disk_floor_batch_of_deletes_is_allowed(floor):
    tokens = {key: token_of(put(floor.roomy, floor.alice, key)) for key in ("a", "b")}
    operations = [delete_op(key, token) for key, token in tokens.items()]
    batch(floor.full, floor.alice, operations, status=200)
    floor.roomy.get("/store/a", headers=floor.alice.headers, status=404)
    floor.roomy.get("/store/b", headers=floor.alice.headers, status=404)


@pytest.mark.sqlite
def test_disk_floor_batch_with_a_new_key_is_disk01_and_changes_nothing(floor):
    token = token_of(put(floor.roomy, floor.alice, "a"))
    operations = [delete_op("a", token), put_op("new")]
    assert_error(batch(floor.full, floor.alice, operations, status=507), 507, "DISK01")
    floor.roomy.get("/store/a", headers=floor.alice.headers, status=200)


@pytest.mark.sqlite
def test_disk_floor_put_of_a_new_key_is_disk01(floor):
    assert_error(put(floor.full, floor.alice, "new", status=507), 507, "DISK01")
    floor.roomy.get("/store/new", headers=floor.alice.headers, status=404)


#: (old value, old meta) -> (new value, new meta); the size counts the value and the meta.
@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param((b"abcd", None), (b"wxyz", None), id="same-size"),
        pytest.param((b"abcd", "ab"), (b"wxyz", "cd"), id="same-size-with-meta"),
        pytest.param((b"abcd", "ab"), (b"ab", "ab"), id="smaller"),
        pytest.param((b"abcd", "abcd"), (b"abcdef", None), id="meta-dropped-value-grows-less"),
    ],
)
def test_disk_floor_put_that_does_not_grow_is_allowed(floor, old, new):
    token = token_of(put(floor.roomy, floor.alice, "k", old[0], meta=old[1]))
    put(floor.full, floor.alice, "k", new[0], token, meta=new[1], status=204)
    response = floor.roomy.get("/store/k", headers=floor.alice.headers)
    assert (response.body, response.headers.get("X-Sync-Meta")) == new


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param((b"abcd", None), (b"abcde", None), id="larger-value"),
        pytest.param((b"abcd", None), (b"abcd", "m"), id="meta-added"),
        pytest.param((b"abcd", None), (b"ab", "abc"), id="value-shrinks-meta-grows-more"),
    ],
)
@pytest.mark.sqlite
def test_disk_floor_put_that_grows_is_disk01_and_keeps_the_value(floor, old, new):
    token = token_of(put(floor.roomy, floor.alice, "k", old[0], meta=old[1]))
    response = put(floor.full, floor.alice, "k", new[0], token, meta=new[1], status=507)
    assert_error(response, 507, "DISK01")
    response = floor.roomy.get("/store/k", headers=floor.alice.headers)
    assert (response.body, response.headers.get("X-Sync-Meta")) == old


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
        pytest.param({"user": "bob", "permission": "READ"}, id="object"),
        pytest.param([{"user": "bob", "permission": "read"}], id="lower-case"),
        pytest.param([{"user": "bob", "permission": "ADMIN"}], id="unknown-level"),
        pytest.param([{"user": "bob"}], id="no-level"),
        pytest.param([{"permission": "READ"}], id="no-user"),
        pytest.param([{"user": 7, "permission": "READ"}], id="user-number"),
        pytest.param([{"user": "bob", "permission": "READ"}, "bob"], id="mixed"),
        pytest.param(
            [{"user": "bob", "permission": "READ"}, {"user": "BOB", "permission": "OWN"}],
            id="duplicate",
        ),
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


@pytest.mark.sqlite
def test_health_low_disk_is_500_with_disk_false(make_app):
    client = webtest.TestApp(make_app(min_free_bytes=2**62))
    response = client.get("/health", status=500)
    assert response.json == {"database": True, "disk": False}


@pytest.mark.sqlite
def test_health_broken_database_is_500_with_database_false(app, client, db_path):
    app.context.close()
    os.remove(db_path)
    os.mkdir(db_path)  # a directory where the database was: no query can run
    response = client.get("/health", status=500)
    assert response.json["database"] is False


@pytest.mark.parametrize("history", ["fresh", "after-a-write", "reopened"])
def test_health_healthy_database_is_200_with_both_parts(app, client, user, history):
    if history != "fresh":
        put(client, user, "k")
    if history == "reopened":
        app.close()
    response = client.get("/health")
    assert (response.status_int, response.json) == (200, {"database": True, "disk": True})


@pytest.mark.sqlite
def test_health_read_only_database_is_500_with_database_false(client, read_only):
    response = client.get("/health", status=500)
    assert response.json["database"] is False


@pytest.mark.sqlite
def test_health_wal_removed_under_the_app_is_500_with_database_false(client, user, db_path):
    put(client, user, "k")
    os.remove(db_path + "-wal")
    response = client.get("/health", status=500)
    assert response.json["database"] is False


@pytest.mark.sqlite
def test_health_malformed_database_is_500_with_database_false(client, user, db_path):
    put(client, user, "k")
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # page 1 lives in the file alone now
    with open(db_path, "r+b") as file:
        file.write(b"\xa5" * 100)
    response = client.get("/health", status=500)
    assert response.content_type == "application/json"
    assert response.json["database"] is False
    assert "Traceback" not in response.text


# ==================================================================================================
# Identity: throttling
# ==================================================================================================


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
    [
        pytest.param("login_fails_per_id", 11, "alice", id="per-id"),
        pytest.param("login_fails_per_address", 101, "nobody{}", id="per-address"),
    ],
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
    assert reset_digests(db) == [token_digest(token)]


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
    [
        pytest.param("resets_per_id", 5, "alice", id="per-id"),
        pytest.param("resets_per_address", 50, "nobody{}", id="per-address"),
    ],
)
def test_throttle_reset_limit_of_zero_is_off(make_app, db, caplog, setting, requests, name):
    client = webtest.TestApp(make_app(**{setting: 0}))
    client.post_json("/account", {"id": "alice", "password": PASSWORD})
    same = {"REMOTE_ADDR": "203.0.113.7"}
    for number in range(requests):
        client.post_json("/resetpassword", {"id": name.format(number)}, extra_environ=same)
    token = request_reset(client, caplog, extra_environ=same)
    assert reset_digests(db) == [token_digest(token)]


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


# Across restarts ----------------------------------------------------------------------------------


def test_throttle_failed_logins_survive_a_restart(make_app, app, client, user):
    for _ in range(10):
        client.post_json("/auth", {"id": "alice", "password": "wrong password"}, status=401)
    app.close()
    restarted = webtest.TestApp(make_app())
    response = restarted.post_json("/auth", {"id": "alice", "password": PASSWORD}, status=429)
    assert_error(response, 429, "AUTH02")
    assert int(response.headers["Retry-After"]) > 0


# A clock stepped back -----------------------------------------------------------------------------


@pytest.fixture
def stepped_back(make_app, clock) -> webtest.TestApp:
    """Alice, locked out by 10 failed logins in a window of 900 s; then the clock steps 2 days
    back."""
    client = webtest.TestApp(make_app(login_fails_per_id=10, login_window=900))
    register_user(client, "alice")
    fail_logins(client, 10, address="192.0.2.{}")
    clock.advance(-2 * 86400)
    return client


def test_throttle_clock_stepped_back_locks_for_the_window_at_most(stepped_back):
    response = login(stepped_back, "alice", PASSWORD, extra_environ=ELSEWHERE, status="*")
    if response.status_int != 200:
        assert_throttled(response, 900)


def test_throttle_clock_stepped_back_right_password_logs_in_after_the_window(stepped_back, clock):
    login(stepped_back, "alice", PASSWORD, extra_environ=ELSEWHERE, status="*")
    clock.advance(900)
    login(stepped_back, "alice", PASSWORD, extra_environ=ELSEWHERE, status=200)


# Racing failed logins -----------------------------------------------------------------------------


def race_logins(server, name: str, password: str, count: int) -> list[Reply]:
    """Send `count` logins released together by a barrier, each on its own connection."""
    barrier = threading.Barrier(count)
    replies: list[Reply | None] = [None] * count
    body = json.dumps({"id": name, "password": password}).encode()

    def attempt(number: int) -> None:
        conn = server.connect(timeout=20)
        try:
            conn.connect()  # connected before the barrier, so that the requests overlap
            barrier.wait(timeout=10)
            headers = {"Content-Type": "application/json"}
            replies[number] = call(conn, "POST", "/auth", body, headers)
        finally:
            conn.close()

    run_threads([lambda number=number: attempt(number) for number in range(count)], timeout=25)
    return replies


@pytest.fixture
def raced(start_server):
    """A server limited to 10 failed logins per id, after 16 racing wrong passwords."""
    server = start_server(
        threads=16,
        login_fails_per_id=10,
        argon2_time_cost=3,
        argon2_memory_cost=4096,
        hash_slots=16,
    )
    server.register("alice")
    return server, race_logins(server, "alice", "wrong password", 16)


def test_throttle_racing_wrong_passwords_verify_at_most_the_limit(raced):
    _, replies = raced
    statuses = collections.Counter(reply.status_int for reply in replies)
    assert set(statuses) <= {401, 429}, statuses
    assert 1 <= statuses[401] <= 10, statuses
    for reply in replies:
        if reply.status_int == 401:
            assert_error(reply, 401, "AUTH01")
        else:
            assert_error(reply, 429, "AUTH02")
            assert reply.headers["Retry-After"].isdigit()
            assert int(reply.headers["Retry-After"]) > 0


def test_throttle_racing_wrong_passwords_then_the_right_one_is_auth02(raced):
    server, _ = raced
    reply = live_json(server, "POST", "/auth", {"id": "alice", "password": PASSWORD}, {})
    assert_error(reply, 429, "AUTH02")
    assert reply.headers["Retry-After"].isdigit()


def test_throttle_successful_logins_are_not_counted_as_failures(make_app):
    client = webtest.TestApp(make_app(login_fails_per_id=10))
    register_user(client, "alice")
    for _ in range(11):
        client.post_json("/auth", {"id": "alice", "password": PASSWORD}, status=200)


# ==================================================================================================
# Identity: secrets
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
        return bearer_headers(response.json["token"])

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
        client.get("/store", headers=bearer_headers(resets[0]), status=401)
        client.post_json(
            "/password", {"password": passwords[3]}, headers=bearer_headers(resets[0]), status=204
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
    assert digests == {token_digest(token) for token in tokens}
    contents = stored_bytes(db, db_path)
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
    [
        pytest.param("nobody", PASSWORD, 401, id="unknown-id"),
        pytest.param("alice", "wrong password", 401, id="wrong-password"),
        pytest.param("alice", PASSWORD, 200, id="right-password"),
    ],
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


# ==================================================================================================
# Identity: hashing slots (the low-memory profile)
# ==================================================================================================


@pytest.mark.parametrize(
    "path, body, signed_in, status",
    [
        pytest.param("/auth", {"id": "alice", "password": PASSWORD}, False, 200, id="login"),
        pytest.param("/account", {"id": "carol", "password": PASSWORD}, False, 200, id="register"),
        pytest.param("/password", {"password": NEW_PASSWORD}, True, 204, id="password"),
    ],
)
def test_busy_hashing_is_busy01_while_every_slot_is_held(
    make_app, db, path, body, signed_in, status
):
    app = make_app(hash_slots=1, hash_wait=1)
    client = webtest.TestApp(app)
    alice = register_user(client, "alice")
    headers = alice.headers if signed_in else {}
    before, counts = snapshot(db), table_counts(db)
    with app.context.hashing.slot():
        response = client.post_json(path, body, headers=headers, status=503)
    assert_error(response, 503, "BUSY01")
    assert int(response.headers["Retry-After"]) >= 1
    assert (snapshot(db), table_counts(db)) == (before, counts)
    client.post_json(path, body, headers=headers, status=status)  # the slot is free again


def test_busy_app_login_is_503_in_the_immich_layout(make_app, db):
    app = make_app(hash_slots=1, hash_wait=1)
    client = webtest.TestApp(app)
    register_user(client, "alice")
    counts = table_counts(db)
    with app.context.hashing.slot():
        body = {"email": "alice", "password": PASSWORD}
        response = client.post_json("/api/auth/login", body, status=503)
    assert set(response.json) == {"message", "error", "statusCode", "correlationId"}
    assert (response.json["error"], response.json["statusCode"]) == ("Service Unavailable", 503)
    assert int(response.headers["Retry-After"]) >= 1
    assert "Set-Cookie" not in response.headers
    assert table_counts(db) == counts
    client.post_json("/api/auth/login", body, status=201)


def test_busy_login_waits_for_a_slot_freed_in_time(make_app):
    app = make_app(hash_slots=1, hash_wait=5)
    client = webtest.TestApp(app)
    register_user(client, "alice")
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with app.context.hashing.slot():
            held.set()
            release.wait(5)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    held.wait(5)
    threading.Timer(0.3, release.set).start()
    started = time.monotonic()
    client.post_json("/auth", {"id": "alice", "password": PASSWORD}, status=200)
    assert time.monotonic() - started >= 0.25
    holder.join(5)


#: A process that takes hashing slot N of a database file as syncnode does, says so, and holds
#: it until its standard input closes.
HOLD_HASH_SLOT = """
import fcntl, os, sys
descriptor = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(descriptor, fcntl.LOCK_EX, 1, int(sys.argv[2]))
print("held", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("slots", [1, 2])
@pytest.mark.sqlite
def test_busy_hashing_counts_the_slots_another_process_holds(make_app, db_path, slots):
    app = make_app(hash_slots=slots, hash_wait=1)
    client = webtest.TestApp(app)
    register_user(client, "alice")
    holders = []
    try:
        for slot in range(slots):  # another process hashes in every slot
            holder = subprocess.Popen(
                [sys.executable, "-c", HOLD_HASH_SLOT, db_path,
                 str(syncnode.HASH_LOCK_BYTE + slot)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            holders.append(holder)
            assert holder.stdout.readline() == "held\n"
        body = {"id": "alice", "password": PASSWORD}
        assert_error(client.post_json("/auth", body, status=503), 503, "BUSY01")
        holders[-1].stdin.close()  # one slot frees up: a login hashes in it
        holders[-1].wait(timeout=10)
        client.post_json("/auth", body, status=200)
    finally:
        for holder in holders:
            if holder.poll() is None:
                holder.kill()
            holder.wait(timeout=10)
            holder.stdin.close()
            holder.stdout.close()


@pytest.mark.sqlite
def test_busy_login_waits_for_a_slot_another_process_frees_in_time(make_app, db_path):
    app = make_app(hash_slots=1, hash_wait=5)
    client = webtest.TestApp(app)
    register_user(client, "alice")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_HASH_SLOT, db_path, str(syncnode.HASH_LOCK_BYTE)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        threading.Timer(0.3, holder.stdin.close).start()
        started = time.monotonic()
        client.post_json("/auth", {"id": "alice", "password": PASSWORD}, status=200)
        assert time.monotonic() - started >= 0.25
    finally:
        holder.wait(timeout=10)
        holder.stdout.close()


def test_busy_new_argon2_settings_rehash_at_the_next_login(make_app, db):
    register_user(webtest.TestApp(make_app()), "alice")
    low = webtest.TestApp(make_app(argon2_memory_cost=16, argon2_time_cost=2))
    low.post_json("/api/auth/login", {"email": "alice", "password": PASSWORD}, status=201)
    (stored,) = db.execute("SELECT password_hash FROM users").fetchone()
    assert stored.startswith("$argon2id$v=19$m=16,t=2,p=1$")
    assert argon2.PasswordHasher().verify(stored, PASSWORD)


# ==================================================================================================
# HTTP layer: CORS
# ==================================================================================================


SYNC_PATHS = [
    "/account", "/auth", "/password", "/resetpassword", "/invite", "/store", "/store/a/b",
    "/batch", "/permission/a/b", "/health", "/.well-known/immich", "/openapi.json",
]  # fmt: skip
PREFLIGHT = {"Origin": "https://app.example", "Access-Control-Request-Method": "PUT"}
EXPOSED = {"X-Sync-Token", "X-Sync-Meta", "X-Sync-Seq", "ETag"}
ALLOWED_HEADERS = {
    "authorization", "content-type", "x-sync-token", "x-sync-meta", "x-sync-cursor", "if-match",
    "if-none-match", "x-api-key",
}  # fmt: skip


def header_names(value: str) -> set[str]:
    """Split a comma-separated header list into its names."""
    return {name.strip() for name in value.split(",")}


@pytest.mark.parametrize("path", SYNC_PATHS)
def test_cors_preflight_answers_on_every_sync_path(client, path):
    response = client.options(path, headers=PREFLIGHT)
    assert response.status_int == 204
    assert response.body == b""
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert header_names(response.headers["Access-Control-Allow-Methods"]) == header_names(
        response.headers["Allow"]
    )
    assert "OPTIONS" in header_names(response.headers["Allow"])
    allowed = header_names(response.headers["Access-Control-Allow-Headers"])
    assert ALLOWED_HEADERS <= {name.lower() for name in allowed}
    assert int(response.headers["Access-Control-Max-Age"]) > 0


def test_cors_preflight_lists_the_methods_of_the_path(client):
    response = client.options("/store/k", headers=PREFLIGHT)
    methods = header_names(response.headers["Access-Control-Allow-Methods"])
    assert methods == {"GET", "HEAD", "PUT", "DELETE", "OPTIONS"}


@pytest.mark.parametrize(
    "method, path, extra, status",
    [
        pytest.param("GET", "/store", {}, 200, id="listing"),
        pytest.param("GET", "/store/k", {}, 200, id="value"),
        pytest.param("GET", "/store/k", {"If-None-Match": "*"}, 304, id="not-modified"),
        pytest.param("PUT", "/store/new", {}, 204, id="put"),
        pytest.param("GET", "/store/missing", {}, 404, id="err01"),
        pytest.param("PATCH", "/store/k", {}, 405, id="req02"),
        pytest.param("POST", "/batch", {"Content-Type": "application/json"}, 200, id="batch"),
        pytest.param("GET", "/health", {}, 200, id="health"),
    ],
)
def test_cors_answers_expose_the_sync_headers(client, user, method, path, extra, status):
    put(client, user, "k")
    headers = {**user.headers, "Origin": "https://app.example", **extra}
    body = b'{"operations": []}' if path == "/batch" else b"v"
    response = client.request(path, method=method, headers=headers, body=body, status=status)
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert EXPOSED <= header_names(response.headers["Access-Control-Expose-Headers"])


def test_cors_auth01_answer_carries_cors_headers(client):
    response = client.get("/store", headers={"Origin": "https://app.example"}, status=401)
    assert_error(response, 401, "AUTH01")
    assert response.headers["Access-Control-Allow-Origin"] == "*"


def test_cors_listed_origin_is_echoed_with_vary(make_app):
    client = webtest.TestApp(make_app(cors_origins="https://a.example, https://b.example"))
    preflight = client.options("/store", headers={**PREFLIGHT, "Origin": "https://b.example"})
    answer = client.get("/health", headers={"Origin": "https://b.example"})
    for response in (preflight, answer):
        assert response.headers["Access-Control-Allow-Origin"] == "https://b.example"
        assert "Origin" in header_names(response.headers["Vary"])
    assert EXPOSED <= header_names(answer.headers["Access-Control-Expose-Headers"])


def test_cors_unlisted_origin_gets_no_cors_headers(make_app):
    client = webtest.TestApp(make_app(cors_origins="https://a.example"))
    preflight = client.options("/store", headers={**PREFLIGHT, "Origin": "https://evil.example"})
    answer = client.get("/health", headers={"Origin": "https://evil.example"})
    for response in (preflight, answer):
        assert not [name for name in response.headers if name.lower().startswith("access-control")]


def test_cors_empty_setting_turns_cors_off(make_app):
    client = webtest.TestApp(make_app(cors_origins=""))
    preflight = client.options("/store", headers=PREFLIGHT)
    answer = client.get("/health", headers={"Origin": "https://app.example"})
    assert preflight.status_int == 204
    for response in (preflight, answer):
        assert not [name for name in response.headers if name.lower().startswith("access-control")]


def test_cors_answer_without_origin_has_no_cors_headers(client, user):
    response = client.get("/store", headers=user.headers)
    assert not [name for name in response.headers if name.lower().startswith("access-control")]


@pytest.mark.parametrize(
    "method, path",
    [
        pytest.param("OPTIONS", "/api/server/ping", id="preflight-ping"),
        pytest.param("GET", "/api/server/ping", id="ping"),
        pytest.param("OPTIONS", "/api/users/me", id="preflight-me"),
        pytest.param("GET", "/api/users/me", id="me"),
    ],
)
def test_cors_api_paths_never_carry_cors_headers(client, user, method, path):
    headers = {**PREFLIGHT, **user.headers}
    response = client.request(path, method=method, headers=headers, expect_errors=True)
    assert not [name for name in response.headers if name.lower().startswith("access-control")]


# ==================================================================================================
# HTTP layer: a browser
# ==================================================================================================


CHROMIUM = "/usr/bin/chromium"

BROWSER_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>syncnode browser test</title></head>
<body><pre id="result">pending</pre>
<script>
(async () => {
  const base = "SYNCNODE_URL";
  const out = document.getElementById("result");
  try {
    let response = await fetch(base + "/account", {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({id: "browser", password: "correct horse"}),
    });
    const session = await response.json();
    const auth = {"Authorization": "Bearer " + session.token};
    response = await fetch(base + "/store/from/browser", {
      method: "PUT", headers: {...auth, "X-Sync-Meta": "text/plain"}, body: "hello from chromium",
    });
    const written = {status: response.status, token: response.headers.get("X-Sync-Token")};
    response = await fetch(base + "/store/from/browser", {headers: auth});
    const read = {
      status: response.status, value: await response.text(),
      token: response.headers.get("X-Sync-Token"), meta: response.headers.get("X-Sync-Meta"),
    };
    response = await fetch(base + "/store", {headers: auth});
    const listing = {keys: (await response.json()).map(e => e.key),
                     seq: response.headers.get("X-Sync-Seq")};
    out.textContent = JSON.stringify({written, read, listing});
  } catch (error) {
    out.textContent = JSON.stringify({error: String(error)});
  }
})();
</script></body></html>
"""


def serve_page(page: dict[str, bytes]) -> http.server.ThreadingHTTPServer:
    """Serve page["html"] at / on 127.0.0.1 (port 0) from a thread; 404 for anything else."""

    class PageHandler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = page["html"] if self.path == "/" else b""
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass  # keep the test output clean

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PageHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="page-server", daemon=True).start()
    return server


class Recorded:
    """A WSGI app that notes each request's method, path and query string, then passes it on."""

    def __init__(self, app) -> None:
        self.app, self.context, self.requests = app, app.context, []

    def __call__(self, environ, start_response):
        self.requests.append(
            (environ["REQUEST_METHOD"], environ["PATH_INFO"], environ.get("QUERY_STRING", ""))
        )
        return self.app(environ, start_response)


def run_page(page_html: str, start_server, make_app, tmp_path) -> tuple[dict, Recorded]:
    """Load a page in headless Chromium against a live syncnode that admits the page's origin
    only (CORS); return the page's result and the requests the server saw."""
    if not os.access(CHROMIUM, os.X_OK):
        skip_or_fail("install Debian's chromium to run the browser test (apt-get install chromium)")
    page: dict[str, bytes] = {"html": b""}
    page_server = serve_page(page)
    try:
        page_url = f"http://127.0.0.1:{page_server.server_address[1]}"
        recorded = Recorded(make_app(cors_origins=page_url))
        sync = start_server(recorded)
        page["html"] = page_html.replace("SYNCNODE_URL", sync.url).encode()
        command = [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}",
            "--virtual-time-budget=20000", "--dump-dom", page_url + "/",
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, timeout=90, text=True)
    finally:
        page_server.shutdown()
        page_server.server_close()
    match = re.search(r'<pre id="result">(.*?)</pre>', done.stdout, re.S)
    assert match, f"no result in the DOM; chromium said: {done.stderr[-2000:]}"
    return json.loads(html.unescape(match.group(1))), recorded


def test_browser_page_writes_and_reads_through_cors(start_server, make_app, tmp_path, db):
    # The page's origin only is allowed: the echo path.
    result, _ = run_page(BROWSER_PAGE, start_server, make_app, tmp_path)
    stored_token = db.execute("SELECT token FROM items WHERE key = 'from/browser'").fetchone()[0]
    assert result == {
        "written": {"status": 204, "token": stored_token},
        "read": {"status": 200, "value": "hello from chromium", "token": stored_token,
                 "meta": "text/plain"},
        "listing": {"keys": ["from/browser"], "seq": result["listing"]["seq"]},
    }  # fmt: skip
    assert result["listing"]["seq"].isdigit()


POLLING_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>syncnode polls</title></head>
<body><pre id="result">pending</pre>
<script>
(async () => {
  const base = "SYNCNODE_URL";
  const out = document.getElementById("result");
  try {
    let response = await fetch(base + "/account", {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({id: "poller", password: "correct horse"}),
    });
    const auth = {"Authorization": "Bearer " + (await response.json()).token};
    response = await fetch(base + "/store", {headers: auth});
    let cursor = response.headers.get("X-Sync-Cursor");
    const seen = {header: [], query: []};
    for (const way of ["header", "query"]) {
      for (let round = 0; round < 4; round++) {
        const key = way + round;
        await fetch(base + "/store/" + key, {method: "PUT", headers: auth, body: "v"});
        response = way === "header"
          ? await fetch(base + "/store?wait=5", {headers: {...auth, "X-Sync-Cursor": cursor}})
          : await fetch(base + "/store?wait=5&since=" + cursor, {headers: auth});
        seen[way].push((await response.json()).map(entry => entry.key));
        cursor = response.headers.get("X-Sync-Cursor");
      }
    }
    out.textContent = JSON.stringify(seen);
  } catch (error) {
    out.textContent = JSON.stringify({error: String(error)});
  }
})();
</script></body></html>
"""


def test_browser_polls_with_the_cursor_in_a_header_are_preflighted_once(
    start_server, make_app, tmp_path
):
    result, recorded = run_page(POLLING_PAGE, start_server, make_app, tmp_path)
    assert result == {way: [[f"{way}{round}"] for round in range(4)] for way in ("header", "query")}
    polls = [(method, query) for method, path, query in recorded.requests if path == "/store"]
    # One URL for every poll: the browser asks once and keeps the answer (Access-Control-Max-Age).
    assert polls.count(("GET", "wait=5")) == 4
    assert polls.count(("OPTIONS", "wait=5")) == 1
    # A cursor in the URL makes each poll's URL new, and each one is preflighted.
    by_query = [query for method, query in polls if query.startswith("wait=5&since=")]
    assert len(by_query) == 8 and len(set(by_query)) == 4
    assert (
        sorted(method for method, query in polls if query in by_query)
        == ["GET"] * 4 + ["OPTIONS"] * 4
    )


# ==================================================================================================
# HTTP layer: the real server
# ==================================================================================================


def race_one_token(live: LiveServer, user: User, key: str, writers: int = 24) -> list[Reply]:
    """Create a key, then let writers released by a barrier PUT it with its one token."""
    token = live_put(live, user, key, b"first").headers["X-Sync-Token"]
    barrier = threading.Barrier(writers)
    replies: list[Reply | None] = [None] * writers

    def write(number: int) -> None:
        conn = live.connect()
        try:
            conn.connect()  # Connected before the barrier, so that the requests race.
            barrier.wait(timeout=5)
            headers = {**user.headers, "X-Sync-Token": token}
            replies[number] = call(
                conn, "PUT", f"/store/{key}", f"writer {number}".encode(), headers
            )
        finally:
            conn.close()

    run_threads([lambda number=number: write(number) for number in range(writers)])
    return replies


def test_real_server_racing_writers_one_token_one_winner(start_server, db):
    """Three races of 24 writers, each served in parallel, each with exactly one winner."""
    live = start_server(server_threads=24)
    alice = live.register("alice")
    for round_number in range(3):
        key = f"race/{round_number}"
        replies = race_one_token(live, alice, key)
        winners = [number for number, reply in enumerate(replies) if reply.status_int == 204]
        assert len(winners) == 1, f"{len(winners)} writers won in {key}"
        for number, reply in enumerate(replies):
            if number != winners[0]:
                assert_error(reply, 409, "KEY01")
        body, token = f"writer {winners[0]}".encode(), replies[winners[0]].headers["X-Sync-Token"]
        stored = live.request("GET", f"/store/{key}", headers=alice.headers)
        assert (stored.body, stored.headers["X-Sync-Token"]) == (body, token)
        row = db.execute("SELECT value, token FROM items WHERE key = ?", (key,)).fetchone()
        assert row == (body, token)


#: Test-only triggers: SQLite lets one writer at a time hold the lock from BEGIN IMMEDIATE to
#: COMMIT, so the audit's sequence numbers give the order in which writes and revokes committed.
AUDIT = """
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, event TEXT NOT NULL, key TEXT NOT NULL, token TEXT
);
CREATE TRIGGER audit_write AFTER UPDATE ON items BEGIN
    INSERT INTO audit (event, key, token) VALUES ('write', NEW.key, NEW.token);
END;
CREATE TRIGGER audit_revoke AFTER DELETE ON permissions BEGIN
    INSERT INTO audit (event, key) SELECT 'revoke', key FROM items WHERE id = OLD.item_id;
END;
"""
#: The same on PostgreSQL, where write transactions take turns under the write lock, so the
#: order of the audit's numbers is the order of the commits.
AUDIT_POSTGRESQL = """
CREATE TABLE audit (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, event TEXT NOT NULL, key TEXT NOT NULL,
    token TEXT
);
CREATE FUNCTION audit_write() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
    INSERT INTO audit (event, key, token) VALUES ('write', NEW.key, NEW.token); RETURN NULL;
END $$;
CREATE TRIGGER audit_write AFTER UPDATE ON items FOR EACH ROW EXECUTE FUNCTION audit_write();
CREATE FUNCTION audit_revoke() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
    INSERT INTO audit (event, key) SELECT 'revoke', key FROM items WHERE id = OLD.item_id;
    RETURN NULL;
END $$;
CREATE TRIGGER audit_revoke AFTER DELETE ON permissions
    FOR EACH ROW EXECUTE FUNCTION audit_revoke();
"""


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One request in a race: when it was sent, what it carried and what came back."""

    method: str
    sent: float
    reply: Reply
    token: str | None = None
    body: bytes = b""


def race_revoke(live: LiveServer, owner: User, bob: User, key: str) -> tuple[float, list[Attempt]]:
    """Let bob's writers update a key while the owner revokes bob; return when the revoke answered.

    Each writer reads the token, then PUTs with the newest token it holds (the one it read, or
    the one its own last write got), and keeps going until it has sent three rounds after the
    revoke answered (at most 400 rounds or 5 seconds).
    """
    path = f"/store/{key}"
    created = live_put(live, owner, key, b"created")
    grant = json.dumps([{"user": bob.name, "permission": "WRITE"}]).encode()
    assert live.request("PUT", f"/permission/{key}", grant, owner.headers).status_int == 204
    attempts = [Attempt("PUT", 0.0, created, None, b"created")]
    bob_wrote, revoked = threading.Semaphore(0), threading.Event()
    answered: list[float] = []
    deadline = time.monotonic() + 5

    def writer(number: int) -> None:
        conn, token, late = live.connect(), None, 0
        try:
            for count in range(400):
                if late == 3 or time.monotonic() > deadline:
                    break
                late += revoked.is_set()
                sent = time.monotonic()
                got = call(conn, "GET", path, headers=bob.headers)
                attempts.append(Attempt("GET", sent, got))
                if got.status_int == 200:
                    token = got.headers["X-Sync-Token"]
                body = f"bob {number}.{count}".encode()
                sent = time.monotonic()
                sent_token = {"X-Sync-Token": token} if token else {}  # none if never read
                reply = call(conn, "PUT", path, body, {**bob.headers, **sent_token})
                attempts.append(Attempt("PUT", sent, reply, token, body))
                if reply.status_int == 204:
                    token = reply.headers["X-Sync-Token"]
                    bob_wrote.release()
        finally:
            conn.close()

    def revoke() -> None:
        for _ in range(3):  # Revoke while the writers are in full swing.
            assert bob_wrote.acquire(timeout=2), "bob's writers did not get going"
        reply = live.request("DELETE", f"/permission/{key}?users={bob.name}", None, owner.headers)
        answered.append(time.monotonic())
        revoked.set()
        assert reply.status_int == 204, reply.body

    run_threads([revoke, *(lambda number=number: writer(number) for number in range(4))])
    return answered[0], attempts


def test_real_server_revoke_racing_writes_refuses_later_writes(start_server):
    live = start_server(server_threads=8)
    owner, bob = live.register("alice"), live.register("bob")
    revoke_answered, attempts = race_revoke(live, owner, bob, "raced")
    late = [attempt for attempt in attempts if attempt.sent > revoke_answered]
    assert any(attempt.method == "PUT" for attempt in late)
    for attempt in late:
        if attempt.method == "GET":
            assert_error(attempt.reply, 404, "ERR01")
        else:
            assert_error(attempt.reply, 409, "KEY01")


def test_real_server_revoke_racing_writes_no_write_commits_after_it(start_server, db):
    """Five times over, no write by bob commits after the revoke that removed him commits.

    Audit triggers record the commit order. A permission check made before the write
    transaction began would let a writer that passed it just before the revoke write just
    after it, and the audit would show that write after the revoke.
    """
    live = start_server(server_threads=8)
    if isinstance(db, syncnode.PostgreSQLConnection):
        db.run_script(AUDIT_POSTGRESQL)
    else:
        db.executescript(AUDIT)
    owner, bob = live.register("alice"), live.register("bob")
    for round_number in range(5):
        key = f"raced/{round_number}"
        revoke_answered, attempts = race_revoke(live, owner, bob, key)
        events = db.execute("SELECT event, token FROM audit WHERE key = ? ORDER BY seq", (key,))
        events = events.fetchall()
        assert events[-1] == ("revoke", None), f"a write committed after the revoke in {key}"
        value, token = db.execute("SELECT value, token FROM items WHERE key = ?", (key,)).fetchone()
        assert token == events[-2][1]
        written = {
            attempt.reply.headers["X-Sync-Token"]: attempt.body
            for attempt in attempts
            if attempt.method == "PUT" and attempt.reply.status_int == 204
        }
        assert written[token] == value
        late_tokens = {a.token for a in attempts if a.method == "PUT" and a.sent > revoke_answered}
        assert token in late_tokens, "no late write held the stored token: KEY01 proved nothing"


#: Request paths and the keys they name once percent-decoded.
KEY_PATHS = [
    pytest.param("/store/a/b/c", "a/b/c", id="slashes"),
    pytest.param("/store/a%2Fb", "a/b", id="encoded-slash"),
    pytest.param(quote("/store/ключ/日本/🎉"), "ключ/日本/🎉", id="unicode"),
    pytest.param("/store/my%20key%20here", "my key here", id="spaces"),
    pytest.param("/store/100%25", "100%", id="encoded-percent"),
    pytest.param("/store//lead//double/", "/lead//double/", id="empty-segments"),
]


@pytest.mark.parametrize(("path", "key"), KEY_PATHS)
def test_real_server_key_path_round_trips(live_server, path, key):
    alice = live_server.register("alice")
    assert live_server.request("PUT", path, key.encode(), alice.headers).status_int == 204
    got = live_server.request("GET", path, headers=alice.headers)
    assert (got.status_int, got.body) == (200, key.encode())


@pytest.mark.parametrize(("path", "key"), KEY_PATHS)
def test_real_server_key_path_lists_decoded_key(live_server, path, key):
    alice = live_server.register("alice")
    assert live_server.request("PUT", path, b"v", alice.headers).status_int == 204
    listed = live_server.request("GET", "/store", headers=alice.headers).json
    assert [entry["key"] for entry in listed] == [key]


def test_real_server_encoded_slash_is_the_same_key(live_server):
    alice = live_server.register("alice")
    assert live_server.request("PUT", "/store/a%2Fb", b"encoded", alice.headers).status_int == 204
    assert live_server.request("GET", "/store/a/b", headers=alice.headers).body == b"encoded"


def test_real_server_value_of_max_bytes_is_stored(start_server):
    live = start_server(max_value_bytes=1000, server_threads=8)
    alice = live.register("alice")
    assert live_put(live, alice, "big", b"x" * 1000).status_int == 204
    assert live.request("GET", "/store/big", headers=alice.headers).body == b"x" * 1000


def test_real_server_value_over_max_bytes_is_size01(start_server, db):
    live = start_server(max_value_bytes=1000, server_threads=8)
    alice = live.register("alice")
    assert_error(live_put(live, alice, "big", b"x" * 1001), 413, "SIZE01")
    assert db.execute("SELECT count(*) FROM items").fetchone() == (0,)


def test_real_server_chunked_value_within_max_bytes_is_stored(start_server):
    live = start_server(max_value_bytes=1000, server_threads=8)
    alice = live.register("alice")
    chunks = iter([b"x" * 400, b"y" * 400, b"z" * 200])
    headers = {**alice.headers, "Transfer-Encoding": "chunked"}
    reply = live.request("PUT", "/store/big", chunks, headers, encode_chunked=True)
    assert reply.status_int == 204
    stored = live.request("GET", "/store/big", headers=alice.headers).body
    assert stored == b"x" * 400 + b"y" * 400 + b"z" * 200


def test_real_server_chunked_value_over_max_bytes_is_size01(start_server, db):
    live = start_server(max_value_bytes=1000, server_threads=8)
    alice = live.register("alice")
    chunks = iter([b"x" * 400, b"y" * 400, b"z" * 201])
    headers = {**alice.headers, "Transfer-Encoding": "chunked"}
    reply = live.request("PUT", "/store/big", chunks, headers, encode_chunked=True)
    assert_error(reply, 413, "SIZE01")
    assert db.execute("SELECT count(*) FROM items").fetchone() == (0,)


def test_real_server_mounted_app_round_trips_unicode_key(start_server, make_app):
    parent = mount_with_bottle("/sync/")(make_app())
    live = start_server(parent, server_threads=8)
    body = json.dumps({"id": "alice", "password": PASSWORD}).encode()
    token = live.request("POST", "/sync/account", body).json["token"]
    headers = {"Authorization": f"Bearer {token}"}
    path = quote("/sync/store/ключ/🎉")
    assert live.request("PUT", path, b"mounted", headers).status_int == 204
    assert live.request("GET", path, headers=headers).body == b"mounted"
    assert live.request("GET", "/sync/store", headers=headers).json[0]["key"] == "ключ/🎉"


# ==================================================================================================
# HTTP layer: slow and stalled clients
# ==================================================================================================

# Slow, stalled and malformed clients against a live server, over raw sockets: the server keeps
# answering, client_timeout closes what cannot be written or never becomes a request,
# max_connections bounds connections without a request, a declared Content-Length over the
# endpoint's limit is refused before the body, the server's own errors are JSON in the layout of
# the API the path belongs to, and keep-alive survives 204 and 304. Every server binds 127.0.0.1
# port 0 through syncnode.make_server (LiveServer). Every wait has a socket timeout or a
# deadline, so that a server that freezes fails a test in seconds instead of hanging it.


HOST = "127.0.0.1"
#: Receive buffer of a client that never reads: the kernel's buffers fill after a few KiB.
SMALL_RCVBUF = 4096
#: How often a trickling client sends one more byte of its request.
TRICKLE_SECONDS = 0.5
#: A request line cut in half: what every trickling client sends first.
TRICKLE_HEAD = b"GET /heal"
#: The bytes that follow, one at a time; then "a" forever (a header value that never ends).
TRICKLE_TAIL = b"th HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: "
#: Most bytes a Trickler sends on each connection (60 s of trickling).
TRICKLE_STEPS = 120
#: Most recv calls any read loop makes.
MAX_READS = 100_000
CLIENT_TIMEOUT = 2
BIG_VALUE = random.Random(16).randbytes(16 * 1024 * 1024)


# Helpers ------------------------------------------------------------------------------------------


@dataclass
class RawAnswer:
    """One HTTP answer parsed from raw bytes: status, headers (lower-case names) and body."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self):
        return json.loads(self.body)


class Clients:
    """Client sockets opened to one server; close() closes them all."""

    def __init__(self, server: LiveServer) -> None:
        self.port = int(server.port)  # waitress gives it as text
        self.sockets: list[socket.socket] = []

    def open(self, rcvbuf: int | None = None, timeout: float = 5.0) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sockets.append(sock)
        if rcvbuf is not None:  # before connect, so that the window the server sees is small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect((HOST, self.port))
        return sock

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


class Trickler:
    """Trickling clients: half a request line, then one more byte every TRICKLE_SECONDS.

    One thread sends the bytes; a connection the server closed is left alone from then on.
    """

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []
        self.dead: set[socket.socket] = set()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="trickler", daemon=True)

    def add(self, sock: socket.socket) -> socket.socket:
        sock.sendall(TRICKLE_HEAD)
        self.sockets.append(sock)
        return sock

    def start(self) -> None:
        self.thread.start()

    def run(self) -> None:
        for step in range(TRICKLE_STEPS):
            if self.stopping.wait(TRICKLE_SECONDS):
                return
            byte = TRICKLE_TAIL[step : step + 1] or b"a"
            for sock in self.sockets:
                if sock in self.dead:
                    continue
                try:
                    sock.send(byte)
                except OSError:  # closed by the server, or the send buffer is full
                    self.dead.add(sock)

    def stop(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)
        assert not self.thread.is_alive(), "the trickling thread did not stop"


def raw_request(method: str, path: str, headers: dict[str, str] | None = None) -> bytes:
    """The head of an HTTP/1.1 request; no body."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def recv_by(sock: socket.socket, deadline: float, what: str, size: int = 65536) -> bytes:
    """One recv that gives up at the deadline, failing the test with what was awaited."""
    sock.settimeout(max(0.001, deadline - time.monotonic()))
    try:
        return sock.recv(size)
    except TimeoutError:
        raise AssertionError(f"no {what} before the deadline") from None


#: Bytes read past an answer (the start of the next one, when both came in one read).
UNREAD: weakref.WeakKeyDictionary[socket.socket, bytes] = weakref.WeakKeyDictionary()


def read_answer(sock: socket.socket, timeout: float) -> RawAnswer:
    """Read one answer: status line and headers, then a body by Content-Length or chunks.

    What arrives past it is kept for the next call on the socket (pipelined answers).
    """
    deadline = time.monotonic() + timeout
    buffer = UNREAD.pop(sock, b"")
    for _ in range(MAX_READS):
        if b"\r\n\r\n" in buffer:
            break
        chunk = recv_by(sock, deadline, "complete answer head")
        assert chunk, f"the connection closed before the answer's head ended: {buffer[:200]!r}"
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, status, *_ = status_line.split(" ", 2)
    assert version.startswith("HTTP/1."), status_line
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        headers[name] = f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
    if int(status) in (204, 304):
        if rest:
            UNREAD[sock] = rest
        return RawAnswer(int(status), headers, b"")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return RawAnswer(int(status), headers, read_chunked(sock, rest, deadline))
    length = int(headers.get("content-length", "-1"))
    for _ in range(MAX_READS):
        if 0 <= length <= len(rest):
            break
        chunk = recv_by(sock, deadline, "complete answer body")
        if not chunk:
            assert length < 0, f"the connection closed after {len(rest)} of {length} body bytes"
            break
        rest += chunk
    if 0 <= length < len(rest):
        UNREAD[sock] = rest[length:]
    return RawAnswer(int(status), headers, rest[:length] if length >= 0 else rest)


def read_chunked(sock: socket.socket, buffer: bytes, deadline: float) -> bytes:
    """Decode a chunked body that starts with the bytes already received."""
    body = b""
    for _ in range(MAX_READS):
        line, found, rest = buffer.partition(b"\r\n")
        size = int(line.split(b";")[0], 16) if found else -1
        if found and len(rest) >= size + 2:
            if size == 0:
                return body
            body += rest[:size]
            buffer = rest[size + 2 :]
            continue
        chunk = recv_by(sock, deadline, "complete chunked body")
        assert chunk, "the connection closed inside a chunked body"
        buffer += chunk
    raise AssertionError("the chunked body did not end")


def closed_after_drain(sock: socket.socket, quiet: float = 0.5, limit: float = 3.0) -> bool:
    """Whether the server closed the connection: read what arrived until EOF or a reset.

    False when nothing arrives for quiet seconds (the connection is open) or when data still
    flows after limit seconds (the server is still writing to it).
    """
    deadline = time.monotonic() + limit
    for _ in range(MAX_READS):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        sock.settimeout(min(quiet, remaining))
        try:
            if not sock.recv(1024 * 1024):
                return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
    return False


def health(server: LiveServer, timeout: float = 5.0) -> tuple[RawAnswer, float]:
    """GET /health on a fresh connection; the answer and the seconds it took."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        started = time.monotonic()
        sock.connect((HOST, int(server.port)))
        sock.sendall(raw_request("GET", "/health"))
        answer = read_answer(sock, timeout - (time.monotonic() - started))
        return answer, time.monotonic() - started
    finally:
        sock.close()


def send_and_read(server: LiveServer, data: bytes, timeout: float = 2.0) -> tuple[RawAnswer, bool]:
    """Send raw bytes on a fresh connection; the answer, and whether the server then closed."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((HOST, int(server.port)))
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before it has read everything
        answer = read_answer(sock, timeout)
        return answer, closed_after_drain(sock, quiet=1.0)
    finally:
        sock.close()


def pipelined_openapi(count: int = 400) -> bytes:
    return raw_request("GET", "/openapi.json") * count


def assert_json_answer(answer: RawAnswer, status: int) -> dict:
    """Check the status and the JSON Content-Type of an answer; return its JSON body."""
    content_type = answer.headers.get("content-type", "")
    seen = f"{answer.status} {content_type}: {answer.body[:200]!r}"
    assert answer.status == status, seen
    assert content_type.partition(";")[0].strip() == "application/json", seen
    return answer.json


def assert_sync_error(answer: RawAnswer, status: int, code: str) -> None:
    body = assert_json_answer(answer, status)
    assert set(body) == {"code", "message"}, body
    assert body["code"] == code, body
    assert isinstance(body["message"], str)


def assert_raw_app_error(answer: RawAnswer, status: int, reason: str) -> None:
    body = assert_json_answer(answer, status)
    assert set(body) == {"message", "error", "statusCode", "correlationId"}, body
    assert body["statusCode"] == status
    assert body["error"] == reason
    assert isinstance(body["message"], str | list)
    assert isinstance(body["correlationId"], str) and body["correlationId"]


# Stalled clients ----------------------------------------------------------------------------------


def test_server_health_answers_while_clients_stall(start_server):
    server = start_server()  # threads=4, the default
    owner = server.register("alice")
    assert live_put(server, owner, "big", BIG_VALUE).status_int == 204
    clients, trickler = Clients(server), Trickler()
    try:
        for _ in range(4):
            clients.open().sendall(pipelined_openapi())
        big = raw_request("GET", "/store/big", owner.headers)
        for _ in range(4):
            clients.open(rcvbuf=SMALL_RCVBUF).sendall(big)
        for _ in range(100):
            trickler.add(clients.open())
        trickler.start()
        time.sleep(1.0)  # the serving threads take the stalled requests and fill the buffers
        try:
            answer, seconds = health(server, timeout=5.0)
        except AssertionError as error:
            raise AssertionError(f"GET /health while clients stall: {error} (5 s)") from None
        print(f"GET /health answered in {seconds:.3f} s while 108 clients stall")
        assert answer.status == 200, answer.body
        assert seconds < 1.0
    finally:
        trickler.stop()
        clients.close()


def test_server_closes_stalled_and_trickling_connections(start_server):
    server = start_server(client_timeout=CLIENT_TIMEOUT)
    owner = server.register("alice")
    assert live_put(server, owner, "big", BIG_VALUE).status_int == 204
    clients, trickler = Clients(server), Trickler()
    try:
        watched: list[tuple[str, socket.socket]] = []
        for number in range(2):
            sock = clients.open()
            sock.sendall(pipelined_openapi())
            watched.append((f"pipelined {number}, never read", sock))
        for number in range(2):
            sock = clients.open(rcvbuf=SMALL_RCVBUF)
            sock.sendall(raw_request("GET", "/store/big", owner.headers))
            watched.append((f"16 MiB GET {number}, never read", sock))
        watched.append(("idle, no request ever", clients.open()))
        kept = clients.open()
        kept.sendall(raw_request("GET", "/health"))
        assert read_answer(kept, 2.0).status == 200
        watched.append(("idle after one answer", kept))
        for number in range(5):
            watched.append((f"trickling {number}", trickler.add(clients.open())))
        trickler.start()
        time.sleep(CLIENT_TIMEOUT + 1.5)
        still_open = [name for name, sock in watched if not closed_after_drain(sock)]
        assert not still_open, f"open {CLIENT_TIMEOUT + 1.5} s later: {still_open}"
    finally:
        trickler.stop()
        clients.close()


def test_server_keeps_slow_steady_reader(start_server):
    server = start_server(client_timeout=CLIENT_TIMEOUT)
    owner = server.register("alice")
    value = BIG_VALUE[: 4 * 1024 * 1024]
    assert live_put(server, owner, "slow", value).status_int == 204
    clients = Clients(server)
    try:
        sock = clients.open(rcvbuf=64 * 1024)
        started = time.monotonic()
        sock.sendall(raw_request("GET", "/store/slow", owner.headers))
        deadline = started + 30
        buffer = b""
        for _ in range(MAX_READS):
            if b"\r\n\r\n" in buffer:
                break
            chunk = recv_by(sock, deadline, "answer head")
            assert chunk, "the connection closed before the answer's head"
            buffer += chunk
        head, _, body = buffer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head[:100]
        for _ in range(len(value) // (64 * 1024) + 10):  # 64 KiB every 0.2 s
            if len(body) >= len(value):
                break
            time.sleep(0.2)
            goal = min(len(value), len(body) + 64 * 1024)
            for _ in range(MAX_READS):
                if len(body) >= goal:
                    break
                chunk = recv_by(sock, deadline, f"byte {len(body)}", goal - len(body))
                assert chunk, f"cut off after {len(body)} of {len(value)} bytes"
                body += chunk
        seconds = time.monotonic() - started
        print(f"read {len(body)} bytes in {seconds:.1f} s")
        assert body == value
        assert seconds > 2 * CLIENT_TIMEOUT  # the read was slow enough to matter
    finally:
        clients.close()


def test_server_closes_oldest_connections_without_request(start_server):
    server = start_server(max_connections=40)
    clients, trickler = Clients(server), Trickler()
    try:
        socks = [trickler.add(clients.open()) for _ in range(60)]
        trickler.start()
        opened = time.monotonic()
        open_ones = list(range(len(socks)))
        for _ in range(20):  # look every 0.25 s for 2.5 s at most
            time.sleep(0.25)
            open_ones = [n for n in open_ones if not closed_after_drain(socks[n], 0.01)]
            if len(open_ones) <= 20 and min(open_ones, default=40) >= 40:
                break
            if time.monotonic() - opened > 2.5:
                break
        print(f"{len(open_ones)} of 60 left open after {time.monotonic() - opened:.2f} s")
        assert len(open_ones) <= 20, f"{len(open_ones)} trickling connections open: {open_ones}"
        assert min(open_ones, default=40) >= 40, f"open among the oldest 40: {open_ones}"
        answer, seconds = health(server, timeout=5.0)
        print(f"GET /health answered in {seconds:.3f} s beside 60 trickling clients")
        assert answer.status == 200, answer.body
        assert seconds < 1.0
    finally:
        trickler.stop()
        clients.close()


def test_server_trickled_bodies_neither_outstay_their_time_nor_shut_newcomers_out(start_server):
    server = start_server(max_connections=20, client_timeout=2)  # at most 10 waiting
    clients = Clients(server)
    head = raw_request("POST", "/auth", {**JSON, "Content-Length": "100"})
    stop = threading.Event()
    try:
        socks = [clients.open() for _ in range(10)]
        for sock in socks:
            sock.sendall(head + b"{")

        def trickle() -> None:
            for _ in range(40):  # one byte every 0.2 s, which keeps each connection "active"
                if stop.wait(0.2):
                    return
                for sock in socks:
                    with contextlib.suppress(OSError):
                        sock.send(b" ")

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        for _ in range(3):  # newcomers are served while the trickled bodies hold their places
            answer, seconds = health(server, timeout=5.0)
            assert answer.status == 200 and seconds < 1.0, (answer.status, seconds)
        time.sleep(2 + 100 / syncnode.MIN_BODY_BYTES_PER_SECOND + 1.5)
        assert all(closed_after_drain(sock, 0.2) for sock in socks), "a trickled body outstayed"
    finally:
        stop.set()
        clients.close()


def test_server_refuses_a_chunked_body_once_it_passes_the_routes_limit(start_server):
    server = start_server()
    clients = Clients(server)
    try:
        sock = clients.open()
        sock.sendall(raw_request("POST", "/auth", {**JSON, "Transfer-Encoding": "chunked"}))
        chunk = b"%x\r\n%s\r\n" % (64 * 1024, b" " * 64 * 1024)
        sent = 0
        with contextlib.suppress(OSError):  # the server may close while more is on its way
            for _ in range(syncnode.MAX_JSON_BYTES // (64 * 1024) + 2):
                sock.sendall(chunk)
                sent += 64 * 1024
        assert sent <= syncnode.MAX_JSON_BYTES + 128 * 1024
        answer = read_answer(sock, timeout=5.0)
        assert (answer.status, answer.json["code"]) == (413, "SIZE01")
    finally:
        clients.close()


# Request limits -----------------------------------------------------------------------------------


MAX_VALUE_BYTES = 1024 * 1024
JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("method", "path", "length", "layout"),
    [
        pytest.param("POST", "/auth", 300_000_000, "sync", id="auth-300MB"),
        pytest.param("POST", "/auth", 2 * syncnode.MAX_JSON_BYTES, "sync", id="auth-json-2MiB"),
        pytest.param("PUT", "/store/k", MAX_VALUE_BYTES + 1, "sync", id="store-max-value-plus-1"),
        pytest.param("POST", "/api/auth/login", 300_000_000, "app", id="app-login-300MB"),
    ],
)
def test_server_refuses_declared_oversize_body_before_reading_it(
    start_server, method, path, length, layout
):
    server = start_server(max_value_bytes=MAX_VALUE_BYTES)
    owner = server.register("alice")
    kind = JSON if path != "/store/k" else {"Content-Type": "application/octet-stream"}
    headers = {**kind, **owner.headers, "Content-Length": str(length)}
    started = time.monotonic()
    answer, closed = send_and_read(server, raw_request(method, path, headers), timeout=2.0)
    print(f"413 after {time.monotonic() - started:.3f} s with no body sent")
    if layout == "sync":
        assert_sync_error(answer, 413, "SIZE01")
    else:
        assert_raw_app_error(answer, 413, "Payload Too Large")
    assert closed, "the connection stayed open after the 413"


def test_server_store_put_of_max_value_bytes_is_204(start_server):
    server = start_server(max_value_bytes=MAX_VALUE_BYTES)
    owner = server.register("alice")
    value = BIG_VALUE[:MAX_VALUE_BYTES]
    assert server.request("PUT", "/store/k", value, owner.headers).status_int == 204
    assert server.request("GET", "/store/k", headers=owner.headers).body == value


# The server's own errors --------------------------------------------------------------------------


HUGE_HEADER = {"X-Huge": "a" * (300 * 1024)}


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        pytest.param(b"GARBAGE\r\n\r\n", 400, "REQ01", id="garbage-request-line"),
        pytest.param(
            raw_request("PUT", "/store/k", {"Content-Length": "abc"}),
            400,
            "REQ01",
            id="content-length-abc",
        ),
        pytest.param(
            raw_request("PUT", "/store/k", {"Content-Length": "-1"}),
            400,
            "REQ01",
            id="content-length-minus-1",
        ),
        pytest.param(raw_request("GET", "/health", HUGE_HEADER), 413, "SIZE01", id="header-300KiB"),
    ],
)
def test_server_own_errors_are_sync_node_json(start_server, data, status, code):
    server = start_server()
    answer, _ = send_and_read(server, data, timeout=3.0)
    assert_sync_error(answer, status, code)


@pytest.mark.parametrize(
    ("headers", "status", "reason"),
    [
        pytest.param(
            {**JSON, "Content-Length": "abc"}, 400, "Bad Request", id="content-length-abc"
        ),
        pytest.param(
            {**JSON, "Content-Length": "-1"}, 400, "Bad Request", id="content-length-minus-1"
        ),
        pytest.param({**JSON, **HUGE_HEADER}, 413, "Payload Too Large", id="header-300KiB"),
    ],
)
def test_server_own_errors_on_app_api_are_immich_json(start_server, headers, status, reason):
    server = start_server()
    data = raw_request("POST", "/api/auth/login", headers)
    answer, _ = send_and_read(server, data, timeout=3.0)
    assert_raw_app_error(answer, status, reason)


# Keep-alive after 204 and 304 ---------------------------------------------------------------------


def test_server_keeps_connection_after_204(start_server):
    server = start_server()
    owner = server.register("alice")
    conn = server.connect()
    try:
        conn.request("PUT", "/store/k", b"value", owner.headers)
        first = conn.getresponse()
        first.read()
        assert first.status == 204
        assert "close" not in (first.getheader("Connection") or "").lower()
        sock = conn.sock
        assert sock is not None, "http.client closed the connection after the 204"
        conn.request("GET", "/store/k", headers=owner.headers)
        second = conn.getresponse()
        assert second.status == 200
        assert second.read() == b"value"
        assert conn.sock is sock
    finally:
        conn.close()


def test_server_keeps_connection_after_304(start_server):
    server = start_server()
    owner = server.register("alice")
    token = server.request("PUT", "/store/k", b"value", owner.headers).headers["X-Sync-Token"]
    conn = server.connect()
    try:
        conn.request("GET", "/store/k", headers={**owner.headers, "If-None-Match": f'"{token}"'})
        first = conn.getresponse()
        first.read()
        assert first.status == 304
        assert "close" not in (first.getheader("Connection") or "").lower()
        sock = conn.sock
        assert sock is not None, "http.client closed the connection after the 304"
        conn.request("GET", "/health")
        second = conn.getresponse()
        assert second.status == 200
        second.read()
        assert conn.sock is sock
    finally:
        conn.close()


# ==================================================================================================
# HTTP layer: type confusion over the served document
# ==================================================================================================

# Driven by the served OpenAPI document (GET /openapi.json). For every operation of the document
# and every field of its JSON request body, every query parameter, every header parameter and
# every credential of its security schemes, send an otherwise valid request with that one place
# holding a bad value: null, booleans, odd numbers, lists, objects, deep nesting, an empty, a
# long, a NUL and a lone-surrogate string. Whole bodies get the same values and a few that are
# not JSON at all. Every answer must be no 5xx and one the operation documents: one of its own
# answers (its schema and required headers), or the error layout of its API. On Sync Node paths
# that is {"code", "message"} with the code's status from syncnode.ERROR_STATUS; under /api it is
# Immich's {"message", "error", "statusCode", "correlationId"} with statusCode the status.


# The bad values -----------------------------------------------------------------------------------


#: Nesting past Python's recursion limit, in the 1 MiB of a Sync Node JSON body.
SYNC_DEPTH = 100_000
#: Nesting past the recursion limit that still fits the App API's 64 KiB bodies.
APP_DEPTH = 30_000
LONG_TEXT = "x" * 100_000


def nested(depth: int) -> str:
    """A list nested depth deep, as JSON text."""
    return "[" * depth + "]" * depth


@dataclasses.dataclass(frozen=True)
class Bad:
    """A bad value: its name, its raw JSON text, and its text as a query or header value.

    The text is a WSGI string, one character per byte: a lone surrogate there is its
    UTF-8-style bytes, which no UTF-8 decoder accepts.
    """

    name: str
    json: str
    text: str


BAD_VALUES = [
    Bad("null", "null", "null"),
    Bad("true", "true", "true"),
    Bad("false", "false", "false"),
    Bad("0", "0", "0"),
    Bad("-1", "-1", "-1"),
    Bad("1e400", "1e400", "1e400"),
    Bad("1.5", "1.5", "1.5"),
    Bad("2**63", str(2**63), str(2**63)),
    Bad("[]", "[]", "[]"),
    Bad("[1]", "[1]", "[1]"),
    Bad("[[]]", "[[]]", "[[]]"),
    Bad("{}", "{}", "{}"),
    Bad('{"a":1}', '{"a": 1}', '{"a":1}'),
    Bad(f"nested-{SYNC_DEPTH}", nested(SYNC_DEPTH), nested(SYNC_DEPTH)),
    Bad(f"nested-{APP_DEPTH}", nested(APP_DEPTH), nested(APP_DEPTH)),
    Bad("empty-string", '""', ""),
    Bad("long-string", json.dumps(LONG_TEXT), LONG_TEXT),
    Bad("nul-string", json.dumps("correct\x00horse"), "correct\x00horse"),
    Bad("lone-surrogate", '"\\ud800"', "\xed\xa0\x80"),
]

#: Whole bodies beyond the bad values: text that is no JSON, or no JSON object.
BAD_BODIES = {
    "string": b'"alice"',
    "invalid-utf8": b'{"id": "\xff\xfe"}',
    "not-json": b"not json",
    "empty-body": b"",
}

#: The text the field under test holds until the bad value's JSON replaces it.
PLACEHOLDER = "\x01placeholder\x01"


# The document and its operations ------------------------------------------------------------------


@cache
def served_document() -> dict:
    """GET /openapi.json of a syncnode app on a throwaway database, once, when first needed."""
    with tempfile.TemporaryDirectory() as tmp:
        app = syncnode.create_app(os.path.join(tmp, "document.db"), **CHEAP_HASHING)
        try:
            return webtest.TestApp(app).get("/openapi.json").json
        finally:
            app.close()


METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


def resolve(node: dict, document: dict | None = None) -> dict:
    """Follow a node's $ref within the (served) document, as often as it takes."""
    while "$ref" in node:
        target: Any = document or served_document()
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


@cache
def validator(schema_text: str) -> jsonschema.Draft202012Validator:
    """A validator of one schema of the document, its references resolved in the document."""
    schema = {**json.loads(schema_text), "components": served_document()["components"]}
    return jsonschema.Draft202012Validator(schema)


def schema_errors(schema: dict, data: Any) -> list[str]:
    """The schema's complaints about data."""
    checker = validator(json.dumps(schema, sort_keys=True))
    return [error.message[:120] for error in checker.iter_errors(data)]


@dataclasses.dataclass(frozen=True)
class Operation:
    """One operation of the document: method, path and what the served document says of it."""

    method: str
    path: str

    def __str__(self) -> str:
        return f"{self.method} {self.path}"

    @property
    def spec(self) -> dict:
        return served_document()["paths"][self.path][self.method.lower()]

    @property
    def parameters(self) -> tuple:
        item = served_document()["paths"][self.path]
        parameters = item.get("parameters", []) + self.spec.get("parameters", [])
        return tuple(resolve(parameter) for parameter in parameters)

    @property
    def app_api(self) -> bool:
        return self.path.startswith("/api/")

    @property
    def secured(self) -> bool:
        return bool(self.spec.get("security"))

    def parameter_names(self, where: str) -> list[str]:
        return [p["name"] for p in self.parameters if p["in"] == where]

    @property
    def body_type(self) -> str | None:
        body = resolve(self.spec.get("requestBody", {}))
        return next(iter(body.get("content", {})), None)

    @property
    def body_schema(self) -> dict:
        body = resolve(self.spec["requestBody"])
        return body["content"]["application/json"]["schema"]


def document_operations(document: dict) -> list[Operation]:
    return [
        Operation(method.upper(), path)
        for path, item in document["paths"].items()
        for method in METHODS
        if method in item
    ]


def json_body(operation: Operation, document: dict) -> bool:
    """Whether the operation's request body is JSON, as the document says."""
    spec = document["paths"][operation.path][operation.method.lower()]
    body = resolve(spec.get("requestBody", {}), document)
    return next(iter(body.get("content", {})), None) == "application/json"


# The parametrizations read the document syncnode serves from memory; the sweeps read what each
# operation says from the served document, which test_openapi_document_is_served_and_valid
# shows to be the same.
CONFUSION_OPERATIONS = document_operations(syncnode.openapi_document())
JSON_OPERATIONS = [
    operation
    for operation in CONFUSION_OPERATIONS
    if json_body(operation, syncnode.openapi_document())
]


def schema_fields(schema: dict, prefix: tuple = ()) -> Iterator[tuple]:
    """Every place in a body of the schema: object properties, and one item of each array."""
    schema = resolve(schema)
    if schema.get("type") == "object":
        for name, sub in schema.get("properties", {}).items():
            yield (*prefix, name)
            yield from schema_fields(sub, (*prefix, name))
    elif schema.get("type") == "array":
        yield (*prefix, 0)
        yield from schema_fields(schema["items"], (*prefix, 0))


def dotted(place: tuple) -> str:
    """A place in a body as text: operations[0].token."""
    text = ""
    for part in place:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def with_placeholder(data: Any, place: tuple) -> Any:
    """The data with the placeholder at the place (the data is a fresh copy)."""
    if not place:
        return PLACEHOLDER
    target = data
    for part in place[:-1]:
        target = target[part]
    target[place[-1]] = PLACEHOLDER
    return data


def json_with(data: Any, place: tuple, raw: str) -> bytes:
    """The data as JSON text, with raw JSON text at the place."""
    text = json.dumps(with_placeholder(data, place))
    return text.replace(json.dumps(PLACEHOLDER), raw).encode()


def query_string(values: dict[str, str]) -> str:
    """Percent-encode a query, each value's characters taken as bytes (WSGI's latin-1)."""
    return "&".join(
        f"{name}={urllib.parse.quote(value.encode('latin-1'), safe='')}"
        for name, value in values.items()
    )


# The world a sweep runs in ------------------------------------------------------------------------


class World:
    """An app with alice (the admin: a stored key, an API key, two sessions) and bob.

    It fills path parameters with real ids, sends alice's credentials and keeps up with what
    the requests change, so that each request is a valid one but for the place under test.
    """

    def __init__(self, http: webtest.TestApp) -> None:
        self.client = http
        #: Whether the app (self.client may change to another on the database) takes invites.
        self.invite_mode = False
        self.counter = itertools.count()
        self.password = PASSWORD
        http.post_json(
            "/api/auth/admin-sign-up", {"email": "alice", "password": PASSWORD, "name": "Alice"}
        )
        self.session = self.log_in()
        self.headers = bearer_headers(self.session)
        self.log_in()  # a second session, for DELETE /api/sessions/{id}
        http.post_json("/account", {"id": "bob", "password": PASSWORD, "invite": self.invite()})
        self.store_token = self.put_key()
        created = http.post_json(
            "/api/api-keys", {"permissions": ["all"], "name": "sweep"}, headers=self.headers
        ).json
        self.api_key = created["secret"]
        me = http.get("/api/users/me", headers=self.headers).json
        sessions = http.get("/api/sessions", headers=self.headers).json
        (other_id,) = [s["id"] for s in sessions if not s["current"]]
        self.path_ids = {
            "/api/api-keys/{id}": created["apiKey"]["id"],
            "/api/sessions/{id}": other_id,
            "/api/users/{id}": me["id"],
        }

    def log_in(self) -> str:
        body = {"id": "alice", "password": PASSWORD}
        return self.client.post_json("/auth", body).json["token"]

    def put_key(self) -> str:
        response = self.client.put("/store/k", b"v", headers=self.headers)
        return response.headers["X-Sync-Token"]

    def fresh(self, stem: str) -> str:
        return f"{stem}{next(self.counter)}"

    def invite(self) -> str:
        """An unspent invite code (minted by alice) with registration=invite; else any text."""
        if not self.invite_mode:
            return "unused"
        return self.client.post("/invite", headers=self.headers).json["invite"]

    def url(self, operation: Operation) -> str:
        path = operation.path.replace("{key}", "k")
        if "{id}" in path:
            path = path.replace("{id}", self.path_ids[operation.path])
        assert "{" not in path, f"no value for the path parameters of {operation}"
        return path

    def credentials(self, operation: Operation) -> dict[str, str]:
        if not operation.secured:
            return {}
        if str(operation) == "GET /api/api-keys/me":
            return {"x-api-key": self.api_key}
        return dict(self.headers)

    def send(
        self,
        operation: Operation,
        body: bytes | None = None,
        query: str = "",
        headers: dict[str, str] | None = None,
        credentials: bool = True,
    ) -> webtest.TestResponse:
        """Send the request and keep the world up with what it changed."""
        sent = {**(self.credentials(operation) if credentials else {}), **(headers or {})}
        kwargs: dict[str, Any] = {"method": operation.method, "headers": sent}
        if body is not None:
            kwargs["body"] = body
            kwargs["content_type"] = operation.body_type
        url = self.url(operation) + (f"?{query}" if query else "")
        response = self.client.request(url, expect_errors=True, **kwargs)
        self.follow(operation, body, response)
        return response

    def follow(self, operation: Operation, body: bytes | None, response) -> None:
        if response.status_int >= 300:
            return
        if str(operation) == "PUT /store/{key}":
            self.store_token = response.headers["X-Sync-Token"]
        elif str(operation) == "DELETE /store/{key}":
            self.store_token = self.put_key()
        elif str(operation) == "POST /api/auth/change-password":
            self.password = json.loads(body)["newPassword"]


#: Valid values of body fields, by field name; a callable takes the world.
FIELD_VALUES: dict[str, Any] = {
    "password": lambda world: world.password,
    "newPassword": PASSWORD,
    "invalidateSessions": False,
    "email": "alice",
    "name": "Alice",
    "permissions": ["all"],
    "user": "bob",
    "permission": "READ",
    "method": "PUT",
    "key": lambda world: world.fresh("batch/"),
    "token": None,
    "value": "dg==",
    "meta": "m",
    "duration": 60,
    "deviceType": "phone",
    "deviceOS": "os",
    "invite": World.invite,
}
#: Valid values of body fields where an operation needs its own.
OPERATION_FIELD_VALUES: dict[str, dict[str, Any]] = {
    "POST /account": {"id": lambda world: world.fresh("user")},
    "POST /auth": {"id": "alice"},
    "POST /resetpassword": {"id": "alice"},
    "POST /api/auth/admin-sign-up": {"email": "carol", "name": "Carol"},
}
#: Valid query parameters; optional ones are left out.
QUERY_VALUES: dict[str, dict[str, str]] = {"DELETE /permission/{key}": {"users": "bob"}}
#: Valid header parameters; optional ones are left out.
HEADER_VALUES: dict[str, Callable[[World], dict[str, str]]] = {
    "PUT /store/{key}": lambda world: {"X-Sync-Token": world.store_token, "X-Sync-Meta": "m"},
    "DELETE /store/{key}": lambda world: {"X-Sync-Token": world.store_token},
}
#: Headers that say the same as the one under test, left out while it holds the bad value.
ALTERNATIVES = {"If-Match": ("X-Sync-Token",)}
#: Octet-stream bodies are any bytes.
OCTET_BODY = b"v"
#: Operations whose valid request the world refuses, with the documented reason.
REFUSED_BASELINES = {"POST /api/auth/admin-sign-up": "the server already has an admin"}


def valid_data(operation: Operation, world: World) -> Any:
    """A valid JSON body for the operation, built from its schema and the value tables."""
    values = {**FIELD_VALUES, **OPERATION_FIELD_VALUES.get(str(operation), {})}

    def example(schema: dict, name: str | None) -> Any:
        schema = resolve(schema)
        if name in values:
            value = values[name]
            return value(world) if callable(value) else copy.deepcopy(value)
        if "enum" in schema:
            return schema["enum"][0]
        if "oneOf" in schema:
            return example(schema["oneOf"][0], name)
        kind = schema.get("type")
        kind = kind[0] if isinstance(kind, list) else kind
        if kind == "object":
            return {key: example(sub, key) for key, sub in schema.get("properties", {}).items()}
        if kind == "array":
            return [example(schema["items"], None)]
        raise AssertionError(f"no valid value for {name!r} of {operation}")

    return example(operation.body_schema, None)


@dataclasses.dataclass
class Request:
    """What a sweep sends: a label for reports, the body, the query and the headers."""

    label: str
    body: bytes | None = None
    query: str = ""
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Whether to send alice's credentials; False when the request carries bad ones.
    credentials: bool = True


def valid_request(operation: Operation, world: World, label: str = "valid request") -> Request:
    required = [p["name"] for p in operation.parameters if p["in"] == "query" and p["required"]]
    query = QUERY_VALUES.get(str(operation), {})
    assert set(required) <= set(query), f"no valid query for {operation}"
    headers = HEADER_VALUES.get(str(operation), lambda world: {})(world)
    body = None
    if operation.body_type == "application/json":
        body = json.dumps(valid_data(operation, world)).encode()
    elif operation.body_type is not None:
        body = OCTET_BODY
    return Request(label, body, query_string(query), headers)


def sweep(operation: Operation, world: World) -> Iterator[Request]:
    """The bad requests, each built when its turn comes (the world moves on meanwhile)."""
    if operation.body_type == "application/json":
        for place in schema_fields(operation.body_schema):
            for bad in BAD_VALUES:
                request = valid_request(operation, world, f"body {dotted(place)}={bad.name}")
                request.body = json_with(valid_data(operation, world), place, bad.json)
                yield request
    if operation.body_type is not None:
        for bad in BAD_VALUES:
            request = valid_request(operation, world, f"whole body={bad.name}")
            request.body = bad.json.encode()
            yield request
        for name, raw in BAD_BODIES.items():
            request = valid_request(operation, world, f"whole body={name}")
            request.body = raw
            yield request
        request = valid_request(operation, world, "whole body=truncated")
        request.body = request.body[: len(request.body) // 2]
        yield request
    for name in operation.parameter_names("query"):
        valid = QUERY_VALUES.get(str(operation), {})
        for bad in BAD_VALUES:
            request = valid_request(operation, world, f"query {name}={bad.name}")
            request.query = query_string({**valid, name: bad.text})
            yield request
        request = valid_request(operation, world, f"query {name}=repeated")
        request.query = "&".join(filter(None, [query_string(valid), f"{name}=1&{name}=2"]))
        yield request
    for name in operation.parameter_names("header"):
        for bad in BAD_VALUES:
            request = valid_request(operation, world, f"header {name}={bad.name}")
            for alternative in ALTERNATIVES.get(name, ()):
                request.headers.pop(alternative, None)
            request.headers[name] = bad.text
            yield request
    for scheme in operation.spec.get("security", []):
        for bad in BAD_VALUES:
            request = valid_request(operation, world, f"credential {', '.join(scheme)}={bad.name}")
            request.credentials = False
            request.headers.update(credential_headers(next(iter(scheme)), bad.text))
            yield request


def credential_headers(scheme_name: str, text: str) -> dict[str, str]:
    """The headers that carry text as a credential of the security scheme."""
    scheme = served_document()["components"]["securitySchemes"][scheme_name]
    if scheme["type"] == "http":
        return {"Authorization": f"{scheme['scheme'].title()} {text}"}
    if scheme["in"] == "cookie":
        return {"Cookie": f"{scheme['name']}={text}"}
    return {scheme["name"]: text}


# The sweep ----------------------------------------------------------------------------------------


def answer_problem(operation: Operation, response) -> str | None:
    """What is wrong with an answer, if anything: undocumented status, layout or headers."""
    status = response.status_int
    if status >= 500:
        return "a server error"
    documented = operation.spec["responses"].get(str(status))
    if documented is not None:
        return documented_problem(resolve(documented), response)
    if status < 400:
        return "an undocumented status"
    if response.content_type != "application/json":
        return f"an error of type {response.content_type!r}"
    try:
        body = json.loads(response.body)
    except ValueError:
        return "an error that is not JSON"
    if operation.app_api:
        errors = schema_errors(served_document()["components"]["schemas"]["AppError"], body)
        if errors:
            return f"not Immich's error layout ({errors[0]})"
        if body["statusCode"] != status or body["error"] != syncnode.REASONS.get(status):
            return "an error whose statusCode or error is not the status"
        return None
    errors = schema_errors(served_document()["components"]["schemas"]["Error"], body)
    if errors:
        return f"not the Sync Node error layout ({errors[0]})"
    if syncnode.ERROR_STATUS.get(body["code"]) != status:
        return f"{body['code']} with another status than its own"
    return None


def documented_problem(documented: dict, response) -> str | None:
    """What is wrong with an answer of a status the operation documents."""
    for name, header in documented.get("headers", {}).items():
        if header.get("required") and name not in response.headers:
            return f"no {name} header"
    content = documented.get("content")
    if content is None:
        return "a body where none is documented" if response.body else None
    if "application/json" not in content:
        return None
    if response.content_type != "application/json":
        return f"a body of type {response.content_type!r}"
    errors = schema_errors(content["application/json"]["schema"], response.json)
    return f"a body off its schema ({errors[0]})" if errors else None


def report(label: str, response, problem: str) -> str:
    return f"{label}: {response.status} {problem}: {response.body[:160]!r}"


SWEEPS = [pytest.param(operation, {}, id=str(operation)) for operation in CONFUSION_OPERATIONS] + [
    pytest.param(
        next(op for op in CONFUSION_OPERATIONS if str(op) == "POST /account"),
        {"registration": "invite"},
        id="POST /account [registration=invite]",
    )
]


@pytest.mark.parametrize(("operation", "settings"), SWEEPS)
def test_sweep_bad_values_get_documented_answers(make_app, clock, operation, settings):
    world = World(webtest.TestApp(make_app()))
    if settings:  # the same database, served with other settings
        world.client = webtest.TestApp(make_app(**settings))
        world.invite_mode = settings.get("registration") == "invite"
    if operation.body_type == "application/json":
        data = valid_data(operation, world)
        assert not schema_errors(operation.body_schema, data), "the valid body is off its schema"
    failures = []
    if operation.secured:
        request = valid_request(operation, world, "no credentials")
        response = world.send(operation, request.body, request.query, request.headers, False)
        problem = answer_problem(operation, response)
        if problem is None and response.status_int != 401:
            problem = "an answer other than 401"
        if problem:
            failures.append(report(request.label, response, problem))
    for request in sweep(operation, world):
        response = world.send(
            operation, request.body, request.query, request.headers, request.credentials
        )
        problem = answer_problem(operation, response)
        if problem:
            failures.append(report(request.label, response, problem))
    # Last, as it may end the session or the key: the valid request, once throttles have reset.
    clock.advance(86400)
    request = valid_request(operation, world)
    response = world.send(operation, request.body, request.query, request.headers)
    problem = answer_problem(operation, response)
    if str(operation) in REFUSED_BASELINES:
        problem = problem or (None if response.status_int == 400 else "not the documented 400")
    elif problem is None and response.status_int >= 400:
        problem = "the valid request failed, so the sweep may not reach the checks"
    if problem:
        failures.append(report(request.label, response, problem))
    assert not failures, f"{len(failures)} answers of {operation}:\n" + "\n".join(failures)


# Regressions --------------------------------------------------------------------------------------


#: The code of a malformed body on Sync Node paths where it is not REQ01.
MALFORMED_CODES = {"POST /account": "ACCT02", "POST /auth": "ACCT02"}


@pytest.mark.parametrize("shape", ["whole-body", "first-field"])
@pytest.mark.parametrize("operation", JSON_OPERATIONS, ids=str)
def test_regression_deep_nesting_is_the_malformed_body_error(make_app, operation, shape):
    world = World(webtest.TestApp(make_app()))
    raw = nested(APP_DEPTH if operation.app_api else SYNC_DEPTH)
    request = valid_request(operation, world)
    if shape == "whole-body":
        request.body = raw.encode()
    else:
        first = next(schema_fields(operation.body_schema))
        request.body = json_with(valid_data(operation, world), first, raw)
    response = world.send(operation, request.body, request.query, request.headers)
    if operation.app_api:
        assert response.status_int == 400
        assert response.json["statusCode"] == 400
        schemas = served_document()["components"]["schemas"]
        assert not schema_errors(schemas["AppError"], response.json)
    else:
        assert_error(response, 400, MALFORMED_CODES.get(str(operation), "REQ01"))


@pytest.mark.parametrize(
    "permission",
    [
        pytest.param({}, id="{}"),
        pytest.param([], id="[]"),
        pytest.param([1], id="[1]"),
        pytest.param({"a": 1}, id='{"a":1}'),
        pytest.param([[]], id="[[]]"),
    ],
)
def test_regression_permission_put_unhashable_permission_is_req01(client, user, other, permission):
    client.put("/store/k", b"v", headers=user.headers)
    body = [{"user": other.name, "permission": permission}]
    response = client.put_json("/permission/k", body, headers=user.headers, status=400)
    assert_error(response, 400, "REQ01")
    holders = client.get("/permission/k", headers=user.headers).json
    assert holders == [{"user": user.name, "permission": "OWN"}]


# ==================================================================================================
# App API: wire format
# ==================================================================================================


def test_app_wire_document_enum_plus_store_is_the_served_list():
    assert app_schemas()["Permission"]["enum"] == SERVED_PERMISSIONS
    assert syncnode.API_KEY_PERMISSIONS == tuple(SERVED_PERMISSIONS)


def test_app_wire_every_answer_carries_a_generated_cid(client, user):
    for method, path, headers, status in [
        ("GET", "/api/server/ping", {}, 200),
        ("GET", "/api/users/me", user.headers, 200),
        ("GET", "/api/users/me", {}, 401),
        ("GET", "/api/nothing-here", {}, 404),
        ("POST", "/api/auth/login", {}, 400),
        ("DELETE", "/api/sessions", user.headers, 204),
    ]:
        response = client.request(path, method=method, headers=headers, status=status)
        assert re.fullmatch(r"[0-9a-f]{8}", response.headers["x-immich-cid"])
        if status >= 400:
            assert response.json["correlationId"] == response.headers["x-immich-cid"]


def test_app_wire_generated_cids_differ(client):
    cids = {client.get("/api/server/ping").headers["x-immich-cid"] for _ in range(5)}
    assert len(cids) == 5


def test_app_wire_sent_cid_is_echoed(client):
    for sent in ["a", "x" * 64, "with space ~!@#$%^&*()"]:
        response = client.get("/api/server/ping", headers={"x-immich-cid": sent})
        assert response.headers["x-immich-cid"] == sent
        response = client.get("/api/nope", headers={"x-immich-cid": sent}, status=404)
        assert response.headers["x-immich-cid"] == sent
        assert response.json["correlationId"] == sent


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param("", id="empty"),
        pytest.param("x" * 65, id="65"),
        pytest.param("caf\xe9", id="latin-1"),
        pytest.param("a\tb", id="tab"),
        pytest.param("a\x7fb", id="del"),
    ],
)
def test_app_wire_bad_sent_cid_is_replaced(client, sent):
    response = client.get("/api/nope", headers={"x-immich-cid": sent}, status=404)
    assert re.fullmatch(r"[0-9a-f]{8}", response.headers["x-immich-cid"])
    assert response.json["correlationId"] == response.headers["x-immich-cid"]


def test_app_wire_sync_node_paths_keep_their_own_layout(client, user):
    response = client.get("/store", status=401)
    assert_error(response, 401, "AUTH01")
    assert set(response.json) == {"code", "message"}
    assert "x-immich-cid" not in response.headers
    assert "x-immich-cid" not in client.get("/store", headers=user.headers).headers
    response = client.get("/api/users/me", status=401)
    assert "code" not in response.json


def test_app_wire_delete_answers_204_empty(client, user):
    response = client.delete("/api/sessions", headers=user.headers, status=204)
    assert response.body == b""
    assert "Content-Type" not in response.headers


@pytest.mark.parametrize(
    "method, path",
    [
        pytest.param("GET", "/api/nope", id="unknown"),
        pytest.param("POST", "/api/server/ping", id="wrong-method"),
        pytest.param("DELETE", "/api/users/me", id="wrong-method-users"),
        pytest.param("OPTIONS", "/api/server/ping", id="options"),
        pytest.param("GET", "/api/auth/status", id="auth-status"),
        pytest.param("GET", "/api/assets", id="assets"),
        pytest.param("GET", "/api/server/media-types", id="media-types"),
        pytest.param("POST", "/api/auth/pin-code", id="pin-code"),
        pytest.param("POST", "/api/oauth/authorize", id="oauth"),
        pytest.param("GET", "/api/shared-links", id="shared-links"),
        pytest.param(
            "PUT", "/api/sessions/7f1a3e4c-9d2b-4c5e-8f6a-1b2c3d4e5f60/lock", id="session-lock"
        ),
        pytest.param("GET", "/api", id="bare-api"),
    ],
)
def test_app_wire_unknown_route_is_json_404_naming_method_and_path(client, method, path):
    headers = {"Authorization": "Bearer any", "x-api-key": "any"}
    response = client.request(path, method=method, headers=headers, status=404)
    assert_app_error(response, 404, f"Cannot {method} {path}")


def test_app_wire_404_message_leaves_out_the_query_string(client):
    response = client.get("/api/nope?apiKey=SECRETKEY&sessionKey=SECRETTOKEN", status=404)
    assert_app_error(response, 404, "Cannot GET /api/nope")
    assert "SECRET" not in response.text


def test_app_wire_api_with_trailing_slash_is_immich_404(client):
    assert_app_error(client.get("/api/", status=404), 404, "Cannot GET /api/")


def test_app_wire_no_cors_headers(client):
    origin = {"Origin": "https://evil.example"}
    responses = [
        client.get("/api/server/ping", headers=origin),
        client.options("/api/server/ping", headers=origin, status=404),
        client.post_json("/api/auth/login", {}, headers=origin, status=400),
    ]
    for response in responses:
        assert not [name for name in response.headers if name.lower().startswith("access-control")]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/jsonx"])
def test_app_wire_body_without_json_type_counts_as_empty(client, user, db, content_type):
    body = json.dumps({"email": "alice", "password": PASSWORD}).encode()
    kw = {"content_type": content_type} if content_type else {}
    response = client.post("/api/auth/login", body, status=400, **kw)
    assert_app_error(response, 400, LOGIN_EMPTY)
    assert table_counts(db)["sessions"] == 1


def test_app_wire_json_type_with_parameters_is_parsed(client, user):
    body = json.dumps({"email": "alice", "password": PASSWORD}).encode()
    for content_type in ("application/json; charset=utf-8", "Application/JSON ; charset=UTF-8"):
        client.post("/api/auth/login", body, content_type=content_type, status=201)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"{", id="cut"),
        pytest.param(b"not json", id="text"),
        pytest.param(b"[]", id="array"),
        pytest.param(b'[{"email": "alice"}]', id="array-of-object"),
        pytest.param(b"null", id="null"),
        pytest.param(b'"text"', id="string"),
        pytest.param(b"5", id="number"),
        pytest.param(b"\xff\xfe", id="bytes"),
        pytest.param(b"", id="empty"),
    ],
)
def test_app_wire_malformed_json_is_400(client, user, db, raw):
    before = app_state(db)
    for path, headers in [
        ("/api/auth/login", {}),
        ("/api/api-keys", user.headers),
        ("/api/auth/change-password", user.headers),
    ]:
        response = client.post(
            path, raw, headers=headers, content_type="application/json", status=400
        )
        assert_app_error(response, 400, "Malformed JSON body")
    assert app_state(db) == before


def test_app_wire_body_over_64_kib_is_413(client, user, db):
    before = app_state(db)
    body = json.dumps({"permissions": ["all"], "pad": "x" * (64 * 1024)})
    response = client.post(
        "/api/api-keys", body, headers=user.headers, content_type="application/json", status=413
    )
    assert_app_error(response, 413, "Request body too large")
    assert app_state(db) == before


def test_app_wire_body_of_exactly_64_kib_is_read(client, user):
    start = json.dumps({"email": "alice", "password": PASSWORD, "pad": ""})
    body = start[:-2] + "x" * (64 * 1024 - len(start)) + start[-2:]
    assert len(body) == 64 * 1024
    client.post("/api/auth/login", body, content_type="application/json", status=201)


def test_app_wire_unknown_properties_are_ignored(client, user, db):
    body = {"email": "alice", "password": PASSWORD, "isAdmin": False, "role": "x", "nested": {}}
    client.post_json("/api/auth/login", body, status=201)
    client.reset()
    secret, _ = make_key(client, user.headers, ["user.read"], owner="bob", secret="mine")
    assert secret != "mine"
    assert db.execute("SELECT count(*) FROM api_keys").fetchone()[0] == 1


def test_app_wire_timestamps_have_milliseconds_and_ids_are_uuid4(client, clock, make_user):
    clock.advance(0.125)
    alice = make_user("alice")
    me = assert_schema(client.get("/api/users/me", headers=alice.headers), "UserAdminResponseDto")
    assert me["createdAt"] == me["updatedAt"] == "2027-01-15T08:00:00.125Z"
    assert UUID4_TEXT.fullmatch(me["id"])
    clock.advance(1.25)
    _, key = make_key(client, alice.headers)
    assert key["createdAt"] == "2027-01-15T08:00:01.375Z"
    assert UUID4_TEXT.fullmatch(key["id"])
    [session] = sessions_listing(client, alice.headers)
    assert session["createdAt"] == "2027-01-15T08:00:00.125Z"
    assert session["expiresAt"] == "2027-02-14T08:00:00.125Z"
    assert UUID4_TEXT.fullmatch(session["id"])


def test_app_wire_credentials_come_before_permission_and_body(client, user):
    response = client.put_json("/api/api-keys/123", {"name": 5}, status=401)
    assert_app_error(response, 401, "Authentication required")
    response = client.put_json(
        "/api/api-keys/123", {"name": 5}, headers=api_key_headers("unknown"), status=401
    )
    assert_app_error(response, 401, "Invalid API key")


def test_app_wire_permission_comes_before_path_id_and_body(client, user):
    secret, _ = make_key(client, user.headers, ["server.about"])
    response = client.put_json(
        "/api/api-keys/123", {"name": 5}, headers=api_key_headers(secret), status=403
    )
    assert_app_error(response, 403, "Missing required permission: apiKey.update")


def test_app_wire_path_id_comes_before_body(client, user):
    response = client.put_json("/api/api-keys/123", {"name": 5}, headers=user.headers, status=400)
    assert_app_error(response, 400, ["id must be a UUID"])


def test_app_wire_body_comes_before_the_operations_rules(client, user, other, db):
    _, bobs = make_key(client, other.headers)
    response = client.put_json(
        f"/api/api-keys/{bobs['id']}", {"name": 5}, headers=user.headers, status=400
    )
    assert_app_error(response, 400, ["name must be a string"])
    body = {"password": "wrong password", "newPassword": "short"}
    response = client.post_json("/api/auth/change-password", body, headers=user.headers, status=400)
    assert_app_error(response, 400, ["newPassword must be longer than or equal to 8 characters"])
    response = client.post_json("/api/auth/admin-sign-up", {"name": ""}, status=400)
    assert_app_error(response, 400, ["name should not be empty", *LOGIN_EMPTY])


def test_app_wire_session_create_body_comes_before_the_session_only_rule(client, user):
    secret, _ = make_key(client, user.headers)
    response = client.post_json(
        "/api/sessions", {"duration": 0}, headers=api_key_headers(secret), status=400
    )
    assert_app_error(response, 400, ["duration must be a positive number"])


def assert_failed_to(response) -> None:
    """Assert a 500 in Immich's layout whose message is a 'Failed to ...' sentence."""
    assert response.status_int == 500
    assert response.headers["Content-Type"] == APP_JSON
    assert list(response.json) == ["message", "error", "statusCode", "correlationId"]
    assert response.json["message"].startswith("Failed to")
    assert response.json["error"] == "Internal Server Error"
    assert response.json["statusCode"] == 500
    assert response.json["correlationId"] == response.headers["x-immich-cid"]


def test_app_wire_unexpected_failure_is_500_and_logged(client, user, monkeypatch, caplog):
    monkeypatch.setattr(syncnode, "get_user", explode)
    with caplog.at_level(logging.ERROR, logger="syncnode"):
        response = client.get("/api/users/me", headers=user.headers, status=500)
    assert_failed_to(response)
    assert "boom" not in response.text and "Traceback" not in response.text
    assert any(record.exc_info for record in caplog.records if record.name == "syncnode")


@pytest.mark.parametrize(
    "method, path, target, message",
    [
        pytest.param("GET", "/api/users/me", "get_user", "Failed to get my user", id="getMyUser"),
        pytest.param("GET", "/api/users", "list_users", "Failed to search users", id="searchUsers"),
        pytest.param(
            "GET", "/api/api-keys", "list_api_keys", "Failed to get api keys", id="getApiKeys"
        ),
        pytest.param(
            "POST", "/api/api-keys", "create_api_key", "Failed to create api key", id="createApiKey"
        ),
        pytest.param(
            "GET", "/api/sessions", "list_sessions", "Failed to get sessions", id="getSessions"
        ),
        pytest.param(
            "DELETE",
            "/api/sessions",
            "end_other_sessions",
            "Failed to delete all sessions",
            id="deleteAllSessions",
        ),
        pytest.param("POST", "/api/auth/login", "start_session", "Failed to login", id="login"),
    ],
)
def test_app_wire_500_message_names_the_operation(
    client, user, monkeypatch, caplog, method, path, target, message
):
    monkeypatch.setattr(syncnode, target, explode)
    body = {"email": "alice", "password": PASSWORD, "permissions": ["all"]}
    with caplog.at_level(logging.ERROR, logger="syncnode"):
        response = client.request(
            path,
            method=method,
            headers={**user.headers, "Content-Type": "application/json"},
            body=json.dumps(body).encode(),
            status=500,
        )
    assert_app_error(response, 500, message)


def test_app_wire_busy_database_is_500_failed_to(make_app, db, caplog):
    client = webtest.TestApp(make_app(busy_timeout=0))
    token = client.post_json("/account", {"id": "alice", "password": PASSWORD}).json["token"]
    db.execute("BEGIN IMMEDIATE")
    try:
        with caplog.at_level(logging.ERROR, logger="syncnode"):
            response = client.post_json(
                "/api/api-keys", {"permissions": ["all"]}, headers=bearer_headers(token),
                expect_errors=True,
            )  # fmt: skip
    finally:
        db.execute("ROLLBACK")
    assert_failed_to(response)
    assert not response.errors
    assert any(record.exc_info for record in caplog.records if record.name == "syncnode")


@pytest.mark.sqlite
def test_app_wire_low_disk_is_507_and_nothing_written(client, user, make_app, db):
    low = webtest.TestApp(make_app(min_free_bytes=2**62))
    before = app_state(db)
    response = low.post_json(
        "/api/api-keys", {"permissions": ["all"]}, headers=user.headers, status=507
    )
    assert_app_error(response, 507, "Insufficient storage")
    assert app_state(db) == before


# ==================================================================================================
# App API: credentials
# ==================================================================================================


def session_sources(token: str) -> dict[str, tuple[str, dict]]:
    """Each place a session token is read from: (query string, headers)."""
    return {
        "x-immich-user-token": ("", {"x-immich-user-token": token}),
        "x-immich-session-token": ("", {"x-immich-session-token": token}),
        "sessionKey": (f"?sessionKey={token}", {}),
        "bearer": ("", {"Authorization": f"Bearer {token}"}),
        "bearer-lower": ("", {"Authorization": f"bearer {token}"}),
        "bearer-upper": ("", {"Authorization": f"BEARER {token}"}),
        "bearer-mixed": ("", {"Authorization": f"bEaReR {token}"}),
        "cookie": ("", {"Cookie": f"immich_access_token={token}"}),
    }


def test_app_credentials_session_token_is_read_from_each_source(client, user):
    for source, (query, headers) in session_sources(user.token).items():
        response = client.get("/api/users/me" + query, headers=headers)
        assert assert_schema(response, "UserAdminResponseDto")["email"] == "alice", source


def test_app_credentials_bad_session_token_in_any_source_is_401(client, user):
    for query, headers in session_sources("unknown-token").values():
        response = client.get("/api/users/me" + query, headers=headers, status=401)
        assert_app_error(response, 401, "Invalid user token")


def test_app_credentials_first_session_source_found_decides(client, user):
    order = ["x-immich-user-token", "x-immich-session-token", "sessionKey", "bearer", "cookie"]
    for number, earlier in enumerate(order):
        for later in order[number + 1 :]:
            bad_query, bad_headers = session_sources("unknown-token")[earlier]
            good_query, good_headers = session_sources(user.token)[later]
            response = client.get(
                "/api/users/me" + (bad_query or good_query),
                headers={**good_headers, **bad_headers},
                status=401,
            )
            assert_app_error(response, 401, "Invalid user token")


def test_app_credentials_api_key_from_header_or_query(client, user):
    secret, _ = make_key(client, user.headers, ["user.read"])
    for query, headers in [("", api_key_headers(secret)), (f"?apiKey={secret}", {})]:
        me = client.get("/api/users/me" + query, headers=headers).json
        assert me["email"] == "alice"


def test_app_credentials_api_key_header_comes_before_query(client, user):
    secret, _ = make_key(client, user.headers, ["user.read"])
    response = client.get(
        f"/api/users/me?apiKey={secret}", headers=api_key_headers("unknown"), status=401
    )
    assert_app_error(response, 401, "Invalid API key")


def test_app_credentials_bad_session_token_beside_good_api_key_is_401(client, user):
    secret, _ = make_key(client, user.headers)
    for query, headers in session_sources("unknown-token").values():
        response = client.get(
            "/api/users/me" + query, headers={**headers, **api_key_headers(secret)}, status=401
        )
        assert_app_error(response, 401, "Invalid user token")


def test_app_credentials_good_session_beside_bad_api_key_passes(client, user):
    headers = {**user.headers, **api_key_headers("unknown")}
    assert client.get("/api/users/me", headers=headers).json["email"] == "alice"


def test_app_credentials_shared_link_is_always_401_first(client, user):
    secret, _ = make_key(client, user.headers)
    for query, headers, message in [
        ("", {"x-immich-share-key": "k"}, "Invalid share key"),
        ("?key=k", {}, "Invalid share key"),
        ("", {"x-immich-share-slug": "s"}, "Invalid share slug"),
        ("?slug=s", {}, "Invalid share slug"),
        ("?slug=s", {"x-immich-share-key": "k"}, "Invalid share key"),
    ]:
        for credentials in [user.headers, api_key_headers(secret), {}]:
            response = client.get(
                "/api/users/me" + query, headers={**credentials, **headers}, status=401
            )
            assert_app_error(response, 401, message)


def test_app_credentials_none_is_authentication_required(client, user):
    for headers in [{}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer "}]:
        response = client.get("/api/users/me", headers=headers, status=401)
        assert_app_error(response, 401, "Authentication required")


def test_app_credentials_unknown_or_deleted_api_key_is_401(client, user):
    secret, key = make_key(client, user.headers)
    client.delete(f"/api/api-keys/{key['id']}", headers=user.headers, status=204)
    for value in [secret, "unknown", "x" * 43]:
        response = client.get("/api/users/me", headers=api_key_headers(value), status=401)
        assert_app_error(response, 401, "Invalid API key")


def test_app_credentials_expired_or_revoked_session_is_invalid_user_token(make_app, clock):
    client = webtest.TestApp(make_app(session_ttl=60))
    first = client.post_json("/account", {"id": "alice", "password": PASSWORD}).json["token"]
    second = client.post_json("/auth", {"id": "alice", "password": PASSWORD}).json["token"]
    client.delete("/auth", headers=bearer_headers(second), status=204)
    assert_app_error(
        client.get("/api/users/me", headers=bearer_headers(second), status=401),
        401,
        "Invalid user token",
    )
    clock.advance(60)
    assert_app_error(
        client.get("/api/users/me", headers=bearer_headers(first), status=401),
        401,
        "Invalid user token",
    )


def test_app_credentials_reset_token_is_invalid_user_token(client, user, caplog, db):
    token = request_reset(client, caplog)
    for query, headers in session_sources(token).values():
        response = client.get("/api/users/me" + query, headers=headers, status=401)
        assert_app_error(response, 401, "Invalid user token")
    assert table_counts(db)["reset_tokens"] == 1


def test_app_credentials_session_tokens_work_on_both_apis(client, user):
    app_token = app_login(client).json["accessToken"]
    client.get("/store", headers=bearer_headers(app_token), status=200)
    assert my_user(client, user.headers)["email"] == "alice"


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="none"),
        pytest.param({"x-api-key": "unknown"}, id="bad-api-key"),
        pytest.param({"Authorization": "Bearer unknown"}, id="bad-session"),
    ],
)
def test_app_credentials_401_has_no_www_authenticate(client, headers):
    response = client.get("/api/users/me", headers=headers, status=401)
    assert "WWW-Authenticate" not in response.headers
    response = app_login(client, "nobody", PASSWORD, status=401)
    assert "WWW-Authenticate" not in response.headers


def test_app_credentials_access_log_leaves_out_query_secrets(make_app, caplog):
    client = webtest.TestApp(make_app(access_log=True))
    token = client.post_json("/account", {"id": "alice", "password": PASSWORD}).json["token"]
    secret, _ = make_key(client, bearer_headers(token))
    with caplog.at_level(logging.INFO, logger="syncnode.access"):
        client.get(f"/api/users/me?apiKey={secret}")
        client.get(f"/api/users/me?sessionKey={token}")
    lines = [r.getMessage() for r in caplog.records if r.name == "syncnode.access"]
    assert len(lines) == 2
    assert all("/api/users/me" in line for line in lines)
    assert not [line for line in lines if secret in line or token in line]


# Operations and the permission each needs from an API key (README, App API); the last
# columns are what a key holding exactly that permission gets: status, error message or schema.
OPERATIONS = [
    ("POST", "/api/auth/change-password", "auth.changePassword",
     {"password": PASSWORD, "newPassword": APP_NEW_PASSWORD}, 200, "UserAdminResponseDto"),
    ("POST", "/api/auth/logout", "all", None, 200, "LogoutResponseDto"),
    ("POST", "/api/api-keys", "apiKey.create", {"permissions": ["apiKey.create"]}, 201,
     "APIKeyCreateResponseDto"),
    ("GET", "/api/api-keys", "apiKey.read", None, 200, ["APIKeyResponseDto"]),
    ("GET", "/api/api-keys/{key}", "apiKey.read", None, 200, "APIKeyResponseDto"),
    ("PUT", "/api/api-keys/{key}", "apiKey.update", {"name": "renamed"}, 200,
     "APIKeyResponseDto"),
    ("DELETE", "/api/api-keys/{key}", "apiKey.delete", None, 204, None),
    ("GET", "/api/server/about", "server.about", None, 200, "ServerAboutResponseDto"),
    ("POST", "/api/sessions", "session.create", {}, 400,
     "This endpoint can only be used with a session token"),
    ("GET", "/api/sessions", "session.read", None, 200, ["SessionResponseDto"]),
    ("DELETE", "/api/sessions", "session.delete", None, 204, None),
    ("DELETE", "/api/sessions/{session}", "session.delete", None, 204, None),
    ("GET", "/api/users", "user.read", None, 200, ["UserResponseDto"]),
    ("GET", "/api/users/me", "user.read", None, 200, "UserAdminResponseDto"),
    ("PUT", "/api/users/me", "user.update", {"name": "Alice"}, 200, "UserAdminResponseDto"),
    ("GET", "/api/users/{user}", "user.read", None, 200, "UserResponseDto"),
]  # fmt: skip
OPERATION_CASES = [pytest.param(*row, id=f"{row[0]}-{row[1][5:]}") for row in OPERATIONS]


def call_operation(client, db, owner: User, headers: dict, key: dict, method, path, body):
    """Call one operation of the table, filling the path ids from the owner's data."""
    user_id = my_user(client, owner.headers)["id"]
    path = path.format(key=key["id"], session=session_id_of(db, owner.token), user=user_id)
    if body is None:
        return client.request(path, method=method, headers=headers, expect_errors=True)
    return client.request(
        path,
        method=method,
        headers={**headers, "Content-Type": "application/json"},
        body=json.dumps(body).encode(),
        expect_errors=True,
    )


@pytest.mark.parametrize("method, path, permission, body, status, answer", OPERATION_CASES)
def test_app_credentials_api_key_without_the_permission_is_403(
    client, user, db, method, path, permission, body, status, answer
):
    unrelated = "user.read" if permission == "server.about" else "server.about"
    secret, key = make_key(client, user.headers, [unrelated, "store.own", "authDevice.delete"])
    before = app_state(db)
    response = call_operation(client, db, user, api_key_headers(secret), key, method, path, body)
    assert_app_error(response, 403, f"Missing required permission: {permission}")
    assert app_state(db) == before


@pytest.mark.parametrize("method, path, permission, body, status, answer", OPERATION_CASES)
def test_app_credentials_api_key_with_the_permission_passes(
    client, user, db, method, path, permission, body, status, answer
):
    secret, key = make_key(client, user.headers, [permission])
    response = call_operation(client, db, user, api_key_headers(secret), key, method, path, body)
    assert response.status_int == status
    if status == 400:
        assert_app_error(response, status, answer)
    elif status == 204:
        assert response.body == b"" and response.headers["x-immich-cid"]
    else:
        assert_schema(response, answer)


def test_app_credentials_api_key_with_all_passes_every_operation(client, user, db):
    user_id = my_user(client, user.headers)["id"]
    session_id = session_id_of(db, user.token)
    keys = [make_key(client, user.headers, ["all"]) for _ in OPERATIONS]
    for (method, path, _, body, status, _), (secret, key) in zip(OPERATIONS, keys, strict=True):
        path = path.format(key=key["id"], session=session_id, user=user_id)
        response = client.request(
            path,
            method=method,
            headers={**api_key_headers(secret), "Content-Type": "application/json"},
            body=b"" if body is None else json.dumps(body).encode(),
            expect_errors=True,
        )
        if path == f"/api/sessions/{session_id}":
            status = 400  # The change of password with the key ended every session.
        assert response.status_int == status, (method, path, response.json)


@pytest.mark.parametrize(
    "method, path", [("POST", "/api/auth/validateToken"), ("GET", "/api/api-keys/me")]
)
def test_app_credentials_any_permission_passes_any_credential_operations(
    client, user, method, path
):
    secret, _ = make_key(client, user.headers, ["authDevice.delete"])
    client.request(path, method=method, headers=api_key_headers(secret), status=200)


def test_app_credentials_inert_permissions_are_stored_but_grant_nothing(client, user, db):
    inert = [
        "authDevice.delete", "session.update", "systemMetadata.read", "systemMetadata.update",
        "adminUser.create", "adminUser.read", "adminUser.update", "adminUser.delete",
    ]  # fmt: skip
    secret, key = make_key(client, user.headers, inert)
    assert key["permissions"] == inert
    before = app_state(db)
    for method, path, needed, body, *_ in OPERATIONS:
        response = call_operation(
            client, db, user, api_key_headers(secret), key, method, path, body
        )
        assert_app_error(response, 403, f"Missing required permission: {needed}")
    assert app_state(db) == before


# ==================================================================================================
# App API: auth
# ==================================================================================================


def test_app_auth_login_answers_login_response_and_session(client, user, other, db):
    response = client.post_json("/api/auth/login", {"email": " ALICE ", "password": PASSWORD})
    assert response.status_int == 201
    body = assert_schema(response, "LoginResponseDto")
    me = my_user(client, user.headers)
    assert body == {
        "accessToken": body["accessToken"],
        "userId": me["id"],
        "userEmail": "alice",
        "name": "alice",
        "isAdmin": True,
        "shouldChangePassword": False,
    }
    assert len(body["accessToken"]) >= 43
    stored = db.execute(
        "SELECT users.name, sessions.expires_ms, sessions.created_ms FROM sessions "
        "JOIN users ON users.id = sessions.user_id WHERE token_digest = ?",
        (token_digest(body["accessToken"]),),
    ).fetchone()
    assert stored == ("alice", 1_800_000_000_000 + 30 * 86400 * 1000, 1_800_000_000_000)
    client.reset()
    bob = app_login(client, "bob").json
    assert (bob["isAdmin"], bob["userEmail"], bob["name"]) == (False, "bob", "bob")


def test_app_auth_login_sets_three_cookies_in_order(make_app, clock):
    client = webtest.TestApp(make_app(session_ttl=3600))
    client.post_json("/account", {"id": "alice", "password": PASSWORD})
    response = app_login(client, status=201)
    token = response.json["accessToken"]
    attributes = "Max-Age=3600; Path=/; Expires=Fri, 15 Jan 2027 09:00:00 GMT"
    assert response.headers.getall("Set-Cookie") == [
        f"immich_access_token={token}; {attributes}; HttpOnly; SameSite=Lax",
        f"immich_auth_type=password; {attributes}; HttpOnly; SameSite=Lax",
        f"immich_is_authenticated=true; {attributes}; SameSite=Lax",
    ]


def test_app_auth_login_cookies_are_secure_over_https(client, user):
    response = client.post_json(
        "/api/auth/login",
        {"email": "alice", "password": PASSWORD},
        extra_environ={"wsgi.url_scheme": "https"},
    )
    cookies = response.headers.getall("Set-Cookie")
    assert len(cookies) == 3
    assert all(cookie.endswith("; SameSite=Lax; Secure") for cookie in cookies)
    assert all("Max-Age=2592000; Path=/; " in cookie for cookie in cookies)


def test_app_auth_login_cookie_path_is_the_mount_prefix(app, client, user):
    sync = mounted(app)
    response = sync.post_json("/sync/api/auth/login", {"email": "alice", "password": PASSWORD})
    cookies = response.headers.getall("Set-Cookie")
    assert [cookie.split("; ")[2] for cookie in cookies] == ["Path=/sync"] * 3
    sync.reset()
    response = sync.post("/sync/api/auth/logout", headers=user.headers)
    assert response.headers.getall("Set-Cookie") == [
        f"{name}=; Path=/sync; Expires=Thu, 01 Jan 1970 00:00:00 GMT"
        for name in ("immich_access_token", "immich_auth_type", "immich_is_authenticated")
    ]


def test_app_auth_login_cookie_authenticates_later_requests(client, user):
    token = app_login(client).json["accessToken"]
    headers = {"Cookie": f"immich_access_token={token}; immich_is_authenticated=true"}
    assert client.post("/api/auth/validateToken", headers=headers).json == {"authStatus": True}


def test_app_auth_login_reads_no_credentials(client, user):
    headers = {"Authorization": "Bearer unknown", "x-immich-share-key": "k"}
    client.post_json(
        "/api/auth/login", {"email": "alice", "password": PASSWORD}, headers=headers, status=201
    )


@pytest.mark.parametrize(
    "body, messages",
    [
        pytest.param({}, LOGIN_EMPTY, id="empty"),
        pytest.param({"email": None, "password": None}, LOGIN_EMPTY, id="nulls"),
        pytest.param(
            {"email": "", "password": PASSWORD},
            ["email should not be empty", "email must be an email"],
            id="email-empty",
        ),
        pytest.param(
            {"email": 5, "password": PASSWORD}, ["email must be an email"], id="email-number"
        ),
        pytest.param(
            {"email": [], "password": PASSWORD}, ["email must be an email"], id="email-array"
        ),
        pytest.param(
            {"email": {}, "password": PASSWORD}, ["email must be an email"], id="email-object"
        ),
        pytest.param(
            {"email": "a b", "password": PASSWORD}, ["email must be an email"], id="email-space"
        ),
        pytest.param(
            {"email": "x" * 255, "password": PASSWORD}, ["email must be an email"], id="email-255"
        ),
        pytest.param(
            {"email": "alice", "password": ""},
            ["password should not be empty"],
            id="password-empty",
        ),
        pytest.param(
            {"email": "alice", "password": 5}, ["password must be a string"], id="password-number"
        ),
        pytest.param(
            {"email": "alice", "password": False}, ["password must be a string"], id="password-bool"
        ),
        pytest.param(
            {"email": "alice"},
            ["password should not be empty", "password must be a string"],
            id="no-password",
        ),
        pytest.param(
            {"email": 5, "password": 5},
            ["email must be an email", "password must be a string"],
            id="both-wrong-types",
        ),
    ],
)
def test_app_auth_login_bad_body_is_400_with_sentences(client, user, db, body, messages):
    before = app_state(db)
    response = client.post_json("/api/auth/login", body, status=400)
    assert_app_error(response, 400, messages)
    assert app_state(db) == before
    assert "Set-Cookie" not in response.headers


def test_app_auth_login_wrong_credentials_are_401(client, user, db):
    before = app_state(db)
    for login_id, password in [
        ("alice", "wrong password"), ("alice", "x"), ("alice", "p" * 5000), ("nobody", PASSWORD),
    ]:  # fmt: skip
        response = app_login(client, login_id, password, status=401)
        assert_app_error(response, 401, "Incorrect email or password")
        assert "Set-Cookie" not in response.headers
    assert app_state(db) == before


def test_app_auth_login_failures_count_for_the_sync_node_api(make_app, db):
    client = webtest.TestApp(make_app(login_fails_per_id=2, login_window=900))
    client.post_json("/account", {"id": "alice", "password": PASSWORD})
    for _ in range(2):
        app_login(client, "alice", "wrong password", status=401)
    response = client.post_json("/auth", {"id": "alice", "password": PASSWORD}, status=429)
    assert_error(response, 429, "AUTH02")
    response = app_login(client, "alice", PASSWORD, status=429)
    assert_app_error(response, 429, "Too many failed attempts, try again later")
    assert response.headers["Retry-After"].isdigit()
    assert 0 < int(response.headers["Retry-After"]) <= 900
    assert table_counts(db)["sessions"] == 1


def test_app_auth_sync_node_failures_count_for_login(make_app, clock):
    client = webtest.TestApp(make_app(login_fails_per_id=2, login_window=900))
    client.post_json("/account", {"id": "alice", "password": PASSWORD})
    for _ in range(2):
        client.post_json("/auth", {"id": "alice", "password": "wrong password"}, status=401)
    clock.advance(100)
    response = app_login(client, "alice", PASSWORD, status=429)
    assert_app_error(response, 429, "Too many failed attempts, try again later")
    assert response.headers["Retry-After"] == "800"
    assert "Set-Cookie" not in response.headers
    assert_app_error(
        app_login(client, "alice", "", status=400), 400, ["password should not be empty"]
    )
    clock.advance(800)
    app_login(client, "alice", PASSWORD, status=201)


def test_app_auth_admin_sign_up_makes_the_first_account_admin(client, db):
    body = {"email": " Admin@Example.org ", "password": PASSWORD, "name": "The Admin"}
    response = client.post_json("/api/auth/admin-sign-up", body)
    assert response.status_int == 201
    admin = assert_schema(response, "UserAdminResponseDto")
    assert admin == {
        "id": admin["id"],
        "name": "The Admin",
        "email": "admin@example.org",
        "shouldChangePassword": False,
        "isAdmin": True,
        "createdAt": CLOCK_START,
        "deletedAt": None,
        "updatedAt": CLOCK_START,
        "status": "active",
    }
    assert "Set-Cookie" not in response.headers
    assert table_counts(db)["sessions"] == 0
    client.post_json("/auth", {"id": "admin@example.org", "password": PASSWORD}, status=200)
    assert app_login(client, "ADMIN@example.org").json["userId"] == admin["id"]


def test_busy_hashing_leaves_the_threads_long_polls_hold_to_others(start_server):
    # Under another server two polls may hold threads; hashing may take what is left but one.
    server = start_server(threads=4, plain=True)
    alice = server.register("alice")
    cursor = server.request("GET", "/store", headers=alice.headers).headers["X-Sync-Seq"]
    polls = [LongPoll(server, alice.headers, f"/store?since={cursor}&wait=10") for _ in range(2)]
    wait_for_waiters(server, 2)
    with server.app.context.hashing.slot():  # one hashes: no thread is left for another
        body = json.dumps({"id": "alice", "password": PASSWORD}).encode()
        refused = server.request("POST", "/auth", body, JSON)
        assert refused.status_int == 503, refused.body
        assert json.loads(refused.body)["code"] == "BUSY01"
    server.request("PUT", "/store/k", b"v", alice.headers)
    for poll in polls:
        assert poll.result().status_int == 200


def test_parked_long_polls_leave_every_thread_to_hashing(start_server):
    server = start_server(threads=4)  # syncnode's own server: waiting polls hold no thread
    alice = server.register("alice")
    cursor = server.request("GET", "/store", headers=alice.headers).headers["X-Sync-Seq"]
    polls = [LongPoll(server, alice.headers, f"/store?since={cursor}&wait=10") for _ in range(3)]
    wait_for_waiters(server, 3)
    assert server.app.context.waiters.holding == 0
    with server.app.context.hashing.slot():  # one hashes: two more may, as with no polls
        body = json.dumps({"id": "alice", "password": PASSWORD}).encode()
        assert server.request("POST", "/auth", body, JSON).status_int == 200
    server.request("PUT", "/store/k", b"v", alice.headers)
    for poll in polls:
        assert [entry["key"] for entry in poll.result().json] == ["k"]


def test_reset_request_token_is_made_by_the_server_after_the_answer(start_server, db):
    server = start_server()
    server.register("alice")
    clients = Clients(server)
    try:
        sock = clients.open()
        body = b'{"id": "alice"}'
        sock.sendall(raw_request("POST", "/resetpassword", {**JSON, "Content-Length": "15"}))
        sock.sendall(body)
        assert read_answer(sock, timeout=5.0).status == 204
    finally:
        clients.close()  # the client leaves at once; the server's work goes on
    deadline = time.monotonic() + 5
    while not db.execute("SELECT count(*) FROM reset_tokens").fetchone()[0]:
        assert time.monotonic() < deadline, "no reset token was made"
        time.sleep(0.02)


def test_invite_by_an_account_deleted_meanwhile_is_auth01(client, user, monkeypatch):
    monkeypatch.setattr(syncnode, "get_user", lambda conn, **kw: None)
    assert_error(client.post("/invite", headers=user.headers, status=401), 401, "AUTH01")


def test_app_auth_admin_sign_up_busy_hashing_is_503_not_400(make_app, db):
    app = make_app(hash_slots=1, hash_wait=1)
    client = webtest.TestApp(app)
    with app.context.hashing.slot():
        body = {"email": "admin", "password": PASSWORD, "name": "Admin"}
        response = client.post_json("/api/auth/admin-sign-up", body, status=503)
    assert (response.json["error"], response.json["statusCode"]) == ("Service Unavailable", 503)
    assert int(response.headers["Retry-After"]) >= 1
    assert table_counts(db)["users"] == 0


def test_app_auth_admin_sign_up_second_time_is_400(client, db):
    client.post_json("/api/auth/admin-sign-up", {"email": "a", "password": PASSWORD, "name": "A"})
    before = app_state(db)
    body = {"email": "b", "password": PASSWORD, "name": "B"}
    response = client.post_json("/api/auth/admin-sign-up", body, status=400)
    assert_app_error(response, 400, "The server already has an admin")
    assert app_state(db) == before


def test_app_auth_admin_sign_up_after_sync_node_registration_is_400(client, user, db):
    before = app_state(db)
    body = {"email": "admin", "password": PASSWORD, "name": "Admin"}
    response = client.post_json("/api/auth/admin-sign-up", body, status=400)
    assert_app_error(response, 400, "The server already has an admin")
    assert app_state(db) == before
    assert my_user(client, user.headers)["isAdmin"] is True


@pytest.mark.sqlite
def test_app_auth_admin_sign_up_low_disk_is_507(make_app, db):
    client = webtest.TestApp(make_app(min_free_bytes=2**62))
    body = {"email": "admin", "password": PASSWORD, "name": "Admin"}
    response = client.post_json("/api/auth/admin-sign-up", body, status=507)
    assert_app_error(response, 507, "Insufficient storage")
    assert table_counts(db)["users"] == 0


SIGN_UP_EMPTY = ["name should not be empty", "name must be a string", *LOGIN_EMPTY]


@pytest.mark.parametrize(
    "body, messages",
    [
        pytest.param({}, SIGN_UP_EMPTY, id="empty"),
        pytest.param({"email": None, "password": None, "name": None}, SIGN_UP_EMPTY, id="nulls"),
        pytest.param(
            {"email": "a", "password": PASSWORD, "name": ""},
            ["name should not be empty"],
            id="name-empty",
        ),
        pytest.param(
            {"email": "a", "password": PASSWORD, "name": 5},
            ["name must be a string"],
            id="name-number",
        ),
        pytest.param(
            {"email": "a", "password": PASSWORD, "name": "n" * 256},
            ["name must be shorter than or equal to 255 characters"],
            id="name-256",
        ),
        pytest.param(
            {"email": "a", "password": PASSWORD, "name": "a\x00b"},
            ["name must not contain control characters"],
            id="name-nul",
        ),
        pytest.param(
            {"email": "a b", "password": PASSWORD, "name": "A"},
            ["email must be an email"],
            id="email-space",
        ),
        pytest.param(
            {"email": "", "password": PASSWORD, "name": "A"},
            ["email should not be empty", "email must be an email"],
            id="email-empty",
        ),
        pytest.param(
            {"email": "a", "password": "short", "name": "A"},
            ["password must be longer than or equal to 8 characters"],
            id="password-5",
        ),
        pytest.param(
            {"email": "a", "password": "p" * 1025, "name": "A"},
            ["password must be shorter than or equal to 1024 characters"],
            id="password-1025",
        ),
        pytest.param(
            {"email": "a", "password": "", "name": "A"},
            ["password should not be empty"],
            id="password-empty",
        ),
        pytest.param(
            {"email": "a", "password": 12345678, "name": "A"},
            ["password must be a string"],
            id="password-number",
        ),
        pytest.param(
            {"email": 5, "password": 5, "name": 5},
            ["name must be a string", "email must be an email", "password must be a string"],
            id="all-numbers",
        ),
    ],
)
def test_app_auth_admin_sign_up_bad_body_is_400_with_sentences(client, db, body, messages):
    response = client.post_json("/api/auth/admin-sign-up", body, status=400)
    assert_app_error(response, 400, messages)
    assert table_counts(db)["users"] == 0


def test_app_auth_admin_sign_up_edge_lengths_are_accepted(client, db):
    body = {"email": "x" * 254, "password": "p" * 8, "name": "n" * 255}
    admin = client.post_json("/api/auth/admin-sign-up", body, status=201).json
    assert (admin["email"], admin["name"]) == ("x" * 254, "n" * 255)


def test_app_auth_validate_token_answers_true(client, user):
    secret, _ = make_key(client, user.headers, ["server.about"])
    for headers in (
        user.headers,
        api_key_headers(secret),
        {"Cookie": f"immich_access_token={user.token}"},
    ):
        response = client.post("/api/auth/validateToken", headers=headers)
        assert response.status_int == 200
        assert assert_schema(response, "ValidateAccessTokenResponseDto") == {"authStatus": True}


def test_app_auth_validate_token_bad_credentials_are_401(client, user):
    for headers, message in [
        ({}, "Authentication required"),
        ({"Authorization": "Bearer unknown"}, "Invalid user token"),
        ({"x-api-key": "unknown"}, "Invalid API key"),
    ]:
        response = client.post("/api/auth/validateToken", headers=headers, status=401)
        assert_app_error(response, 401, message)


def change_password(client, headers: dict, password: str = PASSWORD, **kw):
    """POST /api/auth/change-password to APP_NEW_PASSWORD; return the response."""
    body = {"password": password, "newPassword": APP_NEW_PASSWORD, **kw.pop("body", {})}
    return client.post_json("/api/auth/change-password", body, headers=headers, **kw)


def test_app_auth_change_password_sets_it_and_answers_the_user(client, user, clock, db):
    old_hash = db.execute("SELECT password_hash FROM users").fetchone()[0]
    clock.advance(61.5)
    response = change_password(client, user.headers)
    assert response.status_int == 200
    me = assert_schema(response, "UserAdminResponseDto")
    assert me["updatedAt"] == "2027-01-15T08:01:01.500Z"
    assert me["createdAt"] == CLOCK_START
    assert db.execute("SELECT password_hash FROM users").fetchone()[0] != old_hash
    assert_app_error(
        app_login(client, "alice", PASSWORD, status=401), 401, "Incorrect email or password"
    )
    app_login(client, "alice", APP_NEW_PASSWORD, status=201)
    client.post_json("/auth", {"id": "alice", "password": APP_NEW_PASSWORD}, status=200)


@pytest.mark.parametrize(
    "flag",
    [
        pytest.param(False, id="false"),
        pytest.param(True, id="true"),
    ],
)
def test_app_auth_change_password_revokes_other_sessions_and_children(
    client, user, other, db, flag
):
    current = app_login(client).json["accessToken"]
    own_child = make_child(client, bearer_headers(current))["token"]
    other_child = make_child(client, user.headers)["token"]
    grandchild = make_child(client, bearer_headers(other_child))["token"]
    secret, _ = make_key(client, user.headers, ["user.read"])
    body = {"invalidateSessions": flag}
    change_password(client, bearer_headers(current), body=body, status=200)
    for token in (user.token, own_child, other_child, grandchild):
        response = client.get("/api/users/me", headers=bearer_headers(token), status=401)
        assert_app_error(response, 401, "Invalid user token")
    client.get("/api/users/me", headers=bearer_headers(current), status=200)
    client.get("/api/users/me", headers=api_key_headers(secret), status=200)
    client.get("/api/users/me", headers=other.headers, status=200)
    digests = {row[0] for row in db.execute("SELECT token_digest FROM sessions")}
    assert digests == {token_digest(current), token_digest(other.token)}


def test_app_auth_change_password_from_a_child_keeps_only_that_child(client, user, db):
    child = make_child(client, user.headers)["token"]
    change_password(client, bearer_headers(child), status=200)
    assert_app_error(
        client.get("/api/users/me", headers=user.headers, status=401), 401, "Invalid user token"
    )
    client.get("/api/users/me", headers=bearer_headers(child), status=200)
    assert table_counts(db)["sessions"] == 1


def test_app_auth_change_password_with_api_key_revokes_every_session(client, user, db):
    secret, _ = make_key(client, user.headers, ["auth.changePassword", "user.read"])
    make_child(client, user.headers)
    change_password(client, api_key_headers(secret), status=200)
    assert table_counts(db)["sessions"] == 0
    client.get("/api/users/me", headers=api_key_headers(secret), status=200)
    app_login(client, "alice", APP_NEW_PASSWORD, status=201)


def test_app_auth_change_password_deletes_a_pending_reset_token(client, user, db, caplog):
    request_reset(client, caplog)
    assert table_counts(db)["reset_tokens"] == 1
    change_password(client, user.headers, status=200)
    assert table_counts(db)["reset_tokens"] == 0


def test_app_auth_change_password_wrong_password_is_400(client, user, db):
    make_child(client, user.headers)
    before = app_state(db)
    response = change_password(client, user.headers, "wrong password", status=400)
    assert_app_error(response, 400, "Wrong password")
    assert app_state(db) == before


def test_app_auth_change_password_wrong_password_counts_toward_the_limit(make_app, db):
    client = webtest.TestApp(make_app(login_fails_per_id=2))
    token = client.post_json("/account", {"id": "alice", "password": PASSWORD}).json["token"]
    for _ in range(2):
        change_password(client, bearer_headers(token), "wrong password", status=400)
    before = app_state(db)
    response = change_password(client, bearer_headers(token), status=429)
    assert_app_error(response, 429, "Too many failed attempts, try again later")
    assert response.headers["Retry-After"].isdigit()
    assert app_state(db) == before
    assert_app_error(
        app_login(client, status=429), 429, "Too many failed attempts, try again later"
    )
    assert_error(
        client.post_json("/auth", {"id": "alice", "password": PASSWORD}, status=429), 429, "AUTH02"
    )


CHANGE_EMPTY = [
    "password should not be empty",
    "password must be a string",
    "newPassword must be longer than or equal to 8 characters",
    "newPassword should not be empty",
    "newPassword must be a string",
]


@pytest.mark.parametrize(
    "body, messages",
    [
        pytest.param({}, CHANGE_EMPTY, id="empty"),
        pytest.param(
            {"password": None, "newPassword": None, "invalidateSessions": None},
            CHANGE_EMPTY,
            id="nulls",
        ),
        pytest.param(
            {"password": "", "newPassword": ""},
            [
                "password should not be empty",
                "newPassword must be longer than or equal to 8 characters",
                "newPassword should not be empty",
            ],
            id="empty-strings",
        ),
        pytest.param(
            {"password": 1, "newPassword": 1, "invalidateSessions": 1},
            [
                "password must be a string",
                "newPassword must be longer than or equal to 8 characters",
                "newPassword must be a string",
                "invalidateSessions must be a boolean value",
            ],
            id="numbers",
        ),
        pytest.param(
            {"password": PASSWORD, "newPassword": "short"},
            ["newPassword must be longer than or equal to 8 characters"],
            id="new-5",
        ),
        pytest.param(
            {"password": PASSWORD, "newPassword": list(range(1, 9))},
            [
                "newPassword must be longer than or equal to 8 characters",
                "newPassword must be a string",
            ],
            id="new-array",
        ),
        pytest.param(
            {"password": PASSWORD, "newPassword": "p" * 1025},
            ["newPassword must be shorter than or equal to 1024 characters"],
            id="new-1025",
        ),
        pytest.param(
            {"password": PASSWORD, "newPassword": APP_NEW_PASSWORD, "invalidateSessions": "yes"},
            ["invalidateSessions must be a boolean value"],
            id="flag-yes",
        ),
        pytest.param(
            {"password": PASSWORD, "newPassword": APP_NEW_PASSWORD, "invalidateSessions": "true"},
            ["invalidateSessions must be a boolean value"],
            id="flag-string-true",
        ),
        pytest.param(
            {"newPassword": APP_NEW_PASSWORD},
            ["password should not be empty", "password must be a string"],
            id="no-password",
        ),
    ],
)
def test_app_auth_change_password_bad_body_is_400_with_sentences(client, user, db, body, messages):
    before = app_state(db)
    response = client.post_json("/api/auth/change-password", body, headers=user.headers, status=400)
    assert_app_error(response, 400, messages)
    assert app_state(db) == before


@pytest.mark.parametrize(
    "new_password",
    [
        pytest.param("p" * 8, id="8"),
        pytest.param("p" * 1024, id="1024"),
    ],
)
def test_app_auth_change_password_edge_lengths_are_accepted(client, user, new_password):
    body = {"password": PASSWORD, "newPassword": new_password}
    client.post_json("/api/auth/change-password", body, headers=user.headers, status=200)
    app_login(client, "alice", new_password, status=201)


def test_app_auth_logout_ends_the_session_and_its_children(client, user, db):
    current = app_login(client).json["accessToken"]
    child = make_child(client, bearer_headers(current))["token"]
    grandchild = make_child(client, bearer_headers(child))["token"]
    response = client.post("/api/auth/logout", headers=bearer_headers(current))
    assert response.status_int == 200
    body = assert_schema(response, "LogoutResponseDto")
    assert body == {"successful": True, "redirectUri": "/auth/login?autoLaunch=0"}
    assert response.headers.getall("Set-Cookie") == [
        f"{name}=; Path=/; Expires=Thu, 01 Jan 1970 00:00:00 GMT"
        for name in ("immich_access_token", "immich_auth_type", "immich_is_authenticated")
    ]
    for token in (current, child, grandchild):
        response = client.get("/api/users/me", headers=bearer_headers(token), status=401)
        assert_app_error(response, 401, "Invalid user token")
    client.get("/store", headers=user.headers, status=200)
    assert table_counts(db)["sessions"] == 1


def test_app_auth_logout_by_cookie(client, user, db):
    client.post("/api/auth/logout", headers={"Cookie": f"immich_access_token={user.token}"})
    assert table_counts(db)["sessions"] == 0


def test_app_auth_logout_with_api_key_ends_nothing(client, user, db):
    secret, _ = make_key(client, user.headers)
    before = app_state(db)
    response = client.post("/api/auth/logout", headers=api_key_headers(secret))
    assert assert_schema(response, "LogoutResponseDto") == {
        "successful": True,
        "redirectUri": "/auth/login?autoLaunch=0",
    }
    assert len(response.headers.getall("Set-Cookie")) == 3
    assert app_state(db) == before
    client.get("/api/users/me", headers=api_key_headers(secret), status=200)


def test_app_auth_logout_without_credentials_is_401(client, user):
    response = client.post("/api/auth/logout", status=401)
    assert_app_error(response, 401, "Authentication required")
    assert "Set-Cookie" not in response.headers


def assert_app_refusal(response, status: int) -> None:
    """Assert Immich's error layout without its wording: keys in order, reason, status, cid."""
    assert response.status_int == status
    assert response.headers["Content-Type"] == APP_JSON
    body = response.json
    assert list(body) == ["message", "error", "statusCode", "correlationId"]
    assert body["error"] == {400: "Bad Request", 403: "Forbidden"}[status]
    assert body["statusCode"] == status
    assert body["correlationId"] == response.headers["x-immich-cid"]
    assert body["message"]


# Invisible characters in ids ----------------------------------------------------------------------


@pytest.mark.parametrize("char", INVISIBLE)
def test_app_auth_admin_sign_up_invisible_format_character_is_400(client, db, char):
    body = {"email": f"ali{char}ce@example.org", "password": PASSWORD, "name": "Alice"}
    response = client.post_json("/api/auth/admin-sign-up", body, status=400)
    assert_app_refusal(response, 400)
    assert "email must be an email" in response.json["message"]
    assert table_counts(db)["users"] == 0


def test_app_auth_admin_sign_up_ordinary_non_ascii_letters_are_accepted(client, db):
    body = {"email": "zoë@example.org", "password": PASSWORD, "name": "Zoë"}
    response = client.post_json("/api/auth/admin-sign-up", body, status=201)
    assert response.json["email"] == "zoë@example.org"


# Admin sign-up follows the registration setting ---------------------------------------------------


ADMIN = {"email": "admin", "password": PASSWORD, "name": "Admin"}


def test_app_auth_admin_sign_up_closed_registration_is_403(make_app, db):
    client = webtest.TestApp(make_app(registration="closed"))
    response = client.post_json("/api/auth/admin-sign-up", ADMIN, status=403)
    assert_app_refusal(response, 403)
    assert table_counts(db)["users"] == 0


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({}, id="no-invite"),
        pytest.param({"invite": "wrong"}, id="wrong"),
        pytest.param({"invite": ""}, id="empty"),
    ],
)
def test_app_auth_admin_sign_up_without_a_valid_invite_is_403(make_app, clock, db, fields):
    client = webtest.TestApp(make_app(registration="invite"))
    syncnode.create_invite(db, now_ms(clock), 3600_000)
    response = client.post_json("/api/auth/admin-sign-up", {**ADMIN, **fields}, status=403)
    assert_app_refusal(response, 403)
    assert table_counts(db)["users"] == 0
    assert table_counts(db)["invites"] == 1


def test_app_auth_admin_sign_up_with_a_valid_invite_spends_it(make_app, clock, db):
    client = webtest.TestApp(make_app(registration="invite"))
    code, _ = syncnode.create_invite(db, now_ms(clock), 3600_000)
    response = client.post_json("/api/auth/admin-sign-up", {**ADMIN, "invite": code}, status=201)
    assert response.json["isAdmin"] is True
    assert table_counts(db)["invites"] == 0
    again = client.post_json("/account", {"id": "bob", "password": PASSWORD, "invite": code},
                             status=403)  # fmt: skip
    assert_error(again, 403, "ACCT01")


def test_app_auth_admin_sign_up_open_registration_works_once(client, db):
    client.post_json("/api/auth/admin-sign-up", ADMIN, status=201)
    body = {**ADMIN, "email": "second"}
    response = client.post_json("/api/auth/admin-sign-up", body, status=400)
    assert_app_refusal(response, 400)
    assert table_counts(db)["users"] == 1


# ==================================================================================================
# App API: API keys
# ==================================================================================================


def test_app_keys_create_shows_the_secret_once_and_stores_its_digest(client, user, db):
    response = client.post_json(
        "/api/api-keys", {"name": "CLI", "permissions": ["user.read"]}, headers=user.headers
    )
    assert response.status_int == 201
    body = assert_schema(response, "APIKeyCreateResponseDto")
    secret, key = body["secret"], body["apiKey"]
    assert key == {
        "id": key["id"],
        "name": "CLI",
        "createdAt": CLOCK_START,
        "updatedAt": CLOCK_START,
        "permissions": ["user.read"],
    }
    assert len(secret) >= 43 and re.fullmatch(r"[A-Za-z0-9_-]+", secret)
    rows = db.execute("SELECT * FROM api_keys").fetchall()
    assert len(rows) == 1 and secret not in repr(rows)
    stored = db.execute("SELECT public_id, secret_digest FROM api_keys").fetchone()
    assert stored == (key["id"], token_digest(secret))
    listed = client.get("/api/api-keys", headers=user.headers).json
    assert secret not in json.dumps(listed)
    assert client.get("/api/users/me", headers=api_key_headers(secret)).json["email"] == "alice"


def test_app_keys_create_secrets_differ(client, user):
    secrets = {make_key(client, user.headers)[0] for _ in range(3)}
    assert len(secrets) == 3


def test_app_keys_create_defaults_and_deduplicates(client, user):
    for fields, name, permissions in [
        ({"permissions": ["all"]}, "API Key", ["all"]),
        ({"name": None, "permissions": ["all"]}, "API Key", ["all"]),
        ({"name": "n" * 255, "permissions": ["all"]}, "n" * 255, ["all"]),
        ({"permissions": ["user.read", "all", "user.read", "all"]}, "API Key",
         ["user.read", "all"]),
        ({"permissions": SERVED_PERMISSIONS[::-1]}, "API Key", SERVED_PERMISSIONS[::-1]),
    ]:  # fmt: skip
        response = client.post_json("/api/api-keys", fields, headers=user.headers, status=201)
        key = assert_schema(response, "APIKeyCreateResponseDto")["apiKey"]
        assert (key["name"], key["permissions"]) == (name, permissions)
        assert client.get(f"/api/api-keys/{key['id']}", headers=user.headers).json == key


ENUM_SENTENCE = "each value in permissions must be one of the following values: " + ", ".join(
    SERVED_PERMISSIONS
)

KEY_CREATE_EMPTY = [
    "permissions must contain at least 1 elements",
    "permissions should not be empty",
    ENUM_SENTENCE,
]


@pytest.mark.parametrize(
    "body, messages",
    [
        pytest.param({}, KEY_CREATE_EMPTY, id="empty"),
        pytest.param({"permissions": None}, KEY_CREATE_EMPTY, id="null-permissions"),
        pytest.param(
            {"name": "", "permissions": []},
            ["name should not be empty", "permissions must contain at least 1 elements"],
            id="empty-name-and-list",
        ),
        pytest.param(
            {"name": 5, "permissions": "all"},
            ["name must be a string", "permissions must contain at least 1 elements"],
            id="number-name-string-permission",
        ),
        pytest.param(
            {"permissions": {}},
            ["permissions must contain at least 1 elements", ENUM_SENTENCE],
            id="object",
        ),
        pytest.param(
            {"permissions": "bogus"},
            ["permissions must contain at least 1 elements", ENUM_SENTENCE],
            id="bogus-string",
        ),
        pytest.param({"permissions": ["all", "bogus"]}, [ENUM_SENTENCE], id="one-bogus"),
        pytest.param({"permissions": [5]}, [ENUM_SENTENCE], id="number"),
        pytest.param({"permissions": ["asset.read"]}, [ENUM_SENTENCE], id="immich-only-value"),
        pytest.param(
            {"name": "n" * 256, "permissions": ["all"]},
            ["name must be shorter than or equal to 255 characters"],
            id="name-256",
        ),
        pytest.param(
            {"name": "a\nb", "permissions": ["all"]},
            ["name must not contain control characters"],
            id="name-newline",
        ),
    ],
)
def test_app_keys_create_bad_body_is_400_with_sentences(client, user, db, body, messages):
    before = app_state(db)
    response = client.post_json("/api/api-keys", body, headers=user.headers, status=400)
    assert_app_error(response, 400, messages)
    assert app_state(db) == before


@pytest.mark.parametrize(
    "holds, asks",
    [
        pytest.param(["apiKey.create", "user.read"], ["server.about"], id="other"),
        pytest.param(["apiKey.create", "user.read"], ["all"], id="all"),
        pytest.param(["apiKey.create", "store.read"], ["store.write"], id="read-to-write"),
        pytest.param(["apiKey.create", "store.write"], ["store.own"], id="write-to-own"),
    ],
)
def test_app_keys_create_narrower_key_cannot_grant_more(client, user, db, holds, asks):
    secret, _ = make_key(client, user.headers, holds)
    before = app_state(db)
    response = client.post_json(
        "/api/api-keys", {"permissions": asks}, headers=api_key_headers(secret), status=400
    )
    assert_app_error(response, 400, "Cannot grant permissions you do not have")
    assert app_state(db) == before


def test_app_keys_create_key_may_grant_what_it_holds(client, user):
    for holds, asks in [
        (["apiKey.create", "user.read"], ["apiKey.create", "user.read", "user.read"]),
        (["apiKey.create", "store.own"], ["store.read", "store.write", "store.own"]),
        (["apiKey.create", "store.write"], ["store.read"]),
        (["all"], ["all", "adminUser.delete", "store.own"]),
    ]:
        secret, _ = make_key(client, user.headers, holds)
        response = client.post_json(
            "/api/api-keys", {"permissions": asks}, headers=api_key_headers(secret), status=201
        )
        key = assert_schema(response, "APIKeyCreateResponseDto")["apiKey"]
        assert key["permissions"] == list(dict.fromkeys(asks))


def test_app_keys_list_is_newest_first_and_only_own(client, user, other, clock):
    created = []
    for name in ("first", "second", "third"):
        created.append(make_key(client, user.headers, name=name)[1])
        clock.advance(1)
    make_key(client, other.headers, name="bobs")
    response = client.get("/api/api-keys", headers=user.headers)
    listing = assert_schema(response, ["APIKeyResponseDto"])
    assert listing == created[::-1]
    assert [key["name"] for key in client.get("/api/api-keys", headers=other.headers).json] == [
        "bobs"
    ]


def test_app_keys_list_is_empty_without_keys(client, user):
    assert (
        assert_schema(client.get("/api/api-keys", headers=user.headers), ["APIKeyResponseDto"])
        == []
    )


def test_app_keys_me_answers_the_key_in_use(client, user):
    secret, key = make_key(client, user.headers, ["server.about"], name="mine")
    make_key(client, user.headers, name="another")
    for query, headers in [("", api_key_headers(secret)), (f"?apiKey={secret}", {})]:
        response = client.get("/api/api-keys/me" + query, headers=headers)
        assert assert_schema(response, "APIKeyResponseDto") == key


def test_app_keys_me_with_a_session_is_403(client, user):
    response = client.get("/api/api-keys/me", headers=user.headers, status=403)
    assert_app_error(response, 403, "Not authenticated with an API Key")


def test_app_keys_me_without_credentials_is_401(client, user):
    assert_app_error(client.get("/api/api-keys/me", status=401), 401, "Authentication required")


def test_app_keys_get_answers_own_key_by_any_case_of_its_id(client, user):
    _, key = make_key(client, user.headers, ["user.read"])
    for key_id in (key["id"], key["id"].upper()):
        response = client.get(f"/api/api-keys/{key_id}", headers=user.headers)
        assert assert_schema(response, "APIKeyResponseDto") == key


def test_app_keys_another_users_or_unknown_key_is_400(client, user, other, db):
    _, bobs = make_key(client, other.headers)
    before = app_state(db)
    for method in ("GET", "PUT", "DELETE"):
        for key_id in (bobs["id"], "7f1a3e4c-9d2b-4c5e-8f6a-1b2c3d4e5f60"):
            response = client.request(
                f"/api/api-keys/{key_id}",
                method=method,
                headers={**user.headers, "Content-Type": "application/json"},
                body=b'{"name": "stolen"}' if method == "PUT" else b"",
                status=400,
            )
            assert_app_error(response, 400, "API Key not found")
    assert app_state(db) == before


@pytest.mark.parametrize(
    "key_id",
    [
        pytest.param("123", id="digits"),
        pytest.param("7f1a3e4c-9d2b-1c5e-8f6a-1b2c3d4e5f60", id="uuid-v1"),
        pytest.param("7f1a3e4c-9d2b-4c5e-cf6a-1b2c3d4e5f60", id="bad-variant"),
        pytest.param("7f1a3e4c9d2b4c5e8f6a1b2c3d4e5f60", id="no-dashes"),
    ],
)
def test_app_keys_bad_id_is_400(client, user, db, key_id):
    before = app_state(db)
    for method in ("GET", "PUT", "DELETE"):
        response = client.request(
            f"/api/api-keys/{key_id}",
            method=method,
            headers={**user.headers, "Content-Type": "application/json"},
            body=b'{"name": "x"}' if method == "PUT" else b"",
            status=400,
        )
        assert_app_error(response, 400, ["id must be a UUID"])
    assert app_state(db) == before


def test_app_keys_update_changes_only_the_fields_sent(client, user, clock):
    _, key = make_key(client, user.headers, ["user.read", "server.about"], name="old")
    clock.advance(5)
    response = client.put_json(f"/api/api-keys/{key['id']}", {"name": "new"}, headers=user.headers)
    renamed = assert_schema(response, "APIKeyResponseDto")
    assert renamed == {**key, "name": "new", "updatedAt": "2027-01-15T08:00:05.000Z"}
    clock.advance(5)
    body = {"permissions": ["user.update", "user.update"], "name": None}
    response = client.put_json(f"/api/api-keys/{key['id']}", body, headers=user.headers)
    assert response.json == {
        **renamed,
        "permissions": ["user.update"],
        "updatedAt": "2027-01-15T08:00:10.000Z",
    }
    assert client.get("/api/api-keys", headers=user.headers).json == [response.json]


def test_app_keys_update_empty_body_changes_no_field(client, user):
    _, key = make_key(client, user.headers, ["user.read"], name="same")
    response = client.put_json(f"/api/api-keys/{key['id']}", {}, headers=user.headers)
    body = assert_schema(response, "APIKeyResponseDto")
    assert (body["name"], body["permissions"], body["createdAt"]) == (
        "same", ["user.read"], key["createdAt"],
    )  # fmt: skip


@pytest.mark.parametrize(
    "body, messages",
    [
        pytest.param({"name": ""}, ["name should not be empty"], id="name-empty"),
        pytest.param({"name": 5}, ["name must be a string"], id="name-number"),
        pytest.param(
            {"name": "n" * 256},
            ["name must be shorter than or equal to 255 characters"],
            id="name-256",
        ),
        pytest.param(
            {"name": "a\x1bb"}, ["name must not contain control characters"], id="name-escape"
        ),
        pytest.param(
            {"permissions": []},
            ["permissions must contain at least 1 elements"],
            id="permissions-empty",
        ),
        pytest.param({"permissions": ["x"]}, [ENUM_SENTENCE], id="permissions-bogus"),
        pytest.param(
            {"permissions": "all"},
            ["permissions must contain at least 1 elements"],
            id="permissions-string",
        ),
        pytest.param(
            {"permissions": {}},
            ["permissions must contain at least 1 elements", ENUM_SENTENCE],
            id="permissions-object",
        ),
        pytest.param(
            {"name": "", "permissions": []},
            ["name should not be empty", "permissions must contain at least 1 elements"],
            id="both",
        ),
    ],
)
def test_app_keys_update_bad_body_is_400_with_sentences(client, user, db, body, messages):
    _, key = make_key(client, user.headers)
    before = app_state(db)
    response = client.put_json(f"/api/api-keys/{key['id']}", body, headers=user.headers, status=400)
    assert_app_error(response, 400, messages)
    assert app_state(db) == before


def test_app_keys_update_narrower_key_cannot_widen_any_key(client, user, db):
    secret, narrow = make_key(client, user.headers, ["apiKey.update", "user.read"])
    _, wide = make_key(client, user.headers, ["all"])
    before = app_state(db)
    for key_id, asks in [(narrow["id"], ["all"]), (narrow["id"], ["server.about"]),
                         (wide["id"], ["all"]), (wide["id"], ["server.about"])]:  # fmt: skip
        response = client.put_json(
            f"/api/api-keys/{key_id}",
            {"permissions": asks},
            headers=api_key_headers(secret),
            status=400,
        )
        assert_app_error(response, 400, "Cannot grant permissions you do not have")
    assert app_state(db) == before


def test_app_keys_update_narrower_key_may_rename_a_wider_one_and_narrow_itself(client, user):
    secret, narrow = make_key(client, user.headers, ["apiKey.update", "user.read"])
    _, wide = make_key(client, user.headers, ["all"])
    response = client.put_json(
        f"/api/api-keys/{wide['id']}", {"name": "renamed"}, headers=api_key_headers(secret)
    )
    assert (response.json["name"], response.json["permissions"]) == ("renamed", ["all"])
    response = client.put_json(
        f"/api/api-keys/{narrow['id']}", {"name": "me", "permissions": ["apiKey.update"]},
        headers=api_key_headers(secret),
    )  # fmt: skip
    assert (response.json["name"], response.json["permissions"]) == ("me", ["apiKey.update"])
    response = client.get("/api/users/me", headers=api_key_headers(secret), status=403)
    assert_app_error(response, 403, "Missing required permission: user.read")


def test_app_keys_delete_removes_the_key(client, user, db):
    secret, key = make_key(client, user.headers)
    _, kept = make_key(client, user.headers)
    response = client.delete(f"/api/api-keys/{key['id']}", headers=user.headers, status=204)
    assert response.body == b""
    assert [row[0] for row in db.execute("SELECT public_id FROM api_keys")] == [kept["id"]]
    assert_app_error(
        client.get("/api/users/me", headers=api_key_headers(secret), status=401),
        401,
        "Invalid API key",
    )
    response = client.delete(f"/api/api-keys/{key['id']}", headers=user.headers, status=400)
    assert_app_error(response, 400, "API Key not found")


def test_app_keys_key_may_delete_itself(client, user, db):
    secret, key = make_key(client, user.headers, ["apiKey.delete"])
    client.delete(f"/api/api-keys/{key['id']}", headers=api_key_headers(secret), status=204)
    assert table_counts(db)["api_keys"] == 0
    assert_app_error(
        client.get("/api/api-keys/me", headers=api_key_headers(secret), status=401),
        401,
        "Invalid API key",
    )


def test_app_keys_survive_password_changes_and_reset(client, user, caplog):
    secret, key = make_key(client, user.headers, ["user.read"])
    client.post_json("/password", {"password": "second password"}, headers=user.headers, status=204)
    body = {"password": "second password", "newPassword": "third password"}
    client.post_json("/api/auth/change-password", body, headers=user.headers, status=200)
    token = request_reset(client, caplog)
    client.post_json("/password", {"password": "fourth password"}, headers=bearer_headers(token),
                     status=204)  # fmt: skip
    assert client.get("/api/users/me", headers=api_key_headers(secret)).json["email"] == "alice"
    token = app_login(client, "alice", "fourth password").json["accessToken"]
    assert client.get("/api/api-keys", headers=bearer_headers(token)).json == [key]


def test_app_keys_never_expire(client, user, clock):
    secret, _ = make_key(client, user.headers, ["user.read"])
    clock.advance(10 * 365 * 86400)
    assert client.get("/api/users/me", headers=api_key_headers(secret)).json["email"] == "alice"
    assert_app_error(
        client.get("/api/users/me", headers=user.headers, status=401), 401, "Invalid user token"
    )


# API keys on Sync Node paths (README, App API): a request, the permission it needs and the status
# a key holding it gets. The fixture `stored` makes alice own "k" and "bob" exist.
SYNC_OPERATIONS = [
    ("GET", "/store", "store.read", 200),
    ("HEAD", "/store/k", "store.read", 200),
    ("GET", "/store/k", "store.read", 200),
    ("GET", "/permission/k", "store.read", 200),
    ("PUT", "/store/k", "store.write", 204),
    ("DELETE", "/store/k", "store.own", 204),
    ("PUT", "/permission/k", "store.own", 204),
    ("DELETE", "/permission/k?users=bob", "store.own", 204),
    ("GET", "/account", "session.read", 200),
]
SYNC_OPERATION_CASES = [pytest.param(*row, id=f"{row[0]}-{row[1][1:]}") for row in SYNC_OPERATIONS]


def call_sync_operation(client, headers: dict, method: str, path: str, token: str):
    """Call a Sync Node operation with the body and X-Sync-Token it needs."""
    headers = {**headers, "X-Sync-Token": token}
    if path == "/permission/k" and method == "PUT":
        body = json.dumps([{"user": "bob", "permission": "READ"}]).encode()
    else:
        body = b"new value" if method == "PUT" else b""
    return client.request(path, method=method, headers=headers, body=body, expect_errors=True)


@pytest.fixture
def stored(client, user, other) -> str:
    """Alice owns "k" (READ for bob); return its store token."""
    token = put(client, user, "k", b"value").headers["X-Sync-Token"]
    share(client, user, "k", {"bob": "READ"})
    return token


@pytest.mark.parametrize("method, path, permission, status", SYNC_OPERATION_CASES)
def test_app_keys_sync_node_operation_with_the_permission_passes(
    client, user, stored, method, path, permission, status
):
    secret, _ = make_key(client, user.headers, [permission])
    response = call_sync_operation(client, api_key_headers(secret), method, path, stored)
    assert response.status_int == status
    if path == "/account":
        assert [session["current"] for session in response.json] == [False]


@pytest.mark.parametrize("method, path, permission, status", SYNC_OPERATION_CASES)
def test_app_keys_sync_node_operation_without_the_permission_is_perm01(
    client, user, db, stored, method, path, permission, status
):
    unrelated = {"store.read": "session.read", "session.read": "store.own"}.get(
        permission, "store.read"
    )
    secret, _ = make_key(client, user.headers, [unrelated, "user.read", "apiKey.create"])
    before = app_state(db)
    response = call_sync_operation(client, api_key_headers(secret), method, path, stored)
    assert response.status_int == 403
    if method != "HEAD":
        assert_error(response, 403, "PERM01")
        assert response.json["message"] == f"Missing required permission: {permission}"
    assert app_state(db) == before


@pytest.mark.parametrize("permission", ["store.own", "store.write"])
def test_app_keys_wider_store_permission_covers_narrower(client, user, stored, permission):
    secret, _ = make_key(client, user.headers, [permission])
    client.get("/store/k", headers=api_key_headers(secret), status=200)
    client.get("/store", headers=api_key_headers(secret), status=200)
    client.put("/store/k", b"v2", headers={**api_key_headers(secret), "X-Sync-Token": stored},
               status=204)  # fmt: skip


# ==================================================================================================
# App API: sessions
# ==================================================================================================


def test_app_sessions_list_fields_order_and_current(client, user, other, clock, db):
    clock.advance(10)
    second = client.post_json("/auth", {"id": "alice", "password": PASSWORD}).json["token"]
    clock.advance(10)
    third = app_login(client).json["accessToken"]
    listing = sessions_listing(client, bearer_headers(second))
    ids = [session_id_of(db, token) for token in (third, second, user.token)]
    assert [session["id"] for session in listing] == ids
    assert [session["current"] for session in listing] == [False, True, False]
    assert listing[1] == {
        "id": ids[1],
        "createdAt": "2027-01-15T08:00:10.000Z",
        "updatedAt": "2027-01-15T08:00:10.000Z",
        "expiresAt": "2027-02-14T08:00:10.000Z",
        "current": True,
        "deviceType": "",
        "deviceOS": "",
        "appVersion": None,
        "isPendingSyncReset": False,
    }
    assert user.token not in json.dumps(listing) and second not in json.dumps(listing)
    assert len(sessions_listing(client, other.headers)) == 1


def test_app_sessions_list_orders_by_updated_then_created(client, user, clock, db):
    clock.advance(10)
    second = app_login(client).json["accessToken"]
    clock.advance(10)
    third = app_login(client).json["accessToken"]
    clock.advance(3601)
    client.get("/store", headers=user.headers)  # Refreshes the first session.
    listing = sessions_listing(client, bearer_headers(second))  # And this the second.
    ids = [session_id_of(db, token) for token in (second, user.token, third)]
    assert [session["id"] for session in listing] == ids
    assert [session["updatedAt"] for session in listing] == [
        "2027-01-15T09:00:21.000Z", "2027-01-15T09:00:21.000Z", "2027-01-15T08:00:20.000Z",
    ]  # fmt: skip


def test_app_sessions_list_leaves_out_expired_sessions(make_app, clock):
    client = webtest.TestApp(make_app(session_ttl=100))
    token = client.post_json("/account", {"id": "alice", "password": PASSWORD}).json["token"]
    clock.advance(50)
    newer = app_login(client).json["accessToken"]
    clock.advance(50)
    listing = sessions_listing(client, bearer_headers(newer))
    assert [session["current"] for session in listing] == [True]
    assert token not in json.dumps(listing)


def test_app_sessions_list_with_api_key_has_no_current(client, user):
    secret, _ = make_key(client, user.headers, ["session.read"])
    app_login(client)
    listing = sessions_listing(client, api_key_headers(secret))
    assert [session["current"] for session in listing] == [False, False]


def test_app_sessions_create_child_answers_it_with_token(client, user, clock, db):
    clock.advance(30)
    body = {"deviceType": "Television", "deviceOS": "webOS"}
    response = client.post_json("/api/sessions", body, headers=user.headers)
    assert response.status_int == 201
    child = assert_schema(response, "SessionCreateResponseDto")
    assert child == {
        "id": child["id"],
        "createdAt": "2027-01-15T08:00:30.000Z",
        "updatedAt": "2027-01-15T08:00:30.000Z",
        "expiresAt": "2027-02-14T08:00:00.000Z",
        "current": False,
        "deviceType": "Television",
        "deviceOS": "webOS",
        "appVersion": None,
        "isPendingSyncReset": False,
        "token": child["token"],
    }
    assert len(child["token"]) >= 43
    row = db.execute(
        "SELECT public_id, parent_id, token_digest FROM sessions WHERE public_id = ?",
        (child["id"],),
    ).fetchone()
    parent = db.execute(
        "SELECT id FROM sessions WHERE token_digest = ?", (token_digest(user.token),)
    ).fetchone()
    assert row == (child["id"], parent[0], token_digest(child["token"]))
    assert child["token"] not in repr(db.execute("SELECT * FROM sessions").fetchall())
    listing = sessions_listing(client, user.headers)
    assert {key: value for key, value in child.items() if key != "token"} in listing


def test_app_sessions_child_token_works_on_both_apis(client, user):
    child = make_child(client, user.headers)["token"]
    assert my_user(client, bearer_headers(child))["email"] == "alice"
    client.get("/store", headers=bearer_headers(child), status=200)
    put(client, User("alice", child), "from-child")
    grandchild = make_child(client, bearer_headers(child))["token"]
    client.get("/store/from-child", headers=bearer_headers(grandchild), status=200)


def test_app_sessions_child_expiry_is_never_past_the_parent(client, user):
    parents = "2027-02-14T08:00:00.000Z"
    for body, expires in [
        ({}, parents),
        ({"duration": None}, parents),
        ({"duration": 1}, "2027-01-15T08:00:01.000Z"),
        ({"duration": 2.0}, "2027-01-15T08:00:02.000Z"),
        ({"duration": 30 * 86400}, parents),
        ({"duration": 30 * 86400 + 1}, parents),
        ({"duration": 10**12}, parents),
    ]:
        assert make_child(client, user.headers, **body)["expiresAt"] == expires, body


def test_app_sessions_grandchild_expiry_is_capped_by_its_parent(client, user, clock):
    child = make_child(client, user.headers, duration=60)
    clock.advance(10)
    grandchild = make_child(client, bearer_headers(child["token"]), duration=3600)
    assert grandchild["expiresAt"] == "2027-01-15T08:01:00.000Z"


@pytest.mark.parametrize(
    "body, messages",
    [
        pytest.param({"duration": 0}, ["duration must be a positive number"], id="zero"),
        pytest.param({"duration": 1.5}, ["duration must be an integer number"], id="fraction"),
        pytest.param(
            {"duration": -1.5},
            ["duration must be a positive number", "duration must be an integer number"],
            id="negative-fraction",
        ),
        pytest.param(
            {"duration": "10"},
            ["duration must be a positive number", "duration must be an integer number"],
            id="string",
        ),
        pytest.param(
            {"duration": True},
            ["duration must be a positive number", "duration must be an integer number"],
            id="bool",
        ),
        pytest.param({"deviceType": 5}, ["deviceType must be a string"], id="type-number"),
        pytest.param({"deviceOS": []}, ["deviceOS must be a string"], id="os-array"),
        pytest.param(
            {"deviceType": "t" * 256},
            ["deviceType must be shorter than or equal to 255 characters"],
            id="type-256",
        ),
        pytest.param(
            {"duration": 0.5, "deviceType": 5, "deviceOS": False},
            [
                "duration must be an integer number",
                "deviceType must be a string",
                "deviceOS must be a string",
            ],
            id="all-three",
        ),
    ],
)
def test_app_sessions_create_bad_body_is_400_with_sentences(client, user, db, body, messages):
    before = app_state(db)
    response = client.post_json("/api/sessions", body, headers=user.headers, status=400)
    assert_app_error(response, 400, messages)
    assert app_state(db) == before


def test_app_sessions_create_accepts_nulls_and_edge_lengths(client, user):
    child = make_child(client, user.headers, duration=None, deviceType=None, deviceOS=None)
    assert (child["deviceType"], child["deviceOS"]) == ("", "")
    child = make_child(client, user.headers, deviceType="t" * 255, deviceOS="o" * 255)
    assert (child["deviceType"], child["deviceOS"]) == ("t" * 255, "o" * 255)


def test_app_sessions_create_accepts_empty_device_fields(client, user):
    child = make_child(client, user.headers, deviceType="", deviceOS="")
    assert (child["deviceType"], child["deviceOS"]) == ("", "")


def test_app_sessions_create_with_api_key_is_400(client, user, db):
    secret, _ = make_key(client, user.headers)
    before = app_state(db)
    response = client.post_json("/api/sessions", {}, headers=api_key_headers(secret), status=400)
    assert_app_error(response, 400, "This endpoint can only be used with a session token")
    assert app_state(db) == before


def parent_with_family(client) -> tuple[str, str, str]:
    """Log alice in and make a child and a grandchild; return the three tokens."""
    parent = app_login(client).json["accessToken"]
    child = make_child(client, bearer_headers(parent))["token"]
    grandchild = make_child(client, bearer_headers(child))["token"]
    return parent, child, grandchild


def assert_ended(client, *tokens: str) -> None:
    """Assert each session token is refused on both APIs."""
    for token in tokens:
        response = client.get("/api/users/me", headers=bearer_headers(token), status=401)
        assert_app_error(response, 401, "Invalid user token")
        assert_error(client.get("/store", headers=bearer_headers(token), status=401), 401, "AUTH01")


@pytest.mark.parametrize(
    "how",
    [
        "app-logout",
        "app-delete-session",
        "sync-node-logout",
        "sync-node-password",
        "app-delete-all",
    ],
)
def test_app_sessions_children_end_with_the_parent(client, user, db, how):
    parent, child, grandchild = parent_with_family(client)
    if how == "app-logout":
        client.post("/api/auth/logout", headers=bearer_headers(parent))
    elif how == "app-delete-session":
        session_id = session_id_of(db, parent)
        client.delete(f"/api/sessions/{session_id}", headers=user.headers, status=204)
    elif how == "sync-node-logout":
        client.delete("/auth", headers=bearer_headers(parent), status=204)
    elif how == "sync-node-password":
        body = {"password": "another password"}
        client.post_json("/password", body, headers=user.headers, status=204)
    else:
        client.delete("/api/sessions", headers=user.headers, status=204)
    assert_ended(client, parent, child, grandchild)
    client.get("/api/users/me", headers=user.headers, status=200)
    assert table_counts(db)["sessions"] == 1


def test_app_sessions_children_end_with_the_parents_expiry(make_app, clock):
    client = webtest.TestApp(make_app(session_ttl=100))
    parent = client.post_json("/account", {"id": "alice", "password": PASSWORD}).json["token"]
    child = make_child(client, bearer_headers(parent))["token"]
    clock.advance(99)
    grandchild = make_child(client, bearer_headers(child))["token"]
    client.get("/api/users/me", headers=bearer_headers(grandchild), status=200)
    clock.advance(1)
    assert_ended(client, parent, child, grandchild)


def test_app_sessions_delete_all_keeps_only_the_current_one(client, user, other, db):
    current = app_login(client).json["accessToken"]
    own_child = make_child(client, bearer_headers(current))["token"]
    other_child = make_child(client, user.headers)["token"]
    response = client.delete("/api/sessions", headers=bearer_headers(current), status=204)
    assert response.body == b""
    assert_ended(client, user.token, own_child, other_child)
    [session] = sessions_listing(client, bearer_headers(current))
    assert session["current"] is True
    client.get("/store", headers=other.headers, status=200)


def test_app_sessions_delete_all_from_a_child_keeps_only_it(client, user, db):
    child = make_child(client, user.headers)["token"]
    client.delete("/api/sessions", headers=bearer_headers(child), status=204)
    assert_ended(client, user.token)
    assert [s["current"] for s in sessions_listing(client, bearer_headers(child))] == [True]


def test_app_sessions_delete_all_with_api_key_ends_every_session(client, user, other, db):
    secret, _ = make_key(client, user.headers, ["session.delete", "user.read"])
    make_child(client, user.headers)
    app_login(client)
    client.delete("/api/sessions", headers=api_key_headers(secret), status=204)
    assert table_counts(db)["sessions"] == 1  # Bob's.
    client.get("/api/users/me", headers=api_key_headers(secret), status=200)
    client.get("/store", headers=other.headers, status=200)


def test_app_sessions_delete_one_ends_it(client, user, db):
    second = app_login(client).json["accessToken"]
    response = client.delete(
        f"/api/sessions/{session_id_of(db, second)}", headers=user.headers, status=204
    )
    assert response.body == b""
    assert_ended(client, second)
    client.get("/api/users/me", headers=user.headers, status=200)


def test_app_sessions_delete_one_may_end_the_current_session(client, user, db):
    session_id = session_id_of(db, user.token)
    client.delete(f"/api/sessions/{session_id.upper()}", headers=user.headers, status=204)
    assert_ended(client, user.token)
    assert table_counts(db)["sessions"] == 0


def test_app_sessions_delete_unknown_or_another_users_session_is_400(client, user, other, db):
    before = app_state(db)
    for session_id in (session_id_of(db, other.token), "7f1a3e4c-9d2b-4c5e-8f6a-1b2c3d4e5f60"):
        response = client.delete(f"/api/sessions/{session_id}", headers=user.headers, status=400)
        assert_app_error(response, 400, "Not found or no authDevice.delete access")
    assert app_state(db) == before
    client.get("/store", headers=other.headers, status=200)


def test_app_sessions_delete_bad_id_is_400(client, user, db):
    before = app_state(db)
    for session_id in ("123", "7f1a3e4c-9d2b-1c5e-8f6a-1b2c3d4e5f60"):
        response = client.delete(f"/api/sessions/{session_id}", headers=user.headers, status=400)
        assert_app_error(response, 400, ["id must be a UUID"])
    assert app_state(db) == before


FIREFOX_LINUX = "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0"
CHROME_WINDOWS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36"
)

# User-Agent and headers, and the device fields a session records (README, App API).
DEVICES = [
    ({"User-Agent": CHROME_WINDOWS[:-14] + "Safari/537.36 Edg/120.0.0.0"}, "Edge", "Windows", None),
    ({"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0 Safari/537.36 OPR/106.0"},
     "Opera", "Linux", None),
    ({"User-Agent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10.15; rv:121.0) Firefox/121.0"},
     "Firefox", "macOS", None),
    ({"User-Agent": CHROME_WINDOWS}, "Chrome", "Windows", None),
    ({"User-Agent": "Mozilla/5.0 (Linux; Android 14; Pixel 8) Chrome/120.0 Mobile Safari/537.36"},
     "Chrome", "Android", None),
    ({"User-Agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) CriOS/120.0 "
                    "Mobile/15E148 Safari/604.1"}, "Chrome", "iOS", None),
    ({"User-Agent": "Mozilla/5.0 (iPad; CPU OS 17_0 like Mac OS X) Version/17.0 Safari/604.1"},
     "Safari", "iOS", None),
    ({"User-Agent": "Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) Chrome/120.0 Safari/537.36"},
     "Chrome", "Chrome OS", None),
    ({"User-Agent": "Mozilla/5.0 (compatible; Unknown)", "deviceModel": "Pixel 8",
      "deviceType": "Android"}, "Pixel 8", "Android", None),
    ({"User-Agent": "Mozilla/5.0 (Plan9) Firefox/1.0", "deviceType": "Plan 9"},
     "Firefox", "Plan 9", None),
    ({"User-Agent": "immich-android/1.2.3", "deviceModel": "Pixel 8", "deviceType": "Android"},
     "Pixel 8", "Android", "1.2.3"),
    ({"User-Agent": "immich-ios/1.120.0", "deviceModel": "iPhone15,2", "deviceType": "iOS"},
     "iPhone15,2", "iOS", "1.120.0"),
    ({"User-Agent": "Immich_Android_1.99.0"}, "", "", "1.99.0"),
    ({"User-Agent": "Immich_iOS_2.0.0-beta"}, "", "", "2.0.0-beta"),
    ({"User-Agent": "curl/8.5.0"}, "", "", None),
    ({}, "", "", None),
    ({"User-Agent": "immich-android/" + "9" * 100, "deviceModel": "m" * 100,
      "deviceType": "t" * 100}, "m" * 64, "t" * 64, "9" * 64),
]  # fmt: skip
DEVICE_IDS = [
    "edge-windows", "opera-linux", "firefox-macos", "chrome-windows", "chrome-android",
    "crios-iphone", "safari-ipad", "chrome-os", "mozilla-no-match", "browser-without-os",
    "immich-android", "immich-ios", "old-android", "old-ios", "curl", "nothing", "cut-to-64",
]  # fmt: skip


def test_app_sessions_device_fields_come_from_the_request(client, user):
    for case, (headers, *expected) in zip(DEVICE_IDS, DEVICES, strict=True):
        token = app_login(client, headers=headers).json["accessToken"]
        listing = sessions_listing(client, {**headers, **bearer_headers(token)})
        [session] = [session for session in listing if session["current"]]
        fields = [session["deviceType"], session["deviceOS"], session["appVersion"]]
        assert fields == expected, case


@pytest.mark.parametrize("path", ["/account", "/auth"])
def test_app_sessions_sync_node_sessions_record_the_device_too(client, user, path):
    headers = {"User-Agent": "immich-ios/1.5.0", "deviceModel": "iPhone", "deviceType": "iOS"}
    body = {"id": "carol" if path == "/account" else "alice", "password": PASSWORD}
    token = client.post_json(path, body, headers=headers).json["token"]
    [session] = [
        s for s in sessions_listing(client, {**headers, **bearer_headers(token)}) if s["current"]
    ]
    assert (session["deviceType"], session["deviceOS"], session["appVersion"]) == (
        "iPhone", "iOS", "1.5.0",
    )  # fmt: skip


def device_of(client, db, token: str, secret: str) -> tuple:
    """Return (deviceType, deviceOS, appVersion, updatedAt, expiresAt) of a session.

    The listing is read with an API key, which refreshes no session.
    """
    session_id = session_id_of(db, token)
    [session] = [
        s for s in sessions_listing(client, api_key_headers(secret)) if s["id"] == session_id
    ]
    keys = ("deviceType", "deviceOS", "appVersion", "updatedAt", "expiresAt")
    return tuple(session[key] for key in keys)


def test_app_sessions_device_is_refreshed_after_an_hour_on_either_api(client, user, clock, db):
    firefox, chrome = {"User-Agent": FIREFOX_LINUX}, {"User-Agent": CHROME_WINDOWS}
    secret, _ = make_key(client, user.headers, ["session.read"])
    token = app_login(client, headers=firefox).json["accessToken"]
    expires = "2027-02-14T08:00:00.000Z"
    clock.advance(3600)
    client.get("/api/users/me", headers={**chrome, **bearer_headers(token)})
    assert device_of(client, db, token, secret) == ("Firefox", "Linux", None, CLOCK_START, expires)
    clock.advance(1)
    client.get("/api/users/me", headers={**chrome, **bearer_headers(token)})
    refreshed = ("Chrome", "Windows", None, "2027-01-15T09:00:01.000Z", expires)
    assert device_of(client, db, token, secret) == refreshed
    clock.advance(3601)
    client.get("/store", headers={**firefox, **bearer_headers(token)})
    assert device_of(client, db, token, secret) == (
        "Firefox", "Linux", None, "2027-01-15T10:00:02.000Z", expires,
    )  # fmt: skip


def test_app_sessions_device_is_refreshed_when_the_app_version_changes(client, user, clock, db):
    old = {"User-Agent": "immich-android/1.0.0", "deviceModel": "Pixel 7", "deviceType": "Android"}
    new = {"User-Agent": "immich-android/1.1.0", "deviceModel": "Pixel 8", "deviceType": "Android"}
    secret, _ = make_key(client, user.headers, ["session.read"])
    token = app_login(client, headers=old).json["accessToken"]
    clock.advance(60)
    client.get("/api/users/me", headers={**old, "deviceModel": "ignored", **bearer_headers(token)})
    assert device_of(client, db, token, secret)[:4] == ("Pixel 7", "Android", "1.0.0", CLOCK_START)
    client.get("/api/users/me", headers={**new, **bearer_headers(token)})
    assert device_of(client, db, token, secret)[:4] == (
        "Pixel 8", "Android", "1.1.0", "2027-01-15T08:01:00.000Z",
    )  # fmt: skip


# ==================================================================================================
# App API: users
# ==================================================================================================


def test_app_users_list_admin_sees_everyone_newest_first(client, make_user, clock):
    alice = make_user("alice")
    clock.advance(1)
    make_user("bob@example.org")
    clock.advance(1)
    make_user("carol")
    response = client.get("/api/users", headers=alice.headers)
    listing = assert_schema(response, ["UserResponseDto"])
    assert [(u["email"], u["name"]) for u in listing] == [
        ("carol", "carol"), ("bob@example.org", "bob"), ("alice", "alice"),
    ]  # fmt: skip


def test_app_users_list_non_admin_sees_only_itself(client, user, other):
    secret, _ = make_key(client, other.headers, ["user.read"])
    for headers in (other.headers, api_key_headers(secret)):
        listing = assert_schema(client.get("/api/users", headers=headers), ["UserResponseDto"])
        assert listing == [{key: value for key, value in my_user(client, other.headers).items()
                            if key in ("id", "name", "email")}]  # fmt: skip


def test_app_users_list_public_users_shows_everyone(make_app):
    client = webtest.TestApp(make_app(public_users=True))
    for name in ("alice", "bob"):
        token = client.post_json("/account", {"id": name, "password": PASSWORD}).json["token"]
    listing = assert_schema(
        client.get("/api/users", headers=bearer_headers(token)), ["UserResponseDto"]
    )
    assert [user["email"] for user in listing] == ["bob", "alice"]


def test_app_users_me_answers_the_admin_dto(client, user, other, clock):
    response = client.get("/api/users/me", headers=other.headers)
    me = assert_schema(response, "UserAdminResponseDto")
    assert me == {
        "id": me["id"],
        "name": "bob",
        "email": "bob",
        "shouldChangePassword": False,
        "isAdmin": False,
        "createdAt": CLOCK_START,
        "deletedAt": None,
        "updatedAt": CLOCK_START,
        "status": "active",
    }
    assert my_user(client, user.headers)["isAdmin"] is True


def test_app_users_default_name_is_the_part_before_the_last_at(client, make_user):
    for name, display in [
        ("alice@example.org", "alice"), ("a@b@example.org", "a@b"), ("carol", "carol"),
        ("@handle", "@handle"), ("dave@", "dave"), ("@", "@"),
    ]:  # fmt: skip
        created = make_user(name)
        assert my_user(client, created.headers)["name"] == display, name


def test_app_users_update_me_with_empty_body_changes_nothing(client, user, clock, db):
    before = my_user(client, user.headers)
    state = app_state(db)
    clock.advance(60)
    for body in ({}, {"email": None, "name": None}, {"unknown": "x"}):
        response = client.put_json("/api/users/me", body, headers=user.headers)
        assert assert_schema(response, "UserAdminResponseDto") == before
    assert app_state(db) == state


def test_app_users_update_me_renames_the_display_name(client, user, clock):
    clock.advance(61)
    response = client.put_json("/api/users/me", {"name": "Alice Liddell"}, headers=user.headers)
    me = assert_schema(response, "UserAdminResponseDto")
    assert (me["name"], me["email"]) == ("Alice Liddell", "alice")
    assert me["updatedAt"] == "2027-01-15T08:01:01.000Z" and me["createdAt"] == CLOCK_START
    assert my_user(client, user.headers) == me
    assert app_login(client).json["name"] == "Alice Liddell"


def test_app_users_updated_at_moves_with_a_sync_node_password_change(client, user, clock):
    clock.advance(2)
    client.post_json("/password", {"password": "another password"}, headers=user.headers)
    me = my_user(client, user.headers)
    assert (me["createdAt"], me["updatedAt"]) == (CLOCK_START, "2027-01-15T08:00:02.000Z")


def test_app_users_update_me_ignores_password_and_avatar_color(client, user, db):
    before = app_state(db)
    body = {"password": "another password", "avatarColor": "red", "isAdmin": False}
    client.put_json("/api/users/me", body, headers=user.headers, status=200)
    assert app_state(db) == before
    app_login(client, "alice", PASSWORD, status=201)


def test_app_users_update_me_email_renames_the_sync_node_id(client, user, other, clock, db):
    secret, _ = make_key(client, user.headers, ["user.read", "store.read"])
    put(client, user, "k")
    share(client, user, "k", {"bob": "READ"})
    clock.advance(5)
    body = {"email": " Alice@Example.ORG "}
    response = client.put_json("/api/users/me", body, headers=user.headers)
    me = assert_schema(response, "UserAdminResponseDto")
    assert (me["email"], me["name"]) == ("alice@example.org", "alice")
    assert me["updatedAt"] == "2027-01-15T08:00:05.000Z"
    client.post_json("/auth", {"id": "alice@example.org", "password": PASSWORD}, status=200)
    assert_error(
        client.post_json("/auth", {"id": "alice", "password": PASSWORD}, status=401), 401, "AUTH01"
    )
    app_login(client, "alice@example.org", PASSWORD, status=201)
    assert my_user(client, user.headers)["email"] == "alice@example.org"
    assert my_user(client, api_key_headers(secret))["email"] == "alice@example.org"
    assert client.get("/permission/k", headers=other.headers).json == [
        {"user": "alice@example.org", "permission": "OWN"},
        {"user": "bob", "permission": "READ"},
    ]
    assert client.get("/permission/k", headers=api_key_headers(secret)).status_int == 200
    client.post_json("/account", {"id": "alice", "password": PASSWORD}, status=200)


def test_app_users_update_me_with_a_taken_email_is_400(client, user, other, db):
    before = app_state(db)
    for taken in ("bob", " BOB "):
        response = client.put_json(
            "/api/users/me", {"email": taken}, headers=user.headers, status=400
        )
        assert_app_error(response, 400, "Email already in use by another account")
    assert app_state(db) == before


def test_app_users_update_me_with_own_email_is_accepted(client, user):
    me = client.put_json("/api/users/me", {"email": "ALICE"}, headers=user.headers).json
    assert me["email"] == "alice"


@pytest.mark.parametrize(
    "body, messages",
    [
        pytest.param({"email": ""}, ["email must be an email"], id="email-empty"),
        pytest.param({"email": "a b"}, ["email must be an email"], id="email-space"),
        pytest.param({"name": ""}, ["name should not be empty"], id="name-empty"),
        pytest.param({"name": 5}, ["name must be a string"], id="name-number"),
        pytest.param(
            {"name": "n" * 256},
            ["name must be shorter than or equal to 255 characters"],
            id="name-256",
        ),
        pytest.param(
            {"name": "line\nbreak"}, ["name must not contain control characters"], id="name-newline"
        ),
        pytest.param(
            {"name": "c1\x85"}, ["name must not contain control characters"], id="name-c1"
        ),
        pytest.param(
            {"email": 5, "name": 5}, ["email must be an email", "name must be a string"], id="both"
        ),
    ],
)
def test_app_users_update_me_bad_body_is_400_with_sentences(client, user, db, body, messages):
    before = app_state(db)
    response = client.put_json("/api/users/me", body, headers=user.headers, status=400)
    assert_app_error(response, 400, messages)
    assert app_state(db) == before


def test_app_users_get_answers_any_account(client, user, other):
    bob = my_user(client, other.headers)
    for user_id in (bob["id"], bob["id"].upper()):
        response = client.get(f"/api/users/{user_id}", headers=user.headers)
        assert assert_schema(response, "UserResponseDto") == {
            "id": bob["id"], "name": "bob", "email": "bob",
        }  # fmt: skip


def test_app_users_get_unknown_is_400(client, user, other, db):
    bob = my_user(client, other.headers)
    client.delete("/account", headers=other.headers, status=204)
    for user_id in (bob["id"], "7f1a3e4c-9d2b-4c5e-8f6a-1b2c3d4e5f60"):
        response = client.get(f"/api/users/{user_id}", headers=user.headers, status=400)
        assert_app_error(response, 400, "User not found")


@pytest.mark.parametrize(
    "user_id",
    [
        pytest.param("123", id="digits"),
        pytest.param("7f1a3e4c-9d2b-1c5e-8f6a-1b2c3d4e5f60", id="v1"),
    ],
)
def test_app_users_get_bad_id_is_400(client, user, user_id):
    response = client.get(f"/api/users/{user_id}", headers=user.headers, status=400)
    assert_app_error(response, 400, ["id must be a UUID"])


def test_app_users_deleting_the_admin_makes_the_next_oldest_admin(client, make_user, clock):
    alice = make_user("alice")
    clock.advance(1)
    bob = make_user("bob")
    clock.advance(1)
    carol = make_user("carol")
    client.delete("/account", headers=alice.headers, status=204)
    assert my_user(client, bob.headers)["isAdmin"] is True
    assert my_user(client, carol.headers)["isAdmin"] is False
    assert app_login(client, "bob").json["isAdmin"] is True
    assert [u["email"] for u in client.get("/api/users", headers=bob.headers).json] == [
        "carol", "bob",
    ]  # fmt: skip
    assert client.get("/api/users", headers=carol.headers).json[0]["email"] == "carol"


def test_app_users_admin_stays_the_oldest_account(client, make_user, clock):
    alice = make_user("alice")
    clock.advance(1)
    bob = make_user("bob")
    client.delete("/account", headers=bob.headers, status=204)
    clock.advance(1)
    bob = make_user("bob")
    assert my_user(client, alice.headers)["isAdmin"] is True
    assert my_user(client, bob.headers)["isAdmin"] is False


# ==================================================================================================
# App API: server
# ==================================================================================================


@pytest.mark.parametrize(
    "path, schema, answer",
    [
        pytest.param("/api/server/ping", "ServerPingResponse", {"res": "pong"}, id="ping"),
        pytest.param(
            "/api/server/features", "ServerFeaturesDto", {"passwordLogin": True}, id="features"
        ),
    ],
)
def test_app_server_public_answers(client, path, schema, answer):
    for headers in ({}, {"Authorization": "Bearer unknown", "x-immich-share-key": "k"}):
        response = client.get(path, headers=headers)
        assert response.status_int == 200
        assert assert_schema(response, schema) == answer


def test_app_server_version_is_syncnodes_own(client, monkeypatch):
    major, minor, patch = (int(part) for part in syncnode.__version__.split("."))
    response = client.get("/api/server/version")
    assert assert_schema(response, "ServerVersionResponseDto") == {
        "major": major, "minor": minor, "patch": patch,
    }  # fmt: skip
    monkeypatch.setattr(syncnode, "__version__", "12.34.5rc1")
    assert client.get("/api/server/version").json == {"major": 12, "minor": 34, "patch": 5}


@pytest.mark.parametrize(
    "version",
    [
        pytest.param("12.34.5.dev1", id="pep440-dev"),
        pytest.param("12.34.5-rc.1", id="semver"),
    ],
)
def test_app_server_version_drops_a_dotted_pre_release_part(client, monkeypatch, version):
    monkeypatch.setattr(syncnode, "__version__", version)
    response = client.get("/api/server/version")
    assert response.json == {"major": 12, "minor": 34, "patch": 5}


def test_app_server_about_answers_the_version(client, user):
    secret, _ = make_key(client, user.headers, ["server.about"])
    for headers in (user.headers, api_key_headers(secret)):
        response = client.get("/api/server/about", headers=headers)
        assert assert_schema(response, "ServerAboutResponseDto") == {
            "version": f"v{syncnode.__version__}",
            "versionUrl": "",
        }


def test_app_server_about_needs_credentials_and_server_about(client, user):
    assert_app_error(client.get("/api/server/about", status=401), 401, "Authentication required")
    secret, _ = make_key(client, user.headers, ["user.read"])
    response = client.get("/api/server/about", headers=api_key_headers(secret), status=403)
    assert_app_error(response, 403, "Missing required permission: server.about")


def test_app_server_config_is_initialized_once_an_admin_exists(client, db):
    def config() -> dict:
        return assert_schema(client.get("/api/server/config"), "ServerConfigDto")

    assert config() == {"loginPageMessage": "", "userDeleteDelay": 0, "isInitialized": False}
    token = client.post_json("/account", {"id": "alice", "password": PASSWORD}).json["token"]
    assert config()["isInitialized"] is True
    client.delete("/account", headers=bearer_headers(token), status=204)
    assert config()["isInitialized"] is False
    body = {"email": "admin", "password": PASSWORD, "name": "Admin"}
    client.post_json("/api/auth/admin-sign-up", body, status=201)
    assert config() == {"loginPageMessage": "", "userDeleteDelay": 0, "isInitialized": True}


def test_app_server_well_known_immich_at_the_root(client):
    response = client.get("/.well-known/immich")
    assert response.status_int == 200
    assert response.content_type == "application/json"
    assert response.json == {"api": {"endpoint": "/api"}}


def test_app_server_well_known_immich_under_a_mount_prefix(app, client, user):
    sync = mounted(app)
    assert sync.get("/sync/.well-known/immich").json == {"api": {"endpoint": "/sync/api"}}
    assert sync.get("/sync/api/server/ping").json == {"res": "pong"}
    response = sync.get("/sync/api/nope", status=404)
    assert_app_error(response, 404, "Cannot GET /api/nope")
    me = sync.get("/sync/api/users/me", headers={"x-immich-user-token": user.token}).json
    assert me["email"] == "alice"


@pytest.mark.parametrize(
    "prefix",
    [
        pytest.param("/sync", id="wsgi-mount"),
        pytest.param("/sync/", id="bottle-mount-slash"),
    ],
)
def test_app_server_mount_prefix_reaches_discovery_cookies_and_404(make_app, prefix):
    sync = mounted(make_app(), prefix)
    sync.post_json("/sync/account", {"id": "alice", "password": PASSWORD})
    assert sync.get("/sync/.well-known/immich").json == {"api": {"endpoint": "/sync/api"}}
    response = sync.post_json("/sync/api/auth/login", {"email": "alice", "password": PASSWORD})
    assert [cookie.split("; ")[2] for cookie in response.headers.getall("Set-Cookie")] == [
        "Path=/sync"
    ] * 3
    assert_app_error(sync.get("/sync/api/x", status=404), 404, "Cannot GET /api/x")


# ==================================================================================================
# App API: concurrency
# ==================================================================================================


def test_app_concurrency_admin_sign_up_race_has_one_winner(start_server, db):
    # Threads enough that all 8 racers may hash at once (threads - 1): no loser sees BUSY01.
    live = start_server(threads=9)
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
# App API: a real @immich/sdk client
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


def node_or_skip() -> str:
    """The path of Node.js 18 or newer; skip (fail on CI) without it."""
    node = shutil.which("node")
    if node is None:
        skip_or_fail("install Node.js 18 or newer to run the JavaScript client's tests")
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout
    if int(version.strip().lstrip("v").split(".")[0]) < 18:
        skip_or_fail(f"the JavaScript client needs Node.js 18 or newer, not {version.strip()}")
    return node


def npm_folder(
    tmp_path_factory, name: str, packages: tuple[str, ...], installs: tuple[str, ...]
) -> Path:
    """A new folder with the npm packages installed, each of installs (package names) found
    in its node_modules; skip (fail on CI) when npm cannot."""
    node_or_skip()
    npm = shutil.which("npm")
    if npm is None:
        skip_or_fail(f"npm is needed to install {' '.join(packages)}")
    folder = tmp_path_factory.mktemp(name)
    # A package.json of its own keeps npm from installing into a project further up.
    (folder / "package.json").write_text(f'{{"name": "{name}", "private": true}}\n')
    command = [npm, "install", "--no-audit", "--no-fund", *packages]
    try:
        done = subprocess.run(
            command, cwd=folder, env=node_env(), capture_output=True, text=True,
            timeout=NPM_INSTALL_TIMEOUT,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        skip_or_fail(f"npm install {' '.join(packages)} took over {NPM_INSTALL_TIMEOUT} s")
    if done.returncode != 0:
        skip_or_fail(f"npm install {' '.join(packages)} failed: {done.stderr[-2000:]}")
    for package in installs:
        if not (folder / "node_modules" / package / "package.json").exists():
            skip_or_fail(f"npm install left no node_modules/{package}")
    return folder


@pytest.fixture(scope="session")
def immich_sdk_dir(tmp_path_factory) -> str:
    """A folder with @immich/sdk 3.x installed from npm, once per test session."""
    folder = npm_folder(tmp_path_factory, "immich-sdk", ("@immich/sdk@3",), ("@immich/sdk",))
    manifest = folder / "node_modules" / "@immich" / "sdk" / "package.json"
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


def test_app_client_immich_sdk_works_against_a_live_server(immich_sdk_dir, start_server, db):
    live = start_server()
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
# App API: cross-API credentials
# ==================================================================================================


def test_cross_api_sync_node_login_token_works_on_app_api(client, user):
    token = client.post_json("/auth", {"id": "alice", "password": PASSWORD}).json["token"]
    me = client.get("/api/users/me", headers=bearer_headers(token), status=200).json
    assert me["email"] == "alice" and me["name"] == "alice"
    assert UUID4_TEXT.fullmatch(me["id"])


def test_cross_api_app_login_token_works_on_sync_node(client, user):
    token = app_login_token(client, "alice")
    put(client, User("alice", token), "from-app", b"app value", status=204)
    listing = client.get("/store", headers=bearer_headers(token), status=200).json
    assert [entry["key"] for entry in listing] == ["from-app"]
    assert client.get("/store/from-app", headers=user.headers).body == b"app value"


def test_cross_api_app_revokes_sync_node_session(client, user):
    sync_token = client.post_json("/auth", {"id": "alice", "password": PASSWORD}).json["token"]
    listing = client.get("/account", headers=bearer_headers(sync_token)).json
    [session_id] = [entry["id"] for entry in listing if entry["current"]]
    app_token = app_login_token(client, "alice")
    client.delete(f"/api/sessions/{session_id}", headers=bearer_headers(app_token), status=204)
    response = client.get("/store", headers=bearer_headers(sync_token), status=401)
    assert_error(response, 401, "AUTH01")
    client.get("/store", headers=user.headers, status=200)
    client.get("/store", headers=bearer_headers(app_token), status=200)


def test_cross_api_app_logout_ends_the_token_on_sync_node(client, user):
    token = app_login_token(client, "alice")
    client.post("/api/auth/logout", headers=bearer_headers(token), status=200)
    assert_error(client.get("/store", headers=bearer_headers(token), status=401), 401, "AUTH01")
    assert_error(client.get("/account", headers=bearer_headers(token), status=401), 401, "AUTH01")
    client.get("/store", headers=user.headers, status=200)


def test_cross_api_account_lists_app_login_and_child_sessions(client, user, clock):
    clock.advance(10)
    token = app_login_token(client, "alice")
    clock.advance(10)
    child = client.post_json("/api/sessions", {}, headers=bearer_headers(token), status=201).json
    listing = client.get("/account", headers=bearer_headers(token), status=200).json
    app_sessions = client.get("/api/sessions", headers=bearer_headers(token)).json
    assert [set(entry) for entry in listing] == [{"id", "expiration", "current", "createdAt"}] * 3
    assert {entry["id"] for entry in listing} == {entry["id"] for entry in app_sessions}
    # Newest first: the child, the App API login, the registration's session.
    assert listing[0]["id"] == child["id"]
    assert [entry["current"] for entry in listing] == [False, True, False]
    assert [entry["createdAt"] for entry in listing] == sorted(
        (entry["createdAt"] for entry in listing), reverse=True
    )
    assert listing[0]["expiration"] == listing[1]["expiration"]  # A child outlives no parent.
    from_child = client.get("/account", headers=bearer_headers(child["token"]), status=200).json
    assert [entry["current"] for entry in from_child] == [True, False, False]


def test_cross_api_sync_node_logout_ends_app_child_sessions(client, user):
    child = client.post_json("/api/sessions", {}, headers=user.headers, status=201).json
    client.get("/store", headers=bearer_headers(child["token"]), status=200)
    client.delete("/auth", headers=user.headers, status=204)
    response = client.get("/store", headers=bearer_headers(child["token"]), status=401)
    assert_error(response, 401, "AUTH01")


# API keys on Sync Node paths ----------------------------------------------------------------------


def test_cross_api_store_read_key_reads_but_cannot_write(client, user, db):
    token = put(client, user, "notes", b"secret notes").headers["X-Sync-Token"]
    headers = api_key_headers(create_api_key(client, user, "store.read").secret)
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
    headers = api_key_headers(create_api_key(client, user, "store.write").secret)
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
    headers = api_key_headers(create_api_key(client, user, "store.own").secret)
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
    headers = api_key_headers(create_api_key(client, user, "store.own").secret)
    client.delete("/store/mine", headers={**headers, "X-Sync-Token": token}, status=204)
    assert table_counts(db)["items"] == 0


def test_cross_api_session_read_key_lists_sessions_with_none_current(client, user):
    client.post_json("/auth", {"id": "alice", "password": PASSWORD})
    headers = api_key_headers(create_api_key(client, user, "session.read").secret)
    listing = client.get("/account", headers=headers, status=200).json
    assert len(listing) == 2
    assert [entry["current"] for entry in listing] == [False, False]
    by_session = client.get("/account", headers=user.headers).json
    assert {entry["id"] for entry in listing} == {entry["id"] for entry in by_session}


def test_cross_api_key_without_session_read_cannot_list_sessions(client, user):
    headers = api_key_headers(create_api_key(client, user, "store.own").secret)
    response = client.get("/account", headers=headers, status=403)
    assert_error(response, 403, "PERM01")
    assert response.json["message"] == "Missing required permission: session.read"


@pytest.mark.parametrize(
    "method, path, body",
    [
        pytest.param("DELETE", "/auth", None, id="logout"),
        pytest.param("DELETE", "/account", None, id="delete-account"),
        pytest.param(
            "POST",
            "/password",
            json.dumps({"password": "a new password"}).encode(),
            id="change-password",
        ),
    ],
)
def test_cross_api_session_only_operations_refuse_api_keys(client, user, db, method, path, body):
    headers = api_key_headers(create_api_key(client, user, "all").secret)
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
        **api_key_headers(create_api_key(client, user, "all").secret),
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
    secret = create_api_key(client, user, "all").secret
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
    secret = create_api_key(client, user, "all").secret
    client.get("/store", headers=api_key_headers(secret), status=200)
    client.delete("/account", headers=user.headers, status=204)
    assert table_counts(db)["api_keys"] == 0
    response = client.get("/store", headers=api_key_headers(secret), status=401)
    assert_error(response, 401, "AUTH01")


# ==================================================================================================
# OpenAPI document
# ==================================================================================================


def test_openapi_document_is_served_and_valid(client):
    response = client.get("/openapi.json")
    assert response.content_type == "application/json"
    validate(response.json)
    assert response.json["openapi"] == "3.1.0"
    assert response.json == syncnode.openapi_document()


def test_openapi_document_lists_every_error_code_and_store_permissions(client):
    document = client.get("/openapi.json").json
    schemas = document["components"]["schemas"]
    assert schemas["Error"]["properties"]["code"]["enum"] == list(syncnode.ERROR_STATUS)
    assert {"store.read", "store.write", "store.own"} <= set(schemas["AppPermission"]["enum"])


def test_openapi_document_describes_every_route(app):
    paths = syncnode.openapi_document()["paths"]
    for route in app.routes:
        path = route.rule.replace("<key:re:[\\s\\S]*>", "{key}")
        path = re.sub(r"<(key_id|session_id|user_id)>", "{id}", path)
        if "<path:path>" in path or path in ("/", "/api", "/api/"):
            continue  # the JSON 404 of unknown paths
        assert path in paths, path
        if route.method != "ANY":  # App API routes; Sync Node paths take every method
            assert route.method.lower() in paths[path], (route.method, path)


# ==================================================================================================
# OpenAPI document: schemathesis against a live server
# ==================================================================================================


@pytest.fixture(scope="module")
def live_api(tmp_path_factory):
    """A real server with one user and an all-permissions API key; yields (schema, headers)."""
    database = str(tmp_path_factory.mktemp("schemathesis") / "syncnode.db")
    app = syncnode.create_app(database, **CHEAP_HASHING)
    setup = webtest.TestApp(app)
    token = setup.post_json("/account", {"id": "fuzz", "password": "fuzz password"}).json["token"]
    secret = setup.post_json(
        "/api/api-keys", {"permissions": ["all"]}, headers=bearer_headers(token)
    ).json["secret"]
    server = waitress.server.create_server(app, host="127.0.0.1", port=0, threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{server.effective_port}"
    schema = schemathesis.openapi.from_dict(syncnode.openapi_document())
    yield schema, base_url, {"x-api-key": secret}
    server.close()
    thread.join(timeout=5)
    app.close()


#: (method, path) of every operation of the document, read in memory: loading a schemathesis
#: schema at import would look for its configuration file. live_api's schema has the operations.
FUZZ_OPERATIONS = [
    (method.upper(), path)
    for path, item in syncnode.openapi_document()["paths"].items()
    for method in item
    if method in ("get", "put", "post", "delete", "patch", "head", "options", "trace")
]
FUZZ_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
#: These end the fuzzing credentials' reach, so they run last in their own test.
DESTRUCTIVE = {("DELETE", "/account"), ("DELETE", "/auth")}


@pytest.mark.parametrize(
    "method, path",
    [
        pytest.param(method, path, id=f"{method} {path}")
        for method, path in FUZZ_OPERATIONS
        if (method, path) not in DESTRUCTIVE
    ],
)
def test_openapi_schemathesis_finds_no_mismatch_and_no_500(method, path, live_api):
    schema, base_url, headers = live_api
    operation = schema[path][method]

    @given(case=operation.as_strategy())
    @settings(
        max_examples=10, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def call(case):
        case.call_and_validate(base_url=base_url, headers=headers, timeout=10, checks=FUZZ_CHECKS)

    call()


# ==================================================================================================
# OpenAPI document: clients generated from it
# ==================================================================================================

# Each client runs the same scenario (two users, create and update with the returned token, a
# conditional GET answered 304, the listing, the change feed with a tombstone, a batch of a PUT
# and a DELETE, a share and a read by the second user) and records every step as {status, data,
# error, headers}. One function checks that record, so both clients are held to the same
# answers; it lists every difference at once.

#: Seconds for one generator or compiler run.
GENERATE_TIMEOUT = 120

#: The npm packages, pinned: @hey-api/openapi-ts asks for an exact pin while below 1.0, 0.95 is
#: its last release for Node.js 20 (0.99 needs 22.18), and it needs TypeScript 5 (TypeScript 7
#: no longer has the compiler API it calls, ts.NewLineKind among it).
NPM_PACKAGES = ("@hey-api/openapi-ts@0.95.0", "typescript@5.9.3", "@redocly/cli@2.77.0")

#: The oldest Node.js that @hey-api/openapi-ts 0.95 and @redocly/cli 2.77 both run on.
NODE_MINIMUM = (20, 19)

#: The scenario's operations: the name both clients use for them, and what they are.
SCENARIO_OPERATIONS = {
    "register": ("post", "/account"),
    "put": ("put", "/store/{key}"),
    "get": ("get", "/store/{key}"),
    "remove": ("delete", "/store/{key}"),
    "list": ("get", "/store"),
    "batch": ("post", "/batch"),
    "share": ("put", "/permission/{key}"),
    "holders": ("get", "/permission/{key}"),
}

#: The values the scenario stores: binary, not UTF-8, and one empty.
VALUES = {
    "first": b"buy milk\x00\xff",
    "second": b"\xffbuy milk and eggs\r\n",
    "empty": b"",
    "third": b"hello\x80",
}

#: The response headers each step records.
RECORDED_HEADERS = ("x-sync-token", "etag", "x-sync-seq", "x-sync-meta")


# Fixtures -----------------------------------------------------------------------------------------


@pytest.fixture
def generated_server(start_server) -> LiveServer:
    return start_server()


@pytest.fixture
def document(generated_server, tmp_path) -> Path:
    """The document the live server serves at GET /openapi.json, saved as a file."""
    reply = generated_server.request("GET", "/openapi.json")
    assert reply.status_int == 200, reply.body
    path = tmp_path / "openapi.json"
    path.write_bytes(reply.body)
    return path


def run(command: list[str], cwd: Path, what: str, **kw) -> subprocess.CompletedProcess:
    """Run a tool with a time limit; fail the test when it runs over."""
    timeout = kw.pop("timeout", GENERATE_TIMEOUT)
    try:
        return subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{what} ran over {timeout} s: {error.stdout} {error.stderr}", pytrace=False)


def node_env() -> dict[str, str]:
    """The environment for npm and the Node.js tools: no update checks, no telemetry, no colour."""
    return {
        **os.environ,
        "npm_config_update_notifier": "false",
        "REDOCLY_TELEMETRY": "off",
        "REDOCLY_SUPPRESS_UPDATE_NOTICE": "true",
        "NO_COLOR": "1",
        "FORCE_COLOR": "0",
    }


@pytest.fixture(scope="session")
def npm_tools(tmp_path_factory) -> Path:
    """A folder with @hey-api/openapi-ts, TypeScript and @redocly/cli from npm, once per session."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        skip_or_fail("node and npm are needed for @hey-api/openapi-ts and @redocly/cli")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
    found = re.match(r"v(\d+)\.(\d+)", version.stdout.strip())
    if found is None or (int(found[1]), int(found[2])) < NODE_MINIMUM:
        skip_or_fail(f"the npm tools need Node.js 20.19 or newer, not {version.stdout.strip()}")
    installs = ("@hey-api/openapi-ts", "typescript", "@redocly/cli")
    return npm_folder(tmp_path_factory, "npm-tools", NPM_PACKAGES, installs)


# The scenario and its checks ----------------------------------------------------------------------


class Checks:
    """Collect the differences between a client's record and the answers the server must give."""

    def __init__(self, steps: dict[str, dict]) -> None:
        self.steps = steps
        self.problems: list[str] = []

    def step(self, name: str, status: int) -> dict:
        """Check a step's status; return the step (empty when it did not run)."""
        step = self.steps.get(name)
        if step is None:
            self.problems.append(f"{name}: did not run")
            return {}
        if step.get("exception"):
            self.problems.append(f"{name}: raised {step['exception']}")
        elif step["status"] != status:
            self.problems.append(
                f"{name}: status {step['status']}, expected {status}"
                f" (data {step['data']!r}, error {step['error']!r})"
            )
        return step

    def equal(self, label: str, actual: Any, expected: Any) -> None:
        if actual != expected:
            self.problems.append(f"{label}: {actual!r}, expected {expected!r}")

    def true(self, label: str, condition: bool, shown: Any) -> None:
        if not condition:
            self.problems.append(f"{label}: {shown!r}")


def fail_on(problems: list[str]) -> None:
    """Fail the test with every problem, one a line, when there is any."""
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def header(step: dict, name: str) -> str | None:
    return step.get("headers", {}).get(name)


def scenario_problems(steps: dict[str, dict]) -> list[str]:
    """Check a client's record of the scenario; return every difference, in step order."""
    check = Checks(steps)
    for name in ("registerAlice", "registerBob"):
        data = check.step(name, 200).get("data") or {}
        check.true(f"{name}: a Session", set(data) == {"token", "expiration"}, data)

    created = check.step("create", 204)
    first = header(created, "x-sync-token")
    check.true("create: X-Sync-Token", bool(first), created.get("headers"))
    check.equal("create: ETag", header(created, "etag"), f'"{first}"')
    updated = check.step("update", 204)
    second = header(updated, "x-sync-token")
    check.true("update: a new X-Sync-Token", bool(second) and second != first, updated)
    stale = check.step("updateStale", 409)
    check.equal("updateStale: code", (stale.get("error") or {}).get("code"), "KEY01")

    read = check.step("read", 200)
    check.equal("read: the value", read.get("data"), {"base64": b64(VALUES["second"])})
    check.equal("read: X-Sync-Token", header(read, "x-sync-token"), second)
    check.equal("read: ETag", header(read, "etag"), f'"{second}"')
    check.equal("read: X-Sync-Meta (the update sent none)", header(read, "x-sync-meta"), None)
    unchanged = check.step("readUnchanged", 304)
    check.equal("readUnchanged: ETag", header(unchanged, "etag"), f'"{second}"')

    empty = check.step("createEmpty", 204)
    old = header(empty, "x-sync-token")
    listing = check.step("listing", 200)
    check.equal(
        "listing: entries",
        listing.get("data"),
        [
            {"key": "notes/old", "permission": "OWN", "token": old},
            {"key": "notes/today", "permission": "OWN", "token": second},
        ],
    )
    cursor = header(listing, "x-sync-seq") or ""
    check.true("listing: X-Sync-Seq", cursor.isdigit(), listing.get("headers"))

    check.step("removeOld", 204)
    feed = check.step("feed", 200)
    entries = feed.get("data") or []
    seqs = [entry.get("seq") if isinstance(entry, dict) else None for entry in entries]
    check.equal(
        "feed: a tombstone for notes/old",
        entries,
        [{"key": "notes/old", "deleted": True, "seq": seqs[0] if seqs else None}],
    )
    check.true(
        "feed: seq after the cursor",
        all(isinstance(seq, int) and cursor.isdigit() and seq > int(cursor) for seq in seqs),
        seqs,
    )
    after_delete = header(feed, "x-sync-seq") or ""
    check.true("feed: X-Sync-Seq", after_delete.isdigit(), feed.get("headers"))

    batch = check.step("batch", 200)
    results = (batch.get("data") or {}).get("results") or [{}, {}]
    third = results[0].get("token")
    check.true("batch: the PUT's new token", isinstance(third, str) and third, results)
    expected = [{"key": "notes/a", "token": third}, {"key": "notes/today", "token": None}]
    check.equal("batch: results", results, expected)
    changes = check.step("feedAfterBatch", 200)
    by_key = {entry.get("key"): entry for entry in changes.get("data") or []}
    live_seq = by_key.get("notes/a", {}).get("seq")
    gone_seq = by_key.get("notes/today", {}).get("seq")
    check.equal(
        "feedAfterBatch: a live entry and a tombstone",
        by_key,
        {
            "notes/a": {"key": "notes/a", "permission": "OWN", "token": third, "seq": live_seq},
            "notes/today": {"key": "notes/today", "deleted": True, "seq": gone_seq},
        },
    )
    check.true(
        "feedAfterBatch: integer seqs after the previous cursor",
        all(
            isinstance(seq, int) and after_delete.isdigit() and seq > int(after_delete)
            for seq in (live_seq, gone_seq)
        ),
        (live_seq, gone_seq),
    )

    check.step("share", 204)
    shared = check.step("bobRead", 200)
    check.equal("bobRead: the value", shared.get("data"), {"base64": b64(VALUES["third"])})
    check.equal("bobRead: X-Sync-Token", header(shared, "x-sync-token"), third)
    bob_listing = check.step("bobListing", 200)
    check.equal(
        "bobListing: entries",
        bob_listing.get("data"),
        [{"key": "notes/a", "permission": "READ", "token": third}],
    )
    bob_feed = check.step("bobFeed", 200)
    entries = bob_feed.get("data") or [{}]
    check.equal(
        "bobFeed: only a live entry",
        entries,
        [{"key": "notes/a", "permission": "READ", "token": third, "seq": entries[0].get("seq")}],
    )
    check.true("bobFeed: an integer seq", isinstance(entries[0].get("seq"), int), entries)
    holders = check.step("bobHolders", 200)
    check.equal(
        "bobHolders: entries",
        holders.get("data"),
        [{"user": "alice", "permission": "OWN"}, {"user": "bob", "permission": "READ"}],
    )
    refused = check.step("bobWrite", 403)
    check.equal("bobWrite: code", (refused.get("error") or {}).get("code"), "PERM01")
    return check.problems


# openapi-python-client ----------------------------------------------------------------------------


def snake_case(name: str) -> str:
    """A name as openapi-python-client spells its modules: storePut and store-put give store_put."""
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_").lower()


def python_module_name(document: dict, method: str, path: str) -> str:
    """The module openapi-python-client writes for an operation: api.<tag>.<operation id>.

    Without an operationId it names the operation after its method and path (put_store_key).
    """
    operation = document["paths"][path][method]
    tag = (operation.get("tags") or ["default"])[0]
    return f"api.{snake_case(tag)}.{snake_case(operation.get('operationId') or method + path)}"


def generate_python_client(document: Path, folder: Path) -> tuple[str, subprocess.CompletedProcess]:
    """Generate a client package into folder; return its import name and the generator's run."""
    if importlib.util.find_spec("openapi_python_client") is None:
        skip_or_fail("openapi-python-client is not installed (it is in the test extra)")
    # No post hooks: they run ruff on the generated code, which only changes its layout.
    config = folder / "config.json"
    config.write_text('{"post_hooks": []}\n')
    package = f"syncnode_client_{uuid.uuid4().hex[:12]}"  # unique: sys.modules outlives a test
    command = [
        sys.executable, "-m", "openapi_python_client", "generate", "--path", str(document),
        "--output-path", str(folder / package), "--meta", "none", "--config", str(config),
    ]  # fmt: skip
    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "200"}
    return package, run(command, folder, "openapi-python-client", env=env)


@pytest.fixture
def python_client(document, tmp_path) -> Iterator[Any]:
    """The client package generated from the served document, imported."""
    folder = tmp_path / "python-client"
    folder.mkdir()
    package, done = generate_python_client(document, folder)
    assert done.returncode == 0, done.stdout + done.stderr
    sys.path.insert(0, str(folder))
    importlib.invalidate_caches()
    try:
        yield importlib.import_module(package)
    finally:
        sys.path.remove(str(folder))
        for name in [name for name in sys.modules if name.split(".")[0] == package]:
            del sys.modules[name]


def plain(value: Any) -> Any:
    """A parsed answer as JSON-like data: models by to_dict(), binary values as base64."""
    if value is None or isinstance(value, str | int | bool):
        return value
    if isinstance(value, bytes):
        return {"base64": b64(value)}
    if hasattr(value, "payload"):  # types.File
        return {"base64": b64(value.payload.read())}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list):
        return [plain(item) for item in value]
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value


class PythonScenario:
    """Drive the scenario through the generated package's *_detailed functions."""

    def __init__(self, package: Any, document: dict, url: str) -> None:
        self.package, self.document, self.url = package, document, url
        self.steps: dict[str, dict] = {}
        client = importlib.import_module(f"{package.__name__}.client")
        self.types = importlib.import_module(f"{package.__name__}.types")
        common = {"base_url": url, "timeout": 10.0, "raise_on_unexpected_status": True}
        self.clients = [client.Client(**common)]
        self.anonymous = self.clients[0]

        def authenticated(token: str | None) -> Any:
            self.clients.append(client.AuthenticatedClient(token=token or "", **common))
            return self.clients[-1]

        self.authenticated = authenticated

    def operation(self, name: str) -> Callable:
        """The sync_detailed function generated for one of SCENARIO_OPERATIONS."""
        method, path = SCENARIO_OPERATIONS[name]
        module = f"{self.package.__name__}.{python_module_name(self.document, method, path)}"
        try:
            return importlib.import_module(module).sync_detailed
        except ModuleNotFoundError:
            message = f"no module {module} was generated for {method.upper()} {path}"
            raise LookupError(message) from None

    def body(self, function: Callable, data: Any) -> Any:
        """Build the body argument from JSON-like data or bytes, by the function's annotation."""
        annotation = typing.get_type_hints(function)["body"]
        if isinstance(data, bytes):
            if annotation is self.types.File:
                return self.types.File(io.BytesIO(data), mime_type="application/octet-stream")
            return data
        if typing.get_origin(annotation) is list:
            item = typing.get_args(annotation)[0]
            return [item.from_dict(entry) for entry in data]
        return annotation.from_dict(data)

    def step(self, name: str, operation: str, client: Any, body: Any = None, **kw) -> dict:
        """Call an operation, record {status, data, error, headers} or the exception."""
        try:
            function = self.operation(operation)
            if body is not None:
                kw["body"] = self.body(function, body)
            response = function(client=client, **kw)
        except Exception as error:  # recorded; the checks report it
            self.steps[name] = {"exception": f"{type(error).__name__}: {error}"}
            return self.steps[name]
        parsed = plain(response.parsed)
        status = int(response.status_code)
        self.steps[name] = {
            "status": status,
            "data": parsed if status < 400 else None,
            "error": parsed if status >= 400 else None,
            "headers": {
                key: response.headers[key] for key in RECORDED_HEADERS if key in response.headers
            },
        }
        return self.steps[name]

    def run(self) -> dict[str, dict]:
        step = self.step
        tokens = {}
        for name, user in (("registerAlice", "alice"), ("registerBob", "bob")):
            session = step(name, "register", self.anonymous, {"id": user, "password": PASSWORD})
            tokens[user] = (session.get("data") or {}).get("token")
        alice, bob = self.authenticated(tokens["alice"]), self.authenticated(tokens["bob"])
        today, meta = "notes/today", "text/plain"
        created = step("create", "put", alice, VALUES["first"], key=today, x_sync_meta=meta)
        first = header(created, "x-sync-token") or "none"
        updated = step("update", "put", alice, VALUES["second"], key=today, x_sync_token=first)
        second = header(updated, "x-sync-token") or "none"
        step("updateStale", "put", alice, b"stale", key=today, x_sync_token=first)
        step("read", "get", alice, key=today)
        step("readUnchanged", "get", alice, key=today, if_none_match=f'"{second}"')
        empty = step("createEmpty", "put", alice, VALUES["empty"], key="notes/old")
        old = header(empty, "x-sync-token")
        cursor = header(step("listing", "list", alice), "x-sync-seq") or "0"
        step("removeOld", "remove", alice, key="notes/old", x_sync_token=old or "none")
        after_delete = header(step("feed", "list", alice, since=int(cursor)), "x-sync-seq") or "0"
        operations = [
            {"method": "PUT", "key": "notes/a", "token": None, "value": b64(VALUES["third"]),
             "meta": None},
            {"method": "DELETE", "key": today, "token": second},
        ]  # fmt: skip
        step("batch", "batch", alice, {"operations": operations})
        step("feedAfterBatch", "list", alice, since=int(after_delete))
        grants = [{"user": "bob", "permission": "READ"}]
        step("share", "share", alice, grants, key="notes/a")
        third = header(step("bobRead", "get", bob, key="notes/a"), "x-sync-token") or "none"
        step("bobListing", "list", bob)
        step("bobFeed", "list", bob, since=0)
        step("bobHolders", "holders", bob, key="notes/a")
        step("bobWrite", "put", bob, b"mine now", key="notes/a", x_sync_token=third)
        return self.steps

    def close(self) -> None:
        """Close the httpx connection pools the clients opened."""
        for client in self.clients:
            client.get_httpx_client().close()


def test_python_client_generates_every_operation_without_warnings(document, tmp_path):
    folder = tmp_path / "python-client"
    folder.mkdir()
    package, done = generate_python_client(document, folder)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    served = json.loads(document.read_text())
    modules = {
        f"{method.upper()} {path}": python_module_name(served, method, path)
        for path, item in served["paths"].items()
        for method in item
        if method != "parameters"
    }
    missing = [
        f"{operation} ({module})"
        for operation, module in modules.items()
        if not (folder / package / (module.replace(".", "/") + ".py")).exists()
    ]
    if "Warning(s) encountered" in output or missing:
        pytest.fail(f"operations not generated: {missing}\n{output}", pytrace=False)


def test_python_client_runs_the_sync_scenario(python_client, document, generated_server):
    scenario = PythonScenario(python_client, json.loads(document.read_text()), generated_server.url)
    try:
        steps = scenario.run()
    finally:
        scenario.close()
    fail_on(scenario_problems(steps))


# @hey-api/openapi-ts (fetch client), compiled by tsc, run by Node.js ------------------------------


def camel_case(words: list[str]) -> str:
    words = [word for word in words if word]
    return words[0][:1].lower() + words[0][1:] + "".join(w[:1].upper() + w[1:] for w in words[1:])


def typescript_function_name(document: dict, method: str, path: str) -> str:
    """The SDK function @hey-api/openapi-ts writes for an operation: its camelCased operationId.

    Without an operationId it names the operation after its method and path (putStoreByKey).
    """
    operation = document["paths"][path][method]
    if operation.get("operationId"):
        return camel_case(re.split(r"[^0-9A-Za-z]+", operation["operationId"]))
    words = [method]
    for segment in path.split("/"):
        if segment.startswith("{"):
            words += ["by", *re.split(r"[^0-9A-Za-z]+", segment[1:-1])]
        else:
            words += re.split(r"[^0-9A-Za-z]+", segment)
    return camel_case(words)


#: The scenario for the generated TypeScript SDK. The operations come in as `api`, one property
#: per entry of SCENARIO_OPERATIONS, written above this text from the served document's ids.
TS_SCENARIO = r"""
declare const process: { argv: string[] };

type Recorded = {
  status: number | null;
  data: unknown;
  error: unknown;
  headers: Record<string, string>;
  exception?: string;
};
type Result = { data?: unknown; error?: unknown; response?: Response };

const config = JSON.parse(process.argv[2]) as {
  baseUrl: string;
  password: string;
  values: Record<string, string>;
  recordedHeaders: string[];
};
const results: Record<string, Recorded> = {};
const bytes = (text: string) => Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
const base64 = (data: Uint8Array) => btoa(Array.from(data, (b) => String.fromCharCode(b)).join(''));
const value = (name: string) => new Blob([bytes(config.values[name])]);

async function step(name: string, call: () => Promise<Result>): Promise<Recorded> {
  try {
    const result = await call();
    const headers: Record<string, string> = {};
    for (const name of config.recordedHeaders) {
      const found = result.response?.headers.get(name);
      if (found !== null && found !== undefined) headers[name] = found;
    }
    let data = result.data ?? null;
    if (data instanceof Blob) data = { base64: base64(new Uint8Array(await data.arrayBuffer())) };
    const status = result.response?.status ?? null;
    results[name] = { status, data, error: result.error ?? null, headers };
  } catch (error) {
    const exception = String(error);
    results[name] = { status: null, data: null, error: null, headers: {}, exception };
  }
  return results[name];
}

const clientFor = (token?: string) =>
  createClient(createConfig({ baseUrl: config.baseUrl, auth: token }));
const tokenOf = (recorded: Recorded) => (recorded.data as { token?: string } | null)?.token;
const seqOf = (recorded: Recorded) => Number(recorded.headers['x-sync-seq'] ?? 0);

async function main() {
  const anonymous = clientFor();
  const credentials = (id: string) => ({ id, password: config.password });
  const alice = clientFor(tokenOf(await step('registerAlice', () =>
    api.register({ client: anonymous, body: credentials('alice') }))));
  const bob = clientFor(tokenOf(await step('registerBob', () =>
    api.register({ client: anonymous, body: credentials('bob') }))));
  const today = { key: 'notes/today' };
  const created = await step('create', () => api.put({
    client: alice, path: today, body: value('first'), headers: { 'X-Sync-Meta': 'text/plain' },
  }));
  const first = created.headers['x-sync-token'] ?? 'none';
  const updated = await step('update', () => api.put({
    client: alice, path: today, body: value('second'), headers: { 'X-Sync-Token': first },
  }));
  const second = updated.headers['x-sync-token'] ?? 'none';
  await step('updateStale', () => api.put({
    client: alice, path: today, body: new Blob(['stale']), headers: { 'X-Sync-Token': first },
  }));
  await step('read', () => api.get({ client: alice, path: today }));
  await step('readUnchanged', () => api.get({
    client: alice, path: today, headers: { 'If-None-Match': `"${second}"` },
  }));
  const old = await step('createEmpty', () => api.put({
    client: alice, path: { key: 'notes/old' }, body: value('empty'),
  }));
  const listing = await step('listing', () => api.list({ client: alice }));
  await step('removeOld', () => api.remove({
    client: alice, path: { key: 'notes/old' },
    headers: { 'X-Sync-Token': old.headers['x-sync-token'] ?? 'none' },
  }));
  const feed = await step('feed', () =>
    api.list({ client: alice, query: { since: seqOf(listing) } }));
  await step('batch', () => api.batch({
    client: alice,
    body: {
      operations: [
        { method: 'PUT', key: 'notes/a', token: null, value: config.values.third, meta: null },
        { method: 'DELETE', key: 'notes/today', token: second },
      ],
    },
  }));
  await step('feedAfterBatch', () => api.list({ client: alice, query: { since: seqOf(feed) } }));
  await step('share', () => api.share({
    client: alice, path: { key: 'notes/a' }, body: [{ user: 'bob', permission: 'READ' }],
  }));
  const read = await step('bobRead', () => api.get({ client: bob, path: { key: 'notes/a' } }));
  await step('bobListing', () => api.list({ client: bob }));
  await step('bobFeed', () => api.list({ client: bob, query: { since: 0 } }));
  await step('bobHolders', () => api.holders({ client: bob, path: { key: 'notes/a' } }));
  await step('bobWrite', () => api.put({
    client: bob, path: { key: 'notes/a' }, body: new Blob(['mine now']),
    headers: { 'X-Sync-Token': read.headers['x-sync-token'] ?? 'none' },
  }));
  console.log(JSON.stringify(results));
}

main();

// Checked by tsc only: what the document's types promise a TypeScript caller.
type IsBinary<T> = unknown extends T ? false : [T] extends [Blob] ? true : false;
type BatchOperation = Parameters<typeof api.batch>[0]['body']['operations'][number];
// PUT /store/{key} takes the value as binary (application/octet-stream, format: binary).
export const putBodyIsBinary: IsBinary<Parameters<typeof api.put>[0]['body']> = true;
// GET /store/{key} answers the value as binary.
export const getDataIsBinary: IsBinary<Awaited<ReturnType<typeof api.get<true>>>['data']> = true;
// A batch operation is a PUT, which needs its value, or a DELETE (oneOf).
// @ts-expect-error: a PUT without a value is no batch operation
export const putWithoutValue: BatchOperation = { method: 'PUT', key: 'notes/a' };
"""

TS_CONFIG = {
    "compilerOptions": {
        "target": "es2022",
        "module": "commonjs",
        "moduleResolution": "node10",
        "lib": ["es2022", "dom", "dom.iterable"],
        "types": [],
        "strict": True,
        "skipLibCheck": True,
        "rootDir": ".",
        "outDir": "dist",
    },
    "include": ["scenario.ts", "client/**/*.ts"],
}


def typescript_scenario(document: dict) -> str:
    """The scenario's source, its `api` object naming the SDK functions the document yields."""
    names = {
        name: typescript_function_name(document, method, path)
        for name, (method, path) in SCENARIO_OPERATIONS.items()
    }
    lines = [
        "import * as sdk from './client/sdk.gen';",
        "import { createClient, createConfig } from './client/client';",
        "",
        "const api = {",
        *(f"  {name}: sdk.{function}," for name, function in names.items()),
        "};",
    ]
    return "\n".join(lines) + "\n" + TS_SCENARIO


@pytest.fixture
def typescript_client(npm_tools, document, tmp_path) -> tuple[Path, subprocess.CompletedProcess]:
    """Generate the SDK with its fetch client beside the scenario; compile both with tsc.

    Returns the folder and tsc's run. tsc writes JavaScript even when it finds type errors, so
    the scenario runs either way.
    """
    folder = tmp_path / "typescript-client"
    folder.mkdir()
    (folder / "package.json").write_text('{"private": true, "type": "commonjs"}\n')
    generator = npm_tools / "node_modules" / "@hey-api" / "openapi-ts" / "bin" / "run.js"
    command = [
        shutil.which("node") or "node", str(generator), "--input", str(document),
        "--output", str(folder / "client"), "--client", "@hey-api/client-fetch", "--no-log-file",
    ]  # fmt: skip
    done = run(command, folder, "@hey-api/openapi-ts", env=node_env())
    assert done.returncode == 0, done.stdout + done.stderr
    served = json.loads(document.read_text())
    (folder / "scenario.ts").write_text(typescript_scenario(served))
    (folder / "tsconfig.json").write_text(json.dumps(TS_CONFIG, indent=2))
    tsc = npm_tools / "node_modules" / "typescript" / "bin" / "tsc"
    compiled = run([shutil.which("node") or "node", str(tsc), "-p", str(folder)], folder, "tsc")
    assert (folder / "dist" / "scenario.js").exists(), compiled.stdout + compiled.stderr
    return folder, compiled


def test_typescript_client_type_checks_with_binary_values_and_batch_one_of(typescript_client):
    folder, compiled = typescript_client
    if compiled.returncode == 0:
        return
    source = (folder / "scenario.ts").read_text().splitlines()
    report = []
    for diagnostic in (compiled.stdout + compiled.stderr).splitlines():
        report.append(diagnostic)
        found = re.match(r"scenario\.ts\((\d+),", diagnostic)
        if found:  # show the line and the comment above it, which says what it checks
            report += [f"    {line}" for line in source[max(0, int(found[1]) - 2) : int(found[1])]]
    fail_on(report)


def test_typescript_client_runs_the_sync_scenario(typescript_client, generated_server):
    folder, _ = typescript_client
    config = {
        "baseUrl": generated_server.url,
        "password": PASSWORD,
        "values": {name: b64(data) for name, data in VALUES.items()},
        "recordedHeaders": list(RECORDED_HEADERS),
    }
    done = run(
        [shutil.which("node") or "node", str(folder / "dist" / "scenario.js"), json.dumps(config)],
        folder, "the TypeScript scenario", timeout=NODE_RUN_TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    steps = json.loads(done.stdout)
    fail_on(scenario_problems(steps))


# Redocly lint -------------------------------------------------------------------------------------


def pointer_operation(pointer: str) -> str:
    """'#/paths/~1store~1{key}/put/responses' as 'PUT /store/{key}'; other pointers as they are."""
    parts = [part.replace("~1", "/").replace("~0", "~") for part in pointer.split("/")[1:]]
    if len(parts) >= 3 and parts[0] == "paths":
        return f"{parts[2].upper()} {parts[1]}"
    return pointer


def justified(rule: str, operation: str) -> bool:
    """Whether the document keeps this warning on purpose; each reason is given below."""
    if rule != "operation-4xx-response":
        return False
    # GET /health, GET /.well-known/immich and GET /openapi.json take no parameter, no body and
    # no credential: a GET of them answers no 4XX (GET /health lists its 500), so they have none
    # to document beyond "default".
    if operation in ("GET /health", "GET /.well-known/immich", "GET /openapi.json"):
        return True
    # The App API under /api follows Immich's own document, which lists only each operation's
    # success answer; its errors are the AppError layout under "default", and @immich/sdk derives
    # nothing from error statuses.
    return operation.split(" ")[1].startswith("/api/")


def test_redocly_lint_finds_no_errors_and_only_justified_warnings(npm_tools, document):
    # Warnings seen on the document before the issue "One route table" (with the recommended
    # rules): security-defined (error) for the six public operations, which have no security
    # key instead of `security: []`; no-empty-servers (error): no `servers`;
    # operation-operationId for the 19 Sync Node operations; operation-4xx-response for all 43
    # operations, which list only "default" for their errors.
    cli = npm_tools / "node_modules" / "@redocly" / "cli" / "bin" / "cli.js"
    command = [
        shutil.which("node") or "node", str(cli), "lint", str(document),
        "--extends", "recommended", "--format", "json",
    ]  # fmt: skip
    done = run(command, document.parent, "redocly lint", env=node_env())
    assert done.stdout.strip(), done.stderr
    problems = json.loads(done.stdout)["problems"]
    found = [
        (p["severity"], p["ruleId"], pointer_operation(p["location"][0]["pointer"]), p["message"])
        for p in problems
    ]
    errors = [f"{rule} at {at}: {text}" for level, rule, at, text in found if level == "error"]
    unjustified = [
        f"{rule} at {at}: {text}"
        for level, rule, at, text in found
        if level != "error" and not justified(rule, at)
    ]
    if errors or unjustified:
        fail_on(["errors:", *errors, "unjustified warnings:", *unjustified])


# ==================================================================================================
# App factory and embedding
# ==================================================================================================


@pytest.fixture
def two_apps(make_app, tmp_path):
    """Two apps in this process, each on its own database."""
    return make_app(str(tmp_path / "first.db")), make_app(str(tmp_path / "second.db"))


def test_embedding_two_apps_do_not_share_users(two_apps):
    first, second = (webtest.TestApp(each) for each in two_apps)
    alice = register_user(first)
    login = {"id": "alice", "password": PASSWORD}
    assert_error(second.post_json("/auth", login, status=401), 401, "AUTH01")
    assert_error(second.get("/store", headers=alice.headers, status=401), 401, "AUTH01")
    second.post_json("/account", login, status=200)


def test_embedding_two_apps_do_not_share_keys(two_apps):
    first, second = (webtest.TestApp(each) for each in two_apps)
    alice_first, alice_second = register_user(first), register_user(second)
    first.put("/store/notes/1", b"first", headers=alice_first.headers, status=204)
    assert_error(
        second.get("/store/notes/1", headers=alice_second.headers, status=404), 404, "ERR01"
    )
    assert second.get("/store", headers=alice_second.headers).json == []
    second.put("/store/notes/1", b"second", headers=alice_second.headers, status=204)
    assert first.get("/store/notes/1", headers=alice_first.headers).body == b"first"


def test_embedding_two_apps_keep_their_own_settings(make_app, tmp_path):
    closed = webtest.TestApp(make_app(str(tmp_path / "first.db"), registration="closed"))
    open_ = webtest.TestApp(make_app(str(tmp_path / "second.db")))
    login = {"id": "alice", "password": PASSWORD}
    assert_error(closed.post_json("/account", login, status=403), 403, "ACCT01")
    open_.post_json("/account", login, status=200)


def test_embedding_closing_one_app_leaves_the_other_serving(two_apps):
    first, second = (webtest.TestApp(each) for each in two_apps)
    register_user(first)
    alice = register_user(second)
    second.put("/store/kept", b"before", headers=alice.headers, status=204)
    two_apps[0].close()
    assert second.get("/store/kept", headers=alice.headers).body == b"before"
    second.put("/store/new", b"after", headers=alice.headers, status=204)
    assert second.get("/health").json == {"database": True, "disk": True}


MOUNTS = [
    pytest.param(mount_with_bottle("/sync"), id="bottle-mount-sync"),
    pytest.param(mount_with_bottle("/sync/"), id="bottle-mount-sync-slash"),
    pytest.param(mount_with_dispatcher, id="prefix-dispatcher"),
]


@pytest.fixture(params=MOUNTS)
def mounted_client(request, app) -> webtest.TestApp:
    """The app mounted under /sync in a bigger WSGI application."""
    return webtest.TestApp(request.param(app))


def test_embedding_mounted_app_stores_unicode_key_under_prefix(mounted_client):
    alice = register_user(mounted_client, prefix="/sync")
    path = quote("/sync/store/ключ/日本 🎉")
    written = mounted_client.put(path, b"mounted", headers=alice.headers, status=204)
    got = mounted_client.get(path, headers=alice.headers, status=200)
    assert got.body == b"mounted"
    assert got.headers["X-Sync-Token"] == written.headers["X-Sync-Token"]
    listed = mounted_client.get("/sync/store", headers=alice.headers).json
    assert [entry["key"] for entry in listed] == ["ключ/日本 🎉"]


def test_embedding_mounted_app_unknown_path_is_err01(mounted_client):
    assert_error(mounted_client.get("/sync/no/such/path", status=404), 404, "ERR01")


@pytest.mark.parametrize("mount", MOUNTS)
def test_embedding_mounted_app_non_utf8_key_is_req01(app, db, mount):
    client = webtest.TestApp(mount(app))
    alice = register_user(client, prefix="/sync")
    reply = client.put("/sync/store/a%FFb", b"v", headers=alice.headers, status="*")
    assert_error(reply, 400, "REQ01")
    assert db.execute("SELECT count(*) FROM items").fetchone() == (0,)


#: Run in a fresh interpreter: import syncnode and report what the import changed.
IMPORT_PROBE = """
import json, logging, sqlite3, sys, threading
adapters = dict(sqlite3.adapters)
import syncnode
print(json.dumps({
    "root_handlers": [repr(handler) for handler in logging.getLogger().handlers],
    "threads": [thread.name for thread in threading.enumerate()],
    "waitress": sorted(name for name in sys.modules if name.split(".")[0] == "waitress"),
    "new_adapters": len(sqlite3.adapters) - len(adapters),
}))
"""


@pytest.fixture(scope="module")
def import_report(tmp_path_factory) -> dict:
    """Import syncnode in a fresh interpreter whose cwd, HOME and TMPDIR are an empty directory."""
    home = tmp_path_factory.mktemp("import")
    env = {
        **os.environ,
        "HOME": str(home),
        "TMPDIR": str(home),
        "PYTHONPATH": os.path.dirname(os.path.abspath(syncnode.__file__)),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return {
        **json.loads(result.stdout),
        "stderr": result.stderr,
        "files": sorted(str(path.relative_to(home)) for path in home.rglob("*")),
    }


def test_embedding_import_adds_no_root_log_handler(import_report):
    assert import_report["root_handlers"] == []


def test_embedding_import_creates_no_file(import_report):
    assert import_report["files"] == []


def test_embedding_import_starts_no_thread(import_report):
    assert import_report["threads"] == ["MainThread"]


def test_embedding_import_writes_nothing_to_stderr(import_report):
    assert import_report["stderr"] == ""


def test_embedding_import_does_not_load_waitress(import_report):
    assert import_report["waitress"] == []


def test_embedding_import_registers_no_sqlite_adapter(import_report):
    assert import_report["new_adapters"] == 0


def test_embedding_database_in_a_missing_folder_raises_database_unusable(tmp_path):
    folder = tmp_path / "no-such-folder"
    with pytest.raises(syncnode.DatabaseUnusable) as raised:
        syncnode.create_app(str(folder / "x.db"), **CHEAP_HASHING)
    assert str(folder) in str(raised.value) and "not exist" in str(raised.value)
    assert not folder.exists()


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


#: SHA-256 of each migration script as released. Databases made by them exist from then on, so a
#: released script never changes: a schema change goes into a new script at the end.
RELEASED_SCHEMA_DIGESTS = [
    "1363828413368ce9afa0181767ae693462d1b1e3888d1e6b254bd344491924f5",
    "09ac1ffd4af396baab0a24d5c062e195f6fdcb10959dddf80c57ffd5096711b4",
    "6c260b96f5615db4e18335fa37f8c6f984fcb8fa84bf5d15d8e0f24ae1aa08b1",
    "13d257f7eb1120c35544647e526d72489849b31da3c5fae0472dc284acb39c17",
]


def test_migration_released_scripts_never_change():
    released = syncnode.SCHEMA[: len(RELEASED_SCHEMA_DIGESTS)]
    digests = [hashlib.sha256(script.encode()).hexdigest() for script in released]
    assert digests == RELEASED_SCHEMA_DIGESTS


def test_migration_a_version_6_database_gets_the_trigger_that_numbers_changes(db, make_app):
    syncnode.migrate(db, syncnode.kind_of(db).migrations[:6])
    with syncnode.transaction(db, write=True):
        db.execute(
            "INSERT INTO users (id, name, password_hash, created_ms) "
            "VALUES (1, 'alice', 'x', 0), (2, 'bob', 'x', 0)"
        )
        db.execute(
            "INSERT INTO items (id, key, token, updated_ms, size, value) "
            "VALUES (1, 'k', 't', 0, 1, ?)",
            (b"v",),
        )
        db.execute(
            "INSERT INTO permissions (item_id, user_id, level, seq) "
            "VALUES (1, 1, 3, 1), (1, 2, 1, 1)"
        )
    make_app()
    with syncnode.transaction(db, write=True):
        db.execute("UPDATE items SET token = 't2' WHERE id = 1")
    assert db.execute("SELECT seq FROM sync_state").fetchone()[0] == 2
    rows = db.execute("SELECT user_id, seq FROM permissions ORDER BY user_id").fetchall()
    assert [tuple(row) for row in rows] == [(1, 2), (2, 2)]


@pytest.fixture
def v1_data(db_path, clock) -> V1Data:
    return build_v1_database(db_path, int(clock.now * 1000))


@pytest.mark.sqlite
def test_migration_v1_database_reaches_the_newest_version(v1_data, app, db):
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(syncnode.SCHEMA)
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"users", "sessions", "reset_tokens", "items", "permissions", "api_keys"} <= tables


@pytest.mark.sqlite
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


@pytest.mark.sqlite
def test_migration_v1_sessions_get_device_fields_and_update_times(v1_data, app, db):
    rows = db.execute(
        "SELECT public_id, created_ms, updated_ms, expires_ms, parent_id, device_type, device_os,"
        " app_version FROM sessions ORDER BY id"
    ).fetchall()
    assert rows == [
        (public_id, created_ms, created_ms, expires_ms, None, "", "", None)
        for public_id, _, created_ms, expires_ms in v1_data.sessions.values()
    ]


@pytest.mark.sqlite
def test_migration_v1_sessions_authenticate_on_both_apis(v1_data, client, db, clock):
    for token, (public_id, name, created_ms, expires_ms) in v1_data.sessions.items():
        client.get("/store", headers=bearer_headers(token), status=200)
        me = client.get("/api/users/me", headers=bearer_headers(token), status=200).json
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
        app_sessions = client.get("/api/sessions", headers=bearer_headers(token)).json
        [app_current] = [entry for entry in app_sessions if entry["current"]]
        assert app_current["id"] == public_id
        assert app_current["createdAt"] == iso_ms(created_ms)
        # The first use over an hour after the last refresh moved updatedAt to now.
        assert app_current["updatedAt"] == iso_ms(int(clock.now * 1000))
        assert app_current["expiresAt"] == iso_ms(expires_ms)
        assert app_current["deviceType"] == "" and app_current["appVersion"] is None


@pytest.mark.sqlite
def test_migration_v1_sessions_are_listed_on_the_sync_node_api(v1_data, client):
    for token, (public_id, _, created_ms, expires_ms) in v1_data.sessions.items():
        listing = client.get("/account", headers=bearer_headers(token), status=200).json
        [current] = [entry for entry in listing if entry["current"]]
        assert current["id"] == public_id
        assert current["expiration"] == expires_ms and current["createdAt"] == created_ms


@pytest.mark.sqlite
def test_migration_v1_values_read_back_with_tokens_and_permissions(v1_data, client):
    for key, (value, token, meta, holders) in v1_data.items.items():
        expected_holders = [
            {"user": name, "permission": level} for name, level in sorted(holders.items())
        ]
        for name, level in holders.items():
            headers = bearer_headers(v1_data.token_of(name))
            response = client.get(f"/store/{key}", headers=headers, status=200)
            assert response.body == value
            assert response.headers["X-Sync-Token"] == token
            assert response.headers.get("X-Sync-Meta") == (meta or None)
            assert client.get(f"/permission/{key}", headers=headers).json == expected_holders
            listed = client.get("/store", headers=headers).json
            assert {"key": key, "permission": level, "token": token} in listed


@pytest.mark.sqlite
def test_migration_v1_tokens_still_guard_updates(v1_data, client):
    alice = User("alice@example.org", v1_data.token_of("alice@example.org"))
    assert_error(put(client, alice, "shared", b"new", token="stale", status=409), 409, "KEY01")
    response = put(client, alice, "shared", b"new", token="tok-shared-7", status=204)
    assert response.headers["X-Sync-Token"] != "tok-shared-7"
    assert client.get("/store/shared", headers=alice.headers).body == b"new"


@pytest.mark.sqlite
def test_migration_v1_passwords_and_reset_token_still_work(v1_data, client):
    for name in v1_data.users:
        client.post_json("/auth", {"id": name, "password": PASSWORD}, status=200)
        client.post_json("/api/auth/login", {"email": name, "password": PASSWORD}, status=201)
        client.reset()
    reset = {**bearer_headers(v1_data.reset_token), "Content-Type": "application/json"}
    client.post("/password", json.dumps({"password": "a new password"}), headers=reset, status=204)
    client.post_json("/auth", {"id": "bob", "password": "a new password"}, status=200)


@pytest.mark.sqlite
def test_migration_v1_users_keep_their_uuids_when_reopened(v1_data, make_app, db_path, db):
    make_app().close()
    first = db.execute("SELECT name, uuid, display_name FROM users ORDER BY id").fetchall()
    make_app().close()
    assert db.execute("SELECT name, uuid, display_name FROM users ORDER BY id").fetchall() == first


@pytest.mark.sqlite
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


@pytest.mark.sqlite
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


@pytest.mark.parametrize(
    "start",
    [
        pytest.param(0, id="from-empty"),
        pytest.param(1, id="from-v1"),
    ],
)
@pytest.mark.sqlite
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


@pytest.mark.sqlite
def test_migration_too_new_database_file_is_left_byte_for_byte(db_path):
    make_too_new_database(db_path)
    with open(db_path, "rb") as file:
        before = file.read()
    with pytest.raises(syncnode.DatabaseTooNew):
        syncnode.create_app(db_path, clock=FakeClock(), **CHEAP_HASHING)
    with open(db_path, "rb") as file:
        assert file.read() == before


@pytest.mark.skipif('not os.path.isdir("/proc/self/fd")', reason="needs /proc/self/fd")
@pytest.mark.sqlite
def test_migration_refused_database_leaves_no_connection_open(db_path):
    make_too_new_database(db_path)
    with pytest.raises(syncnode.DatabaseTooNew):
        syncnode.create_app(db_path, clock=FakeClock(), **CHEAP_HASHING)
    assert open_descriptors(db_path) == []


# ==================================================================================================
# CLI
# ==================================================================================================


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port on 127.0.0.1 that a listening socket holds for the whole test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def start_cli(tmp_path):
    """Start `python syncnode.py` in the background; terminate it and wait at teardown."""
    processes: list[subprocess.Popen] = []

    def start(*args: str, **variables: str) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, SYNCNODE_PY, *args],
            cwd=tmp_path,
            env=cli_env(**variables),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.terminate()
        try:
            process.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate(timeout=5)


def get_health(process: subprocess.Popen, port: int, timeout: float = 10) -> Reply:
    """Ask a starting server for GET /health until it answers; fail if it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            pytest.fail(f"syncnode exited with {process.returncode}: {process.stderr.read()}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            return call(conn, "GET", "/health")
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
        finally:
            conn.close()
        time.sleep(0.05)  # The server is still starting.


def assert_one_error_line(result: subprocess.CompletedProcess) -> str:
    """Assert a failed run that wrote exactly one `syncnode:` line and no traceback; return it."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("syncnode:"), result.stderr
    return lines[0]


def test_cli_serves_health(start_cli, tmp_path):
    port, database = free_port(), tmp_path / "flagged.db"
    process = start_cli("--port", str(port), "--database", str(database))
    reply = get_health(process, port)
    assert (reply.status_int, reply.json) == (200, {"database": True, "disk": True})
    assert database.exists()
    process.terminate()
    process.wait(timeout=5)


def test_cli_port_comes_from_environment_without_flag(start_cli):
    port = free_port()
    process = start_cli(SYNCNODE_PORT=str(port))
    assert get_health(process, port).status_int == 200


def test_cli_port_flag_beats_environment(start_cli, taken_port):
    """The variable names a taken port, so the server starts only if the flag wins."""
    port = free_port()
    process = start_cli("--port", str(port), SYNCNODE_PORT=str(taken_port))
    assert get_health(process, port).status_int == 200


def test_cli_interrupt_exits_zero(start_cli):
    port = free_port()
    process = start_cli("--port", str(port))
    get_health(process, port)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0
    assert "Traceback" not in stderr


def test_cli_taken_port_exits_with_one_line(tmp_path, taken_port):
    # At WARNING the start-up lines (such as the migration) stay out of stderr.
    result = run_cli(tmp_path, "--port", str(taken_port), "--log-level", "WARNING", timeout=20)
    assert str(taken_port) in assert_one_error_line(result)


def not_a_database(tmp_path) -> str:
    (tmp_path / "garbage.db").write_bytes(b"this is not a database" * 100)
    return str(tmp_path / "garbage.db")


def newer_schema(tmp_path) -> str:
    with contextlib.closing(sqlite3.connect(tmp_path / "newer.db")) as conn:
        conn.execute("PRAGMA user_version = 99")
    return str(tmp_path / "newer.db")


@pytest.mark.parametrize(
    "make_path",
    [
        pytest.param(lambda tmp_path: str(tmp_path / "missing" / "syncnode.db"), id="missing-dir"),
        pytest.param(lambda tmp_path: str(tmp_path), id="directory"),
        pytest.param(not_a_database, id="not-a-database"),
        pytest.param(newer_schema, id="newer-schema"),
    ],
)
def test_cli_unusable_database_exits_with_one_line(tmp_path, make_path):
    # On a free port a database that wrongly opens would serve until run_cli's timeout.
    database = make_path(tmp_path)
    result = run_cli(tmp_path, "--database", database, "--port", "0", timeout=20)
    assert "database" in assert_one_error_line(result)


def test_cli_unusable_host_exits_with_one_line(tmp_path):
    result = run_cli(
        tmp_path, "--host", "bad..host", "--port", "0", "--log-level", "WARNING", timeout=20
    )
    assert "bad..host" in assert_one_error_line(result)


@pytest.fixture(scope="module")
def help_run(tmp_path_factory) -> subprocess.CompletedProcess:
    return run_cli(tmp_path_factory.mktemp("help"), "--help", timeout=20)


def test_cli_help_exits_zero(help_run):
    assert help_run.returncode == 0


def test_cli_help_lists_every_flag(help_run):
    for item in dataclasses.fields(syncnode.Settings):
        assert f"--{item.name.replace('_', '-')}" in help_run.stdout


def test_cli_help_names_every_variable(help_run):
    for item in dataclasses.fields(syncnode.Settings):
        assert f"SYNCNODE_{item.name.upper()}" in help_run.stdout


@pytest.mark.parametrize(
    ("args", "variables", "named"),
    [
        pytest.param(["--registration", "maybe"], {}, "registration", id="flag-choice"),
        pytest.param(["--port", "eighty"], {}, "--port", id="flag-not-a-number"),
        pytest.param([], {"SYNCNODE_PORT": "abc"}, "SYNCNODE_PORT", id="variable-not-a-number"),
        pytest.param([], {"SYNCNODE_REGISTRATION": "maybe"}, "registration", id="variable-choice"),
        pytest.param([], {"SYNCNODE_PORT": "²"}, "SYNCNODE_PORT", id="variable-superscript-digit"),
    ],
)
def test_cli_bad_value_exits_2_naming_the_setting(tmp_path, args, variables, named):
    result = run_cli(tmp_path, *args, **variables, timeout=20)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last_line = result.stderr.splitlines()[-1]
    assert last_line.startswith("syncnode: error:") and named in last_line


def test_cli_taken_port_creates_no_database(tmp_path, taken_port):
    database = tmp_path / "new.db"
    result = run_cli(
        tmp_path,
        "--port",
        str(taken_port),
        "--database",
        str(database),
        "--log-level",
        "WARNING",
        timeout=20,
    )
    line = assert_one_error_line(result)
    assert result.returncode == 1
    assert "listen" in line
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_cli_database_in_a_missing_folder_says_the_folder_does_not_exist(tmp_path):
    folder = tmp_path / "no-such-folder"
    # Port 0: should the database wrongly open, the server would start (and time out).
    result = run_cli(
        tmp_path,
        "--database",
        str(folder / "x.db"),
        "--port",
        "0",
        "--log-level",
        "WARNING",
        timeout=20,
    )
    line = assert_one_error_line(result)
    assert result.returncode == 1
    assert str(folder) in line and "not exist" in line
    assert "unable to open" not in line
    assert not folder.exists()


@pytest.mark.parametrize(
    ("args", "variables", "named"),
    [
        pytest.param(["--access-log", "maybe"], {}, "--access-log", id="flag"),
        pytest.param([], {"SYNCNODE_ACCESS_LOG": "maybe"}, "SYNCNODE_ACCESS_LOG", id="variable"),
    ],
)
def test_cli_bad_boolean_lists_the_accepted_words(tmp_path, taken_port, args, variables, named):
    # The port is taken, so that a value wrongly accepted fails fast instead of serving.
    result = run_cli(tmp_path, *args, "--port", str(taken_port), **variables, timeout=20)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last_line = result.stderr.splitlines()[-1]
    assert last_line.startswith("syncnode: error:") and named in last_line
    for word in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        assert re.search(rf"\b{word}\b", last_line), word


# ==================================================================================================
# CLI: admin commands
# ==================================================================================================


@pytest.fixture
def admin(tmp_path, db_path):
    """Run an admin command on the test's database."""

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        return run_cli(tmp_path, "--database", db_path, *args, stdin=stdin)

    return run


def assert_exit_1_with_one_line(result: subprocess.CompletedProcess) -> str:
    """Assert exit status 1 with exactly one `syncnode:` line and no traceback; return it."""
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("syncnode: "), result.stderr
    return lines[0]


def test_cli_user_add_reads_one_line_and_the_account_logs_in(admin, make_app):
    result = admin("user", "add", " Alice@Example.org", stdin=PASSWORD + "\n")
    assert (result.returncode, result.stdout) == (0, "Added alice@example.org.\n")
    client = webtest.TestApp(make_app())
    client.post_json("/auth", {"id": "alice@example.org", "password": PASSWORD}, status=200)


def test_cli_user_add_taken_id_exits_1(admin, user, db):
    before = snapshot(db)
    assert_exit_1_with_one_line(admin("user", "add", "ALICE", stdin=NEW_PASSWORD + "\n"))
    assert snapshot(db) == before


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["user", "add", "carol"], id="add"),
        pytest.param(["user", "passwd", "alice"], id="passwd"),
    ],
)
def test_cli_password_of_7_characters_exits_1(admin, user, db, command):
    before = snapshot(db)
    assert_exit_1_with_one_line(admin(*command, stdin="1234567\n"))
    assert snapshot(db) == before


def test_cli_user_list_prints_every_account_oldest_first(admin, user, other, db, clock):
    result = admin("user", "list")
    assert result.returncode == 0
    uuids = [row[0] for row in db.execute("SELECT uuid FROM users ORDER BY id")]
    created = syncnode.iso_time(int(clock.now * 1000))
    assert [line.split("\t") for line in result.stdout.splitlines()] == [
        ["alice", uuids[0], created, "admin"],
        ["bob", uuids[1], created, ""],
    ]


def test_cli_user_delete_removes_the_account_and_its_keys(admin, client, user, other, db):
    put(client, user, "alone")
    put(client, user, "together")
    share(client, user, "together", {"bob": "OWN"})
    result = admin("user", "delete", "Alice")
    assert (result.returncode, result.stdout) == (0, "Deleted alice.\n")
    assert db.execute("SELECT name FROM users").fetchall() == [("bob",)]
    assert db.execute("SELECT key FROM items").fetchall() == [("together",)]
    assert_error(client.get("/account", headers=user.headers, status=401), 401, "AUTH01")


def test_cli_user_passwd_sets_the_password_and_ends_sessions(admin, client, user):
    result = admin("user", "passwd", "alice", stdin=NEW_PASSWORD + "\n")
    assert result.returncode == 0
    assert_error(client.get("/account", headers=user.headers, status=401), 401, "AUTH01")
    client.post_json("/auth", {"id": "alice", "password": PASSWORD}, status=401)
    client.post_json("/auth", {"id": "alice", "password": NEW_PASSWORD}, status=200)


def test_cli_reset_token_prints_only_a_token_usable_once(admin, client, user, clock):
    clock.now = time.time()  # the token's lifetime runs on the command's real clock
    result = admin("reset-token", "alice")
    assert result.returncode == 0
    token = result.stdout.removesuffix("\n")
    assert re.fullmatch(r"[A-Za-z0-9_-]{43,}", token)
    assert token not in result.stderr
    client.post_json(
        "/password", {"password": NEW_PASSWORD}, headers=bearer_headers(token), status=204
    )
    again = client.post_json(
        "/password", {"password": PASSWORD}, headers=bearer_headers(token), status=401
    )
    assert_error(again, 401, "AUTH01")
    client.post_json("/auth", {"id": "alice", "password": NEW_PASSWORD}, status=200)


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["user", "delete", "nobody"], id="delete"),
        pytest.param(["user", "passwd", "nobody"], id="passwd"),
        pytest.param(["reset-token", "nobody"], id="reset-token"),
        pytest.param(["user", "add", "no body"], id="add-bad-id"),
    ],
)
def test_cli_unknown_user_exits_1_with_one_line(admin, user, db, command):
    before = snapshot(db)
    assert_exit_1_with_one_line(admin(*command, stdin=NEW_PASSWORD + "\n"))
    assert snapshot(db) == before


@pytest.fixture
def stats_data(make_app, clock, db):
    """Two users, two live sessions and one expired (on the real clock), keys of 5 and 7 bytes."""
    clock.now = time.time()
    client = webtest.TestApp(make_app())
    alice, bob = register_user(client, "alice"), register_user(client, "bob")
    put(client, alice, "k1", b"12345")
    put(client, bob, "k2", b"1234567")
    clock.now = time.time() - 31 * 86400
    client.post_json("/auth", {"id": "alice", "password": PASSWORD})
    assert table_counts(db)["sessions"] == 3


def test_cli_stats_prints_counts(admin, stats_data):
    result = admin("stats")
    assert (result.returncode, result.stdout) == (0, "users: 2\nkeys: 2\nbytes: 12\nsessions: 2\n")


def test_cli_stats_json_prints_one_object(admin, stats_data):
    result = admin("stats", "--json")
    assert result.returncode == 0
    assert json.loads(result.stdout) == {"users": 2, "keys": 2, "bytes": 12, "sessions": 2}


# The admin fixture puts --database before the command, so every other CLI test covers that.
@pytest.mark.parametrize(
    "args, variables",
    [
        pytest.param(
            ["stats", "--json", "--database", "named.db"], {}, id="flag-after-the-command"
        ),
        pytest.param(["stats", "--json"], {"SYNCNODE_DATABASE": "named.db"}, id="variable"),
        pytest.param(
            ["stats", "--json", "--database", "named.db"],
            {"SYNCNODE_DATABASE": "other.db"},
            id="flag-beats-variable",
        ),
    ],
)
def test_cli_database_comes_from_either_flag_or_the_variable(make_app, tmp_path, args, variables):
    register_user(webtest.TestApp(make_app(str(tmp_path / "named.db"))), "alice")
    result = run_cli(tmp_path, *args, **variables)
    assert result.returncode == 0
    assert json.loads(result.stdout)["users"] == 1
    assert sorted(path.name for path in tmp_path.glob("*.db")) == ["named.db"]


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["serve"],
        ["user"],
        ["user", "add"],
        ["user", "list"],
        ["user", "delete"],
        ["user", "passwd"],
        ["reset-token"],
        ["invite"],
        ["backup"],
        ["check"],
        ["stats"],
    ],
    ids=lambda command: "-".join(command) or "top",
)
def test_cli_help_of_every_command_exits_0(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        syncnode.main([*command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(" ".join(["usage: syncnode", *command]))


class Terminal(io.StringIO):
    """Standard input that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def typed(monkeypatch):
    """Answer getpass's prompts with the given passwords in turn; return the prompts asked."""
    prompts: list[str] = []

    def type_in(*passwords: str) -> list[str]:
        answers = iter(passwords)

        def fake_getpass(prompt: str = "Password: ", stream=None) -> str:
            prompts.append(prompt)
            return next(answers)

        monkeypatch.setattr(getpass, "getpass", fake_getpass)
        return prompts

    return type_in


def test_cli_terminal_asks_for_the_password_twice(typed):
    prompts = typed(NEW_PASSWORD, NEW_PASSWORD)
    assert syncnode.read_new_password(Terminal("typed ahead\n")) == NEW_PASSWORD
    assert len(prompts) == 2


def test_cli_terminal_password_adds_a_user_who_logs_in(typed, make_app, db_path):
    typed(NEW_PASSWORD, NEW_PASSWORD)
    argv = ["--database", db_path, "user", "add", "carol"]
    args, settings = syncnode.parse_command(argv, cheap_environ())
    out = io.StringIO()
    assert syncnode.run_command(args, settings, Terminal(), out) == 0
    assert out.getvalue() == "Added carol.\n"
    client = webtest.TestApp(make_app())
    client.post_json("/auth", {"id": "carol", "password": NEW_PASSWORD}, status=200)


def test_cli_terminal_passwords_that_differ_are_refused(typed, db_path, db):
    typed(NEW_PASSWORD, NEW_PASSWORD + "!")
    argv = ["--database", db_path, "user", "add", "carol"]
    args, settings = syncnode.parse_command(argv, cheap_environ())
    with pytest.raises(syncnode.ApiError) as error:
        syncnode.run_command(args, settings, Terminal(), io.StringIO())
    assert error.value.code == "ACCT02"
    assert table_counts(db)["users"] == 0


def test_cli_check_healthy_database_prints_ok(admin, client, user):
    put(client, user, "k", b"value")
    result = admin("check")
    assert (result.returncode, result.stdout) == (0, "ok\n")


@pytest.mark.sqlite
def test_cli_check_corrupted_file_exits_1(admin, app, db_path):
    app.close()
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
        conn.execute(
            """
            WITH RECURSIVE numbers (n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM numbers
                                           WHERE n < 4000)
            INSERT INTO items (key, token, updated_ms, size, value)
            SELECT 'key ' || n, 'token ' || n, 0, 200, randomblob(200) FROM numbers
            """
        )
    # That was the last connection, so the WAL went into the file as it closed.
    size = os.path.getsize(db_path)
    with open(db_path, "r+b") as file:
        file.seek(size // 2 // 4096 * 4096)
        file.write(b"\xa5" * 4096)
    result = admin("check")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "ok" not in result.stdout.splitlines()
    assert (result.stdout + result.stderr).strip()


@pytest.mark.sqlite
def test_cli_check_broken_foreign_key_exits_1_naming_the_table(admin, user, db):
    db.execute("PRAGMA foreign_keys = OFF")
    db.execute(
        "INSERT INTO sessions (public_id, user_id, token_digest, created_ms, expires_ms) "
        "VALUES ('dangling', 999, x'00', 0, 0)"
    )
    result = admin("check")
    assert result.returncode == 1
    assert "sessions" in result.stdout and "ok" not in result.stdout.splitlines()


@pytest.mark.sqlite
def test_cli_check_broken_foreign_key_in_permissions_names_the_row(admin, client, user, db):
    put(client, user, "k")
    db.execute(
        "INSERT INTO permissions (item_id, user_id, level) VALUES ((SELECT id FROM items), 999, 1)"
    )
    result = admin("check")
    assert result.returncode == 1 and "permissions" in result.stdout
    assert "None" not in result.stdout


def test_cli_check_missing_database_creates_no_file(tmp_path):
    result = run_cli(tmp_path, "check", "--database", "missing.db")
    assert result.returncode == 1
    assert not (tmp_path / "missing.db").exists()


def test_admin_cli_interrupted_prompt_is_one_line(monkeypatch, db_path, capsys):
    def interrupted(prompt: str = "") -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(getpass, "getpass", interrupted)
    monkeypatch.setattr(
        sys, "stdin", type("Terminal", (io.StringIO,), {"isatty": lambda self: True})()
    )
    assert syncnode.main(["--database", db_path, "user", "add", "alice"]) == 1
    assert capsys.readouterr().err.startswith("syncnode: ")


# Unlock -------------------------------------------------------------------------------------------


def test_cli_unlock_lets_a_locked_out_user_log_in_at_once(admin, client, user):
    fail_logins(client, 10, address="192.0.2.{}")
    assert_throttled(login(client, "alice", PASSWORD, extra_environ=ELSEWHERE, status=429), 900)
    assert admin("unlock", "alice").returncode == 0
    login(client, "alice", PASSWORD, extra_environ=ELSEWHERE, status=200)


def test_cli_unlock_unknown_id_exits_1(admin, user, db):
    before = snapshot(db)
    assert_exit_1_with_one_line(admin("unlock", "nobody"))
    assert snapshot(db) == before


# ==================================================================================================
# Operations: backup and restore
# ==================================================================================================


def test_cli_backup_of_a_missing_database_exits_1(tmp_path):
    result = run_cli(tmp_path, "--database", "missing.db", "backup", "copy.db")
    assert_exit_1_with_one_line(result)
    assert not (tmp_path / "copy.db").exists()


def data_of(path) -> dict[str, list]:
    """Every row of the data tables of a database file, read by a connection of its own."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return snapshot(conn)


def check_ok(tmp_path, database) -> bool:
    """Whether `syncnode check` passes on the database."""
    result = run_cli(tmp_path, "--database", str(database), "check")
    return (result.returncode, result.stdout) == (0, "ok\n")


@pytest.mark.parametrize(
    "target",
    [
        pytest.param(lambda tmp_path: str(tmp_path / "syncnode.db"), id="same-path"),
        pytest.param(lambda tmp_path: "./syncnode.db", id="relative-path"),
    ],
)
@pytest.mark.sqlite
def test_cli_backup_onto_the_live_database_is_refused(
    admin, client, user, db_path, tmp_path, target
):
    put(client, user, "k", b"value")
    before, inode = data_of(db_path), os.stat(db_path).st_ino
    line = assert_exit_1_with_one_line(admin("backup", target(tmp_path)))
    assert "syncnode.db" in line
    assert (data_of(db_path), os.stat(db_path).st_ino) == (before, inode)
    assert check_ok(tmp_path, db_path)


@pytest.mark.sqlite
def test_cli_backup_into_a_missing_folder_names_the_folder(admin, user, tmp_path):
    folder = tmp_path / "missing"
    line = assert_exit_1_with_one_line(admin("backup", str(folder / "copy.db")))
    assert str(folder) in line
    assert "cannot use the database" not in line
    assert not folder.exists()


@pytest.mark.sqlite
def test_cli_backup_onto_an_existing_file_is_refused_without_force(admin, user, tmp_path):
    target = tmp_path / "copy.db"
    target.write_bytes(b"an older backup")
    line = assert_exit_1_with_one_line(admin("backup", str(target)))
    assert "copy.db" in line
    assert target.read_bytes() == b"an older backup"


@pytest.mark.sqlite
def test_cli_backup_force_replaces_an_existing_file_with_a_good_copy(
    admin, client, user, db_path, tmp_path
):
    put(client, user, "k", b"value")
    target = tmp_path / "copy.db"
    target.write_bytes(b"an older backup")
    assert admin("backup", str(target), "--force").returncode == 0
    assert check_ok(tmp_path, target)
    assert data_of(target) == data_of(db_path)


@pytest.mark.sqlite
def test_cli_backup_while_serving_holds_every_acknowledged_key(start_syncnode, tmp_path, db_path):
    server = start_syncnode(db_path)
    alice = server.register("alice")
    acknowledged: list[str] = []
    stop, errors = threading.Event(), []

    def write() -> None:
        conn = server.connect()
        try:
            for number in itertools.count():
                if stop.is_set():
                    return
                key = f"key{number}"
                answer = call(conn, "PUT", f"/store/{key}", key.encode() * 100, alice.headers)
                assert answer.status_int == 204, answer.body
                acknowledged.append(key)
        except BaseException as error:
            errors.append(error)
        finally:
            conn.close()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    wait_for(lambda: len(acknowledged) >= 50, timeout=20, what="50 acknowledged writes")
    before = set(acknowledged)
    result = run_cli(tmp_path, "--database", db_path, "backup", "copy.db")
    after = len(acknowledged)
    stop.set()
    writer.join(10)
    assert errors == []
    assert result.returncode == 0
    assert after > len(before)  # the server kept taking writes
    check = run_cli(tmp_path, "--database", "copy.db", "check")
    assert (check.returncode, check.stdout) == (0, "ok\n")
    with contextlib.closing(sqlite3.connect(tmp_path / "copy.db")) as copy:
        stored = dict(copy.execute("SELECT key, value FROM items"))
    assert before <= set(stored)
    assert all(stored[key] == key.encode() * 100 for key in before)
    assert sorted(path.name for path in tmp_path.glob("copy.db*")) == ["copy.db"]


# Restore ------------------------------------------------------------------------------------------


@dataclass
class Restorable:
    """A backup of alice with key "old", a live database that since gained bob and key "new",
    and the -wal and -shm files a killed server would have left beside the live database."""

    backup: str
    alice: User
    wal: bytes
    shm: bytes


@pytest.fixture
def restorable(make_app, db_path, tmp_path) -> Restorable:
    app = make_app()
    client = webtest.TestApp(app)
    alice = register_user(client, "alice")
    put(client, alice, "old", b"old value")
    backup = str(tmp_path / "backup.db")
    with contextlib.closing(sqlite3.connect(db_path)) as live:
        with contextlib.closing(sqlite3.connect(backup)) as copy:
            live.backup(copy)
    register_user(client, "bob")
    put(client, alice, "new", b"new value")
    wal, shm = Path(db_path + "-wal").read_bytes(), Path(db_path + "-shm").read_bytes()
    app.close()  # no server has the database open any more
    return Restorable(backup, alice, wal, shm)


def leave_crash_files(restorable: Restorable, db_path: str) -> None:
    """Put back the -wal and -shm of the live database, as a killed server leaves them."""
    Path(db_path + "-wal").write_bytes(restorable.wal)
    Path(db_path + "-shm").write_bytes(restorable.shm)


def restore(tmp_path, db_path: str, backup: str):
    return run_cli(tmp_path, "--database", db_path, "restore", backup)


def not_sqlite(backup: str) -> None:
    Path(backup).write_bytes(b"this is not a database" * 100)


def empty_file(backup: str) -> None:
    Path(backup).write_bytes(b"")


def truncated(backup: str) -> None:
    os.truncate(backup, os.path.getsize(backup) // 2)


def newer_schema_version(backup: str) -> None:
    with contextlib.closing(sqlite3.connect(backup)) as conn:
        conn.execute(f"PRAGMA user_version = {len(syncnode.SCHEMA) + 1}")


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(not_sqlite, id="not-sqlite"),
        pytest.param(empty_file, id="empty-file"),
        pytest.param(truncated, id="truncated"),
        pytest.param(newer_schema_version, id="newer-schema"),
    ],
)
@pytest.mark.sqlite
def test_cli_restore_bad_backup_is_refused_and_the_database_untouched(
    restorable, db_path, tmp_path, spoil
):
    spoil(restorable.backup)
    before = Path(db_path).read_bytes()
    assert_exit_1_with_one_line(restore(tmp_path, db_path, restorable.backup))
    assert Path(db_path).read_bytes() == before
    assert not os.path.exists(db_path + ".before-restore")


@pytest.mark.sqlite
def test_embedding_app_refuses_a_database_a_restore_is_replacing(make_app, db_path):
    import fcntl

    make_app().close()
    held = os.open(db_path, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as syncnode restore holds it
        with pytest.raises(syncnode.DatabaseUnusable, match="restore"):
            syncnode.create_app(db_path, **CHEAP_HASHING)
    finally:
        os.close(held)
    make_app().close()  # once the restore is done, it opens


@pytest.mark.sqlite
def test_cli_restore_while_a_server_has_the_database_open_is_refused(
    restorable, make_app, db_path, tmp_path
):
    webtest.TestApp(make_app()).get("/health")  # the app stays open until teardown
    before = data_of(db_path)
    line = assert_exit_1_with_one_line(restore(tmp_path, db_path, restorable.backup))
    assert "server" in line
    assert data_of(db_path) == before
    assert not os.path.exists(db_path + ".before-restore")


@pytest.mark.sqlite
def test_cli_restore_swaps_in_exactly_the_backup_data(restorable, db_path, tmp_path):
    leave_crash_files(restorable, db_path)
    expected = data_of(restorable.backup)
    assert restore(tmp_path, db_path, restorable.backup).returncode == 0
    assert data_of(db_path) == expected
    assert check_ok(tmp_path, db_path)


@pytest.mark.sqlite
def test_cli_restore_leaves_no_wal_of_the_old_database(restorable, db_path, tmp_path):
    leave_crash_files(restorable, db_path)
    assert restore(tmp_path, db_path, restorable.backup).returncode == 0
    for suffix, stale in (("-wal", restorable.wal), ("-shm", restorable.shm)):
        path = Path(db_path + suffix)
        assert not path.exists() or path.read_bytes() != stale, suffix


@pytest.mark.sqlite
def test_cli_restore_keeps_the_previous_database_as_before_restore(restorable, db_path, tmp_path):
    before = data_of(db_path)
    assert restore(tmp_path, db_path, restorable.backup).returncode == 0
    assert data_of(db_path + ".before-restore") == before


@pytest.mark.sqlite
def test_cli_restore_prints_what_it_did(restorable, db_path, tmp_path):
    result = restore(tmp_path, db_path, restorable.backup)
    assert result.returncode == 0
    assert ".before-restore" in result.stdout


@pytest.mark.sqlite
def test_cli_restore_then_a_server_serves_the_restored_data(
    restorable, make_app, db_path, tmp_path
):
    assert restore(tmp_path, db_path, restorable.backup).returncode == 0
    client = webtest.TestApp(make_app())
    alice = restorable.alice
    assert client.get("/store/old", headers=alice.headers).body == b"old value"
    client.get("/store/new", headers=alice.headers, status=404)
    login(client, "bob", PASSWORD, status=401)


# ==================================================================================================
# Operations: housekeeping
# ==================================================================================================


PURGED_TABLES = ("sessions", "reset_tokens", "invites", "attempts")


def purged_counts(db) -> dict[str, int]:
    """Count the rows of the tables housekeeping purges."""
    counts = table_counts(db)
    return {table: counts[table] for table in PURGED_TABLES}


@pytest.fixture
def expiring(make_app, db):
    """A server whose sessions, reset tokens and invites last a minute, one row each, and
    four attempts (a reset request and a failed login, each per id and per address)."""
    client = webtest.TestApp(make_app(session_ttl=60, reset_ttl=60, invite_ttl=60))
    alice = register_user(client, "alice")
    client.post("/invite", headers=alice.headers, status=200)
    client.post_json("/resetpassword", {"id": "alice"}, status=204)
    client.post_json("/auth", {"id": "alice", "password": "wrong password"}, status=401)
    assert purged_counts(db) == {"sessions": 1, "reset_tokens": 1, "invites": 1, "attempts": 4}
    return client


def test_housekeeping_waits_for_its_interval(expiring, clock, db):
    clock.advance(61)
    expiring.get("/health")
    assert purged_counts(db) == {"sessions": 1, "reset_tokens": 1, "invites": 1, "attempts": 4}


@pytest.mark.parametrize(
    "path",
    [
        "/health",
        "/api/server/ping",
        pytest.param(
            "/nothing",
        ),
    ],
)
def test_housekeeping_purges_expired_rows_on_any_request(expiring, clock, db, path):
    clock.advance(syncnode.HOUSEKEEPING_MS / 1000 + 1)
    expiring.get(path, status="*")
    # The attempts are younger than the longest window (an hour), so they stay.
    assert purged_counts(db) == {"sessions": 0, "reset_tokens": 0, "invites": 0, "attempts": 4}


def test_housekeeping_keeps_live_rows(client, user, clock, db):
    client.post("/invite", headers=user.headers, status=200)
    client.post_json("/resetpassword", {"id": "alice"}, status=204)
    clock.advance(syncnode.HOUSEKEEPING_MS / 1000 + 1)
    client.get("/health")
    assert purged_counts(db) == {"sessions": 1, "reset_tokens": 1, "invites": 1, "attempts": 2}


def test_housekeeping_keeps_attempts_for_the_longest_window(make_app, clock, db):
    client = webtest.TestApp(make_app(login_window=60, reset_window=120, registration_window=7200))
    register_user(client, "alice")
    client.post_json("/auth", {"id": "alice", "password": "wrong password"}, status=401)
    clock.advance(3600)
    client.get("/health")
    assert table_counts(db)["attempts"] == 2
    clock.advance(3601)
    client.get("/health")
    assert table_counts(db)["attempts"] == 0


@pytest.mark.sqlite
def test_housekeeping_wal_stays_bounded_under_steady_writes(make_app, clock, db_path):
    # NORMAL spares an fsync per write; the WAL grows the same way under FULL.
    client = webtest.TestApp(make_app(synchronous="NORMAL"))
    alice = register_user(client, "alice")
    big, largest = os.urandom(100 * 1024), 0
    for number in range(1000):
        put(client, alice, f"small/{number}", b"%d" % number)
        if number % 20 == 0:
            put(client, alice, f"big/{number}", big)
        if number % 250 == 249:
            clock.advance(syncnode.HOUSEKEEPING_MS / 1000 + 1)
        largest = max(largest, os.path.getsize(db_path + "-wal"))
    assert 0 < largest <= syncnode.WAL_LIMIT_BYTES


def test_housekeeping_runs_after_the_clock_stepped_back(make_app, clock, db):
    client = webtest.TestApp(make_app(reset_ttl=60))
    register_user(client, "alice")  # the first request housekeeps; the next run is due later
    clock.advance(-2 * 86400)
    client.post_json("/resetpassword", {"id": "alice"}, status=204)
    assert table_counts(db)["reset_tokens"] == 1
    clock.advance(syncnode.HOUSEKEEPING_MS / 1000 + 1)  # the token has expired
    client.get("/health")
    assert table_counts(db)["reset_tokens"] == 0


# Vacuum -------------------------------------------------------------------------------------------


def auto_vacuum(path: str) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute("PRAGMA auto_vacuum").fetchone()[0]


@pytest.mark.sqlite
def test_vacuum_new_database_is_incremental(app, db_path):
    assert auto_vacuum(db_path) == 2


@pytest.mark.sqlite
def test_vacuum_housekeeping_gives_freed_pages_back(client, user, clock, db, db_path):
    keys = [f"big/{number}" for number in range(8)]  # 2 MiB in all
    tokens = [token_of(put(client, user, key, os.urandom(256 * 1024))) for key in keys]
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    stored_size = os.path.getsize(db_path)
    for key, token in zip(keys, tokens, strict=True):
        deleting(client, user, key, token, status=204)
    clock.advance(syncnode.HOUSEKEEPING_MS / 1000 + 1)
    client.get("/health")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    free_pages = db.execute("PRAGMA freelist_count").fetchone()[0]
    assert free_pages == 0 or os.path.getsize(db_path) <= stored_size - 2**20


@pytest.mark.sqlite
def test_vacuum_existing_database_is_switched_to_incremental(make_app, db_path):
    # As an older syncnode left it: the whole schema, in WAL mode, without auto-vacuum.
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
        conn.execute("PRAGMA auto_vacuum = NONE")
        conn.execute("PRAGMA journal_mode = WAL")
        for number, script in enumerate(syncnode.SCHEMA, start=1):
            for statement in syncnode.split_statements(script):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
    assert auto_vacuum(db_path) == 0
    make_app()
    assert auto_vacuum(db_path) == 2
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


# ==================================================================================================
# Operations: access log
# ==================================================================================================


ACCESS_LINE = re.compile(
    r"(?P<method>[A-Z]+) (?P<path>\S+) (?P<status>\d{3}) (?P<bytes>\d+) (?P<ms>\d+\.\d)ms "
    r"(?P<client>\S+)"
)
CLIENT_ADDRESS = {"REMOTE_ADDR": "192.0.2.7"}


def access_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "syncnode.access"]


def test_access_log_writes_one_line_per_request(make_app, caplog):
    client = webtest.TestApp(make_app(access_log=True), extra_environ=CLIENT_ADDRESS)
    alice = register_user(client, "alice")
    with caplog.at_level(logging.INFO, logger="syncnode.access"):
        responses = [
            client.get("/health"),
            client.put("/store/notes/a?apiKey=SECRET", b"hello", headers=alice.headers),
            client.get("/store/notes/a", headers=alice.headers),
            client.get("/store/missing", headers=alice.headers, status=404),
            client.post_json(
                "/api/auth/login", {"email": "alice", "password": "wrong"}, status=401
            ),
        ]
    matches = [ACCESS_LINE.fullmatch(line) for line in access_lines(caplog)]
    assert all(matches) and len(matches) == len(responses)
    assert [(match["method"], match["path"], match["status"]) for match in matches] == [
        ("GET", "/health", "200"),
        ("PUT", "/store/notes/a", "204"),
        ("GET", "/store/notes/a", "200"),
        ("GET", "/store/missing", "404"),
        ("POST", "/api/auth/login", "401"),
    ]
    assert [int(match["bytes"]) for match in matches] == [len(r.body) for r in responses]
    assert {match["client"] for match in matches} == {"192.0.2.7"}


def test_access_log_times_a_parked_long_poll_from_its_first_run(start_server, caplog):
    server = start_server(access_log=True)
    alice = server.register("alice")
    cursor = server.request("GET", "/store", headers=alice.headers).headers["X-Sync-Cursor"]
    with caplog.at_level(logging.INFO, logger="syncnode.access"):
        poll = LongPoll(server, alice.headers, f"/store?since={cursor}&wait=1")
        assert (poll.result().status_int, poll.result().json) == (200, [])
        deadline = time.monotonic() + 5  # the line is written once the answer is sent
        while not access_lines(caplog) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # room for a second line, were the poll logged once per run
    lines = [ACCESS_LINE.fullmatch(line) for line in access_lines(caplog)]
    polls = [match for match in lines if match and match["path"] == "/store"]
    assert len(polls) == 1, "one line for the poll, however often it ran"
    assert float(polls[0]["ms"]) >= 900  # its wait, not its last run's milliseconds


def test_access_log_line_stays_one_line_for_any_path(make_app, caplog):
    client = webtest.TestApp(make_app(access_log=True), extra_environ=CLIENT_ADDRESS)
    forged = urllib.parse.quote("GET /forged 200 0 0.1ms 203.0.113.9")
    with caplog.at_level(logging.INFO, logger="syncnode.access"):
        client.get(f"/store/a%0A{forged}", status=401)
        client.get(f"/nothing%0D%0A{forged}", status=404)
    lines = access_lines(caplog)
    assert len(lines) == 2
    assert [line for line in lines if "\n" in line or "\r" in line] == []


def test_access_log_is_off_by_default(client, user, caplog):
    with caplog.at_level(logging.DEBUG):
        client.get("/health")
        put(client, user, "k")
        client.get("/store/missing", headers=user.headers, status=404)
    assert access_lines(caplog) == []


def test_access_log_and_server_log_carry_no_secret(make_app, caplog):
    caplog.set_level(logging.DEBUG)
    client = webtest.TestApp(make_app(access_log=True), extra_environ=CLIENT_ADDRESS)
    alice = register_user(client, "alice")
    login = client.post_json("/auth", {"id": "alice", "password": PASSWORD}).json["token"]
    meta = "meta-secret-4711"
    put(client, alice, "k", b"value", headers={"X-Sync-Meta": meta})
    client.get("/store/k", headers=alice.headers)
    body = {"name": "key", "permissions": ["all"]}
    key = client.post_json("/api/api-keys", body, headers=alice.headers, status=201).json["secret"]
    client.get("/store", headers={"x-api-key": key})
    client.get(f"/api/users/me?apiKey={key}")
    client.post_json("/auth", {"id": "alice", "password": "wrong password 1"}, status=401)
    client.post_json("/password", {"password": NEW_PASSWORD}, headers=alice.headers, status=204)
    app_login = {"email": "alice", "password": NEW_PASSWORD}
    access = client.post_json("/api/auth/login", app_login, status=201).json["accessToken"]
    client.reset()
    change = {"password": NEW_PASSWORD, "newPassword": "third password"}
    client.post_json(
        "/api/auth/change-password", change, headers=bearer_headers(access), status=200
    )
    secrets = [PASSWORD, NEW_PASSWORD, "wrong password 1", "third password", meta]
    secrets += [alice.token, login, key, access]
    assert len(access_lines(caplog)) == 11
    texts = [record.getMessage() for record in caplog.records] + [caplog.text]
    assert not [(secret, text) for secret in secrets for text in texts if secret in text]


# ==================================================================================================
# Operations: shutdown and restarts
# ==================================================================================================


@dataclasses.dataclass
class ServerProcess(RealServer):
    """`python syncnode.py` serving a database on 127.0.0.1, its stderr going to a file."""

    process: subprocess.Popen
    port: int
    log_path: str

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8") as file:
            return file.read()

    def wait_until_up(self, timeout: float = 15) -> None:
        """Ask GET /health until it answers; fail if the process exits first."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"syncnode exited with {self.process.returncode}: {self.log()}")
            try:
                if self.request("GET", "/health").status_int == 200:
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.05)  # The server is still starting.


@pytest.fixture
def start_syncnode(tmp_path):
    """Start `python syncnode.py --port P --database F ARGS`; kill what still runs at teardown."""
    started: list[ServerProcess] = []

    def start(database: str, *args: str) -> ServerProcess:
        port, log_path = free_port(), str(tmp_path / f"server-{len(started)}.log")
        with open(log_path, "w", encoding="utf-8") as log_file:
            process = subprocess.Popen(
                [sys.executable, SYNCNODE_PY, "--port", str(port), "--database", database, *args],
                cwd=tmp_path,
                env=cli_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
            )
        server = ServerProcess(process, port, log_path)
        started.append(server)
        server.wait_until_up()
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
        server.process.wait(timeout=10)


@pytest.mark.sqlite
def test_health_checks_keep_the_wal_of_a_serving_process_when_another_one_closes(
    start_syncnode, db_path, tmp_path
):
    # Opening and closing the database file outside SQLite would drop the server's POSIX
    # locks: the next process to close its connection would then delete the -wal under it.
    server = start_syncnode(db_path)
    for _ in range(3):
        assert server.request("GET", "/health").status_int == 200
    stats = run_cli(tmp_path, "stats", "--database", db_path)
    assert stats.returncode == 0, stats.stderr
    alice = server.register("alice")
    assert server.request("PUT", "/store/k", b"kept", alice.headers).status_int == 204
    assert os.path.exists(db_path + "-wal"), "another process deleted the serving one's -wal"
    with contextlib.closing(sqlite3.connect(db_path)) as conn:  # another process's view
        assert conn.execute("SELECT value FROM items WHERE key = 'k'").fetchone() == (b"kept",)
        assert conn.execute("SELECT count(*) FROM sessions").fetchone() == (1,)


@pytest.mark.sqlite
def test_closing_one_app_keeps_the_locks_of_another_on_the_same_file(make_app, db_path, tmp_path):
    first, second = make_app(), make_app()
    client = webtest.TestApp(first)
    client.get("/health", status=200)
    webtest.TestApp(second).get("/health", status=200)
    second.close()  # the file's one descriptor stays open for the first app
    stats = run_cli(tmp_path, "stats", "--database", db_path)
    assert stats.returncode == 0, stats.stderr
    token = register_user(client, "alice").token
    client.put("/store/k", b"kept", headers=bearer_headers(token), status=204)
    assert os.path.exists(db_path + "-wal")
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("SELECT value FROM items WHERE key = 'k'").fetchone() == (b"kept",)


def thread_placements(pid: int) -> dict[int, tuple[int, str]]:
    """Each thread of a process: its nice value and the CPUs it may run on."""
    placements = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            nice = int((task / "stat").read_text().rpartition(")")[2].split()[16])
            status = (task / "status").read_text()
            cpus = re.search(r"^Cpus_allowed_list:\s*(\S+)", status, re.M).group(1)
            placements[int(task.name)] = (nice, cpus)
    return placements


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "not-pinned"])
def test_server_runs_its_python_threads_on_one_cpu_and_hashes_on_all(
    start_syncnode, tmp_path, pinned
):
    flags = [] if pinned else ["--pin-threads", "false"]
    server = start_syncnode(str(tmp_path / "pin.db"), *flags)
    server.register("alice")  # hashing threads start
    everywhere = thread_placements(os.getpid())[threading.get_native_id()][1]
    placements = thread_placements(server.process.pid).values()
    serving = {cpus for nice, cpus in placements if nice == 0}
    hashing = {cpus for nice, cpus in placements if nice > 0}
    assert hashing == {everywhere}  # Argon2 may use every CPU the process may
    if pinned and len(os.sched_getaffinity(0)) > 1:
        (cpu,) = serving
        assert cpu in {str(n) for n in os.sched_getaffinity(0)}
    else:
        assert serving == {everywhere}


@pytest.mark.sqlite
def test_shutdown_sigterm_finishes_a_put_under_way(start_syncnode, db_path):
    server = start_syncnode(db_path, "--shutdown-timeout", "5")
    alice = server.register("alice")
    value = os.urandom(8192)
    head = (
        "PUT /store/in-flight HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {alice.token}\r\nContent-Length: {len(value)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head + value[:4096])
        # One more request through the same event loop: by its answer the headers are read.
        assert server.request("GET", "/health").status_int == 200
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        wait_for(lambda: "Stopping" in server.log(), what="the server to start stopping")
        sock.sendall(value[4096:])
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 204
        token = response.getheader("X-Sync-Token")
    assert server.process.wait(timeout=10) == 0
    assert time.monotonic() - signalled <= 5
    assert not os.path.exists(db_path + "-wal")
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        row = conn.execute("SELECT value, token FROM items WHERE key = 'in-flight'").fetchone()
    assert row == (value, token)


@pytest.mark.sqlite
def test_shutdown_sigint_with_an_idle_connection_exits_0_at_once_without_a_wal(
    start_syncnode, db_path
):
    server = start_syncnode(db_path, "--shutdown-timeout", "30")
    alice = server.register("alice")
    idle = server.connect()
    answer = call(idle, "PUT", "/store/k", b"value", alice.headers)
    assert answer.status_int == 204  # the connection stays open, idle
    assert os.path.exists(db_path + "-wal")
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(timeout=20) == 0
    assert time.monotonic() - signalled < 10  # the idle connection held nothing up
    idle.close()
    assert not os.path.exists(db_path + "-wal")
    assert "Stopped." in server.log() and "Traceback" not in server.log()


def test_shutdown_answers_a_long_poll_at_once(start_syncnode, db_path):
    server = start_syncnode(db_path, "--shutdown-timeout", "1")
    alice = server.register("alice")
    seq = server.request("GET", "/store?since=0", headers=alice.headers).headers["X-Sync-Seq"]
    poller, answers = server.connect(), []
    poller.request("GET", f"/store?since={seq}&wait=30", headers=alice.headers)

    def read_answer() -> None:
        try:
            response = poller.getresponse()
            answers.append(Reply(response.status, response.headers, response.read()))
        except (OSError, http.client.HTTPException) as error:
            answers.append(error)

    thread = threading.Thread(target=read_answer, daemon=True)
    thread.start()
    assert server.request("GET", "/health").status_int == 200  # by now the poll is under way
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=15) == 0
    thread.join(10)
    poller.close()
    (answer,) = answers
    assert isinstance(answer, Reply), answer
    assert (answer.status_int, answer.body) == (200, b"[]")
    assert time.monotonic() - signalled < 1


class Writer(threading.Thread):
    """A client that keeps updating its own keys until its connection breaks.

    It records the last write answered 204 for each key, and the value of a write whose
    answer never came (which may or may not have been stored).
    """

    def __init__(self, server: ServerProcess, user: User, keys: list[str], known: dict) -> None:
        super().__init__(daemon=True)
        self.server, self.user, self.keys = server, user, keys
        self.known = known  # key -> (value, token) last acknowledged
        self.pending: dict[str, bytes] = {}
        self.acknowledged = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        conn = self.server.connect()
        try:
            for number in itertools.count():
                key = self.keys[number % len(self.keys)]
                value = f"{self.name}/{number}|".encode() * (1 + number % 40)
                headers = dict(self.user.headers)
                if key in self.known:
                    headers["X-Sync-Token"] = self.known[key][1]
                self.pending[key] = value
                try:
                    answer = call(conn, "PUT", f"/store/{key}", value, headers)
                except (OSError, http.client.HTTPException):
                    return  # The server is gone; this write's fate is unknown.
                assert answer.status_int == 204, answer.body
                del self.pending[key]
                self.known[key] = (value, answer.headers["X-Sync-Token"])
                self.acknowledged += 1
        except BaseException as error:
            self.error = error
        finally:
            conn.close()


def check_survivors(server: ServerProcess, users: list[User], writers: list[Writer]) -> None:
    """Assert each key holds its last acknowledged write, or else the write left unanswered."""
    for owner, writer in zip(users, writers, strict=True):
        for key in sorted(set(writer.known) | set(writer.pending)):
            answer = server.request("GET", f"/store/{key}", headers=owner.headers)
            if key not in writer.known and answer.status_int == 404:
                continue  # Its creation was never answered, and did not happen.
            assert answer.status_int == 200
            stored = (answer.body, answer.headers["X-Sync-Token"])
            if stored != writer.known.get(key):
                assert answer.body == writer.pending.get(key), f"{key} lost an acknowledged write"
                writer.known[key] = stored


def test_restart_after_sigkill_keeps_every_acknowledged_write(start_syncnode, tmp_path, db_path):
    server = start_syncnode(db_path)
    users = [server.register(f"writer{number}") for number in range(4)]
    known: list[dict] = [{} for _ in users]
    for _ in range(3):
        writers = [
            Writer(server, user, [f"{user.name}/{n}" for n in range(3)], known[number])
            for number, user in enumerate(users)
        ]
        for writer in writers:
            writer.start()
        wait_for(
            lambda: all(writer.acknowledged >= 20 for writer in writers),  # noqa: B023
            timeout=20,
            what="every writer to have 20 writes acknowledged",
        )
        server.process.kill()
        server.process.wait(timeout=10)
        for writer in writers:
            writer.join(timeout=10)
            assert not writer.is_alive() and writer.error is None, writer.error
        result = run_cli(tmp_path, "--database", db_path, "check")
        assert (result.returncode, result.stdout) == (0, "ok\n")
        server = start_syncnode(db_path)
        check_survivors(server, users, writers)


# ==================================================================================================
# Operations: several processes under gunicorn
# ==================================================================================================


@pytest.fixture
def start_gunicorn(tmp_path, db_path):
    """Start gunicorn with the README's command line on the test's database; stop it after."""
    pytest.importorskip("gunicorn", reason="gunicorn is in the test extra")
    started: list[ServerProcess] = []

    def start(workers: int, *args: str, **variables: str) -> ServerProcess:
        port, log_path = free_port(), str(tmp_path / f"gunicorn-{len(started)}.log")
        command = [
            sys.executable, "-m", "gunicorn", "--workers", str(workers),
            "--worker-class", "gthread", "--threads", "4", "--keep-alive", "30",
            "--bind", f"127.0.0.1:{port}", "--chdir", os.path.dirname(SYNCNODE_PY),
            "--no-control-socket", *args,
            "syncnode:app_from_environment()",
        ]  # fmt: skip
        with open(log_path, "w", encoding="utf-8") as log_file:
            process = subprocess.Popen(
                command,
                cwd=tmp_path,
                env=cli_env(SYNCNODE_DATABASE=db_path, SYNCNODE_THREADS="4", **variables),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
            )
        server = ServerProcess(process, port, log_path)
        started.append(server)
        server.wait_until_up()
        wait_for(lambda: len(gunicorn_workers(server)) == workers, what="gunicorn's workers")
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
        server.process.wait(timeout=10)


def gunicorn_workers(server: ServerProcess) -> list[int]:
    """The process ids of a gunicorn master's workers."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat", encoding="utf-8") as file:
                    if int(file.read().rpartition(")")[2].split()[1]) == server.process.pid:
                        children.append(int(entry))
    return children


def serving_worker(server: ServerProcess, conn: http.client.HTTPConnection) -> int | None:
    """Which worker process holds the server's end of a kept-alive connection (Linux /proc)."""
    client_port = conn.sock.getsockname()[1]
    wanted = f"0100007F:{server.port:04X} 0100007F:{client_port:04X}"
    with open("/proc/net/tcp", encoding="utf-8") as file:
        rows = [line.split() for line in file.read().splitlines()[1:]]
    inodes = [row[9] for row in rows if f"{row[1]} {row[2]}" == wanted]
    if not inodes:
        return None
    for pid in gunicorn_workers(server):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inodes[0]}]":
                        return pid
    return None


def connections_by_worker(server: ServerProcess, count: int = 2) -> dict[int, list]:
    """Kept-alive connections to the server, at least one to each of `count` workers."""
    by_worker: dict[int, list] = collections.defaultdict(list)
    for _ in range(200):  # the kernel hands each new connection to one worker or another
        conn = server.connect(timeout=30)
        assert call(conn, "GET", "/health").status_int == 200
        by_worker[serving_worker(server, conn)].append(conn)
        if len([pid for pid in by_worker if pid is not None]) >= count:
            break
    assert None not in by_worker or len(by_worker) > count, "a connection's worker was not found"
    return {pid: conns for pid, conns in by_worker.items() if pid is not None}


def close_all(by_worker: dict[int, list]) -> None:
    for conns in by_worker.values():
        for conn in conns:
            conn.close()


class KeptPoll(LongPoll):
    """A long-poll on a given kept-alive connection."""

    def __init__(self, conn: http.client.HTTPConnection, headers: dict[str, str], url: str):
        self.conn = conn
        super().__init__(None, headers, url)

    def run(self, server, headers, url, socket_timeout) -> None:
        try:
            self.answer = call(self.conn, "GET", url, headers=headers)
        except BaseException as error:  # re-raised by result()
            self.error = error
        self.done_at = time.monotonic()


@pytest.mark.parametrize("workers", [1, 2])
def test_gunicorn_serves_the_contract_with_one_or_two_workers(start_gunicorn, workers):
    server = start_gunicorn(workers)
    alice = server.register("alice")
    written = server.request("PUT", "/store/k", b"v1", alice.headers)
    assert written.status_int == 204
    token = written.headers["X-Sync-Token"]
    read = server.request("GET", "/store/k", headers=alice.headers)
    assert (read.status_int, read.body, read.headers["X-Sync-Token"]) == (200, b"v1", token)
    listing = server.request("GET", "/store?values=true", headers=alice.headers)
    assert [(entry["key"], entry["value"]) for entry in listing.json] == [("k", b64(b"v1"))]
    assert server.request("GET", "/openapi.json").status_int == 200


def test_gunicorn_a_commit_in_one_worker_wakes_a_poll_in_the_other(start_gunicorn):
    server = start_gunicorn(2)
    alice = server.register("alice")
    by_worker = connections_by_worker(server)
    try:
        (poll_worker, poll_conns), (put_worker, put_conns) = list(by_worker.items())[:2]
        cursor = call(put_conns[0], "GET", "/store", headers=alice.headers).headers["X-Sync-Seq"]
        poll = KeptPoll(poll_conns[0], alice.headers, f"/store?since={cursor}&wait=20")
        time.sleep(0.3)  # the poll reaches its worker and waits
        assert poll.thread.is_alive()
        started = time.monotonic()
        written = call(put_conns[0], "PUT", "/store/k", b"v", alice.headers)
        assert written.status_int == 204
        answer = poll.result(timeout=25)
        print(
            f"woken {1000 * (poll.done_at - started):.0f} ms after the other worker's PUT",
            dict(answer.headers),
        )
        assert [entry["key"] for entry in answer.json] == ["k"]
        assert poll.done_at - started < 5, "woken by the wait running out, not by the watcher"
        assert serving_worker(server, poll_conns[0]) == poll_worker != put_worker
    finally:
        close_all(by_worker)


def test_gunicorn_racing_writers_in_two_workers_one_wins_and_limits_hold(start_gunicorn, db):
    server = start_gunicorn(2, SYNCNODE_LOGIN_FAILS_PER_ID="3")
    alice = server.register("alice")
    token = server.request("PUT", "/store/k", b"v0", alice.headers).headers["X-Sync-Token"]
    by_worker = connections_by_worker(server)
    try:
        conns = [conn for conns in by_worker.values() for conn in conns[:3]]
        headers = {**alice.headers, "If-Match": f'"{token}"'}
        answers: list[int] = []

        def write(conn: http.client.HTTPConnection, value: bytes) -> None:
            answers.append(call(conn, "PUT", "/store/k", value, headers).status_int)

        writers = [lambda conn=conn, n=n: write(conn, b"v%d" % n) for n, conn in enumerate(conns)]
        run_threads(writers, timeout=30)
        assert sorted(answers) == [204] + [409] * (len(conns) - 1)
        # Failed logins count in the database: three in all, whichever worker took each.
        wrong = json.dumps({"id": "alice", "password": "wrong password"}).encode()
        statuses = [
            # Each on a new connection, which the kernel gives to either worker.
            server.request("POST", "/auth", wrong, JSON).status_int
            for _ in range(4)
        ]
        assert statuses == [401, 401, 401, 429]
    finally:
        close_all(by_worker)
    assert db.execute("SELECT count(*) FROM attempts WHERE kind = 'login_id'").fetchone()[0] == 3


def test_gunicorn_sigterm_answers_waiting_polls_and_stops(start_gunicorn):
    server = start_gunicorn(2, "--graceful-timeout", "30")
    alice = server.register("alice")
    by_worker = connections_by_worker(server)
    try:
        cursor = server.request("GET", "/store", headers=alice.headers).headers["X-Sync-Seq"]
        polls = [
            KeptPoll(conns[0], alice.headers, f"/store?since={cursor}&wait=50")
            for conns in by_worker.values()
        ]
        time.sleep(0.3)
        assert all(poll.thread.is_alive() for poll in polls)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        for poll in polls:
            answer = poll.result(timeout=25)
            assert (answer.status_int, answer.json) == (200, [])
        assert server.process.wait(timeout=25) == 0
        print(f"gunicorn stopped {time.monotonic() - signalled:.1f} s after SIGTERM")
        assert time.monotonic() - signalled < 15, "the polls held the workers to the timeout"
    finally:
        close_all(by_worker)


# ==================================================================================================
# More than one machine: nodes on one PostgreSQL database
# ==================================================================================================


@pytest.fixture
def postgresql_url(postgresql) -> Iterator[str]:
    """A schema of its own on the session's PostgreSQL, for the tests of several nodes."""
    with postgresql_schema(postgresql) as url:
        yield url


@pytest.fixture
def postgresql_db(postgresql_url) -> Iterator[syncnode.PostgreSQLConnection]:
    """A connection of its own to the test's schema: another node, as far as locks go."""
    settings = syncnode.Settings(database=postgresql_url)
    with contextlib.closing(syncnode.PostgreSQLConnection(postgresql_url, settings, {})) as conn:
        yield conn


@dataclass
class Node(RealServer):
    """A `python syncnode.py` process serving a PostgreSQL database on 127.0.0.1."""

    process: subprocess.Popen
    port: int

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def start_node(postgresql_url, tmp_path) -> Iterator[Callable[..., Node]]:
    """Start syncnode processes (nodes) on the test's PostgreSQL schema; stop them after."""
    nodes: list[Node] = []

    def start(*flags: str) -> Node:
        port = free_port()
        log = open(tmp_path / f"node-{port}.log", "wb")
        process = subprocess.Popen(
            [sys.executable, SYNCNODE_PY, "--database", postgresql_url, "--port", str(port),
             *flags],
            env=cli_env(), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        node = Node(process, port)
        nodes.append(node)
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (tmp_path / f"node-{port}.log").read_text()
            with contextlib.suppress(OSError):
                if node.request("GET", "/health").status_int == 200:
                    return node
            assert time.monotonic() < deadline, "the node did not start"
            time.sleep(0.05)

    yield start
    for node in nodes:
        node.stop()


def test_nodes_racing_writers_on_two_nodes_one_wins(start_node, postgresql_url):
    first, second = start_node(), start_node()
    alice = first.register("alice")
    token = first.request("PUT", "/store/k", b"v0", alice.headers).headers["X-Sync-Token"]
    barrier = threading.Barrier(10)
    answers: dict[int, Reply] = {}

    def write(number: int) -> None:
        node = (first, second)[number % 2]
        conn = node.connect()
        try:
            conn.connect()
            barrier.wait(timeout=10)
            headers = {**alice.headers, "X-Sync-Token": token}
            answers[number] = call(conn, "PUT", "/store/k", b"v%d" % number, headers)
        finally:
            conn.close()

    run_threads([lambda n=n: write(n) for n in range(10)], timeout=30)
    statuses = sorted(reply.status_int for reply in answers.values())
    assert statuses == [204] + [409] * 9
    (winner,) = [n for n, reply in answers.items() if reply.status_int == 204]
    for node in (first, second):
        read = node.request("GET", "/store/k", headers=alice.headers)
        assert read.body == b"v%d" % winner
        assert read.headers["X-Sync-Token"] == answers[winner].headers["X-Sync-Token"]
    for n, reply in answers.items():
        if n != winner:
            assert reply.json["code"] == "KEY01"


def test_nodes_feed_read_while_two_nodes_write_misses_no_change(start_node):
    """A reader following the feed on one node while writers race on both ends up with
    exactly the final state: no change committed later carries a number below its cursor."""
    first, second = start_node(), start_node()
    alice = first.register("alice")
    keys = [f"k{n}" for n in range(8)]
    tokens = {}
    for key in keys:
        tokens[key] = first.request("PUT", f"/store/{key}", b"0", alice.headers).headers[
            "X-Sync-Token"
        ]
    cursor = int(first.request("GET", "/store", headers=alice.headers).headers["X-Sync-Cursor"])
    seen: dict[str, str] = {}
    writing = threading.Event()
    writing.set()

    def writer(node: Node, my_keys: list[str]) -> None:
        conn = node.connect()
        try:
            for round_ in range(25):
                for key in my_keys:
                    headers = {**alice.headers, "X-Sync-Token": tokens[key]}
                    reply = call(conn, "PUT", f"/store/{key}", b"%d" % round_, headers)
                    assert reply.status_int == 204, reply.body
                    tokens[key] = reply.headers["X-Sync-Token"]
        finally:
            conn.close()

    def reader() -> None:
        nonlocal cursor
        conn = first.connect()
        try:
            while writing.is_set():
                page = call(conn, "GET", f"/store?since={cursor}", headers=alice.headers)
                assert page.status_int == 200, page.body
                numbers = [entry["seq"] for entry in page.json]
                assert numbers == sorted(numbers) and all(n > cursor for n in numbers)
                for entry in page.json:
                    seen[entry["key"]] = entry["token"]
                cursor = int(page.headers["X-Sync-Cursor"])
        finally:
            conn.close()

    reading = threading.Thread(target=reader, daemon=True)
    reading.start()
    run_threads([lambda: writer(first, keys[:4]), lambda: writer(second, keys[4:])], timeout=120)
    writing.clear()
    reading.join(30)
    assert not reading.is_alive()
    final = first.request("GET", f"/store?since={cursor}", headers=alice.headers)
    for entry in final.json:
        seen[entry["key"]] = entry["token"]
    assert seen == tokens  # every key at its last token, whichever node wrote it


def test_nodes_poll_on_one_node_wakes_for_a_write_on_the_other(start_node):
    first, second = start_node(), start_node()
    alice, bob = first.register("alice"), first.register("bob")
    cursors = {
        user.name: second.request("GET", "/store", headers=user.headers).headers["X-Sync-Cursor"]
        for user in (alice, bob)
    }
    alices = LongPoll(second, alice.headers, f"/store?since={cursors['alice']}&wait=20", 30)
    bobs = LongPoll(second, bob.headers, f"/store?since={cursors['bob']}&wait=3", 30)
    time.sleep(0.5)  # both polls reach the second node and wait
    started = time.monotonic()
    assert first.request("PUT", "/store/k", b"v", alice.headers).status_int == 204
    answer = alices.result(timeout=25)
    print(f"woken {1000 * (alices.done_at - started):.0f} ms after the other node's PUT")
    assert [entry["key"] for entry in answer.json] == ["k"]
    assert alices.done_at - started < 5, "woken by the wait running out, not by the write"
    # Bob cannot see the key: his poll waits its three seconds out and says nothing changed.
    assert bobs.result(timeout=10).json == []
    assert bobs.done_at - bobs.started_at >= 2.5


def test_nodes_logout_on_one_node_ends_a_poll_on_the_other(start_node):
    first, second = start_node(), start_node()
    alice = first.register("alice")
    cursor = second.request("GET", "/store", headers=alice.headers).headers["X-Sync-Cursor"]
    poll = LongPoll(second, alice.headers, f"/store?since={cursor}&wait=20", 30)
    time.sleep(0.5)
    started = time.monotonic()
    assert first.request("DELETE", "/auth", headers=alice.headers).status_int == 204
    answer = poll.result(timeout=25)
    assert answer.status_int == 401 and answer.json["code"] == "AUTH01"
    assert poll.done_at - started < 5


def test_nodes_starting_together_migrate_once(postgresql_url, postgresql_db, clock):
    barrier = threading.Barrier(4)
    apps: list = []

    def start() -> None:
        barrier.wait(timeout=10)
        apps.append(syncnode.create_app(postgresql_url, clock=clock, **CHEAP_HASHING))

    try:
        run_threads([start] * 4, timeout=60)
        assert len(apps) == 4
        conn = postgresql_db
        assert conn.schema_version() == len(syncnode.SCHEMA)
        assert conn.execute("SELECT count(*) FROM sync_state").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM id_counters").fetchone()[0] == 3
    finally:
        for app in apps:
            app.close()


def test_nodes_housekeeping_waits_for_the_node_that_holds_its_turn(
    postgresql_url, postgresql_db, clock
):
    app = syncnode.create_app(postgresql_url, clock=clock, **CHEAP_HASHING)
    try:
        client = webtest.TestApp(app)
        alice = register_user(client)
        token = token_of(put(client, alice, "k", b"v"))
        deleting(client, alice, "k", token)
        other = postgresql_db
        lock = f"{syncnode.POSTGRESQL_LOCK_CLASS}, {syncnode.POSTGRESQL_HOUSEKEEPING_LOCK}"
        other.execute(f"SELECT pg_advisory_lock({lock})")  # another node is housekeeping
        clock.advance(app.context.settings.tombstone_ttl + 3600)
        client.get("/health")
        assert other.execute("SELECT count(*) FROM tombstones").fetchone()[0] == 1
        other.execute(f"SELECT pg_advisory_unlock({lock})")
        clock.advance(3600)
        client.get("/health")
        assert other.execute("SELECT count(*) FROM tombstones").fetchone()[0] == 0
    finally:
        app.close()


def test_nodes_refuse_a_database_of_a_newer_syncnode_untouched(
    postgresql_url, postgresql_db, clock
):
    syncnode.create_app(postgresql_url, clock=clock, **CHEAP_HASHING).close()
    db = postgresql_db
    db.execute("UPDATE schema_version SET version = ?", (len(syncnode.SCHEMA) + 1,))
    before = app_state(db)
    with pytest.raises(syncnode.DatabaseTooNew):
        syncnode.create_app(postgresql_url, clock=clock, **CHEAP_HASHING)
    assert app_state(db) == before
    assert db.schema_version() == len(syncnode.SCHEMA) + 1


def test_nodes_writes_take_the_database_write_lock(postgresql_url, postgresql_db, clock):
    """A write waits while another node holds the write lock, and fails (ERR02, nothing
    written) once it waited busy_timeout; reads go on meanwhile."""
    app = syncnode.create_app(postgresql_url, clock=clock, busy_timeout=300, **CHEAP_HASHING)
    try:
        client = webtest.TestApp(app)
        alice = register_user(client)
        put(client, alice, "k", b"v")
        other = postgresql_db
        other.execute("BEGIN IMMEDIATE")
        try:
            started = time.monotonic()
            response = client.put(
                "/store/new", b"x", headers={**alice.headers, "If-None-Match": "*"}, status=500
            )
            assert response.json["code"] == "ERR02"
            assert time.monotonic() - started >= 0.25
            assert client.get("/store/k", headers=alice.headers).body == b"v"
        finally:
            other.execute("ROLLBACK")
        assert other.execute("SELECT count(*) FROM items WHERE key = 'new'").fetchone()[0] == 0
        put(client, alice, "new", b"x")
    finally:
        app.close()


def test_nodes_a_lost_database_connection_is_replaced(postgresql_url, postgresql, clock):
    """A database connection the server lost (a restart, a failover) fails at most the
    request that met it; the next requests open new connections and are answered."""
    app = syncnode.create_app(postgresql_url, clock=clock, **CHEAP_HASHING)
    try:
        client = webtest.TestApp(app)
        alice = register_user(client)
        put(client, alice, "k", b"v")
        with postgresql.admin() as admin:
            ended = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            ).fetchone()[0]
        assert ended >= 1
        first = client.get("/store/k", headers=alice.headers, expect_errors=True)
        assert first.status_int in (200, 500)
        assert client.get("/store/k", headers=alice.headers).body == b"v"
        put(client, alice, "k2", b"after")
        assert client.get("/health").json == {"database": True, "disk": True}
    finally:
        app.close()


def test_cli_copy_sqlite_to_postgresql_moves_everything(tmp_path, postgresql_url, clock):
    source = str(tmp_path / "pi.db")
    app = syncnode.create_app(source, clock=clock, **CHEAP_HASHING)
    client = webtest.TestApp(app)
    alice, bob = register_user(client, "alice"), register_user(client, "bob")
    big = bytes(range(256)) * 2048  # 512 KiB, streamed
    put(client, alice, "notes/big", big)
    put(client, alice, "notes/small", b"small", meta="m1")
    put(client, alice, "notes/gone", b"x")
    share(client, alice, "notes/small", {"bob": "WRITE"})
    deleting(
        client,
        alice,
        "notes/gone",
        token_of(client.get("/store/notes/gone", headers=alice.headers)),
    )
    key = create_api_key(client, alice, "store.read")
    before = {
        user.name: (
            client.get("/store?values=true", headers=user.headers).json,
            client.get("/store?since=0", headers=user.headers).json,
        )
        for user in (alice, bob)
    }
    app.close()
    copied = run_cli(tmp_path, "copy", source, postgresql_url)
    assert copied.returncode == 0, copied.stderr
    assert "2 users, 2 items, 2 sessions" in copied.stdout
    served = syncnode.create_app(postgresql_url, clock=clock, **CHEAP_HASHING)
    try:
        client = webtest.TestApp(served)
        for user in (alice, bob):  # the same sessions, listings and feed
            assert (
                client.get("/store?values=true", headers=user.headers).json,
                client.get("/store?since=0", headers=user.headers).json,
            ) == before[user.name]
        assert client.get("/store/notes/big", headers=alice.headers).body == big
        small = client.get("/store/notes/small", headers=key.headers)
        assert (small.body, small.headers["X-Sync-Meta"]) == (b"small", "m1")
        login(client, "bob", PASSWORD, status=200)
        put(client, bob, "new", b"after the move")  # new rows get new ids
        assert client.get("/store/new", headers=bob.headers).body == b"after the move"
    finally:
        served.close()
    again = run_cli(tmp_path, "copy", source, postgresql_url)
    assert again.returncode == 1 and "not empty" in again.stderr


def test_cli_copy_into_a_sqlite_file_from_postgresql(tmp_path, postgresql_url, clock):
    app = syncnode.create_app(postgresql_url, clock=clock, **CHEAP_HASHING)
    client = webtest.TestApp(app)
    alice = register_user(client)
    put(client, alice, "k", b"v" * 300_000)
    app.close()
    target = str(tmp_path / "back.db")
    copied = run_cli(tmp_path, "copy", postgresql_url, target)
    assert copied.returncode == 0, copied.stderr
    served = syncnode.create_app(target, clock=clock, **CHEAP_HASHING)
    try:
        assert webtest.TestApp(served).get("/store/k", headers=alice.headers).body == b"v" * 300_000
    finally:
        served.close()


def test_cli_backup_on_postgresql_says_to_use_pg_dump(tmp_path, postgresql_url):
    for command in (["backup", str(tmp_path / "b.db")], ["restore", str(tmp_path / "b.db")]):
        result = run_cli(tmp_path, "--database", postgresql_url, *command)
        assert result.returncode == 1
        assert "pg_dump" in result.stderr and "pg_restore" in result.stderr
    assert not (tmp_path / "b.db").exists()


def test_cli_messages_never_show_a_database_password(tmp_path, postgresql):
    url = f"postgresql://syncnode:hunter2secret@127.0.0.1:{free_port()}/postgres"
    result = run_cli(tmp_path, "--database", url, "stats")
    assert result.returncode == 1
    assert "hunter2secret" not in result.stderr + result.stdout
    assert "syncnode:***@127.0.0.1" in result.stderr


# ==================================================================================================
# Properties
# ==================================================================================================


class FreshServer:
    """An app on a database in its own temporary directory, built and removed per example.

    Hypothesis runs many examples inside one test call, so a function-scoped fixture would
    share one database between them; each example builds its own server instead.
    """

    def __init__(self, **settings) -> None:
        self.directory = tempfile.mkdtemp(prefix="syncnode-props-")
        self.database = os.path.join(self.directory, "syncnode.db")
        self.app = syncnode.create_app(
            self.database, clock=FakeClock(), **{**CHEAP_HASHING, **settings}
        )
        self.client = webtest.TestApp(self.app)

    def register(self, name: str) -> User:
        """Register a user through the API and return it."""
        return register_user(self.client, name)

    def close(self) -> None:
        self.app.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def store_url(key: str) -> str:
    """The path of a key, every reserved character percent-encoded ('/' as %2F)."""
    return "/store/" + urllib.parse.quote(key, safe="")


def permission_url(key: str) -> str:
    """The permission path of a key, percent-encoded like store_url."""
    return "/permission/" + urllib.parse.quote(key, safe="")


#: Text the contract accepts as a key: no control characters (Cc, C1 included), no surrogates.
valid_keys = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"]),
    min_size=1,
    max_size=syncnode.MAX_KEY_CHARS,
)
printable_meta = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E),
    max_size=syncnode.MAX_META_BYTES,
)


#: Every code point, lone surrogates and controls included: ids arrive as JSON strings, and
#: JSON's \u escapes can spell any of them.
any_text = st.text(st.characters(exclude_categories=()))


def accepted_id(raw: str) -> str | None:
    """Return normalize_id(raw), or None when it refuses the id."""
    try:
        return syncnode.normalize_id(raw)
    except syncnode.ApiError as error:
        assert error.code == "ACCT02"
        return None


@given(any_text)
@example("ℌello")  # NFKC makes capitals of some letters: lower-casing must come after it.
@example("İstanbul")  # Lower-cases to two code points.
@example("ΌΣΟΣ")  # Final sigma.
@example("ﬀ\u3000")  # A ligature and ideographic space.
@example("Å" * syncnode.MAX_ID_CHARS)  # Angstrom sign, NFKC to Å, at the length limit.
def test_account_id_normalisation_is_idempotent(raw):
    name = accepted_id(raw)
    if name is not None:
        assert syncnode.normalize_id(name) == name


@given(any_text)
@example(" " + "x" * syncnode.MAX_ID_CHARS + "\t")
@example("x" * (syncnode.MAX_ID_CHARS + 1))
@example("a\u0085b")  # NEL: C1 control and whitespace.
@example("a\u00a0b")  # No-break space.
@example("\u2028")
def test_account_accepted_ids_have_no_whitespace_or_controls(raw):
    name = accepted_id(raw)
    if name is not None:
        assert 1 <= len(name) <= syncnode.MAX_ID_CHARS
        assert not any(char.isspace() for char in name)
        assert not any(unicodedata.category(char) == "Cc" for char in name)


@settings(max_examples=60, deadline=None)
@given(key=valid_keys, value=st.binary(max_size=4096), meta=st.none() | printable_meta)
@example(key="a/b?c#d%2F e", value=b"", meta=None)
@example(key="%", value=b"\x00\xff", meta="")
@example(key="🦄 ünï/cødé", value=b"v", meta=" spaced meta ")
@example(key="k" * syncnode.MAX_KEY_CHARS, value=b"v", meta="m" * syncnode.MAX_META_BYTES)
def test_store_any_valid_key_value_and_meta_read_back(key, value, meta):
    server = FreshServer()
    try:
        user = server.register("alice")
        headers = dict(user.headers)
        if meta is not None:
            headers["X-Sync-Meta"] = meta
        put = server.client.put(
            store_url(key),
            value,
            headers=headers,
            content_type="application/octet-stream",
            status=204,
        )
        token = put.headers["X-Sync-Token"]
        assert put.headers["ETag"] == f'"{token}"'

        got = server.client.get(store_url(key), headers=user.headers, status=200)
        assert got.body == value
        assert got.content_type == "application/octet-stream"
        assert got.headers["X-Sync-Token"] == token
        assert got.headers["ETag"] == f'"{token}"'
        assert got.headers.get("X-Sync-Meta") == meta

        listing = server.client.get("/store", headers=user.headers, status=200)
        assert listing.json == [{"key": key, "permission": "OWN", "token": token}]
    finally:
        server.close()


USERS = ("ann", "bob", "cyd")
#: An id that never belongs to an account: a grant naming it is ERR01, a removal ignores it.
STRANGER = "ghost"
#: A small key alphabet, so that rules collide on keys; percent-encoding matters for two.
KEYS = ("a", "a/b", "é ?#%")
LEVELS = ("READ", "WRITE", "OWN")
RANK = {"READ": 1, "WRITE": 2, "OWN": 3}
#: X-Sync-Meta values a PUT must refuse: not printable ASCII (REQ01), too long (SIZE01).
BAD_METAS = ("tab\there", "caf\u00e9", "x" * (syncnode.MAX_META_BYTES + 1))
#: Who sends a request: a user by id, or a role that the rule resolves against the model to a
#: holder of the key at (or nearest to) that level, so that rules often get past ERR01 to the
#: permission and token checks.
ROLES = {"<owner>": "OWN", "<writer>": "WRITE", "<reader>": "READ"}
ACTORS = (*USERS, *ROLES)
#: Which X-Sync-Token a PUT or DELETE sends: the stored one (if any), a spent one, or none.
SENT_TOKENS = ("current", "current", "stale", "none")
#: Whom a permission change names: a user, the stranger, the caller itself or the key's owner.
SUBJECTS = ("<self>", "<owner>", *USERS, STRANGER)


@dataclass
class Entry:
    """The model of one stored key."""

    value: bytes
    token: str
    meta: str | None
    holders: dict[str, str] = field(default_factory=dict)


def spell(name: str, shout: bool) -> str:
    """Write an id as a client might; the server normalises it (README, Accounts and sessions)."""
    return name.upper() if shout else name


class StoreModel(RuleBasedStateMachine):
    """Three users send store, permission and account requests; a dict model predicts each answer.

    Codes follow the README's Errors: the first broken rule in the order AUTH01, REQ01/SIZE01,
    ERR01 (missing or invisible key), PERM01, KEY01 answers; permission changes need OWN except
    self-removal, and none may leave a key without an OWN holder (PERM02).
    """

    def __init__(self) -> None:
        super().__init__()
        self.server = FreshServer()
        self.client = self.server.client
        self.db = sqlite3.connect(self.server.database, isolation_level=None)
        #: The latest session of every id; a deleted account's stays here until it registers again.
        self.sessions: dict[str, User] = {}
        #: Sessions of deleted accounts, which must stay dead after the id registers again.
        self.dead_sessions: list[User] = []
        self.alive: set[str] = set()
        self.store: dict[str, Entry] = {}
        self.spent_tokens: list[str] = ["never-issued-token"]

    def teardown(self) -> None:
        self.db.close()
        self.server.close()

    # Model helpers ------------------------------------------------------------------------------

    def resolve(self, actor: str, key: str) -> str:
        """The user behind an actor: a role goes to the holder nearest its level, else USERS[0]."""
        if actor not in ROLES:
            return actor
        entry, wanted = self.store.get(key), RANK[ROLES[actor]]
        if not entry or not entry.holders:
            return USERS[0]
        return min(entry.holders, key=lambda user: (abs(RANK[entry.holders[user]] - wanted), user))

    def subject(self, who: str, name: str, key: str) -> str:
        """The user a permission change names; <self> is the caller."""
        return name if who == "<self>" else self.resolve(who, key)

    def level(self, name: str, key: str) -> int:
        entry = self.store.get(key)
        return RANK[entry.holders[name]] if entry and name in entry.holders else 0

    def token_to_send(self, key: str, sent: str) -> str | None:
        """The X-Sync-Token for a rule: the current one, a stale one or none."""
        entry = self.store.get(key)
        if sent == "current":
            return entry.token if entry else None
        if sent == "stale":
            return self.spent_tokens[-1]
        return None

    def headers(self, name: str, token: str | None = None, meta: str | None = None) -> dict:
        headers = dict(self.sessions[name].headers)
        if token is not None:
            headers["X-Sync-Token"] = token
        if meta is not None:
            headers["X-Sync-Meta"] = meta
        return headers

    @staticmethod
    def expect(response, status: int, code: str | None) -> None:
        if code is not None:
            assert_error(response, status, code)

    @staticmethod
    def has_owner(holders: dict[str, str]) -> bool:
        return "OWN" in holders.values()

    # Accounts -----------------------------------------------------------------------------------

    def register(self, name: str, shout: bool = False) -> None:
        body = {"id": spell(name, shout), "password": PASSWORD}
        if name in self.alive:
            response = self.client.post_json("/account", body, status=409)
            assert_error(response, 409, "ACCT03")
            return
        response = self.client.post_json("/account", body, status=200)
        self.sessions[name] = User(name, response.json["token"])
        self.alive.add(name)

    @initialize(
        owners=st.lists(st.sampled_from(USERS), min_size=len(KEYS), max_size=len(KEYS)),
        shares=st.lists(
            st.tuples(st.sampled_from(KEYS), st.sampled_from(USERS), st.sampled_from(LEVELS)),
            min_size=1,
            max_size=5,
        ),
    )
    def register_users_and_share_keys(
        self, owners: list[str], shares: list[tuple[str, str, str]]
    ) -> None:
        """Start from three users, every key created and some of them shared."""
        for name in USERS:
            self.register(name)
        for key, owner in zip(KEYS, owners, strict=True):
            self.put_value(owner, key, "none", b"first", None)
        for key, user, permission in shares:
            self.grant("<owner>", key, [(user, permission, False)])

    @rule(name=st.sampled_from(USERS), shout=st.booleans())
    def register_again(self, name: str, shout: bool) -> None:
        self.register(name, shout)

    # One deleted account at a time, so that few steps end in AUTH01.
    @precondition(lambda self: len(self.alive) == len(USERS))
    @rule(name=st.sampled_from(USERS))
    def delete_account(self, name: str) -> None:
        self.client.delete("/account", headers=self.headers(name), status=204)
        self.alive.discard(name)
        self.dead_sessions.append(self.sessions[name])
        for key, entry in list(self.store.items()):
            level = entry.holders.pop(name, None)
            if level == "OWN" and not self.has_owner(entry.holders):
                del self.store[key]

    # Store --------------------------------------------------------------------------------------

    @rule(
        actor=st.sampled_from(ACTORS),
        key=st.sampled_from(KEYS),
        sent=st.sampled_from(SENT_TOKENS),
        value=st.binary(max_size=64),
        meta=st.none()
        | st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=16)
        | st.sampled_from(BAD_METAS),
    )
    def put_value(self, actor: str, key: str, sent: str, value: bytes, meta: str | None) -> None:
        """PUT: a bad X-Sync-Meta answers before visibility, permission and token."""
        name = self.resolve(actor, key)
        entry, level = self.store.get(key), self.level(name, key)
        token = self.token_to_send(key, sent)
        if name not in self.alive:
            status, code = 401, "AUTH01"
        elif meta is not None and not (meta.isascii() and meta.isprintable()):
            status, code = 400, "REQ01"
        elif meta is not None and len(meta) > syncnode.MAX_META_BYTES:
            status, code = 413, "SIZE01"
        elif entry is None:
            status, code = (204, None) if token is None else (409, "KEY01")
        elif level == 0:
            status, code = 409, "KEY01"  # Exists but invisible: a create that cannot happen.
        elif level < RANK["WRITE"]:
            status, code = 403, "PERM01"
        elif token != entry.token:
            status, code = 409, "KEY01"
        else:
            status, code = 204, None
        response = self.client.put(
            store_url(key),
            value,
            headers=self.headers(name, token, meta),
            content_type="application/octet-stream",
            status=status,
        )
        self.expect(response, status, code)
        if status == 204:
            new_token = response.headers["X-Sync-Token"]
            assert response.headers["ETag"] == f'"{new_token}"'
            assert new_token not in self.spent_tokens
            if entry is None:
                self.store[key] = Entry(value, new_token, meta, {name: "OWN"})
            else:
                self.spent_tokens.append(entry.token)
                entry.value, entry.token, entry.meta = value, new_token, meta

    @rule(
        actor=st.sampled_from(ACTORS),
        key=st.sampled_from(KEYS),
        sent=st.sampled_from(SENT_TOKENS),
    )
    def delete_value(self, actor: str, key: str, sent: str) -> None:
        name = self.resolve(actor, key)
        entry, level = self.store.get(key), self.level(name, key)
        token = self.token_to_send(key, sent)
        if name not in self.alive:
            status, code = 401, "AUTH01"
        elif level == 0:
            status, code = 404, "ERR01"
        elif level < RANK["OWN"]:
            status, code = 403, "PERM01"
        elif token != entry.token:
            status, code = 409, "KEY01"
        else:
            status, code = 204, None
        response = self.client.delete(
            store_url(key), headers=self.headers(name, token), status=status
        )
        self.expect(response, status, code)
        if status == 204:
            self.spent_tokens.append(entry.token)
            del self.store[key]

    @rule(actor=st.sampled_from(ACTORS), key=st.sampled_from(KEYS))
    def read(self, actor: str, key: str) -> None:
        """GET the value and the permission list: any holder may, nobody else sees the key."""
        name = self.resolve(actor, key)
        entry, level = self.store.get(key), self.level(name, key)
        if name not in self.alive:
            status, code = 401, "AUTH01"
        elif level == 0:
            status, code = 404, "ERR01"
        else:
            status, code = 200, None
        value = self.client.get(store_url(key), headers=self.headers(name), status=status)
        self.expect(value, status, code)
        holders = self.client.get(permission_url(key), headers=self.headers(name), status=status)
        self.expect(holders, status, code)
        if status == 200:
            assert value.body == entry.value
            assert value.headers["X-Sync-Token"] == entry.token
            assert value.headers["ETag"] == f'"{entry.token}"'
            assert value.headers.get("X-Sync-Meta") == entry.meta
            assert holders.json == [
                {"user": user, "permission": entry.holders[user]} for user in sorted(entry.holders)
            ]

    # Permissions --------------------------------------------------------------------------------

    @rule(
        actor=st.sampled_from(ACTORS),
        key=st.sampled_from(KEYS),
        grants=st.lists(
            st.tuples(st.sampled_from(SUBJECTS), st.sampled_from(LEVELS), st.booleans()),
            max_size=3,
        ),
    )
    def grant(self, actor: str, key: str, grants: list[tuple[str, str, bool]]) -> None:
        name = self.resolve(actor, key)
        entry, level = self.store.get(key), self.level(name, key)
        wanted: dict[str, tuple[str, bool]] = {}
        for user, permission, shout in grants:  # One entry per user; a repeat is REQ01.
            wanted.setdefault(self.subject(user, name, key), (permission, shout))
        changed = dict(entry.holders) if entry else {}
        changed.update({user: permission for user, (permission, _) in wanted.items()})
        if name not in self.alive:
            status, code = 401, "AUTH01"
        elif level == 0:
            status, code = 404, "ERR01"
        elif level < RANK["OWN"]:
            status, code = 403, "PERM01"
        elif any(user not in self.alive for user in wanted):
            status, code = 404, "ERR01"
        elif not self.has_owner(changed):
            status, code = 409, "PERM02"
        else:
            status, code = 204, None
        body = [
            {"user": spell(user, shout), "permission": permission}
            for user, (permission, shout) in wanted.items()
        ]
        response = self.client.put_json(
            permission_url(key), body, headers=self.headers(name), status=status
        )
        self.expect(response, status, code)
        if status == 204:
            entry.holders = changed

    @rule(
        actor=st.sampled_from(ACTORS),
        key=st.sampled_from(KEYS),
        users=st.lists(st.tuples(st.sampled_from(SUBJECTS), st.booleans()), max_size=3),
    )
    def revoke(self, actor: str, key: str, users: list[tuple[str, bool]]) -> None:
        """DELETE /permission: OWN removes anyone, a holder itself; no users parameter is REQ01."""
        name = self.resolve(actor, key)
        entry, level = self.store.get(key), self.level(name, key)
        holders = entry.holders if entry else {}
        names = {self.subject(user, name, key) for user, _ in users}
        changed = {user: permission for user, permission in holders.items() if user not in names}
        if name not in self.alive:
            status, code = 401, "AUTH01"
        elif not users:
            status, code = 400, "REQ01"
        elif level == 0:
            status, code = 404, "ERR01"
        elif level < RANK["OWN"] and (names & set(holders)) - {name}:
            status, code = 403, "PERM01"
        elif not self.has_owner(changed):
            status, code = 409, "PERM02"
        else:
            status, code = 204, None
        url = permission_url(key)
        if users:
            spelled = [spell(self.subject(user, name, key), shout) for user, shout in users]
            url += "?users=" + urllib.parse.quote(",".join(spelled), safe=",")
        response = self.client.delete(url, headers=self.headers(name), status=status)
        self.expect(response, status, code)
        if status == 204:
            entry.holders = changed

    # Invariants ---------------------------------------------------------------------------------

    @invariant()
    def listings_match_the_model(self) -> None:
        for name in USERS:
            if name not in self.alive:
                continue
            response = self.client.get("/store", headers=self.headers(name), status=200)
            assert response.json == [
                {"key": key, "permission": entry.holders[name], "token": entry.token}
                for key, entry in sorted(self.store.items())
                if name in entry.holders
            ]

    @invariant()
    def deleted_accounts_stay_signed_out(self) -> None:
        for session in self.dead_sessions:
            response = self.client.get("/store", headers=session.headers, status=401)
            assert_error(response, 401, "AUTH01")

    @invariant()
    def every_stored_key_has_an_owner(self) -> None:
        keys = {row[0] for row in self.db.execute("SELECT key FROM items")}
        assert keys == set(self.store)
        orphans = self.db.execute(
            """
            SELECT items.key FROM items
            WHERE NOT EXISTS (
                SELECT 1 FROM permissions
                WHERE permissions.item_id = items.id AND permissions.level = ?
            )
            """,
            (syncnode.LEVELS["OWN"],),
        ).fetchall()
        assert orphans == []


def test_store_and_permissions_follow_the_model():
    run_state_machine_as_test(
        StoreModel, settings=settings(max_examples=40, stateful_step_count=30, deadline=None)
    )


@settings(max_examples=30, deadline=None)
@given(users=st.text(max_size=20), key=st.sampled_from(["missing", "theirs"]))
@example(users="no one", key="missing")
@example(users=",", key="theirs")
def test_permission_revoke_on_unseen_key_never_succeeds(users, key):
    server = FreshServer()
    try:
        caller, owner = server.register("alice"), server.register("bob")
        server.client.put(store_url("theirs"), b"v", headers=owner.headers, status=204)
        response = server.client.delete(
            permission_url(key) + "?users=" + urllib.parse.quote(users, safe=","),
            headers=caller.headers,
            expect_errors=True,
        )
        assert response.status_int in (400, 404)
        assert response.json["code"] == {400: "REQ01", 404: "ERR01"}[response.status_int]
        holders = server.client.get(permission_url("theirs"), headers=owner.headers, status=200)
        assert holders.json == [{"user": "bob", "permission": "OWN"}]
    finally:
        server.close()


@settings(max_examples=30, deadline=None)
@given(name=any_text, password=any_text)
@example(name="a\ud800", password=PASSWORD)
@example(name="bob", password="\udfff" + PASSWORD)
def test_account_register_any_credentials_is_200_or_acct02(name, password):
    server = FreshServer()
    try:
        body = json.dumps({"id": name, "password": password}).encode()  # Escapes surrogates.
        response = server.client.post(
            "/account", body, content_type="application/json", expect_errors=True
        )
        assert response.status_int in (200, 400)
        if response.status_int == 400:
            assert_error(response, 400, "ACCT02")
    finally:
        server.close()


# The change feed replayed on a listing ------------------------------------------------------------


# A small world: three users and three keys, two with characters that wildcards would match.
FEED_USERS = ("ann", "ben", "cat")
FEED_KEYS = ("a_", "a%", "ab")
FEED_STEP = st.tuples(
    st.sampled_from(["put", "put", "delete", "grant", "grant", "revoke", "regrant"]),
    st.sampled_from(FEED_KEYS),
    st.integers(0, 2),  # who acts, among those who may
    st.integers(0, 2),  # whom a grant or a revoke names
    st.sampled_from(["READ", "WRITE", "OWN"]),
)


def key_holders(client, users: list[User], key: str) -> dict[str, str]:
    """Return {user: permission} of a key, asked as each user until one holds it; {} if none."""
    for each in users:
        response = client.get(f"/permission/{quote(escaped(key))}", headers=each.headers,
                              status=(200, 404))  # fmt: skip
        if response.status_int == 200:
            return {entry["user"]: entry["permission"] for entry in response.json}
    return {}


def feed_step(client, users: list[User], step: tuple) -> None:
    """Make one random change, acted by an owner where one is needed so that most steps apply.

    A missing key is created; a refusal is fine, but only with a code the contract allows.
    """
    action, key, actor, target, level = step
    by_name = {each.name: each for each in users}
    holders = key_holders(client, users, key)
    owners = sorted(name for name, permission in holders.items() if permission == "OWN")
    if not holders or action == "put":
        caller = users[actor]
    else:
        caller = by_name[owners[actor % len(owners)]]
    path = quote(escaped(key))
    read = client.get(f"/store/{path}", headers=caller.headers, status=(200, 404))
    token = read.headers.get("X-Sync-Token")
    if not holders or action == "put":
        response = put(client, caller, escaped(key), os.urandom(2), token, status=(204, 403, 409))
    elif action == "delete":
        headers = {**caller.headers, "X-Sync-Token": token}
        response = client.delete(f"/store/{path}", headers=headers, status=204)
    elif action == "grant":
        grant = {FEED_USERS[target]: level}
        response = share(client, caller, escaped(key), grant, status=(204, 409))
    else:  # revoke, or revoke and grant again at once
        name = sorted(holders)[target % len(holders)]
        url = f"/permission/{path}?users={name}"
        response = client.delete(url, headers=caller.headers, status=(204, 409))
        if action == "regrant" and response.status_int == 204:
            # An owner that left was not the last one: another owner grants it back.
            granter = caller.name if name != caller.name else [o for o in owners if o != name][0]
            grant = {name: level}
            response = share(client, by_name[granter], escaped(key), grant, status=204)
    if response.status_int >= 400:
        assert response.json["code"] in ("PERM01", "PERM02", "KEY01")


def listing_at_cursor(client, user: User, limit: int, between: list[Callable[[], None]]):
    """Page through the full listing as the README's client does; return its cursor and keys.

    The cursor is the X-Sync-Seq of the first page; one of `between` runs after each page, so
    that the listing is not one snapshot.
    """
    response = client.get(f"/store?limit={limit}", headers=user.headers)
    cursor, entries = int(response.headers["X-Sync-Seq"]), list(response.json)
    while url := next_link(response):
        if between:
            between.pop(0)()
        response = client.get(url, headers=user.headers)
        entries += response.json
    return cursor, {entry["key"]: entry for entry in entries}


def replay(mirror: dict[str, dict], entries: list[dict]) -> None:
    """Apply change feed entries to a client's copy of the listing."""
    for entry in entries:
        if entry.get("deleted"):
            assert set(entry) == {"key", "deleted", "seq"}
            mirror.pop(entry["key"], None)
        else:
            assert set(entry) == {"key", "permission", "token", "seq"}
            mirror[entry["key"]] = {name: entry[name] for name in ("key", "permission", "token")}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    before=st.lists(FEED_STEP, max_size=3),
    during=st.lists(FEED_STEP, max_size=3),
    after=st.lists(FEED_STEP, min_size=1, max_size=8),
    limit=st.integers(1, 3),
)
def test_feed_replayed_on_a_listing_reproduces_the_final_listing(before, during, after, limit):
    # Refusals are allowed answers, so an example whose steps are mostly refused still checks
    # the feed; `during` runs between the pages of the listings, `after` once they are done.
    server = FreshServer(synchronous="NORMAL")
    try:
        client = server.client
        users = [register_user(client, name) for name in FEED_USERS]
        for number, key in enumerate(FEED_KEYS):  # each key shared, so that steps matter
            put(client, users[number], escaped(key))
            share(client, users[number], escaped(key), {FEED_USERS[number - 1]: "WRITE"})
        for step in before:
            feed_step(client, users, step)
        between = [lambda step=step: feed_step(client, users, step) for step in during]
        copies = {each.name: listing_at_cursor(client, each, limit, between) for each in users}
        for step in after:
            feed_step(client, users, step)
        for each in users:
            cursor, mirror = copies[each.name]
            entries = follow_pages(client, each, f"/store?since={cursor}&limit={limit}")
            seqs = [entry["seq"] for entry in entries]
            assert seqs == sorted(set(seqs)), "entries not in strictly increasing seq order"
            assert len({entry["key"] for entry in entries}) == len(entries)
            replay(mirror, entries)
            final = client.get("/store", headers=each.headers)
            assert [mirror[key] for key in sorted(mirror)] == final.json, each.name
            assert all(seq <= int(final.headers["X-Sync-Seq"]) for seq in seqs)
    finally:
        server.close()


# ==================================================================================================
# Clients: JavaScript
# ==================================================================================================

JS_CLIENT = os.path.join(os.path.dirname(SYNCNODE_PY), "clients", "js")


def test_js_client_passes_its_node_tests_against_live_servers(start_server):
    node = node_or_skip()
    server = start_server()
    one_waiter, small_quota = start_server(max_waiters=1), start_server(quota_keys=2)
    env = {
        **os.environ,
        "SYNCNODE_URL": server.url,
        "SYNCNODE_ONE_WAITER_URL": one_waiter.url,
        "SYNCNODE_SMALL_QUOTA_URL": small_quota.url,
        # For the test that stops a server of its own and starts it again.
        "SYNCNODE_PYTHON": sys.executable,
        "SYNCNODE_PY": SYNCNODE_PY,
    }
    done = subprocess.run(
        [node, "--test", "--test-reporter=spec", "test/"],
        cwd=JS_CLIENT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    print(done.stdout[-4000:])
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-4000:]
    assert "# fail 0" in done.stdout or "ℹ fail 0" in done.stdout


#: RxDB and its rxjs, pinned, for the replication test.
RXDB_PACKAGES = ("rxdb@17.6.0", "rxjs@7.8.2")


@pytest.fixture(scope="session")
def rxdb_dir(tmp_path_factory) -> Path:
    """A folder with RxDB installed from npm (once per session), for clients/js/rxdb.js."""
    return npm_folder(tmp_path_factory, "rxdb", RXDB_PACKAGES, ("rxdb", "rxjs"))


def test_js_rxdb_replication_converges_two_databases(start_server, rxdb_dir):
    node = node_or_skip()
    server = start_server()
    # The client and its RxDB module beside node_modules, where their imports resolve.
    for name in ("syncnode.js", "rxdb.js", os.path.join("rxdb-test", "converge.mjs")):
        shutil.copy(os.path.join(JS_CLIENT, name), rxdb_dir)
    done = subprocess.run(
        [node, "--test", "--test-reporter=spec", "converge.mjs"],
        cwd=rxdb_dir, env={**os.environ, "SYNCNODE_URL": server.url},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "ℹ pass 1" in done.stdout and "ℹ fail 0" in done.stdout
    assert server.app.context.db.connection().execute(
        "SELECT count(*) FROM items WHERE key LIKE 'rxdb-%/todos/%'"
    ).fetchone() == (4,)


#: puppeteer-core, pinned, to drive Debian's Chromium through the example app.
PUPPETEER_PACKAGES = ("puppeteer-core@25.16.0",)


def serve_folder(folder: str) -> http.server.ThreadingHTTPServer:
    """Serve a folder's files on 127.0.0.1 (port 0) from a thread, as a static web server."""

    class FileHandler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=folder, **kwargs)

        def log_message(self, *args) -> None:
            pass  # keep the test output clean

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FileHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="file-server", daemon=True).start()
    return server


@pytest.fixture(scope="session")
def puppeteer_dir(tmp_path_factory) -> Path:
    """A folder with puppeteer-core installed from npm, once per test session."""
    return npm_folder(tmp_path_factory, "puppeteer", PUPPETEER_PACKAGES, ("puppeteer-core",))


def test_js_example_app_syncs_two_browser_pages_one_offline(start_server, puppeteer_dir, db):
    if not os.access(CHROMIUM, os.X_OK):
        skip_or_fail("install Debian's chromium to run the browser test (apt-get install chromium)")
    node = node_or_skip()
    pages = serve_folder(JS_CLIENT)
    try:
        page_url = f"http://127.0.0.1:{pages.server_address[1]}"
        sync = start_server(cors_origins=page_url)  # another origin than the page's
        shutil.copy(os.path.join(JS_CLIENT, "example-test", "two-devices.mjs"), puppeteer_dir)
        env = {**os.environ, "CHROMIUM": CHROMIUM, "PAGE_URL": page_url, "SYNCNODE_URL": sync.url}
        done = subprocess.run(
            [node, "--test", "--test-reporter=spec", "two-devices.mjs"],
            cwd=puppeteer_dir, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        pages.shutdown()
        pages.server_close()
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "ℹ pass 1" in done.stdout and "ℹ fail 0" in done.stdout
    titles = sorted(
        json.loads(value)["title"]
        for (value,) in db.execute("SELECT value FROM items WHERE key LIKE 'todo-%/todos/%'")
    )
    assert titles == ["bread", "eggs"]  # milk, the first, was deleted; the others are kept


def test_js_client_declarations_type_check_a_usage_file(npm_tools, tmp_path):
    node = node_or_skip()
    tsc = npm_tools / "node_modules" / "typescript" / "bin" / "tsc"
    folder = tmp_path / "js"
    shutil.copytree(JS_CLIENT, folder, ignore=shutil.ignore_patterns("node_modules"))
    command = [
        node, str(tsc), "--noEmit", "--strict", "--target", "es2022", "--module", "nodenext",
        "--moduleResolution", "nodenext", "--lib", "es2022,dom", "--skipLibCheck", "false",
        str(folder / "types-test" / "usage.ts"),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


# ==================================================================================================
# The README's contract and curl session
# ==================================================================================================

# - Errors: the README's error table lists every code of syncnode.ERROR_STATUS with its status.
# - Self-contained: the README names no contract file that the repository lacks.
# - Session: the README's curl session, the ```sh blocks each preceded by `<!-- session -->`,
#   runs with bash against a live server and gets the answers the README promises.


#: The session's first line, which the test points at its own server.
README_SERVER = "S=http://127.0.0.1:8080"
#: The long-poll of the session, and the short one the test runs instead.
README_WAIT, TEST_WAIT = "wait=30", "wait=1"
#: CHEAP_HASHING as command-line flags.
CHEAP_HASHING_FLAGS = [
    arg
    for name, value in CHEAP_HASHING.items()
    for arg in (f"--{name.replace('_', '-')}", str(value))
]
SERVER_START_TIMEOUT = 20
SESSION_TIMEOUT = 60
SESSION_BLOCK = re.compile(r"^<!-- session -->\n```sh\n(.*?)^```$", re.M | re.S)
STATUS_LINE = re.compile(r"^HTTP/[0-9.]+ (\d{3})\b.*$", re.M)


def readme_section(title: str) -> str:
    """Return the text of the README's `## title` section, without its heading."""
    text = repository_file("README.md").read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no section '## {title}'"
    return match[1]


# Errors -------------------------------------------------------------------------------------------


def test_readme_error_table_lists_every_code_with_its_status():
    rows = re.findall(
        r"^\| *`?([A-Z]+\d\d)`? *\| *(\d{3}) *\| *(.*?) *\|$", readme_section("Errors"), re.M
    )
    table = {code: int(status) for code, status, _ in rows}
    assert table == syncnode.ERROR_STATUS
    assert len(rows) == len(table), "a code appears twice in the error table"
    assert all(when for _, _, when in rows), "every code says when it is answered"


def test_readme_error_section_shows_the_json_layout():
    section = readme_section("Errors")
    assert '{"code": "KEY01", "message": ' in section
    assert '"index"' in section


# Self-contained -----------------------------------------------------------------------------------


def test_readme_names_no_contract_outside_the_repository():
    text = repository_file("README.md").read_text(encoding="utf-8")
    assert "SYNCNODE.md" not in text and "APP-API.md" not in text
    named = set(re.findall(r"`(spec/[^`]+)`", text))
    assert named >= {"spec/syncnode-openapi.json", "spec/app-api-openapi.json"}
    assert all(repository_file(path).is_file() for path in named), named


# Session ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CurlAnswer:
    """One HTTP answer that the session printed, with what was printed after it."""

    status: int
    headers: dict[str, str]
    body: str

    @property
    def code(self) -> str | None:
        """Return the first Sync Node error code printed after the status line, if any."""
        match = re.search(r'"code":"([A-Z]+\d\d)"', self.body)
        return match[1] if match else None


#: Each answer the session shows, in order: a name for the test, its status and Sync Node code.
EXPECTED = [
    ("create", 204, None),  # alice creates notes/today
    ("update", 204, None),  # alice updates it with the current token
    ("stale", 409, "KEY01"),  # the replaced token is stale
    ("read", 200, None),  # alice reads it: no X-Sync-Meta any more
    ("share", 204, None),  # alice shares it with bob, who then reads and lists it
    ("bob_put", 403, "PERM01"),  # bob, a READ holder, cannot write
    ("key_put", 403, "PERM01"),  # the API key lacks store.write
    ("key_user", 403, None),  # the API key lacks user.read (App API layout)
    ("key_assets", 404, None),  # /api/assets is not served (App API layout)
    ("listing", 200, None),  # the full listing that gives the cursor
    ("not_modified", 304, None),  # alice's copy is current
    ("batch_stale", 409, "KEY01"),  # the batch with a stale token
    ("batch", 200, None),  # the batch with the current token
    ("feed", 200, None),  # the changes after the cursor, then the long-poll's []
]


def session_script() -> str:
    """Return the README's session blocks as one script, waiting briefly instead of 30 s."""
    blocks = SESSION_BLOCK.findall(repository_file("README.md").read_text(encoding="utf-8"))
    assert blocks, "README.md marks no ```sh block with <!-- session -->"
    script = "".join(blocks)
    assert script.splitlines()[0] == README_SERVER, "the session opens by setting S"
    assert script.count(README_WAIT) == 1, "the session has one long-poll"
    return script.replace(README_WAIT, TEST_WAIT)


def parse_answers(output: str) -> list[CurlAnswer]:
    """Split the session's output at each status line into answers."""
    output = output.replace("\r", "")
    starts = list(STATUS_LINE.finditer(output))
    answers = []
    for match, following in zip(starts, [*starts[1:], None], strict=True):
        text = output[match.end() : following.start() if following else len(output)]
        head, _, body = text.lstrip("\n").partition("\n\n")
        headers = {}
        for line in head.splitlines():
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        answers.append(CurlAnswer(int(match[1]), headers, body))
    return answers


def first_line(answer: CurlAnswer) -> str:
    """Return the first line printed after an answer's headers: its body when it has one."""
    return answer.body.splitlines()[0]


def wait_for_health(process: subprocess.Popen, port: int, log: Path) -> None:
    """Ask a starting server for GET /health until it answers 200; fail if it exits or hangs."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while True:
        if process.poll() is not None:
            pytest.fail(f"syncnode exited with {process.returncode}: {log.read_text()}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass  # The server is still starting.
        finally:
            conn.close()
        if time.monotonic() > deadline:
            pytest.fail(f"syncnode did not answer /health in time: {log.read_text()}")
        time.sleep(0.05)


@contextlib.contextmanager
def running_server(tmp_path: Path) -> Iterator[str]:
    """Run `python syncnode.py` on a free 127.0.0.1 port; yield its URL, then stop it."""
    port, log = free_port(), tmp_path / "server.log"
    env = {name: value for name, value in os.environ.items() if not name.startswith("SYNCNODE_")}
    command = [sys.executable, SYNCNODE_PY, "--port", str(port)]
    command += ["--database", str(tmp_path / "x.db"), *CHEAP_HASHING_FLAGS]
    with log.open("w") as log_file:
        process = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    try:
        wait_for_health(process, port, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()  # Only this process, by its pid.
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def session_env(tmp_path: Path) -> dict[str, str]:
    """Return an environment for the session: this Python first, no proxy, no curl or bash rc."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name.lower() not in ("http_proxy", "https_proxy", "all_proxy", "bash_env", "env")
    }
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env.update(NO_PROXY="*", no_proxy="*", CURL_HOME=str(tmp_path))
    return env


def run_session(tmp_path: Path, server: str, env: dict[str, str]) -> str:
    """Run the README's session with bash against the server; return what it printed."""
    script = tmp_path / "session.sh"
    body = session_script().replace(README_SERVER, f"S={server}", 1)
    script.write_text("set -euo pipefail\n" + body, encoding="utf-8")
    result = subprocess.run(
        [shutil.which("bash", path=env["PATH"]), str(script)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=SESSION_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout
    return result.stdout


def test_readme_session_runs_and_answers_as_documented(tmp_path):
    env = session_env(tmp_path)
    tools = ("curl", "bash", "awk", "tr", "python3")
    missing = [tool for tool in tools if shutil.which(tool, path=env["PATH"]) is None]
    if missing:
        skip_or_fail(f"The README's curl session needs {', '.join(missing)}.")
    with running_server(tmp_path) as server:
        output = run_session(tmp_path, server, env)
    answers = parse_answers(output)
    assert [(a.status, a.code) for a in answers] == [(s, c) for _, s, c in EXPECTED], output
    answer = {name: a for (name, _, _), a in zip(EXPECTED, answers, strict=True)}

    token = answer["update"].headers["x-sync-token"]
    assert answer["create"].headers["x-sync-token"] != token
    # A PUT without X-Sync-Meta drops the stored meta.
    assert answer["read"].body.startswith("buy milk and eggs")
    assert "x-sync-meta" not in answer["read"].headers
    # bob reads and lists the key he holds READ on.
    bob_read, bob_list = answer["share"].body.strip().splitlines()
    assert bob_read == "buy milk and eggs"
    listed = [(item["key"], item["permission"]) for item in json.loads(bob_list)]
    assert listed == [("notes/today", "READ")]
    assert json.loads(first_line(answer["key_user"]))["statusCode"] == 403
    assert json.loads(first_line(answer["key_assets"]))["message"] == "Cannot GET /api/assets"
    # The session carries alice's latest token into Syncing a client.
    assert answer["listing"].headers["x-sync-seq"].isdigit()
    assert answer["not_modified"].headers["etag"] == f'"{token}"'
    assert json.loads(first_line(answer["batch_stale"]))["index"] == 1
    results = json.loads(first_line(answer["batch"]))["results"]
    assert [(item["key"], item["token"] is None) for item in results] == [
        ("notes/a", False),
        ("notes/today", True),
    ]
    changes, waited = answer["feed"].body.strip().splitlines()
    assert [(item["key"], "deleted" in item) for item in json.loads(changes)] == [
        ("notes/a", False),
        ("notes/today", True),
    ]
    assert json.loads(waited) == []
