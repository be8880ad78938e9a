#!/usr/bin/env python3
"""The no-overhead reference server of the benchmark: the least each syncnode route can cost.

A bare bottle app on waitress that does only the happy path of each benchmark scenario, the
cheapest way, on its own minimal SQLite schema: WAL, synchronous FULL unless --synchronous says
otherwise, one connection per serving thread. It answers the same wire format as syncnode on
these routes (status codes, X-Sync-Token, JSON shapes), so bench/load.py drives both alike:

- ``GET /hello``: a constant, the ceiling of bottle on waitress;
- ``POST /auth``: Argon2id verification of the stored hash, a new session stored by its SHA-256;
- ``GET /store/<key>``: the session by its digest, the value by primary key, the caller's
  permission row by primary key;
- ``PUT /store/<key>``: compare-and-swap by one conditional UPDATE (204 with the new token,
  409 KEY01 otherwise);
- ``GET /store``: the caller's keys with permission and token, sorted by key.

With --allow-seed it also takes bench/load.py's setup calls under /seed: ``POST /seed/account``,
``PUT /seed/store/<key>`` (create) and ``PUT /seed/permission/<key>``. It checks nothing else:
it exists only to be measured, on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import secrets
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable

import argon2
import bottle

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    token_digest BLOB PRIMARY KEY,
    user_id INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS items (
    key TEXT PRIMARY KEY,
    token TEXT NOT NULL,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS permissions (
    user_id INTEGER NOT NULL,
    key TEXT NOT NULL,
    level INTEGER NOT NULL,
    PRIMARY KEY (user_id, key)
) WITHOUT ROWID;
"""
LEVEL_NAMES = {1: "READ", 2: "WRITE", 3: "OWN"}
LEVELS = {name: number for number, name in LEVEL_NAMES.items()}
SESSION_TTL_MS = 30 * 86400 * 1000


def error(status: int, code: str, message: str) -> bottle.HTTPResponse:
    """Return an error answer in syncnode's JSON layout."""
    body = json.dumps({"code": code, "message": message}).encode()
    return bottle.HTTPResponse(body, status, {"Content-Type": "application/json"})


def read_body() -> bytes:
    """Read the request body whole (Content-Length bytes)."""
    environ = bottle.request.environ
    return environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))


def digest(token: str) -> bytes:
    """Return the SHA-256 digest under which a session token is stored."""
    return hashlib.sha256(token.encode()).digest()


def create_app(
    database: str,
    synchronous: str = "FULL",
    hasher: argon2.PasswordHasher | None = None,
    allow_seed: bool = False,
) -> bottle.Bottle:
    """Return the baseline WSGI app on the database, creating its tables if missing."""
    hasher = hasher or argon2.PasswordHasher()
    local = threading.local()

    def db() -> sqlite3.Connection:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            local.conn = conn
        return conn

    db().executescript(SCHEMA)
    app = bottle.Bottle()

    def caller() -> int:
        """Return the user id of the bearer token; raise 401 AUTH01 when unknown."""
        token = bottle.request.environ.get("HTTP_AUTHORIZATION", "")[7:]
        row = (
            db()
            .execute("SELECT user_id FROM sessions WHERE token_digest = ?", (digest(token),))
            .fetchone()
        )
        if row is None:
            raise error(401, "AUTH01", "The session token is unknown.")
        return row[0]

    def new_session(user_id: int) -> bytes:
        token = secrets.token_urlsafe(32)
        db().execute(
            "INSERT INTO sessions (token_digest, user_id) VALUES (?, ?)", (digest(token), user_id)
        )
        expiration = int(time.time() * 1000) + SESSION_TTL_MS
        bottle.response.content_type = "application/json"
        return json.dumps({"token": token, "expiration": expiration}).encode()

    def stored(token: str) -> bottle.HTTPResponse:
        return bottle.HTTPResponse(b"", 204, {"X-Sync-Token": token, "ETag": f'"{token}"'})

    @app.get("/hello")
    def hello_get() -> bytes:
        return b"hello"

    @app.post("/auth")
    def auth_post() -> bytes:
        try:
            body = json.loads(read_body())
            row = (
                db()
                .execute("SELECT id, password_hash FROM users WHERE name = ?", (body["id"],))
                .fetchone()
            )
            hasher.verify(row[1], body["password"])
        except (ValueError, TypeError, KeyError, argon2.exceptions.VerificationError):
            raise error(401, "AUTH01", "The user id or password is wrong.") from None
        return new_session(row[0])

    @app.get("/store")
    def store_list_get() -> bytes:
        rows = (
            db()
            .execute(
                """
            SELECT permissions.key, permissions.level, items.token
            FROM permissions JOIN items ON items.key = permissions.key
            WHERE permissions.user_id = ?
            ORDER BY permissions.key
            """,
                (caller(),),
            )
            .fetchall()
        )
        bottle.response.content_type = "application/json"
        entries = [
            {"key": key, "permission": LEVEL_NAMES[level], "token": token}
            for key, level, token in rows
        ]
        return json.dumps(entries, ensure_ascii=False, separators=(",", ":")).encode()

    @app.get("/store/<key:path>")
    def store_get(key: str) -> bytes:
        row = (
            db()
            .execute(
                """
            SELECT items.token, items.value
            FROM items JOIN permissions ON permissions.key = items.key AND permissions.user_id = ?
            WHERE items.key = ?
            """,
                (caller(), key),
            )
            .fetchone()
        )
        if row is None:
            raise error(404, "ERR01", "No data was found for this key.")
        token, value = row
        response = bottle.response
        response.content_type = "application/octet-stream"
        response.set_header("X-Sync-Token", token)
        response.set_header("ETag", f'"{token}"')
        return value

    @app.put("/store/<key:path>")
    def store_put(key: str) -> bottle.HTTPResponse:
        user_id = caller()
        sent = bottle.request.environ.get("HTTP_X_SYNC_TOKEN")
        token = secrets.token_urlsafe(16)
        # One statement decides: the key, the token and a WRITE or OWN permission row.
        changed = (
            db()
            .execute(
                """
            UPDATE items SET token = ?, value = ?
            WHERE key = ? AND token = ?
              AND EXISTS (SELECT 1 FROM permissions WHERE user_id = ? AND key = ? AND level >= 2)
            """,
                (token, read_body(), key, sent, user_id, key),
            )
            .rowcount
        )
        if changed != 1:
            raise error(409, "KEY01", "X-Sync-Token does not match the stored token.")
        return stored(token)

    if allow_seed:
        add_seed_routes(app, db, caller, new_session, stored, hasher)
    return app


def add_seed_routes(
    app: bottle.Bottle,
    db: Callable[[], sqlite3.Connection],
    caller: Callable[[], int],
    new_session: Callable[[int], bytes],
    stored: Callable[[str], bottle.HTTPResponse],
    hasher: argon2.PasswordHasher,
) -> None:
    """Add the setup routes of bench/load.py under /seed, in syncnode's wire format."""

    @app.post("/seed/account")
    def seed_account_post() -> bytes:
        body = json.loads(read_body())
        user_id = (
            db()
            .execute(
                "INSERT INTO users (name, password_hash) VALUES (?, ?)",
                (body["id"], hasher.hash(body["password"])),
            )
            .lastrowid
        )
        return new_session(user_id)

    @app.put("/seed/store/<key:path>")
    def seed_store_put(key: str) -> bottle.HTTPResponse:
        user_id, token, conn = caller(), secrets.token_urlsafe(16), db()
        with conn:
            conn.execute("BEGIN")
            conn.execute(
                "INSERT INTO items (key, token, value) VALUES (?, ?, ?)", (key, token, read_body())
            )
            conn.execute(
                "INSERT INTO permissions (user_id, key, level) VALUES (?, ?, ?)",
                (user_id, key, LEVELS["OWN"]),
            )
        return stored(token)

    @app.put("/seed/permission/<key:path>")
    def seed_permission_put(key: str) -> bottle.HTTPResponse:
        caller()
        grants = json.loads(read_body())
        conn = db()
        with conn:
            conn.execute("BEGIN")
            conn.executemany(
                """
                INSERT OR REPLACE INTO permissions (user_id, key, level)
                SELECT id, ?, ? FROM users WHERE name = ?
                """,
                [(key, LEVELS[grant["permission"]], grant["user"]) for grant in grants],
            )
        return bottle.HTTPResponse(b"", 204)


def main(argv: list[str] | None = None) -> int:
    """Serve the baseline with waitress until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
    parser.add_argument("--port", type=int, default=8081, help="TCP port to listen on.")
    parser.add_argument("--database", default="baseline.db", help="SQLite database file.")
    parser.add_argument("--threads", type=int, default=4, help="Serving threads.")
    parser.add_argument("--synchronous", default="FULL", choices=("FULL", "NORMAL"))
    parser.add_argument("--argon2-time-cost", type=int, default=argon2.DEFAULT_TIME_COST)
    parser.add_argument("--argon2-memory-cost", type=int, default=argon2.DEFAULT_MEMORY_COST)
    parser.add_argument("--argon2-parallelism", type=int, default=argon2.DEFAULT_PARALLELISM)
    parser.add_argument(
        "--allow-seed", action="store_true", help="Take bench/load.py's setup calls under /seed."
    )
    args = parser.parse_args(argv)
    hasher = argon2.PasswordHasher(
        time_cost=args.argon2_time_cost,
        memory_cost=args.argon2_memory_cost,
        parallelism=args.argon2_parallelism,
    )
    app = create_app(args.database, args.synchronous, hasher, args.allow_seed)

    import waitress.server

    # Waitress warns about its queue depth on nearly every request under load.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    server = waitress.server.create_server(
        app, host=args.host, port=args.port, threads=args.threads, ident="baseline"
    )
    # SystemExit inside the loop makes waitress stop its threads and return.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"baseline serving on http://{args.host}:{server.effective_port}", file=sys.stderr)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
