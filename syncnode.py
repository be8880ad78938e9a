"""syncnode: a self-hosted sync server for local-first apps.

People create an account, get a bearer session, store opaque values under keys, update them by
compare-and-swap on a store token and share keys with other users as READ, WRITE or OWN.

Three ways to run it:

- ``python syncnode.py`` serves on 127.0.0.1:8080 with waitress (``--help`` lists the settings);
- the ``syncnode`` console script does the same once the package is installed;
- ``syncnode.create_app(database="path/to/syncnode.db")`` returns a WSGI application for any
  WSGI server, or to mount under a path prefix in a bigger application.

Beside the Sync Node API it serves an App API under ``/api``: the accounts, sessions, API keys
and server-info operations of Immich's API, on the same accounts. The README describes the
behaviour (errors, sessions, reset, permissions, the App API's scope) with the OpenAPI documents
in ``spec/``; ``GET /openapi.json`` serves the document of everything this file serves. The
admin commands (``syncnode user``, ``backup``, ``restore``, ``check``, ...) are at the end, with
the CLI.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import dataclasses
import datetime
import email.message
import email.utils
import functools
import getpass
import hashlib
import heapq
import html
import importlib.util
import ipaddress
import itertools
import json
import logging
import math
import os
import re
import secrets
import select
import shutil
import signal
import smtplib
import socket
import sqlite3
import ssl
import sys
import tempfile
import threading
import time
import unicodedata
import urllib.parse
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, NamedTuple

import argon2
import bottle

try:
    import fcntl
except ImportError:  # Windows: syncnode restore cannot tell whether a server is running
    fcntl = None

__version__ = "0.1.0"

log = logging.getLogger("syncnode")
log.addHandler(logging.NullHandler())
access_log = logging.getLogger("syncnode.access")


# ==================================================================================================
# Constants and settings
# ==================================================================================================

MAX_KEY_CHARS = 1024
MAX_META_BYTES = 8192
MAX_ID_CHARS = 254
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 1024
MAX_JSON_BYTES = 1024 * 1024
MAX_BEARER_CHARS = 512
READ_CHUNK_BYTES = 64 * 1024
#: Rows a listing fetches from PostgreSQL at a time (SQLite reads them one by one anyway).
STREAM_ROWS = 100
#: A LIMIT that limits nothing (SQLite's -1 is an error on PostgreSQL).
NO_LIMIT = 2**63 - 1
MAX_WAIT_SECONDS = 60
MAX_PAGE_ENTRIES = 1000
MAX_BATCH_OPERATIONS = 100
MAX_BATCH_BYTES = 16 * 1024 * 1024
PROXY_SUFFIXES = ("-gzip", "-br", "-zstd", "-deflate")
VALUE_CACHE_CONTROL = "no-cache, no-transform"
CORS_ALLOW_HEADERS = (
    "Authorization, Content-Type, X-Sync-Token, X-Sync-Meta, X-Sync-Cursor, If-Match, "
    "If-None-Match, x-api-key"
)
CORS_EXPOSE_HEADERS = (
    "X-Sync-Token, X-Sync-Meta, X-Sync-Seq, X-Sync-Cursor, ETag, Link, Retry-After, "
    "X-Sync-Wait-Declined, "
    "X-Sync-Usage-Keys, X-Sync-Usage-Bytes, X-Sync-Quota-Keys, X-Sync-Quota-Bytes"
)
CORS_MAX_AGE_SECONDS = 86400
#: Bytes of an answer waitress buffers before the serving thread waits for the client.
OUTBUF_HIGH_WATERMARK_BYTES = 1024 * 1024
#: Values up to this size are read and written whole; larger ones stream in chunks.
STREAM_FROM_BYTES = 256 * 1024
#: With values=true, a listing or feed carries values up to this size inline (larger ones are
#: marked "large", for a GET), and a page ends once its values and meta pass the budget.
INLINE_VALUE_BYTES = 64 * 1024
INLINE_BUDGET_BYTES = 1024 * 1024
#: The WSGI environ key of the callbacks a request leaves for after its answer.
AFTER_ANSWER = "syncnode.after_answer"
#: The WSGI environ key of the place syncnode's own server keeps a long-poll in (see Parking).
PARKING = "syncnode.parking"
#: Seconds between two looks of a process's watcher for other processes' commits and for
#: long-polls whose wait is over.
WATCH_SECONDS = 0.05

LEVELS = {"READ": 1, "WRITE": 2, "OWN": 3}

#: README, App API: the API key permissions of Immich's document, then the store ones added.
API_KEY_PERMISSIONS = (
    "all", "apiKey.create", "apiKey.read", "apiKey.update", "apiKey.delete",
    "auth.changePassword", "authDevice.delete", "session.create", "session.read",
    "session.update", "session.delete", "systemMetadata.read", "systemMetadata.update",
    "user.read", "user.update", "server.about", "adminUser.create", "adminUser.read",
    "adminUser.update", "adminUser.delete", "store.read", "store.write", "store.own",
)  # fmt: skip
#: A store permission is also granted by the wider ones (OWN includes WRITE includes READ).
IMPLIED_BY = {
    "store.read": ("store.read", "store.write", "store.own"),
    "store.write": ("store.write", "store.own"),
}
MAX_NAME_CHARS = 255
MAX_DEVICE_CHARS = 64
SESSION_REFRESH_MS = 3600 * 1000
HOUSEKEEPING_MS = 10 * 60 * 1000
#: How much lower the CPU priority of hashing threads is than the serving threads'.
HASH_NICENESS = 10
#: Hashing slot n of every process serving a database is a lock on this byte plus n of the
#: database file: past the 512 bytes from 1 GiB where SQLite keeps its own locks.
HASH_LOCK_BYTE = 0x50000000
#: How often a login waiting for a hashing slot looks whether another process freed one.
HASH_RETRY_SECONDS = 0.01
#: How often the serving loop looks for a stop signal.
STOP_CHECK_SECONDS = 0.25
#: How long GET /health trusts a database it found writable before trying a write again, and
#: writes trust a disk they found roomy before looking again.
HEALTHY_FOR_SECONDS = 1
#: The WAL file is cut back to this size after each checkpoint.
WAL_LIMIT_BYTES = 64 * 1024 * 1024
LEVEL_NAMES = {number: name for name, number in LEVELS.items()}

CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")
BEARER_TOKEN = re.compile(r"[A-Za-z0-9_\-]+")
HOST_NAME = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def _setting(default: Any, help: str, **options: Any) -> Any:
    """Declare a setting: its default and the sentence ``--help`` and the README show."""
    return field(default=default, metadata={"help": help, **options})


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything an operator can tune; the CLI reads each from a flag or a SYNCNODE_* variable."""

    database: str = _setting(
        "syncnode.db",
        "SQLite database file (created if missing), or a postgresql:// URL (see the README, "
        "More than one machine).",
    )
    host: str = _setting("127.0.0.1", "Address to listen on.")
    port: int = _setting(8080, "TCP port to listen on.")
    threads: int = _setting(4, "Serving threads (one database connection each).")
    pin_threads: bool = _setting(
        True,
        "Whether syncnode's own server runs its Python threads on one CPU (chosen by process "
        "id): spread over several they contend for Python's lock and serve many times fewer "
        "requests. Password hashing still uses every CPU.",
    )
    log_level: str = _setting(
        "INFO", "Server log level.", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )
    registration: str = _setting(
        "open",
        "Who may create accounts with POST /account: anyone, nobody, or holders of an invite.",
        choices=("open", "closed", "invite"),
    )
    invite_ttl: int = _setting(7 * 86400, "Lifetime of an invite code in seconds.")
    session_ttl: int = _setting(30 * 86400, "Session lifetime in seconds.")
    reset_ttl: int = _setting(3600, "Password reset token lifetime in seconds.")
    max_value_bytes: int = _setting(32 * 1024 * 1024, "Largest stored value in bytes.")
    min_free_bytes: int = _setting(
        64 * 1024 * 1024, "Free space the data directory keeps; writes stop below it."
    )
    synchronous: str = _setting(
        "FULL",
        "SQLite synchronous mode: FULL survives power cuts, NORMAL is faster but may lose "
        "the last writes on a power cut.",
        choices=("FULL", "NORMAL"),
    )
    busy_timeout: int = _setting(5000, "Milliseconds a write waits for the database lock.")
    argon2_time_cost: int = _setting(argon2.DEFAULT_TIME_COST, "Argon2id iterations.")
    argon2_memory_cost: int = _setting(argon2.DEFAULT_MEMORY_COST, "Argon2id memory in KiB.")
    argon2_parallelism: int = _setting(argon2.DEFAULT_PARALLELISM, "Argon2id lanes.")
    login_window: int = _setting(900, "Window in seconds over which failed logins count.")
    login_fails_per_id: int = _setting(10, "Failed logins per user id in the window (0: off).")
    login_fails_per_address: int = _setting(
        100, "Failed logins per client address in the window (0: off)."
    )
    reset_window: int = _setting(3600, "Window in seconds over which reset requests count.")
    resets_per_id: int = _setting(5, "Reset requests per user id in the window (0: off).")
    resets_per_address: int = _setting(
        50, "Reset requests per client address in the window (0: off)."
    )
    registration_window: int = _setting(3600, "Window in seconds over which registrations count.")
    registrations_per_address: int = _setting(
        0, "Registrations per client address in the window (0: off)."
    )
    quota_bytes: int = _setting(0, "Bytes of values each user may own (0: no limit).")
    quota_keys: int = _setting(100_000, "Keys each user may own (0: no limit).")
    hash_slots: int = _setting(
        os.cpu_count() or 1,
        "Password hashes computed at once by every process serving the database (each takes "
        "Argon2's memory).",
    )
    hash_wait: int = _setting(
        2, "Seconds a login or registration waits for a hashing slot before BUSY01."
    )
    client_timeout: int = _setting(
        30,
        "Seconds a connection may take to send a request's headers, stay idle, or stall in "
        "sending a body or reading an answer before it is closed.",
    )
    max_connections: int = _setting(
        2000,
        "Open connections at most; half of them at most may hold no complete request.",
    )
    max_waiters: int = _setting(
        1000,
        "Long-polls that wait at once; past them a poll answers at once, declined. Under "
        "syncnode's own server a waiting poll holds its connection but no thread; under "
        "another server it holds a thread, and at most half the threads wait.",
    )
    access_log: bool = _setting(False, "Whether to log one line per request.")
    shutdown_timeout: int = _setting(
        10, "Seconds to finish running requests after SIGTERM or SIGINT."
    )
    smtp_host: str = _setting("", "SMTP server for password reset mails (empty: log line).")
    smtp_port: int = _setting(587, "SMTP server port.")
    smtp_security: str = _setting(
        "starttls", "SMTP connection security.", choices=("starttls", "tls", "none")
    )
    smtp_user: str = _setting("", "SMTP user name (empty: no login).")
    smtp_password: str = _setting("", "SMTP password.")
    smtp_from: str = _setting("", "Sender address of reset mails.")
    tombstone_ttl: int = _setting(
        90 * 86400, "Seconds the change feed remembers deletions; older cursors get SYNC01."
    )
    tombstones_per_user: int = _setting(
        100_000,
        "Deletions the change feed remembers per user; past them its older cursors get SYNC01.",
    )
    cors_origins: str = _setting(
        "*", "Origins browsers may call the Sync Node API from: *, a comma list, or empty (off)."
    )
    public_users: bool = _setting(
        False, "Whether GET /api/users lists every account to every user (else admins only)."
    )
    trusted_proxies: str = _setting(
        "",
        "Comma-separated addresses or networks of reverse proxies whose X-Forwarded-For "
        "names the client.",
    )

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.type == "int" and (type(value) is not int or value < 0):
                raise ValueError(f"The setting {item.name} must be a whole number of 0 or more.")
            if item.type == "bool" and type(value) is not bool:
                raise ValueError(f"The setting {item.name} must be true or false.")
            choices = item.metadata.get("choices")
            if choices and value not in choices:
                raise ValueError(f"The setting {item.name} must be one of {', '.join(choices)}.")
        if not self.database or self.database == ":memory:" or self.database.startswith("file:"):
            raise ValueError(
                "The setting database must be the path of a database file or a postgresql:// URL."
            )
        if not 1 <= self.port <= 65535 and self.port != 0:
            raise ValueError("The setting port must be 0 to 65535.")
        if self.hash_slots < 1:
            raise ValueError("The setting hash_slots must be at least 1.")
        if self.smtp_host and not self.smtp_from:
            raise ValueError("The setting smtp_from is needed with smtp_host.")
        if self.threads < 1:
            raise ValueError("The setting threads must be at least 1.")
        if self.client_timeout < 1 or self.max_connections < 2:
            raise ValueError(
                "The setting client_timeout must be at least 1 and max_connections at least 2."
            )
        if self.session_ttl < 1 or self.reset_ttl < 1:
            raise ValueError("The settings session_ttl and reset_ttl must be at least 1 second.")
        if self.argon2_time_cost < 1 or self.argon2_parallelism < 1:
            raise ValueError("The Argon2 time cost and parallelism must be at least 1.")
        if self.argon2_memory_cost < 8 * self.argon2_parallelism:
            raise ValueError("The Argon2 memory cost must be at least 8 KiB per lane.")
        parse_networks(self.trusted_proxies)


def parse_networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Parse a comma-separated list of addresses or networks; raise ValueError naming a bad one."""
    networks = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"The trusted proxy {item!r} is not an address or network.") from None
    return tuple(networks)


# ==================================================================================================
# Errors
# ==================================================================================================

#: README, Errors: every code with its HTTP status.
ERROR_STATUS = {
    "AUTH01": 401,
    "AUTH02": 429,
    "ACCT01": 403,
    "ACCT02": 400,
    "ACCT03": 409,
    "ERR01": 404,
    "ERR02": 500,
    "KEY01": 409,
    "PERM01": 403,
    "PERM02": 409,
    "REQ01": 400,
    "REQ02": 405,
    "SIZE01": 413,
    "DISK01": 507,
    "QUOTA01": 507,
    "BUSY01": 503,
    "SYNC01": 410,
}


class ApiError(Exception):
    """A deliberate error answer: a code of the error table, a sentence, extra headers.

    Both APIs render it in their own layout; app_message is the App API's wording (Immich's),
    where it differs from the code's usual one (APP_ERRORS).
    """

    def __init__(
        self,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
        *,
        index: int | None = None,
        app_message: str | list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = ERROR_STATUS[code]
        self.message = message
        self.headers = dict(headers or {})
        #: The 0-based position of the failing operation in a POST /batch.
        self.index = index
        self.app_message = app_message
        if code == "AUTH01":
            self.headers.setdefault("WWW-Authenticate", "Bearer")

    def at(self, index: int) -> ApiError:
        """Return this error as the failure of a batch's operation at index."""
        return ApiError(
            self.code, self.message, self.headers, index=index, app_message=self.app_message
        )


def out_of_space() -> ApiError:
    """The one answer for a write the disk has no room for (or a file that takes no write)."""
    return ApiError("DISK01", "The server is out of storage space; nothing was written.")


def not_found() -> ApiError:
    """The one answer for a key that is missing or that the caller may not see."""
    return ApiError("ERR01", "No data was found for this key.")


# ==================================================================================================
# Database
# ==================================================================================================

#: Migration scripts, applied in order; PRAGMA user_version counts how many have run.
SCHEMA = [
    """
    CREATE TABLE users (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        password_hash TEXT NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE sessions (
        id INTEGER PRIMARY KEY,
        public_id TEXT NOT NULL UNIQUE,
        user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        token_digest BLOB NOT NULL UNIQUE,
        created_ms INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL
    );
    CREATE INDEX sessions_by_user ON sessions (user_id, created_ms);
    CREATE INDEX sessions_by_expiry ON sessions (expires_ms);
    CREATE TABLE reset_tokens (
        user_id INTEGER PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
        token_digest BLOB NOT NULL UNIQUE,
        expires_ms INTEGER NOT NULL
    );
    CREATE TABLE items (
        id INTEGER PRIMARY KEY,
        key TEXT NOT NULL UNIQUE,
        token TEXT NOT NULL,
        meta TEXT,
        updated_ms INTEGER NOT NULL,
        size INTEGER NOT NULL,
        value BLOB NOT NULL
    );
    CREATE TABLE permissions (
        item_id INTEGER NOT NULL REFERENCES items (id) ON DELETE CASCADE,
        user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        level INTEGER NOT NULL CHECK (level IN (1, 2, 3)),
        PRIMARY KEY (item_id, user_id)
    ) WITHOUT ROWID;
    CREATE INDEX permissions_by_user ON permissions (user_id, item_id);
    CREATE TABLE attempts (
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        at_ms INTEGER NOT NULL
    );
    CREATE INDEX attempts_by_subject ON attempts (kind, subject, at_ms);
    """,
    # The App API: user UUIDs, names and update times, session devices and children, API keys.
    """
    ALTER TABLE users ADD COLUMN uuid TEXT;
    ALTER TABLE users ADD COLUMN display_name TEXT;
    ALTER TABLE users ADD COLUMN updated_ms INTEGER;
    UPDATE users SET
        uuid = lower(
            hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4'
            || substr(hex(randomblob(2)), 2) || '-' || substr('89ab', 1 + abs(random() % 4), 1)
            || substr(hex(randomblob(2)), 2) || '-' || hex(randomblob(6))
        ),
        updated_ms = created_ms,
        display_name = coalesce(
            nullif(substr(rtrim(name, replace(name, '@', '')), 1,
                          length(rtrim(name, replace(name, '@', ''))) - 1), ''),
            name
        );
    CREATE UNIQUE INDEX users_by_uuid ON users (uuid);
    ALTER TABLE sessions ADD COLUMN parent_id INTEGER REFERENCES sessions (id) ON DELETE CASCADE;
    ALTER TABLE sessions ADD COLUMN updated_ms INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE sessions ADD COLUMN device_type TEXT NOT NULL DEFAULT '';
    ALTER TABLE sessions ADD COLUMN device_os TEXT NOT NULL DEFAULT '';
    ALTER TABLE sessions ADD COLUMN app_version TEXT;
    UPDATE sessions SET updated_ms = created_ms;
    CREATE INDEX sessions_by_parent ON sessions (parent_id);
    CREATE TABLE api_keys (
        id INTEGER PRIMARY KEY,
        public_id TEXT NOT NULL UNIQUE,
        user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        secret_digest BLOB NOT NULL UNIQUE,
        permissions TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL
    );
    CREATE INDEX api_keys_by_user ON api_keys (user_id, created_ms);
    """,
    # Operations: invite codes, purging old attempts by time.
    """
    CREATE TABLE invites (
        code_digest BLOB PRIMARY KEY,
        expires_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX attempts_by_time ON attempts (at_ms);
    """,
    # The change feed: a server-wide sequence, the latest seq each holder saw of each key,
    # and tombstones for keys a user can no longer see.
    """
    CREATE TABLE sync_state (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq INTEGER NOT NULL,
        floor INTEGER NOT NULL
    );
    INSERT INTO sync_state (id, seq, floor) VALUES (1, 1, 0);
    ALTER TABLE permissions ADD COLUMN seq INTEGER NOT NULL DEFAULT 1;
    CREATE INDEX permissions_by_user_seq ON permissions (user_id, seq);
    CREATE TABLE tombstones (
        user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        key TEXT NOT NULL,
        seq INTEGER NOT NULL,
        created_ms INTEGER NOT NULL,
        PRIMARY KEY (user_id, key)
    ) WITHOUT ROWID;
    CREATE INDEX tombstones_by_user_seq ON tombstones (user_id, seq);
    CREATE INDEX tombstones_by_time ON tombstones (created_ms);
    """,
    # Hardening: ids that name an owner are never used twice (each table's last id is kept
    # past deletions), and each user's own floor of the change feed.
    """
    CREATE TABLE id_counters (
        name TEXT PRIMARY KEY,
        last INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO id_counters (name, last) SELECT 'users', coalesce(max(id), 0) FROM users;
    INSERT INTO id_counters (name, last) SELECT 'sessions', coalesce(max(id), 0) FROM sessions;
    INSERT INTO id_counters (name, last) SELECT 'api_keys', coalesce(max(id), 0) FROM api_keys;
    ALTER TABLE users ADD COLUMN feed_floor INTEGER NOT NULL DEFAULT 0;
    """,
    # Fleets: a count of ended or narrowed credentials, which tells every process's watcher
    # to have its long-polls check theirs again.
    """
    ALTER TABLE sync_state ADD COLUMN revocations INTEGER NOT NULL DEFAULT 0;
    """,
    # Speed: a changed value is written by one statement; this trigger gives every holder's
    # row its new change number (see record_update).
    """
    CREATE TRIGGER items_changed AFTER UPDATE OF token ON items
    BEGIN
        UPDATE sync_state SET seq = seq + 1;
        UPDATE permissions SET seq = (SELECT seq FROM sync_state) WHERE item_id = NEW.id;
    END;
    """,
]


class DatabaseTooNew(RuntimeError):
    """The database was written by a newer syncnode than this one."""


class DatabaseUnusable(RuntimeError):
    """The database path cannot be used (a missing or unwritable folder, say); says why."""


class HeldFiles:
    """The one descriptor this process keeps open of each database file its apps serve.

    Closing any descriptor of a file drops every POSIX lock the process holds on it, SQLite's
    own included: another process then takes the database for unused and deletes the -wal
    under it, and what this one writes after is lost. So syncnode opens a database file
    outside SQLite once per process, and closes it when the last app of that file closes.
    The descriptor carries the shared flock that syncnode restore checks for.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: For each (device, inode): its descriptor and how many apps hold it.
        self._files: dict[tuple[int, int], list[int]] = {}

    def hold(self, path: str) -> tuple[int, int]:
        """Hold the file with a shared flock; BlockingIOError while a restore swaps it."""
        status = os.stat(path)
        key = (status.st_dev, status.st_ino)
        with self._lock:
            entry = self._files.get(key)
            if entry is not None:
                entry[1] += 1
                return key
            try:  # writable, so that it can take the write locks of hashing slots
                held = os.open(path, os.O_RDWR)
            except PermissionError:
                held = os.open(path, os.O_RDONLY)
            try:
                fcntl.flock(held, fcntl.LOCK_SH | fcntl.LOCK_NB)
                opened, now = os.fstat(held), os.stat(path)
                if (opened.st_dev, opened.st_ino) != key or now.st_ino != key[1]:  # swapped
                    raise BlockingIOError
            except BlockingIOError:
                os.close(held)
                raise
            self._files[key] = [held, 1]
            return key

    def header(self, key: tuple[int, int]) -> bytes:
        """Return the first 16 bytes of a held file."""
        return os.pread(self._files[key][0], 16, 0)

    def descriptor(self, key: tuple[int, int]) -> int:
        """Return the descriptor of a held file (for the locks of hashing slots)."""
        return self._files[key][0]

    def release(self, key: tuple[int, int]) -> None:
        """Let go of a held file; the last app of it closes the descriptor."""
        with self._lock:
            entry = self._files[key]
            entry[1] -= 1
            if not entry[1]:
                del self._files[key]
                os.close(entry[0])


HELD_FILES = HeldFiles()


class SQLiteConnection(sqlite3.Connection):
    """A SQLite connection that may share an in-process write lock with its siblings.

    With PostgreSQLConnection, the one place that knows which database it speaks to: its
    schema and version, its errors, large values, the watcher's change count, upkeep.
    """

    #: Held by write transactions of the same app, so that writers queue in Python.
    write_lock: WriteLock | None = None
    #: Set when the file could not take a write: the app replaces the connection.
    stale = False
    #: A SQLite connection never breaks (PostgreSQL's may).
    broken = False
    #: The open connections of the app that opened this one (see Connections.open).
    owners: set | None = None
    #: Whether the open transaction of transaction() is a write transaction.
    writing = False
    #: Users whose feed or credentials the open transaction changes, and those of committed
    #: ones not yet told to their long-polls (see touch); the same of changed items, whose
    #: holders are looked up only when long-polls wait (see touch_items).
    pending: set[int]
    changed: set[int]
    pending_items: set[int]
    changed_items: set[int]
    #: The migrations of this database, its errors, and a condition on a list of user ids
    #: passed as one parameter (see id_list).
    migrations = SCHEMA
    Error = sqlite3.Error
    IntegrityError = sqlite3.IntegrityError
    IDS_IN = "IN (SELECT value FROM json_each(?))"

    def schema_version(self) -> int:
        """Return the schema version of the database (0 for a new one)."""
        return self.execute("PRAGMA user_version").fetchone()[0]

    def set_schema_version(self, version: int) -> None:
        """Record the schema version inside the migration's transaction."""
        self.execute(f"PRAGMA user_version = {int(version)}")

    def run_script(self, script: str) -> None:
        """Run a migration script, statement by statement."""
        for statement in split_statements(script):
            self.execute(statement)

    def id_list(self, ids: Iterable[int]) -> str:
        """Return row ids as the one parameter of IDS_IN."""
        return json.dumps(list(ids))

    def stream(self, sql: str, params: Any) -> sqlite3.Cursor:
        """Return the rows of a query as they are read (SQLite steps through them lazily)."""
        return self.execute(sql, params)

    def fill_value(self, item_id: int, body: BinaryIO, size: int) -> None:
        """Copy a file-held value into its row's zeroblob in chunks."""
        with self.blobopen("items", "value", item_id) as blob:
            while chunk := body.read(READ_CHUNK_BYTES):
                blob.write(chunk)

    def data_version(self) -> int:
        """Return SQLite's count of commits other connections made (PRAGMA data_version)."""
        return self.execute("PRAGMA data_version").fetchone()[0]

    @staticmethod
    def wait_for_change(closed: threading.Event, seconds: float) -> bool:
        """Wait the watcher's interval (SQLite tells of no commit); return whether closed."""
        return closed.wait(seconds)

    @contextlib.contextmanager
    def housekeeping_turn(self) -> Iterator[bool]:
        """Whether this process may do housekeeping now: always (each process does its own)."""
        yield True

    def restart_ids(self) -> None:
        """Nothing after a copy: SQLite numbers new rows past the largest id by itself."""

    def tidy(self, write_lock: WriteLock) -> None:
        """Give freed pages back to the file system and checkpoint the WAL."""
        with write_lock:  # (one execute frees only one page)
            self.executescript("PRAGMA incremental_vacuum;")
        self.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        """Close the connection (twice is harmless)."""
        super().close()
        if self.owners is not None:
            self.owners.discard(self)


@dataclass(slots=True)
class QueuedWrite:
    """A write statement waiting for WriteLock.run_together, and once its batch ended, its rows
    (None when the batch failed)."""

    sql: str
    params: tuple
    done: bool = False
    rows: list[tuple] | None = None


class WriteLock:
    """The lock an app's writers queue on in Python, which also commits single-statement
    writes of several threads together (run_together).

    Committing costs a sync of the disk: statements that arrive while another thread writes
    wait, and the next of them to take the lock runs them all in one transaction, so they
    share one commit instead of queueing for one each.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._turn = threading.Condition()
        self._queue: list[QueuedWrite] = []
        self._leading = False

    def acquire(self) -> bool:
        """Take the lock (as threading.Lock's)."""
        return self._lock.acquire()

    def release(self) -> None:
        """Let go of the lock."""
        self._lock.release()

    def __enter__(self) -> WriteLock:
        self._lock.acquire()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._lock.release()

    def queued(self) -> int:
        """Return how many statements wait for their batch."""
        with self._turn:
            return len(self._queue)

    def run_together(self, conn: Connection, sql: str, params: tuple) -> list[tuple]:
        """Run a write statement on its own or in one transaction with those queued beside it;
        return its rows once committed.

        Each statement decides on the rows as the ones before it in the batch left them, as
        it would have alone in that order. Should any of the batch fail, the batch rolls back
        and each runs alone again, so that a statement's error is its own.
        """
        write = QueuedWrite(sql, params)
        with self._turn:
            self._queue.append(write)
            while self._leading and not write.done:
                self._turn.wait()
            lead = not write.done  # the batch before has ended without it: it leads the next
            if lead:
                self._leading = True
        if lead:
            batch: list[QueuedWrite] = []
            try:
                with self._lock:
                    with self._turn:
                        batch, self._queue = self._queue, []
                    if len(batch) == 1:
                        return conn.execute(sql, params).fetchall()
                    run_batch(conn, batch)
            finally:
                with self._turn:
                    for queued in batch:
                        queued.done = True
                    self._leading = False
                    self._turn.notify_all()
        if write.rows is not None:
            return write.rows
        with self._lock:  # its batch failed: alone, for its own outcome
            return conn.execute(sql, params).fetchall()


def run_batch(conn: Connection, batch: list[QueuedWrite]) -> None:
    """Run queued writes in one write transaction; on any failure roll it all back."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        for queued in batch:
            queued.rows = conn.execute(queued.sql, queued.params).fetchall()
        conn.execute("COMMIT")
    except BaseException as error:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        for queued in batch:
            queued.rows = None
        if not isinstance(error, conn.Error):
            raise


def connect(path: str, settings: Settings, write_lock: WriteLock | None = None) -> Connection:
    """Open a connection in autocommit mode with WAL, foreign keys and the busy timeout set."""
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, factory=SQLiteConnection
    )
    conn.write_lock = write_lock
    conn.pending, conn.changed, conn.pending_items, conn.changed_items = set(), set(), set(), set()
    conn.execute(f"PRAGMA busy_timeout = {int(settings.busy_timeout)}")
    # Takes effect in a new database (open_context converts an older one once).
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {settings.synchronous}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}")
    return conn


@contextlib.contextmanager
def transaction(conn: Connection, write: bool = False) -> Iterator[Connection]:
    """Run a block in one transaction: commit on a clean exit, roll back on any exception.

    Writes use BEGIN IMMEDIATE: the write lock is taken before the first read, so a busy
    database waits at BEGIN (busy timeout) instead of failing halfway through the block.
    Writers of one app first queue on its in-process lock: SQLite's busy handler sleeps in
    steps of up to 100 ms, while a waiter on the lock wakes the moment the writer before it
    commits. Inside an open transaction the block runs in a savepoint of it, so any storage
    function may call another.
    """
    if conn.in_transaction:  # inside another: a savepoint, so either may be called alone
        if write and not getattr(conn, "writing", True):
            raise RuntimeError("A write transaction cannot nest inside a read transaction.")
        conn.execute("SAVEPOINT nested")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK TO nested")
            conn.execute("RELEASE nested")
            raise
        conn.execute("RELEASE nested")
        return
    lock = getattr(conn, "write_lock", None) if write else None
    if lock is not None:
        lock.acquire()
    try:
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        if isinstance(conn, Connection):
            conn.writing = write
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if hasattr(conn, "pending"):
                conn.pending.clear()
                conn.pending_items.clear()
            raise
        if hasattr(conn, "pending"):
            committed(conn, conn.pending, conn.pending_items)
            conn.pending.clear()
            conn.pending_items.clear()
    finally:
        if lock is not None:
            lock.release()


def touch(conn: Connection, user_ids: Iterable[int]) -> None:
    """Note inside a write transaction the users whose feed or credentials it changes.

    Once it commits, their long-polls alone wake (Waiters.notify); a rollback forgets them.
    """
    if hasattr(conn, "pending"):
        conn.pending.update(user_ids)


def touch_items(conn: Connection, item_ids: Iterable[int]) -> None:
    """Note, as touch does, items whose holders' feeds a write changes (or has changed,
    outside a transaction): their holders are looked up only if long-polls wait."""
    if not hasattr(conn, "pending"):
        return
    if conn.in_transaction:
        conn.pending_items.update(item_ids)
    else:
        committed(conn, (), item_ids)


def committed(conn: Connection, user_ids: Iterable[int], item_ids: Iterable[int]) -> None:
    """Keep the users and items a committed write touched, until Waiters.notify takes them."""
    conn.changed.update(user_ids)
    conn.changed_items.update(item_ids)


def revoke(conn: Connection, user_ids: Iterable[int]) -> None:
    """Note inside a write transaction that it ends or narrows credentials of these users.

    Their long-polls in this process wake at once (touch); those in other processes, whose
    users this one cannot name, all check their credentials once the watcher sees the count.
    """
    touch(conn, user_ids)
    conn.execute("UPDATE sync_state SET revocations = revocations + 1")


def cannot_write(error: BaseException) -> bool:
    """Whether a database error means the database cannot take a write (full or read-only)."""
    if getattr(error, "sqlstate", None) in POSTGRESQL_CANNOT_WRITE:
        return True
    return (getattr(error, "sqlite_errorcode", 0) or 0) & 0xFF in (
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_READONLY,
    )


def error_name(error: BaseException) -> str:
    """Name a database error for the log without its text (which may quote values)."""
    name = getattr(error, "sqlite_errorname", None) or getattr(error, "sqlstate", None)
    return name or type(error).__name__


def write_if_possible(conn: Connection, statement: str, params: tuple) -> None:
    """Run one bookkeeping write that a read can do without; skip it if the file takes none.

    Reads go on working on a database that cannot be written; the connection is marked so
    that the next request opens a fresh one.
    """
    try:
        with transaction(conn, write=True):
            conn.execute(statement, params)
    except conn.Error as error:
        if not cannot_write(error):
            raise
        conn.stale = True
        log.warning("Skipped a bookkeeping write: %s", error_name(error))


def split_statements(script: str) -> list[str]:
    """Split a migration script into whole SQL statements."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        raise ValueError("A migration script ends in an incomplete statement.")
    return statements


def refuse_newer(version: int, newest: int) -> None:
    """Raise DatabaseTooNew for a database whose schema version is past the newest known."""
    if version > newest:
        raise DatabaseTooNew(
            f"The database has schema version {version}, newer than this syncnode "
            f"({newest}); upgrade syncnode."
        )


def open_connection(
    database: str,
    settings: Settings,
    write_lock: WriteLock | None = None,
    texts: dict[str, str] | None = None,
) -> Connection:
    """Open a connection to a database file or a postgresql:// URL (texts: the app's cache
    of statements translated for PostgreSQL)."""
    if is_postgresql(database):
        return PostgreSQLConnection(database, settings, {} if texts is None else texts, write_lock)
    return connect(database, settings, write_lock)


def kind_of(conn: Connection | sqlite3.Connection) -> type[Connection]:
    """Return the class whose methods speak to conn's database (plain sqlite3: SQLite's)."""
    return PostgreSQLConnection if isinstance(conn, PostgreSQLConnection) else SQLiteConnection


def migrate(conn: Connection, schema: list[str] | None = None) -> int:
    """Bring the database up to the newest schema in one transaction; return the version.

    The write transaction holds the database's write lock, so of several processes starting
    on one database one migrates while the others wait, then find nothing left to do.
    """
    kind = kind_of(conn)
    schema = kind.migrations if schema is None else schema
    with transaction(conn, write=True):
        version = kind.schema_version(conn)
        refuse_newer(version, len(schema))
        for number, script in enumerate(schema[version:], start=version + 1):
            kind.run_script(conn, script)
            kind.set_schema_version(conn, number)
            if script.strip():  # (PostgreSQL's schema starts at the newest version)
                log.info("Migrated the database to schema version %d.", number)
    return len(schema)


def placeholders(count: int) -> str:
    """Return the placeholders of an IN list of count values (NULL, matching none, for 0)."""
    return ", ".join("?" * count) if count else "NULL"


def take_id(conn: Connection, table: str) -> int:
    """Take the next row id of users, sessions or api_keys inside a write transaction.

    SQLite would hand out the id of a deleted newest row again; these ids name who owns
    sessions, keys and permissions, so a new row never gets an old one.
    """
    return conn.execute(
        "UPDATE id_counters SET last = last + 1 WHERE name = ? RETURNING last", (table,)
    ).fetchone()[0]


# The second database. SQL is written once, in SQLite's spelling; what PostgreSQL needs
# otherwise sits here: its schema, its placeholders, its write lock and its large values.

#: The schema on PostgreSQL: one script for the version of its first release, where a
#: PostgreSQL database starts, then each later migration of SCHEMA in PostgreSQL's words.
#: Keys and names sort by their bytes (COLLATE "C"), as SQLite sorts them; zeroblob() is
#: SQLite's placeholder for a value streamed in after its row (see PostgreSQLConnection);
#: every change to sync_state is announced to the watchers of other nodes (NOTIFY).
POSTGRESQL_SCHEMA = [""] * (len(SCHEMA) - 2) + [
    """
    CREATE TABLE users (
        id BIGINT PRIMARY KEY,
        name TEXT COLLATE "C" NOT NULL UNIQUE,
        password_hash TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        uuid TEXT,
        display_name TEXT,
        updated_ms BIGINT,
        feed_floor BIGINT NOT NULL DEFAULT 0
    );
    CREATE UNIQUE INDEX users_by_uuid ON users (uuid);
    CREATE TABLE sessions (
        id BIGINT PRIMARY KEY,
        public_id TEXT NOT NULL UNIQUE,
        user_id BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        token_digest BYTEA NOT NULL UNIQUE,
        created_ms BIGINT NOT NULL,
        expires_ms BIGINT NOT NULL,
        parent_id BIGINT REFERENCES sessions (id) ON DELETE CASCADE,
        updated_ms BIGINT NOT NULL DEFAULT 0,
        device_type TEXT NOT NULL DEFAULT '',
        device_os TEXT NOT NULL DEFAULT '',
        app_version TEXT
    );
    CREATE INDEX sessions_by_user ON sessions (user_id, created_ms);
    CREATE INDEX sessions_by_expiry ON sessions (expires_ms);
    CREATE INDEX sessions_by_parent ON sessions (parent_id);
    CREATE TABLE reset_tokens (
        user_id BIGINT PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
        token_digest BYTEA NOT NULL UNIQUE,
        expires_ms BIGINT NOT NULL
    );
    CREATE TABLE items (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        key TEXT COLLATE "C" NOT NULL UNIQUE,
        token TEXT NOT NULL,
        meta TEXT,
        updated_ms BIGINT NOT NULL,
        size BIGINT NOT NULL,
        value BYTEA NOT NULL
    );
    ALTER TABLE items ALTER COLUMN value SET STORAGE EXTERNAL;
    CREATE TABLE permissions (
        item_id BIGINT NOT NULL REFERENCES items (id) ON DELETE CASCADE,
        user_id BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        level INTEGER NOT NULL CHECK (level IN (1, 2, 3)),
        seq BIGINT NOT NULL DEFAULT 1,
        PRIMARY KEY (item_id, user_id)
    );
    CREATE INDEX permissions_by_user ON permissions (user_id, item_id);
    CREATE INDEX permissions_by_user_seq ON permissions (user_id, seq);
    CREATE TABLE attempts (
        rowid BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        at_ms BIGINT NOT NULL
    );
    CREATE INDEX attempts_by_subject ON attempts (kind, subject, at_ms);
    CREATE INDEX attempts_by_time ON attempts (at_ms);
    CREATE TABLE api_keys (
        id BIGINT PRIMARY KEY,
        public_id TEXT NOT NULL UNIQUE,
        user_id BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        secret_digest BYTEA NOT NULL UNIQUE,
        permissions TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        updated_ms BIGINT NOT NULL
    );
    CREATE INDEX api_keys_by_user ON api_keys (user_id, created_ms);
    CREATE TABLE invites (
        code_digest BYTEA PRIMARY KEY,
        expires_ms BIGINT NOT NULL
    );
    CREATE TABLE sync_state (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq BIGINT NOT NULL,
        floor BIGINT NOT NULL,
        revocations BIGINT NOT NULL DEFAULT 0
    );
    INSERT INTO sync_state (id, seq, floor) VALUES (1, 1, 0);
    CREATE TABLE tombstones (
        user_id BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        key TEXT COLLATE "C" NOT NULL,
        seq BIGINT NOT NULL,
        created_ms BIGINT NOT NULL,
        PRIMARY KEY (user_id, key)
    );
    CREATE INDEX tombstones_by_user_seq ON tombstones (user_id, seq);
    CREATE INDEX tombstones_by_time ON tombstones (created_ms);
    CREATE TABLE id_counters (
        name TEXT PRIMARY KEY,
        last BIGINT NOT NULL
    );
    INSERT INTO id_counters (name, last) VALUES ('users', 0), ('sessions', 0), ('api_keys', 0);
    CREATE FUNCTION zeroblob(size BIGINT) RETURNS BYTEA
        LANGUAGE sql IMMUTABLE AS $$ SELECT ''::bytea $$;
    CREATE FUNCTION syncnode_announce() RETURNS trigger
        LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_notify('syncnode', ''); RETURN NULL; END $$;
    CREATE TRIGGER sync_state_announced AFTER UPDATE ON sync_state
        FOR EACH STATEMENT EXECUTE FUNCTION syncnode_announce();
    """,
    """
    CREATE FUNCTION syncnode_item_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE sync_state SET seq = seq + 1;
        UPDATE permissions SET seq = (SELECT seq FROM sync_state) WHERE item_id = NEW.id;
        RETURN NULL;
    END $$;
    CREATE TRIGGER items_changed AFTER UPDATE OF token ON items
        FOR EACH ROW EXECUTE FUNCTION syncnode_item_changed();
    """,
]

#: The first number of the advisory locks syncnode takes; the second names the lock.
POSTGRESQL_LOCK_CLASS = 0x53594E43  # "SYNC"
POSTGRESQL_WRITE_LOCK = 1
POSTGRESQL_HOUSEKEEPING_LOCK = 2
#: SQLSTATEs that mean the database takes no write: disk full, read-only transaction.
POSTGRESQL_CANNOT_WRITE = ("53100", "25006")
#: The first bytes of a binary COPY holding one row of one field (then its length).
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8) + b"\x00\x01"


def is_postgresql(database: str) -> bool:
    """Whether the database setting names a PostgreSQL database (a URL) and not a file."""
    return database.startswith(("postgresql://", "postgres://"))


def database_label(database: str) -> str:
    """Name a database for logs and messages: a URL without its password."""
    if not is_postgresql(database):
        return database
    parts = urllib.parse.urlsplit(database)
    if parts.password is None:
        return database
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def database_errors(database: str) -> tuple[type[Exception], ...]:
    """The errors of a database beside SQLite's: psycopg's, for a URL (if it is installed)."""
    if is_postgresql(database) and importlib.util.find_spec("psycopg") is not None:
        return (import_psycopg().Error,)
    return ()


def import_psycopg() -> Any:
    """Import psycopg 3, saying how to install it when it is missing."""
    try:
        import psycopg
    except ImportError:
        raise DatabaseUnusable(
            "A postgresql:// database needs psycopg 3: pip install 'syncnode[postgresql]'."
        ) from None
    return psycopg


#: A placeholder, a quoted string or name (left alone), or a % (doubled for psycopg).
SQL_PLACEHOLDER = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|\?|(?<!:):([A-Za-z_]\w*)|%""")


def postgresql_text(sql: str) -> str:
    """Return a statement written with SQLite's placeholders (? and :name) in psycopg's."""

    def replace(match: re.Match) -> str:
        text = match.group(0)
        if text == "?":
            return "%s"
        if match.group(1):
            return f"%({match.group(1)})s"
        return "%%" if text == "%" else text

    return SQL_PLACEHOLDER.sub(replace, sql)


class PostgreSQLConnection:
    """A psycopg connection that takes syncnode's SQL as a SQLite Connection does.

    Statements keep SQLite's placeholders, translated once per text. BEGIN IMMEDIATE becomes
    BEGIN and the database's advisory write lock, so writers take turns across every node as
    they do on one SQLite file: CAS, quotas and the feed's sequence (assigned under the lock,
    so in commit order) need nothing else. A read transaction is REPEATABLE READ, one
    snapshot as in SQLite. Large values stream in through COPY and out by substring.
    """

    #: Held by write transactions of the same app, so that writers queue in Python.
    write_lock: WriteLock | None = None
    #: Set when the database could not take a write: the app replaces the connection.
    stale = False
    #: Whether the open transaction of transaction() is a write transaction.
    writing = False
    #: The open connections of the app that opened this one (see Connections.open).
    owners: set | None = None
    #: As on SQLiteConnection; Error and IntegrityError are psycopg's (set when connecting).
    migrations = POSTGRESQL_SCHEMA
    IDS_IN = "= ANY(?)"

    def __init__(
        self,
        url: str,
        settings: Settings,
        texts: dict[str, str],
        write_lock: WriteLock | None = None,
    ) -> None:
        psycopg = import_psycopg()
        self.Error, self.IntegrityError = psycopg.Error, psycopg.IntegrityError
        self.raw = psycopg.connect(url, autocommit=True)
        self.write_lock = write_lock
        self._texts = texts
        self._idle = psycopg.pq.TransactionStatus.IDLE
        self.pending: set[int] = set()
        self.changed: set[int] = set()
        self.pending_items: set[int] = set()
        self.changed_items: set[int] = set()
        self._announcements = 0
        self._listening = False
        # (0 would wait forever on PostgreSQL; SQLite's 0 is not to wait)
        self.raw.execute(f"SET lock_timeout = {max(1, int(settings.busy_timeout))}")
        if settings.synchronous == "NORMAL":  # may lose the last commits on a crash
            self.raw.execute("SET synchronous_commit = off")

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction is open."""
        return self.raw.info.transaction_status != self._idle

    @property
    def broken(self) -> bool:
        """Whether the connection to the server was lost (the app then opens another)."""
        return self.raw.broken

    def execute(self, sql: str, params: Any = ()) -> Any:
        """Run one statement; return its cursor (fetchone, fetchall, rowcount, iteration)."""
        if sql == "BEGIN IMMEDIATE":
            try:
                return self.raw.execute(
                    f"BEGIN; SELECT pg_advisory_xact_lock({POSTGRESQL_LOCK_CLASS}, "
                    f"{POSTGRESQL_WRITE_LOCK})"
                )
            except BaseException:  # no lock within lock_timeout: no transaction, as SQLite
                with contextlib.suppress(self.Error):
                    self.raw.execute("ROLLBACK")
                raise
        if sql == "BEGIN":
            return self.raw.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        if not params:
            return self.raw.execute(sql)
        return self.raw.execute(self.text_of(sql), params)

    def text_of(self, sql: str) -> str:
        """Return a statement in psycopg's placeholders (translated once per text)."""
        text = self._texts.get(sql)
        if text is None:
            text = self._texts[sql] = postgresql_text(sql)
        return text

    def executemany(self, sql: str, rows: Iterable[tuple]) -> None:
        """Run one statement for each row of parameters."""
        self.raw.cursor().executemany(self.text_of(sql), list(rows))

    def schema_version(self) -> int:
        """Return the schema version of the database (0 for a new one)."""
        if self.raw.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None:
            return 0
        return self.raw.execute("SELECT version FROM schema_version").fetchone()[0]

    def set_schema_version(self, version: int) -> None:
        """Record the schema version inside the migration's transaction."""
        self.raw.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        self.raw.execute("DELETE FROM schema_version")
        self.raw.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))

    def run_script(self, script: str) -> None:
        """Run a migration script, whole (its functions hold semicolons)."""
        if script.strip():
            self.raw.execute(script)

    def id_list(self, ids: Iterable[int]) -> list[int]:
        """Return row ids as the one parameter of IDS_IN."""
        return list(ids)

    def stream(self, sql: str, params: Any) -> PostgreSQLRows:
        """Return the rows of a query as they are read: a cursor of the server's, fetched
        STREAM_ROWS at a time, so that a page that ends early reads no further.

        Such a cursor lives in a transaction: outside one, this opens a read transaction
        that closing the rows ends.
        """
        began = not self.in_transaction
        if began:
            self.execute("BEGIN")
        try:
            cursor = self.raw.cursor(name="rows")
            cursor.itersize = STREAM_ROWS
            cursor.execute(self.text_of(sql), params)
        except BaseException:
            if began:
                self.raw.execute("ROLLBACK")
            raise
        return PostgreSQLRows(self, cursor, began)

    def fill_value(self, item_id: int, body: BinaryIO, size: int) -> None:
        """Stream a file-held value into its row through COPY, never whole in memory."""
        self.raw.execute(
            "CREATE TEMPORARY TABLE IF NOT EXISTS upload (value BYTEA) ON COMMIT DELETE ROWS"
        )
        with self.raw.cursor().copy("COPY upload (value) FROM STDIN (FORMAT BINARY)") as copy:
            copy.write(COPY_HEADER + size.to_bytes(4, "big", signed=True))
            while chunk := body.read(READ_CHUNK_BYTES):
                copy.write(chunk)
            copy.write(b"\xff\xff")
        self.raw.execute(
            "UPDATE items SET value = (SELECT value FROM upload) WHERE id = %s", (item_id,)
        )
        self.raw.execute("DELETE FROM upload")

    def blobopen(self, table: str, column: str, row: int, readonly: bool = True) -> PostgreSQLBlob:
        """Open a stored value for reading in chunks (the only blob use on PostgreSQL)."""
        return PostgreSQLBlob(self, row)

    def data_version(self) -> int:
        """Return how many changes of other connections were announced (see the schema).

        The first call starts listening, outside any transaction, so that nothing committed
        after it goes unannounced.
        """
        if not self._listening:
            self.raw.execute("LISTEN syncnode")
            self._listening = True
        for _ in self.raw.notifies(timeout=0):
            self._announcements += 1
        return self._announcements

    def wait_for_change(self, closed: threading.Event, seconds: float) -> bool:
        """Wait up to the watcher's interval, less when a change is announced; return
        whether closed."""
        for _ in self.raw.notifies(timeout=seconds, stop_after=1):
            self._announcements += 1
        return closed.is_set()

    @contextlib.contextmanager
    def housekeeping_turn(self) -> Iterator[bool]:
        """Whether this node may do housekeeping now: not while another node does."""
        lock = f"{POSTGRESQL_LOCK_CLASS}, {POSTGRESQL_HOUSEKEEPING_LOCK}"
        if not self.raw.execute(f"SELECT pg_try_advisory_lock({lock})").fetchone()[0]:
            yield False
            return
        try:
            yield True
        finally:
            self.raw.execute(f"SELECT pg_advisory_unlock({lock})")

    def tidy(self, write_lock: WriteLock) -> None:
        """Nothing: PostgreSQL's autovacuum and checkpoints do this."""

    def restart_ids(self) -> None:
        """After a copy: number new items past the largest id copied."""
        self.raw.execute(
            "SELECT setval(pg_get_serial_sequence('items', 'id'), coalesce(max(id), 0) + 1, false) "
            "FROM items"
        )

    def close(self) -> None:
        """Close the connection (twice is harmless)."""
        self.raw.close()
        if self.owners is not None:
            self.owners.discard(self)


class PostgreSQLRows:
    """The rows of PostgreSQLConnection.stream: iterate, fetchone, close."""

    def __init__(self, conn: PostgreSQLConnection, cursor: Any, began: bool) -> None:
        self.conn, self.cursor, self.began = conn, cursor, began

    def __iter__(self) -> Iterator[tuple]:
        return iter(self.cursor)

    def fetchone(self) -> tuple | None:
        """Return the next row, or None after the last."""
        return self.cursor.fetchone()

    def close(self) -> None:
        """Close the cursor, and end the transaction stream() began for it."""
        if self.cursor.closed:
            return
        self.cursor.close()
        if self.began:
            self.conn.raw.execute("COMMIT")


class PostgreSQLBlob:
    """A stored value read in chunks by substring, inside the reader's transaction."""

    def __init__(self, conn: PostgreSQLConnection, item_id: int) -> None:
        self.conn, self.item_id, self.position = conn, item_id, 0
        self.size = conn.execute("SELECT size FROM items WHERE id = ?", (item_id,)).fetchone()[0]

    def read(self, size: int = -1) -> bytes:
        """Read up to size bytes (all that is left with -1)."""
        left = self.size - self.position
        size = left if size < 0 else min(size, left)
        if size <= 0:
            return b""
        chunk = self.conn.execute(
            "SELECT substring(value FROM ? FOR ?) FROM items WHERE id = ?",
            (self.position + 1, size, self.item_id),
        ).fetchone()[0]
        self.position += len(chunk)
        return bytes(chunk)

    def seek(self, offset: int, origin: int = os.SEEK_SET) -> None:
        """Move the read position, as a file does."""
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.position, os.SEEK_END: self.size}[origin]
        self.position = max(0, min(self.size, base + offset))

    def tell(self) -> int:
        """Return the read position."""
        return self.position

    def close(self) -> None:
        """Nothing to free: the reader's connection ends the transaction."""


#: A connection of either database, as the storage functions take it.
Connection = SQLiteConnection | PostgreSQLConnection


# ==================================================================================================
# Storage
# ==================================================================================================


@dataclass(slots=True)  # (not frozen: one per request, made at a third of the cost)
class Caller:
    """Who is asking: the user, and the session or the API key behind the request."""

    user_id: int
    session_id: int | None = None
    api_key_id: int | None = None
    #: The API key's permissions; None for a session, which has every right of its user.
    permissions: frozenset[str] | None = None

    def allows(self, permission: str) -> bool:
        """Whether the credential grants the permission (README, App API)."""
        if self.permissions is None or "all" in self.permissions:
            return True
        return not self.permissions.isdisjoint(IMPLIED_BY.get(permission, (permission,)))


@dataclass(slots=True)  # (not frozen: one per request, made at a third of the cost)
class StoredValue:
    """A value read from the store: its token, metadata, size and bytes (or a stream of them)."""

    token: str
    meta: str | None
    size: int
    #: The bytes, a BlobReader, or None for a value too large to read whole.
    body: bytes | BlobReader | None


class BlobReader:
    """The bytes of a large value as a read-only file, read inside one read transaction.

    The reader owns a connection of its own: the transaction began before the row was looked
    up, so the token sent in the headers and every chunk come from one snapshot, and a write
    committed meanwhile is not seen. A WSGI server may read it from another thread (waitress
    sends it from its main loop, so no serving thread waits on a slow client). Closing it
    ends the transaction and closes the connection.
    """

    def __init__(self, conn: Connection, item_id: int) -> None:
        self.conn = conn
        self.blob = conn.blobopen("items", "value", item_id, readonly=True)

    def read(self, size: int = -1) -> bytes:
        """Read up to size bytes (all that is left with -1)."""
        return self.blob.read(size)

    def seek(self, offset: int, origin: int = os.SEEK_SET) -> int:
        """Move the read position, as a file does."""
        self.blob.seek(offset, origin)
        return self.blob.tell()

    def tell(self) -> int:
        """Return the read position."""
        return self.blob.tell()

    def close(self) -> None:
        """End the read transaction and close the reader's connection (twice is harmless)."""
        if self.conn is None:
            return
        conn, self.conn = self.conn, None
        with contextlib.suppress(sqlite3.Error):
            self.blob.close()
        conn.close()


@dataclass(frozen=True, slots=True)
class Quota:
    """Per-user limits on owned keys and their bytes (0: no limit), and the disk's floor."""

    max_bytes: int = 0
    max_keys: int = 0
    #: The data directory is below its free-space floor: only writes that grow nothing pass.
    disk_full: bool = False


def get_usage(conn: Connection, user_id: int) -> tuple[int, int]:
    """Return (keys, bytes of values and metadata) the user holds OWN on."""
    return conn.execute(
        """
        SELECT count(*),
               CAST(coalesce(sum(items.size + coalesce(length(items.meta), 0)), 0) AS BIGINT)
        FROM permissions JOIN items ON items.id = permissions.item_id
        WHERE permissions.user_id = ? AND permissions.level = ?
        """,
        (user_id, LEVELS["OWN"]),
    ).fetchone()


def check_growth(quota: Quota, grew: bool) -> None:
    """Raise DISK01 for a write that grows the store while the disk is at its floor."""
    if grew and quota.disk_full:
        raise out_of_space()


def check_quota(
    conn: Connection,
    item_id: int,
    quota: Quota,
    grew: bool,
    new_owner_ids: Iterable[int] = (),
) -> None:
    """Raise QUOTA01 if a write just made left an owner of the key over a limit.

    Runs inside the write transaction after the change, so raising rolls it back. Limits bind
    only on growth: a user over a lowered quota may still shrink or delete.
    """
    new_owner_ids = set(new_owner_ids)
    if not (quota.max_bytes and (grew or new_owner_ids)) and not (quota.max_keys and new_owner_ids):
        return
    owners = conn.execute(
        "SELECT user_id FROM permissions WHERE item_id = ? AND level = ?",
        (item_id, LEVELS["OWN"]),
    )
    for (owner_id,) in owners.fetchall():
        is_new = owner_id in new_owner_ids
        if not ((quota.max_keys and is_new) or (quota.max_bytes and (grew or is_new))):
            continue  # no limit can bind this owner: skip counting what it owns
        keys, size = get_usage(conn, owner_id)
        if (quota.max_keys and is_new and keys > quota.max_keys) or (
            quota.max_bytes and (grew or is_new) and size > quota.max_bytes
        ):
            raise ApiError("QUOTA01", "The write would exceed an owner's storage quota.")


def new_store_token() -> str:
    """Return a fresh store token: 128 random bits as URL-safe text."""
    return secrets.token_urlsafe(16)


def find_item(conn: Connection, key: str, user_id: int) -> tuple[int, str, int, int] | None:
    """Return (item id, token, caller's level or 0, bytes of value and meta) for a key, or None."""
    return conn.execute(
        """
        SELECT items.id, items.token, coalesce(permissions.level, 0),
               items.size + coalesce(length(items.meta), 0)
        FROM items
        LEFT JOIN permissions ON permissions.item_id = items.id AND permissions.user_id = ?
        WHERE items.key = ?
        """,
        (user_id, key),
    ).fetchone()


class Item(NamedTuple):
    """A key as a listing or the change feed shows it: its permission level and token, the
    change that last touched it (in a feed), or level 0 for a key the user can no longer see.

    A tuple, made straight from a row: a listing makes one per key it answers.
    """

    key: str
    level: int
    token: str | None
    seq: int | None
    #: With values: the value (None when over INLINE_VALUE_BYTES) and the meta.
    value: bytes | None
    meta: str | None


@dataclass(slots=True)  # (not frozen: one per request, made at a third of the cost)
class Listing:
    """One answer of GET /store: its entries, the cursor, and whether more entries remain."""

    entries: list[Item]
    seq: int
    more: bool
    #: Whether the entries carry their values.
    values: bool = False


def page_of(items: Iterable[Item], limit: int, values: bool) -> tuple[list[Item], bool]:
    """Take the entries of one page; return them and whether more remain.

    A page holds at most limit entries (0: no limit) and, with values, ends once its values
    and meta pass INLINE_BUDGET_BYTES (it always holds one).
    """
    if not values:
        entries = list(itertools.islice(items, limit + 1 if limit else None))
        more = bool(limit) and len(entries) > limit
        return (entries[:limit] if more else entries), more
    entries = []
    spent = 0
    for item in items:
        if (limit and len(entries) == limit) or spent >= INLINE_BUDGET_BYTES:
            return entries, True
        entries.append(item)
        spent += len(item.value or b"") + len(item.meta or "")
    return entries, False


def bump_seq(conn: Connection) -> None:
    """Take the next server-wide change number inside the caller's write transaction.

    SQL that records it reads it back as (SELECT seq FROM sync_state).
    """
    conn.execute("UPDATE sync_state SET seq = seq + 1")


def next_seq(conn: Connection) -> int:
    """Take the next change number, as bump_seq does, and return it."""
    bump_seq(conn)
    return conn.execute("SELECT seq FROM sync_state").fetchone()[0]


def bury(conn: Connection, user_ids: Iterable[int], key: str, seq: int, now_ms: int):
    """Record that these users can no longer see the key, as change seq."""
    user_ids = list(user_ids)
    touch(conn, user_ids)
    conn.executemany(
        """
        INSERT INTO tombstones (user_id, key, seq, created_ms) VALUES (?, ?, ?, ?)
        ON CONFLICT (user_id, key)
        DO UPDATE SET seq = excluded.seq, created_ms = excluded.created_ms
        """,
        [(user_id, key, seq, now_ms) for user_id in user_ids],
    )


def unbury(conn: Connection, user_ids: Iterable[int], key: str) -> None:
    """Forget the tombstones of users who can see the key again."""
    conn.executemany(
        "DELETE FROM tombstones WHERE user_id = ? AND key = ?",
        [(user_id, key) for user_id in user_ids],
    )


def list_keys(
    conn: Connection,
    user_id: int,
    prefix: str = "",
    after: str | None = None,
    limit: int = 0,
    values: bool = False,
) -> Listing:
    """List the keys the user holds, sorted by key: those after `after` starting with prefix.

    The cursor is read in the same snapshot, so a listing at cursor C followed by the
    changes after C misses nothing. `more` tells whether a next page exists (see page_of).
    """
    # Only the columns and conditions the request needs: each one costs on every row.
    inline = ", CASE WHEN items.size <= :inline THEN items.value END, items.meta"
    query = f"""
        SELECT items.key, permissions.level, items.token, (SELECT seq FROM sync_state)
               {inline if values else ""}
        FROM permissions JOIN items ON items.id = permissions.item_id
        WHERE permissions.user_id = :user
          {"AND substr(items.key, 1, length(:prefix)) = :prefix" if prefix else ""}
          {"AND items.key > :after" if after is not None else ""}
        ORDER BY items.key
        LIMIT :limit
    """
    params = {
        "user": user_id,
        "prefix": prefix,
        "after": after,
        "limit": limit + 1 if limit else NO_LIMIT,
        "inline": INLINE_VALUE_BYTES,
    }

    def items(rows: Iterable[tuple]) -> Iterator[Item]:
        # tuple.__new__ makes each Item at half the cost of Item(), a Python function.
        make = tuple.__new__
        if values:
            return (make(Item, (*row[:3], None, *row[4:])) for row in rows)
        return (make(Item, (key, level, token, None, None, None)) for key, level, token, _ in rows)

    # One statement reads the rows, as they are paged, and the cursor (a scalar subquery,
    # computed once) in one snapshot. An empty answer has no row to carry the cursor: then
    # both are read again inside one read transaction.
    # With values the page ends within its byte budget: the rows past it stay unread.
    rows = conn.stream(query, params) if values else conn.execute(query, params)
    try:
        first = rows.fetchone()
        if first is not None:
            entries, more = page_of(items(itertools.chain([first], rows)), limit, values)
            return Listing(entries, first[3], more, values)
    finally:
        rows.close()  # a page that ended early leaves the statement's snapshot open
    with transaction(conn):
        entries, more = page_of(items(conn.execute(query, params)), limit, values)
        seq = conn.execute("SELECT seq FROM sync_state").fetchone()[0]
    return Listing(entries, seq, more, values)


def list_changes(
    conn: Connection,
    user_id: int,
    since: int,
    prefix: str = "",
    limit: int = 0,
    values: bool = False,
) -> Listing:
    """List what changed for the user after change `since`, one entry per key, by seq.

    Live keys come with their permission, token and seq; keys the user can no longer see
    as {"key", "deleted": true, "seq"}. SYNC01 when `since` is older than the oldest change
    the server still remembers, or newer than the newest.
    """
    with transaction(conn):
        seq, floor, own_floor = conn.execute(
            """
            SELECT seq, floor, coalesce((SELECT feed_floor FROM users WHERE id = ?), 0)
            FROM sync_state
            """,
            (user_id,),
        ).fetchone()
        floor = max(floor, own_floor)
        if since < floor or since > seq:
            raise ApiError(
                "SYNC01", "The server no longer remembers changes that old; list every key again."
            )
        rows = (conn.stream if values else conn.execute)(
            """
            SELECT items.key, permissions.level, items.token, permissions.seq,
                   CASE WHEN :values AND items.size <= :inline THEN items.value END,
                   CASE WHEN :values THEN items.meta END
            FROM permissions JOIN items ON items.id = permissions.item_id
            WHERE permissions.user_id = :user AND permissions.seq > :since
              AND substr(items.key, 1, length(:prefix)) = :prefix
            UNION ALL
            SELECT key, 0, NULL, seq, NULL, NULL FROM tombstones
            WHERE user_id = :user AND seq > :since AND substr(key, 1, length(:prefix)) = :prefix
            ORDER BY 4
            LIMIT :limit
            """,
            {
                "user": user_id,
                "since": since,
                "prefix": prefix,
                "limit": limit + 1 if limit else NO_LIMIT,
                "values": values,
                "inline": INLINE_VALUE_BYTES,
            },
        )
        entries, more = page_of(map(Item._make, rows), limit, values)
        rows.close()  # before the snapshot ends, when the page ended early
    return Listing(entries, seq, more, values)


def trim_tombstones(conn: Connection, per_user: int) -> None:
    """Keep each user's newest per_user tombstones; its feed floor rises past the rest.

    A user whose deletions outgrow the bound answers SYNC01 to a cursor older than the
    oldest tombstone kept; nobody else's feed changes.
    """
    with transaction(conn, write=True):
        crowded = conn.execute(
            "SELECT user_id FROM tombstones GROUP BY user_id HAVING count(*) > ?", (per_user,)
        ).fetchall()
        for (user_id,) in crowded:
            (cut,) = conn.execute(
                "SELECT seq FROM tombstones WHERE user_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?",
                (user_id, per_user),
            ).fetchone()
            conn.execute("DELETE FROM tombstones WHERE user_id = ? AND seq <= ?", (user_id, cut))
            conn.execute(
                "UPDATE users SET feed_floor = ? WHERE id = ? AND feed_floor < ?",
                (cut, user_id, cut),
            )


def purge_tombstones(conn: Connection, before_ms: int) -> None:
    """Forget tombstones made before the time, raising the floor of what since may ask for."""
    with transaction(conn, write=True):
        oldest_kept = conn.execute(
            "SELECT max(seq) FROM tombstones WHERE created_ms < ?", (before_ms,)
        ).fetchone()[0]
        if oldest_kept is not None:
            conn.execute(
                "UPDATE sync_state SET floor = ? WHERE floor < ?", (oldest_kept, oldest_kept)
            )
            conn.execute("DELETE FROM tombstones WHERE created_ms < ?", (before_ms,))


VALUE_QUERY = """
    SELECT items.id, items.token, items.meta, items.size,
           CASE WHEN items.size <= ? THEN items.value END
    FROM items JOIN permissions ON permissions.item_id = items.id
    WHERE items.key = ? AND permissions.user_id = ?
"""


def get_value(conn: Connection, key: str, user_id: int) -> StoredValue:
    """Return the value of a key the user may read; ERR01 when missing or invisible.

    A value of up to STREAM_FROM_BYTES comes whole in the one query; for a larger one the
    body is None, and stream_value reads it.
    """
    row = conn.execute(VALUE_QUERY, (STREAM_FROM_BYTES, key, user_id)).fetchone()
    if row is None:
        raise not_found()
    return StoredValue(row[1], row[2], row[3], row[4])


def stream_value(conn: Connection, key: str, user_id: int) -> StoredValue:
    """Return a value as get_value does, a large one as a BlobReader that owns conn.

    conn is a connection of the reader's own; it is closed here unless a BlobReader took it.
    """
    try:
        conn.execute("BEGIN")
        row = conn.execute(VALUE_QUERY, (STREAM_FROM_BYTES, key, user_id)).fetchone()
        if row is None:
            raise not_found()
        if row[4] is not None:  # it became small meanwhile
            conn.close()
            return StoredValue(row[1], row[2], row[3], row[4])
        return StoredValue(row[1], row[2], row[3], BlobReader(conn, row[0]))
    except BaseException:
        conn.close()
        raise


@dataclass(slots=True)  # (not frozen: one per request, made at a third of the cost)
class NewValue:
    """A value to store: its bytes, or a file holding size bytes, and its metadata."""

    body: bytes | BinaryIO
    size: int
    meta: str | None


def write_value(conn: Connection, item_id: int, value: NewValue) -> None:
    """Copy a file-held value into its row's zeroblob in chunks (bytes are already stored)."""
    if isinstance(value.body, bytes) or value.size == 0:
        return
    conn.fill_value(item_id, value.body, value.size)


def apply_put(
    conn: Connection,
    key: str,
    user_id: int,
    value: NewValue,
    sent_token: tuple[str, ...] | None,
    now_ms: int,
    quota: Quota,
    create_only: bool = False,
    update_tried: bool = False,
) -> str:
    """Create or compare-and-swap a value inside the caller's write transaction; return its token.

    The update is one conditional UPDATE on the key and the sent token inside the write
    transaction that also checked the permission, so of racing writers holding the same token
    exactly one changes a row, and a writer whose permission was just revoked never writes.
    A large value is stored as a zeroblob of its size and then filled in chunks. update_tried:
    update_current already found nothing to update just before (see put_value).
    """
    token = new_store_token()
    # Bytes go in as they are; a file-held value as zeroblob(size), filled by write_value.
    inline = value.body if isinstance(value.body, bytes) else None
    new_bytes = value.size + len(value.meta or "")
    if not update_tried and updates_at_once(sent_token, quota, create_only):
        item_id = update_current(conn, key, user_id, value, sent_token, token, now_ms)
        if item_id is not None:
            record_update(conn, item_id, value)
            return token
    found = find_item(conn, key, user_id)
    if found is None:
        if sent_token is not None:
            raise ApiError("KEY01", "The key does not exist; create it without a token.")
        check_growth(quota, grew=True)
        item_id = conn.execute(
            """
            INSERT INTO items (key, token, meta, updated_ms, size, value)
            VALUES (?, ?, ?, ?, ?, coalesce(?, zeroblob(?)))
            RETURNING id
            """,
            (key, token, value.meta, now_ms, value.size, inline, value.size),
        ).fetchone()[0]
        bump_seq(conn)
        conn.execute(
            """
            INSERT INTO permissions (item_id, user_id, level, seq)
            VALUES (?, ?, ?, (SELECT seq FROM sync_state))
            """,
            (item_id, user_id, LEVELS["OWN"]),
        )
        unbury(conn, [user_id], key)
        touch(conn, [user_id])
        write_value(conn, item_id, value)
        check_quota(conn, item_id, quota, grew=True, new_owner_ids=[user_id])
        return token
    item_id, _, level, old_bytes = found
    if level == 0 or create_only:
        raise ApiError("KEY01", "The key already exists.")
    if level < LEVELS["WRITE"]:
        raise ApiError("PERM01", "Writing this key needs the WRITE or OWN permission.")
    if sent_token is None:
        raise ApiError("KEY01", "The token is missing; send the token of the stored value.")
    check_growth(quota, grew=new_bytes > old_bytes)
    updated = conn.execute(
        f"""
        UPDATE items SET token = ?, meta = ?, updated_ms = ?, size = ?,
            value = coalesce(?, zeroblob(?))
        WHERE id = ? AND token IN ({placeholders(len(sent_token))})
        """,
        (token, value.meta, now_ms, value.size, inline, value.size, item_id, *sent_token),
    ).rowcount
    if updated != 1:
        raise ApiError("KEY01", "The token sent does not match the stored token.")
    record_update(conn, item_id, value)
    check_quota(conn, item_id, quota, grew=new_bytes > old_bytes)
    return token


def item_holders(conn: Connection, item_ids: Iterable[int]) -> list[int]:
    """Return the users who hold any of these items."""
    rows = conn.execute(
        f"SELECT DISTINCT user_id FROM permissions WHERE item_id {conn.IDS_IN}",
        (conn.id_list(item_ids),),
    )
    return [row[0] for row in rows]


def updates_at_once(sent_token: tuple[str, ...] | None, quota: Quota, create_only: bool) -> bool:
    """Whether a PUT may first try update_current: an update where growth binds no limit."""
    return sent_token is not None and not create_only and not (quota.disk_full or quota.max_bytes)


def update_current(
    conn: Connection,
    key: str,
    user_id: int,
    value: NewValue,
    sent_token: tuple[str, ...],
    token: str,
    now_ms: int,
    together: bool = False,
) -> int | None:
    """The common update: one statement decides the key, the token and the WRITE or OWN
    permission, and writes. Return the item's id, or None (the long way finds the error).

    together: the statement is a transaction of its own, committed with those of other
    threads that queue meanwhile (WriteLock.run_together).
    """
    inline = value.body if isinstance(value.body, bytes) else None
    sql = f"""
        UPDATE items SET token = ?, meta = ?, updated_ms = ?, size = ?,
            value = coalesce(?, zeroblob(?))
        WHERE key = ? AND token IN ({placeholders(len(sent_token))})
          AND EXISTS (SELECT 1 FROM permissions
                      WHERE item_id = items.id AND user_id = ? AND level >= ?)
        RETURNING id
    """
    params = (token, value.meta, now_ms, value.size, inline, value.size, key, *sent_token,
              user_id, LEVELS["WRITE"])  # fmt: skip
    lock = conn.write_lock if together else None
    rows = lock.run_together(conn, sql, params) if lock else conn.execute(sql, params).fetchall()
    return rows[0][0] if rows else None


def record_update(conn: Connection, item_id: int, value: NewValue) -> None:
    """After an item's token changed, which gave every holder's row a new change number
    (the trigger items_changed): their long-polls noted, and a file-held value copied in."""
    touch_items(conn, [item_id])
    write_value(conn, item_id, value)


def put_value(
    conn: Connection,
    key: str,
    user_id: int,
    value: NewValue,
    sent_token: tuple[str, ...] | None,
    now_ms: int,
    quota: Quota = Quota(),
    create_only: bool = False,
) -> str:
    """Create or compare-and-swap a value in one write transaction; return its new token.

    On SQLite the common update of a value in memory is one statement, a transaction of its
    own (its trigger included), queued behind this app's other writers as transaction's are
    and committed together with the updates of other threads queued beside it.
    """
    tried = (
        isinstance(conn, SQLiteConnection)
        and isinstance(value.body, bytes)
        and not conn.in_transaction
        and updates_at_once(sent_token, quota, create_only)
    )
    if tried:
        token = new_store_token()
        item_id = update_current(
            conn, key, user_id, value, sent_token, token, now_ms, together=True
        )
        if item_id is not None:
            record_update(conn, item_id, value)
            return token
    with transaction(conn, write=True):  # the long way, for another change or for the error
        return apply_put(
            conn, key, user_id, value, sent_token, now_ms, quota, create_only, update_tried=tried
        )


def apply_batch(
    conn: Connection, user_id: int, operations: list[dict], now_ms: int, quota: Quota
) -> list[dict]:
    """Apply PUTs and DELETEs all or nothing in one write transaction; return the new tokens.

    The first operation that fails rolls back the whole batch; its error carries its index.
    """
    results = []
    with transaction(conn, write=True):
        for index, operation in enumerate(operations):
            key = operation["key"]
            try:
                if operation["method"] == "PUT":
                    token = apply_put(
                        conn, key, user_id, operation["value"], operation["token"], now_ms, quota
                    )
                else:
                    apply_delete(conn, key, user_id, operation["token"], now_ms)
                    token = None
            except ApiError as error:
                raise error.at(index) from None
            results.append({"key": key, "token": token})
    return results


def apply_delete(
    conn: Connection,
    key: str,
    user_id: int,
    sent_token: tuple[str, ...] | None,
    now_ms: int,
) -> None:
    """Delete a key, its value and its permissions inside the caller's write transaction.

    OWN and the current token are needed; every holder gets a tombstone in the change feed.
    """
    found = find_item(conn, key, user_id)
    if found is None or found[2] == 0:
        raise not_found()
    item_id, token, level, _ = found
    if level < LEVELS["OWN"]:
        raise ApiError("PERM01", "Deleting this key needs the OWN permission.")
    if sent_token is None or token not in sent_token:
        raise ApiError("KEY01", "The token is missing or does not match the stored token.")
    holders = conn.execute("SELECT user_id FROM permissions WHERE item_id = ?", (item_id,))
    bury(conn, [row[0] for row in holders.fetchall()], key, next_seq(conn), now_ms)
    conn.execute("DELETE FROM items WHERE id = ?", (item_id,))


def delete_value(
    conn: Connection,
    key: str,
    user_id: int,
    sent_token: tuple[str, ...] | None,
    now_ms: int,
) -> None:
    """Delete a key in one write transaction (see apply_delete)."""
    with transaction(conn, write=True):
        apply_delete(conn, key, user_id, sent_token, now_ms)


def get_permissions(conn: Connection, key: str, user_id: int) -> list[dict]:
    """Return every holder of a key the user holds, sorted by user id; ERR01 otherwise."""
    with transaction(conn):
        found = find_item(conn, key, user_id)
        if found is None or found[2] == 0:
            raise not_found()
        rows = conn.execute(
            """
            SELECT users.name, permissions.level
            FROM permissions JOIN users ON users.id = permissions.user_id
            WHERE permissions.item_id = ?
            ORDER BY users.name
            """,
            (found[0],),
        ).fetchall()
    return [{"user": name, "permission": LEVEL_NAMES[level]} for name, level in rows]


def check_owner_remains(conn: Connection, item_id: int) -> None:
    """Raise PERM02 if the key has no OWN holder left (the caller's transaction rolls back)."""
    owners = conn.execute(
        "SELECT count(*) FROM permissions WHERE item_id = ? AND level = ?",
        (item_id, LEVELS["OWN"]),
    ).fetchone()[0]
    if owners == 0:
        raise ApiError("PERM02", "The change would leave the key without an OWN holder.")


def set_permissions(
    conn: Connection,
    key: str,
    user_id: int,
    grants: dict[str, int],
    quota: Quota = Quota(),
) -> None:
    """Grant or replace permissions all or nothing: ERR01 for unknown users, PERM02 for no owner."""
    with transaction(conn, write=True):
        found = find_item(conn, key, user_id)
        if found is None or found[2] == 0:
            raise not_found()
        item_id, _, level, _ = found
        if level < LEVELS["OWN"]:
            raise ApiError("PERM01", "Changing permissions needs the OWN permission.")
        new_owner_ids, seq = [], None
        for name, grant in grants.items():
            row = conn.execute("SELECT id FROM users WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise ApiError("ERR01", "A user in the list does not exist.")
            previous = conn.execute(
                "SELECT level FROM permissions WHERE item_id = ? AND user_id = ?",
                (item_id, row[0]),
            ).fetchone()
            if previous == (grant,):
                continue  # Nothing changes for this user, so nothing enters the feed.
            if grant == LEVELS["OWN"]:
                new_owner_ids.append(row[0])
            seq = seq or next_seq(conn)
            conn.execute(
                """
                INSERT INTO permissions (item_id, user_id, level, seq) VALUES (?, ?, ?, ?)
                ON CONFLICT (item_id, user_id)
                DO UPDATE SET level = excluded.level, seq = excluded.seq
                """,
                (item_id, row[0], grant, seq),
            )
            unbury(conn, [row[0]], key)
            touch(conn, [row[0]])
        check_owner_remains(conn, item_id)
        check_quota(conn, item_id, quota, grew=False, new_owner_ids=new_owner_ids)


def remove_permissions(
    conn: Connection, key: str, user_id: int, names: set[str], now_ms: int
) -> None:
    """Remove the named users' permissions; OWN needed unless the caller only removes itself."""
    with transaction(conn, write=True):
        found = find_item(conn, key, user_id)
        if found is None or found[2] == 0:
            raise not_found()
        item_id, _, level, _ = found
        holders = conn.execute(
            f"""
            SELECT users.id FROM permissions JOIN users ON users.id = permissions.user_id
            WHERE permissions.item_id = ? AND users.name IN ({placeholders(len(names))})
            """,
            (item_id, *names),
        ).fetchall()
        holder_ids = {row[0] for row in holders}
        if level < LEVELS["OWN"] and holder_ids - {user_id}:
            raise ApiError("PERM01", "Removing other users' permissions needs the OWN permission.")
        conn.executemany(
            "DELETE FROM permissions WHERE item_id = ? AND user_id = ?",
            [(item_id, holder_id) for holder_id in holder_ids],
        )
        check_owner_remains(conn, item_id)
        if holder_ids:
            bury(conn, holder_ids, key, next_seq(conn), now_ms)


# ==================================================================================================
# Identity and sessions
# ==================================================================================================


def normalize_id(raw: str) -> str:
    """Normalise a user id (NFKC, stripped, lower-cased); ACCT02 when it breaks the rules."""
    name = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", raw).strip().lower())
    if not 1 <= len(name) <= MAX_ID_CHARS or any(
        char.isspace() or unicodedata.category(char) in ("Cc", "Cf") for char in name
    ):
        raise ApiError(
            "ACCT02",
            f"The user id must be 1 to {MAX_ID_CHARS} characters without spaces, control or "
            "invisible format characters.",
        )
    return name


def check_password(password: str) -> None:
    """Raise ACCT02 unless the password has an acceptable length."""
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise ApiError(
            "ACCT02",
            f"The password must be {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS:,} characters.",
        )


def digest_token(token: str) -> bytes:
    """Return the SHA-256 digest under which a bearer token is stored."""
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True, slots=True)
class Device:
    """What a session records of the client that made or last refreshed it."""

    device_type: str = ""
    device_os: str = ""
    app_version: str | None = None


@dataclass(frozen=True, slots=True)
class NewSession:
    """A session just made, with the only copy of its token."""

    row_id: int
    public_id: str
    token: str
    expires_ms: int


#: Immich's words for a second admin sign-up, and for a sign-up without a live invite.
HAS_ADMIN = "The server already has an admin"
NEEDS_INVITE = "Registration on this server needs a live invite code"


def default_display_name(name: str) -> str:
    """Return the part of an id before its last '@', or the whole id when that is empty."""
    return name.rpartition("@")[0] or name


def create_user(
    conn: Connection,
    name: str,
    password_hash: str,
    now_ms: int,
    *,
    first: bool = False,
    display_name: str | None = None,
    invite: str | None = None,
) -> int:
    """Insert a user and return its row id; ACCT03 when the id is taken.

    With first=True the insert happens only on an empty server (README, App API):
    the check and the insert share one write transaction, so of racing calls one wins. An
    invite code, when given, is spent in that same transaction (ACCT01 if it is not live).
    """
    try:
        with transaction(conn, write=True):
            if first and has_users(conn):
                raise ApiError("ACCT03", "The server already has an admin.", app_message=HAS_ADMIN)
            if invite is not None and not spend_invite(conn, invite, now_ms):
                raise ApiError(
                    "ACCT01", "The invite code is wrong, used or expired.", app_message=NEEDS_INVITE
                )
            return conn.execute(
                """
                INSERT INTO users (id, name, password_hash, created_ms, uuid, display_name,
                                   updated_ms)
                VALUES (?, ?, ?, ?, ?, ?, ?)
                RETURNING id
                """,
                (
                    take_id(conn, "users"),
                    name,
                    password_hash,
                    now_ms,
                    str(uuid.uuid4()),
                    display_name or default_display_name(name),
                    now_ms,
                ),
            ).fetchone()[0]
    except conn.IntegrityError:
        raise ApiError("ACCT03", "This user id is already in use.") from None


def has_users(conn: Connection) -> bool:
    """Whether any account exists."""
    return conn.execute("SELECT 1 FROM users LIMIT 1").fetchone() is not None


def find_user(conn: Connection, name: str) -> tuple[int, str] | None:
    """Return (row id, password hash) of a user, or None."""
    return conn.execute("SELECT id, password_hash FROM users WHERE name = ?", (name,)).fetchone()


def create_session(
    conn: Connection,
    user_id: int,
    now_ms: int,
    expires_ms: int,
    device: Device,
    parent_id: int | None = None,
) -> NewSession:
    """Start a session (a child of parent_id when given) and return it with its token."""
    token, public_id = secrets.token_urlsafe(32), str(uuid.uuid4())
    with transaction(conn, write=True):
        row_id = take_id(conn, "sessions")
        conn.execute(
            """
            INSERT INTO sessions (id, public_id, user_id, token_digest, created_ms, updated_ms,
                                  expires_ms, parent_id, device_type, device_os, app_version)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            """,
            (
                row_id,
                public_id,
                user_id,
                digest_token(token),
                now_ms,
                now_ms,
                expires_ms,
                parent_id,
                device.device_type,
                device.device_os,
                device.app_version,
            ),
        )
    return NewSession(row_id, public_id, token, expires_ms)


def find_session(
    conn: Connection,
    token: str,
    now_ms: int,
    app_version: str | None,
    device: Callable[[], Device],
) -> Caller:
    """Return the caller behind a session token; AUTH01 (and the row purged) when expired.

    README, App API: a session used over an hour after its last refresh, or from
    another app version, records the time and this request's device again.
    """
    row = conn.execute(
        "SELECT id, user_id, expires_ms, updated_ms, app_version FROM sessions "
        "WHERE token_digest = ?",
        (digest_token(token),),
    ).fetchone()
    if row is None:
        raise ApiError("AUTH01", "The session token is unknown, expired or revoked.")
    session_id, user_id, expires_ms, updated_ms, stored_version = row
    if expires_ms <= now_ms:
        write_if_possible(conn, "DELETE FROM sessions WHERE id = ?", (session_id,))
        raise ApiError("AUTH01", "The session token is unknown, expired or revoked.")
    if now_ms - updated_ms > SESSION_REFRESH_MS or stored_version != app_version:
        device = device()  # derived only when it is recorded
        write_if_possible(
            conn,
            """
            UPDATE sessions SET updated_ms = ?, device_type = ?, device_os = ?, app_version = ?
            WHERE id = ?
            """,
            (now_ms, device.device_type, device.device_os, device.app_version, session_id),
        )
    return Caller(user_id, session_id=session_id)


def credential_is_live(conn: Connection, caller: Caller, permission: str, now_ms: int):
    """Whether the session or API key behind a caller still exists and grants the permission.

    A long-poll asks again each time it wakes, so it ends once the session ends, the
    password changes, the key is deleted or narrowed, or the account goes.
    """
    if caller.session_id is not None:
        return (
            conn.execute(
                "SELECT 1 FROM sessions WHERE id = ? AND user_id = ? AND expires_ms > ?",
                (caller.session_id, caller.user_id, now_ms),
            ).fetchone()
            is not None
        )
    row = conn.execute(
        "SELECT permissions FROM api_keys WHERE id = ? AND user_id = ?",
        (caller.api_key_id, caller.user_id),
    ).fetchone()
    return row is not None and dataclasses.replace(
        caller, permissions=frozenset(json.loads(row[0]))
    ).allows(permission)


def find_session_expiry(conn: Connection, session_id: int) -> int:
    """Return when a session expires; AUTH01 if it ended since it was read."""
    row = conn.execute("SELECT expires_ms FROM sessions WHERE id = ?", (session_id,)).fetchone()
    if row is None:
        raise ApiError("AUTH01", "The session token is unknown, expired or revoked.")
    return row[0]


@dataclass(frozen=True, slots=True)
class Session:
    """A live session, as its owner may list it."""

    row_id: int
    public_id: str
    created_ms: int
    updated_ms: int
    expires_ms: int
    device: Device


def list_sessions(conn: Connection, user_id: int, now_ms: int, by_use: bool = False):
    """Return the user's live sessions, newest first (by_use: most recently used first)."""
    order = "updated_ms DESC, created_ms DESC, id DESC" if by_use else "created_ms DESC, id DESC"
    rows = conn.execute(
        f"""
        SELECT id, public_id, created_ms, updated_ms, expires_ms, device_type, device_os,
               app_version
        FROM sessions WHERE user_id = ? AND expires_ms > ?
        ORDER BY {order}
        """,
        (user_id, now_ms),
    )
    return [Session(*row[:5], Device(*row[5:])) for row in rows]


def iso_time(ms: int) -> str:
    """Format milliseconds since the epoch as UTC ISO 8601 with milliseconds."""
    moment = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def end_user_session(conn: Connection, user_id: int, public_id: str) -> bool:
    """End one of the user's sessions with its children; False when there is none such."""
    return delete_credential(conn, "sessions", user_id, public_id)


def delete_credential(conn: Connection, table: str, user_id: int, public_id: str) -> bool:
    """Delete one of the user's sessions or API keys by its public id, as a revocation;
    False when there is none such."""
    with transaction(conn, write=True):
        deleted = conn.execute(
            f"DELETE FROM {table} WHERE user_id = ? AND public_id = ?", (user_id, public_id)
        ).rowcount
        if deleted:
            revoke(conn, [user_id])
    return deleted == 1


def end_other_sessions(conn: Connection, user_id: int, keep_session_id: int | None) -> None:
    """End every session of the user but the one kept (all with None), children included.

    The kept session is detached from its parent first, so that ending the parent does not
    end the kept session with it.
    """
    with transaction(conn, write=True):
        conn.execute("UPDATE sessions SET parent_id = NULL WHERE id = ?", (keep_session_id,))
        if conn.execute(
            "DELETE FROM sessions WHERE user_id = ? AND id != ?", (user_id, keep_session_id or 0)
        ).rowcount:
            revoke(conn, [user_id])


def end_session(conn: Connection, session_id: int) -> None:
    """Delete one session."""
    with transaction(conn, write=True):
        ended = conn.execute("DELETE FROM sessions WHERE id = ? RETURNING user_id", (session_id,))
        user_ids = [row[0] for row in ended.fetchall()]
        if user_ids:
            revoke(conn, user_ids)


def delete_account(conn: Connection, user_id: int, now_ms: int) -> None:
    """Delete a user with its sessions, tokens and permissions, and the keys only it owned.

    The other holders of a key that goes with the account get a tombstone for it.
    """
    with transaction(conn, write=True):
        doomed = conn.execute(
            """
            SELECT items.id, items.key FROM permissions AS mine
            JOIN items ON items.id = mine.item_id
            WHERE mine.user_id = :user AND mine.level = :own AND NOT EXISTS (
                SELECT 1 FROM permissions AS other
                WHERE other.item_id = mine.item_id AND other.level = :own
                AND other.user_id != :user
            )
            """,
            {"user": user_id, "own": LEVELS["OWN"]},
        ).fetchall()
        for item_id, key in doomed:
            others = conn.execute(
                "SELECT user_id FROM permissions WHERE item_id = ? AND user_id != ?",
                (item_id, user_id),
            ).fetchall()
            if others:
                bury(conn, [row[0] for row in others], key, next_seq(conn), now_ms)
            conn.execute("DELETE FROM items WHERE id = ?", (item_id,))
        revoke(conn, [user_id])
        conn.execute("DELETE FROM users WHERE id = ?", (user_id,))


def set_password(
    conn: Connection,
    user_id: int,
    password_hash: str,
    keep_session_id: int | None,
    now_ms: int,
    reset_token: str | None = None,
) -> None:
    """Store a new password hash; end every session but the one kept and any reset token.

    With reset_token, that token is spent in the same transaction (AUTH01 if it is no
    longer live), so of two requests racing with one token only one sets a password.
    """
    with transaction(conn, write=True):
        if reset_token is not None:
            spent = conn.execute(
                """
                DELETE FROM reset_tokens
                WHERE token_digest = ? AND user_id = ? AND expires_ms > ?
                """,
                (digest_token(reset_token), user_id, now_ms),
            ).rowcount
            if spent != 1:
                raise ApiError("AUTH01", "The reset token is unknown, expired or used.")
        conn.execute(
            "UPDATE users SET password_hash = ?, updated_ms = ? WHERE id = ?",
            (password_hash, now_ms, user_id),
        )
        end_other_sessions(conn, user_id, keep_session_id)
        conn.execute("DELETE FROM reset_tokens WHERE user_id = ?", (user_id,))


def update_password_hash(conn: Connection, user_id: int, password_hash: str) -> None:
    """Replace a hash after login found its parameters out of date."""
    with transaction(conn, write=True):
        conn.execute("UPDATE users SET password_hash = ? WHERE id = ?", (password_hash, user_id))


def create_reset_token(conn: Connection, user_id: int, now_ms: int, ttl_ms: int) -> str:
    """Replace the user's reset token with a new one and return it."""
    token = secrets.token_urlsafe(32)
    with transaction(conn, write=True):
        conn.execute(
            """
            INSERT INTO reset_tokens (user_id, token_digest, expires_ms) VALUES (?, ?, ?)
            ON CONFLICT (user_id) DO UPDATE
            SET token_digest = excluded.token_digest, expires_ms = excluded.expires_ms
            """,
            (user_id, digest_token(token), now_ms + ttl_ms),
        )
    return token


def find_reset_token(conn: Connection, token: str, now_ms: int) -> int | None:
    """Return the user id a live reset token belongs to, or None."""
    row = conn.execute(
        "SELECT user_id FROM reset_tokens WHERE token_digest = ? AND expires_ms > ?",
        (digest_token(token), now_ms),
    ).fetchone()
    return row[0] if row else None


def reset_password(conn: Connection, token: str, password_hash: str, now_ms: int) -> None:
    """Spend a reset token: set the password and end every session; AUTH01 if already spent."""
    user_id = find_reset_token(conn, token, now_ms)
    if user_id is None:
        raise ApiError("AUTH01", "The reset token is unknown, expired or used.")
    set_password(conn, user_id, password_hash, None, now_ms, reset_token=token)


def create_invite(conn: Connection, now_ms: int, ttl_ms: int) -> tuple[str, int]:
    """Mint a single-use invite code; return it with its expiry."""
    code, expires_ms = secrets.token_urlsafe(16), now_ms + ttl_ms
    with transaction(conn, write=True):
        conn.execute(
            "INSERT INTO invites (code_digest, expires_ms) VALUES (?, ?)",
            (digest_token(code), expires_ms),
        )
    return code, expires_ms


def invite_is_live(conn: Connection, code: str, now_ms: int) -> bool:
    """Whether an invite code exists and has not expired (it stays unspent)."""
    return (
        conn.execute(
            "SELECT 1 FROM invites WHERE code_digest = ? AND expires_ms > ?",
            (digest_token(code), now_ms),
        ).fetchone()
        is not None
    )


def spend_invite(conn: Connection, code: str, now_ms: int) -> bool:
    """Delete a live invite code inside the caller's transaction; False when there is none."""
    return (
        conn.execute(
            "DELETE FROM invites WHERE code_digest = ? AND expires_ms > ?",
            (digest_token(code), now_ms),
        ).rowcount
        == 1
    )


# API keys and users of the App API.


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key as its owner may see it (never its secret)."""

    public_id: str
    name: str
    permissions: tuple[str, ...]
    created_ms: int
    updated_ms: int


API_KEY_COLUMNS = "public_id, name, permissions, created_ms, updated_ms"


def api_key_of(row: tuple) -> ApiKey:
    """Return an ApiKey from an api_keys row (API_KEY_COLUMNS)."""
    public_id, name, permissions, created_ms, updated_ms = row
    return ApiKey(public_id, name, tuple(json.loads(permissions)), created_ms, updated_ms)


def create_api_key(
    conn: Connection, user_id: int, name: str, permissions: list[str], now_ms: int
) -> tuple[str, ApiKey]:
    """Create an API key; return its secret (shown once) and the key."""
    secret, public_id = secrets.token_urlsafe(32), str(uuid.uuid4())
    row = (public_id, name, json.dumps(permissions), now_ms, now_ms)
    with transaction(conn, write=True):
        conn.execute(
            f"INSERT INTO api_keys (id, user_id, secret_digest, {API_KEY_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (take_id(conn, "api_keys"), user_id, digest_token(secret), *row),
        )
    return secret, api_key_of(row)


def find_api_key(conn: Connection, secret: str) -> Caller | None:
    """Return the caller behind an API key secret, or None."""
    row = conn.execute(
        """
        SELECT id, user_id, permissions FROM api_keys WHERE secret_digest = ?
        """,
        (digest_token(secret),),
    ).fetchone()
    if row is None:
        return None
    key_id, user_id, permissions = row
    return Caller(user_id, api_key_id=key_id, permissions=frozenset(json.loads(permissions)))


def list_api_keys(conn: Connection, user_id: int) -> list[ApiKey]:
    """Return the user's API keys, newest first."""
    rows = conn.execute(
        f"SELECT {API_KEY_COLUMNS} FROM api_keys WHERE user_id = ? "
        "ORDER BY created_ms DESC, id DESC",
        (user_id,),
    )
    return [api_key_of(row) for row in rows]


def get_api_key(
    conn: Connection, user_id: int, *, public_id: str = "", row_id: int = 0
) -> ApiKey | None:
    """Return one of the user's API keys by public or row id, or None."""
    row = conn.execute(
        f"SELECT {API_KEY_COLUMNS} FROM api_keys WHERE user_id = ? AND (public_id = ? OR id = ?)",
        (user_id, public_id, row_id),
    ).fetchone()
    return api_key_of(row) if row else None


def update_api_key(
    conn: Connection,
    user_id: int,
    public_id: str,
    name: str | None,
    permissions: list[str] | None,
    now_ms: int,
) -> ApiKey | None:
    """Change the fields given of one of the user's API keys; None when there is none such."""
    with transaction(conn, write=True):
        updated = conn.execute(
            """
            UPDATE api_keys SET name = coalesce(?, name),
                permissions = coalesce(?, permissions), updated_ms = ?
            WHERE user_id = ? AND public_id = ?
            """,
            (
                name,
                None if permissions is None else json.dumps(permissions),
                now_ms,
                user_id,
                public_id,
            ),
        ).rowcount
        if updated:
            revoke(conn, [user_id])
    return get_api_key(conn, user_id, public_id=public_id) if updated else None


def delete_api_key(conn: Connection, user_id: int, public_id: str) -> bool:
    """Delete one of the user's API keys; False when there is none such."""
    return delete_credential(conn, "api_keys", user_id, public_id)


@dataclass(frozen=True, slots=True)
class User:
    """An account as the App API shows it."""

    row_id: int
    public_id: str
    display_name: str
    name: str
    created_ms: int
    updated_ms: int
    #: The oldest account is the admin (README, Accounts and sessions), so deleting the admin
    #: makes the next oldest one admin, and an admin exists whenever a user does.
    is_admin: bool


USER_COLUMNS = """
    id, uuid, display_name, name, created_ms, updated_ms,
    id = (SELECT min(id) FROM users) AS is_admin
"""


def get_user(conn: Connection, *, row_id: int = 0, public_id: str = "") -> User | None:
    """Return a user by row id or UUID, or None."""
    row = conn.execute(
        f"SELECT {USER_COLUMNS} FROM users WHERE id = ? OR uuid = ?", (row_id, public_id)
    ).fetchone()
    return User(*row[:6], bool(row[6])) if row else None


def list_users(conn: Connection, user_id: int | None = None) -> list[User]:
    """Return every account (or only the one with user_id), newest first."""
    rows = conn.execute(
        f"SELECT {USER_COLUMNS} FROM users WHERE CAST(? AS BIGINT) IS NULL OR id = ? "
        "ORDER BY created_ms DESC, id DESC",
        (user_id, user_id),
    )
    return [User(*row[:6], bool(row[6])) for row in rows]


def update_user(
    conn: Connection, user_id: int, name: str | None, display_name: str | None, now_ms: int
) -> None:
    """Rename a user's id and/or display name; ACCT03 when the new id is taken."""
    if name is None and display_name is None:
        return
    try:
        with transaction(conn, write=True):
            conn.execute(
                """
                UPDATE users SET name = coalesce(?, name),
                    display_name = coalesce(?, display_name), updated_ms = ?
                WHERE id = ?
                """,
                (name, display_name, now_ms, user_id),
            )
    except conn.IntegrityError:
        raise ApiError("ACCT03", "This user id is already in use.") from None


# Attempts are counted in the database, so that every serving thread sees the same counts.


def take_attempts(
    conn: Connection, attempts: list[tuple[str, str, int, int]], now_ms: int
) -> list[int]:
    """Count one attempt for each (kind, subject, limit, window) at once; return their row ids.

    AUTH02 with Retry-After, counting nothing, when a subject already reached its limit
    within the window. Checking and counting share one write transaction, so racing
    attempts never pass a limit. Attempts dated later than now (the clock was set back)
    are dated now, so they count for one window at most.
    """
    refusal = None
    with transaction(conn, write=True):
        for kind, subject, limit, window_ms in attempts:
            conn.execute(
                "UPDATE attempts SET at_ms = :now WHERE kind = :kind AND subject = :subject "
                "AND at_ms > :now",
                {"now": now_ms, "kind": kind, "subject": subject},
            )
            conn.execute(
                "DELETE FROM attempts WHERE kind = ? AND subject = ? AND at_ms <= ?",
                (kind, subject, now_ms - window_ms),
            )
            times = [
                row[0]
                for row in conn.execute(
                    "SELECT at_ms FROM attempts WHERE kind = ? AND subject = ? "
                    "ORDER BY at_ms DESC LIMIT ?",
                    (kind, subject, limit),
                )
            ]
            if len(times) >= limit and refusal is None:
                retry_after = max(1, math.ceil((times[-1] + window_ms - now_ms) / 1000))
                refusal = ApiError(
                    "AUTH02",
                    "Too many attempts; try again later.",
                    headers={"Retry-After": str(retry_after)},
                )
        if refusal is not None:  # the re-dating and forgetting above stay
            row_ids = []
        else:
            row_ids = [
                conn.execute(
                    "INSERT INTO attempts (kind, subject, at_ms) VALUES (?, ?, ?) RETURNING rowid",
                    (kind, subject, now_ms),
                ).fetchone()[0]
                for kind, subject, _, _ in attempts
            ]
    if refusal is not None:
        raise refusal
    return row_ids


def release_attempts(conn: Connection, row_ids: list[int]) -> None:
    """Uncount attempts that turned out not to count (a right password, a failed sign-up)."""
    with transaction(conn, write=True):
        conn.executemany("DELETE FROM attempts WHERE rowid = ?", [(row_id,) for row_id in row_ids])


def clear_attempts(conn: Connection, kind: str, subject: str) -> int:
    """Forget every attempt of a kind by a subject (syncnode unlock); return how many."""
    with transaction(conn, write=True):
        return conn.execute(
            "DELETE FROM attempts WHERE kind = ? AND subject = ?", (kind, subject)
        ).rowcount


# Housekeeping and the admin commands' reports.


def purge_expired(conn: Connection, now_ms: int, attempts_before_ms: int) -> None:
    """Delete expired sessions, reset tokens and invites, and attempts older than any window."""
    with transaction(conn, write=True):
        conn.execute("DELETE FROM sessions WHERE expires_ms <= ?", (now_ms,))
        conn.execute("DELETE FROM reset_tokens WHERE expires_ms <= ?", (now_ms,))
        conn.execute("DELETE FROM invites WHERE expires_ms <= ?", (now_ms,))
        conn.execute("DELETE FROM attempts WHERE at_ms <= ?", (attempts_before_ms,))


def get_stats(conn: Connection, now_ms: int) -> dict[str, int]:
    """Return counts of users, keys, stored bytes and live sessions."""
    return {
        "users": conn.execute("SELECT count(*) FROM users").fetchone()[0],
        "keys": conn.execute("SELECT count(*) FROM items").fetchone()[0],
        "bytes": conn.execute(
            "SELECT CAST(coalesce(sum(size), 0) AS BIGINT) FROM items"
        ).fetchone()[0],
        "sessions": conn.execute(
            "SELECT count(*) FROM sessions WHERE expires_ms > ?", (now_ms,)
        ).fetchone()[0],
    }


def check_database(conn: Connection, newest: bool = True) -> list[str]:
    """Run SQLite's integrity and foreign-key checks; return the problems found (none: []).

    With newest, a schema version other than this syncnode's is a problem too. PostgreSQL
    checks its own pages and keys as it writes; there only the schema version is checked.
    """
    problems = []
    if not isinstance(conn, PostgreSQLConnection):
        problems = [row[0] for row in conn.execute("PRAGMA integrity_check")]
        problems = [] if problems == ["ok"] else problems
        for table, row_id, parent, _ in conn.execute("PRAGMA foreign_key_check"):
            row = f"Row {row_id} of {table}" if row_id is not None else f"A row of {table}"
            problems.append(f"{row} points to a missing row of {parent}.")
    version = kind_of(conn).schema_version(conn)
    if newest and version != len(SCHEMA):
        problems.append(f"The schema version is {version}, not {len(SCHEMA)}.")
    return problems


# ==================================================================================================
# HTTP layer
# ==================================================================================================


class Connections:
    """The app's database connections (one per thread) and its in-process write lock."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        #: Held by write transactions of the app, so that its writers queue in Python.
        self.write_lock = WriteLock()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._open: list[Connection] = []
        #: Every open connection open() made, closed with the app if its owner has not (a
        #: large value's reader whose answer a stalled client never took, say).
        self._owned: set[Connection] = set()
        self._held: tuple[int, int] | None = None
        self._healthy_until = 0.0
        #: Whether the database is PostgreSQL, and its statements in psycopg's placeholders.
        self.postgresql = is_postgresql(settings.database)
        self._texts: dict[str, str] = {}

    def open(self) -> Connection:
        """Open a connection of the app's that its caller owns and closes."""
        settings = self.settings
        conn = open_connection(settings.database, settings, self.write_lock, self._texts)
        conn.owners = self._owned
        self._owned.add(conn)
        return conn

    def connection(self) -> Connection:
        """Return this thread's connection, opening it on first use or after it went stale
        (a file that took no write) or broke (a PostgreSQL server that restarted)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and (conn.broken or (conn.stale and not conn.in_transaction)):
            self.discard()
            conn = None
        if conn is None:
            conn = self.open()
            with self._lock:
                self._open.append(conn)
            self._local.conn = conn
        return conn

    def discard(self) -> None:
        """Close this thread's connection; the next use opens a new one.

        SQLite opens a file it cannot write read-only, and such a connection never writes
        again: a new one does once the file is writable.
        """
        conn, self._local.conn = getattr(self._local, "conn", None), None
        if conn is None:
            return
        with self._lock:
            if conn in self._open:
                self._open.remove(conn)
        with contextlib.suppress(conn.Error):
            conn.close()

    def held_descriptor(self) -> int | None:
        """The descriptor of the database file this app holds (see HeldFiles), if any."""
        held = self._held
        return None if held is None else HELD_FILES.descriptor(held)

    def errors(self) -> tuple[type[Exception], ...]:
        """The errors of the database beside SQLite's: psycopg's on PostgreSQL."""
        return database_errors(self.settings.database)

    def take_changed(self) -> tuple[set[int], set[int]]:
        """Return and forget the users and the items this thread's committed writes touched
        (see touch and touch_items)."""
        conn = getattr(self._local, "conn", None)
        users, items = getattr(conn, "changed", None), getattr(conn, "changed_items", None)
        if not (users or items):
            return set(), set()
        conn.changed, conn.changed_items = set(), set()
        return users or set(), items or set()

    def writable(self) -> bool:
        """Whether the database file can take a write, cheaply and without raising.

        The file must start as SQLite's do, its -wal must be there (deleting it under a
        running server loses writes), and a write must be possible: one is tried and
        rolled back.
        """
        if time.monotonic() < self._healthy_until:
            return True  # a flood of health checks does not queue behind the writers
        if self.postgresql:
            return self._server_writable()
        path = self.settings.database
        try:
            if self._held is not None:  # never a descriptor of its own: see HeldFiles
                header = HELD_FILES.header(self._held)
            else:  # (no POSIX locks here to lose)
                with open(path, "rb") as file:
                    header = file.read(16)
            if header != b"SQLite format 3\x00":
                return False
            conn = self.connection()
            with self.write_lock:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    (version,) = conn.execute("PRAGMA user_version").fetchone()
                    conn.execute(f"PRAGMA user_version = {int(version)}")
                finally:
                    conn.execute("ROLLBACK")
            if not os.path.exists(path + "-wal"):  # (an open connection has made it)
                return False
        except (OSError, sqlite3.Error) as error:
            if isinstance(error, sqlite3.Error) and cannot_write(error):
                self.discard()
            return False
        self._healthy_until = time.monotonic() + HEALTHY_FOR_SECONDS
        return True

    def _server_writable(self) -> bool:
        """Whether the PostgreSQL server answers and takes writes (not a read-only replica)."""
        try:
            conn = self.connection()
            (read_only,) = conn.execute(
                "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on'"
            ).fetchone()
        except self.errors():
            self.discard()
            return False
        if read_only:
            return False
        self._healthy_until = time.monotonic() + HEALTHY_FOR_SECONDS
        return True

    def hold(self) -> None:
        """Hold a shared lock on the database file while the app is open.

        syncnode restore takes it exclusively, so it never swaps a database a server uses.
        """
        with self._lock:
            if fcntl is None or self._held is not None or self.postgresql:
                return
            path = self.settings.database
            try:
                self._held = HELD_FILES.hold(path)
            except BlockingIOError:
                raise DatabaseUnusable(
                    f"syncnode restore is replacing {path}; start again once it is done."
                ) from None

    def close(self) -> None:
        """Close every connection (new ones open if the app is used again) and the lock."""
        with self._lock:
            connections, self._open = [*self._open, *self._owned], []
            self._owned = set()
            self._local = threading.local()
            held, self._held = self._held, None
        for conn in connections:
            conn.close()
        if held is not None:
            HELD_FILES.release(held)


class Hashing:
    """Password hashing with Argon2id in a bounded number of slots, at a lower CPU priority."""

    def __init__(
        self,
        settings: Settings,
        waiting: Callable[[], int] = lambda: 0,
        database_file: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.settings = settings
        #: How many serving threads long-polls hold, which hashing may not take as well.
        self.waiting = waiting
        #: The descriptor of the database file, whose locks make the slots server-wide.
        self.database_file = database_file
        #: The CPUs hashing threads may use, where serve's threads were pinned to one.
        self.cpus: set[int] | None = None
        self.hasher = argon2.PasswordHasher(
            time_cost=settings.argon2_time_cost,
            memory_cost=settings.argon2_memory_cost,
            parallelism=settings.argon2_parallelism,
        )
        #: Requests hashing or waiting to, at most (less the long-polls); the rest answer
        #: BUSY01 at once, so that at least one serving thread is always free for the rest.
        self.max_requests = max(1, settings.threads - 1)
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        #: The slots this process's hashes hold.
        self._taken: set[int] = set()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._requests = 0
        self._dummy_hash: str | None = None

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the hash_slots while hashing; BUSY01 when none frees up in time.

        Each Argon2 hash takes its full memory cost at once, so a burst of logins could push
        a small board into swap; past hash_slots at once, requests wait briefly, then give up.
        All serving threads but one at most hash or wait to, so logins never hold every thread.
        """
        busy = ApiError(
            "BUSY01", "The server is busy hashing passwords; try again shortly.",
            headers={"Retry-After": "1"},
        )  # fmt: skip
        with self._lock:
            if self._requests >= self.max_requests - self.waiting():
                raise busy
            self._requests += 1
        try:
            slot = self._take_slot(time.monotonic() + self.settings.hash_wait)
            if slot is None:
                raise busy
            try:
                yield
            finally:
                self._give_back(slot)
        finally:
            with self._lock:
                self._requests -= 1

    def _take_slot(self, deadline: float) -> int | None:
        """Take a slot that no hash holds, in this process or another; None at the deadline.

        Slot n is a write lock on byte HASH_LOCK_BYTE + n of the database file, so every
        process serving the database shares hash_slots (a lock is the process's, so this
        process's own slots are kept apart in _taken). Another process's slot going free is
        seen within HASH_RETRY_SECONDS.
        """
        descriptor = self.database_file() if fcntl is not None else None
        with self._lock:
            while True:
                for slot in range(self.settings.hash_slots):
                    if slot in self._taken:
                        continue
                    if descriptor is not None:
                        try:
                            fcntl.lockf(
                                descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, HASH_LOCK_BYTE + slot
                            )
                        except OSError:
                            continue  # another process hashes in it
                    self._taken.add(slot)
                    return slot
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._freed.wait(min(remaining, HASH_RETRY_SECONDS))

    def _give_back(self, slot: int) -> None:
        descriptor = self.database_file() if fcntl is not None else None
        with self._lock:
            if descriptor is not None:
                fcntl.lockf(descriptor, fcntl.LOCK_UN, 1, HASH_LOCK_BYTE + slot)
            self._taken.discard(slot)
            self._freed.notify()

    def run(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run an Argon2 call in a hashing slot, on a thread of lowered CPU priority.

        Hashing at a lower priority leaves the CPU to the serving threads first, so a burst
        of logins slows other requests little (bench/run, login-profiles).
        """
        with self.slot():
            with self._lock:
                if self._pool is None:
                    self._pool = concurrent.futures.ThreadPoolExecutor(
                        self.settings.hash_slots,
                        "syncnode-hash",
                        prepare_hash_thread,
                        (self.cpus,),
                    )
                pool = self._pool
            return pool.submit(function, *args).result()

    def hash(self, password: str) -> str:
        """Hash a password with Argon2id."""
        return self.run(self.hasher.hash, password)

    def verify(self, password_hash: str | None, password: str) -> bool:
        """Check a password against a hash; with no hash, spend one verification all the same.

        Verifying against a dummy hash for unknown ids makes a failed login take as long
        whether or not the id exists, so timing does not tell which ids are registered.
        """
        if password_hash is None:
            if self._dummy_hash is None:
                self._dummy_hash = self.hash(secrets.token_urlsafe(16))
            password_hash = self._dummy_hash
        try:
            return self.run(self.hasher.verify, password_hash, password)
        except argon2.exceptions.VerificationError:
            return False
        except argon2.exceptions.InvalidHashError:
            log.error("A stored password hash is not a valid Argon2 hash.")
            return False

    def close(self) -> None:
        """Stop the hashing threads (new ones start if the app is used again)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()


class Parked(BaseException):
    """Raised through the app by a long-poll that waits without a thread (see Waiters).

    syncnode's own server catches it, keeps the request and runs it again once the poll
    wakes. It is a BaseException, so that no handler's `except Exception` takes it for an
    error.
    """


class Parking:
    """The place syncnode's own server keeps a long-poll's request in, across its runs."""

    def __init__(self, resume: Callable[[], None]) -> None:
        #: Runs the request again on a serving thread.
        self.resume = resume
        #: When the request first ran (monotonic seconds), for the access log.
        self.started = time.monotonic()
        #: When the poll's wait ends (monotonic seconds); set by its first run.
        self.deadline: float | None = None
        #: Whether the poll holds one of the places of max_waiters.
        self.admitted = False
        #: The poll's entry while it is parked.
        self.waiter: Waiter | None = None
        #: Frees the poll's place; the server calls it once the request is answered, however
        #: it ends, or its client goes away.
        self.release: Callable[[], None] = lambda: None


@dataclasses.dataclass(eq=False)
class Waiter:
    """One long-poll waiting for changes: whose, from which cursor, and how to wake it."""

    user_id: int
    since: int
    #: Runs a parked poll's request again; None while its query runs, and for a poll that
    #: holds its thread (under another server).
    resume: Callable[[], None] | None = None
    #: Set by a wake-up that came while the poll's query ran, or while it holds its thread.
    woken: bool = False


class Waiters:
    """The change feed's long-polls: how many wait, and waking only those a change concerns.

    Under syncnode's own server a waiting poll is parked: it keeps its connection but no
    thread, and its request runs again once it wakes or its wait ends. Under other servers a
    poll holds its serving thread, so at most half the threads wait. A commit of this
    process wakes the users it touched at once (see touch); one watcher thread per process
    finds the commits of other processes from PRAGMA data_version, and ends parked polls
    whose wait is over.
    """

    def __init__(self, settings: Settings, connections: Connections) -> None:
        self.max_waiters = settings.max_waiters
        #: Polls that may hold a serving thread at once; the other threads serve the rest.
        self.max_holding = min(settings.threads // 2, settings.max_waiters)
        self.connections = connections
        #: Parked polls (admitted and not yet answered), and polls holding a thread.
        self.parked = 0
        self.holding = 0
        self._lock = threading.Lock()
        self._woken = threading.Condition(self._lock)
        #: For each user with waiting polls: their entries.
        self._users: dict[int, set[Waiter]] = {}
        #: When the parked polls' waits end: (deadline, tie-breaker, parking).
        self._deadlines: list[tuple[float, int, Parking]] = []
        self._stopping = False
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def waiting(self) -> int:
        """How many long-polls wait now."""
        return self.parked + self.holding

    def notify(self, user_ids: Collection[int], item_ids: Collection[int] = ()) -> None:
        """Wake the long-polls of these users, and of the holders of these items, after a
        committed change."""
        if not self._users or not (user_ids or item_ids):  # (most requests: none of either)
            return
        users = dict.fromkeys(user_ids)
        if item_ids:
            try:
                users.update(dict.fromkeys(item_holders(self.connections.connection(), item_ids)))
            except (sqlite3.Error, *self.connections.errors()):
                self._wake(None)  # each poll queries again
                return
        self._wake(users)

    def stop(self) -> None:
        """Answer every long-poll now and hold no new ones: the server is shutting down."""
        with self._lock:
            self._stopping = True
        self._wake(None)

    def close(self) -> None:
        """Stop the watcher thread (a new one starts if the app is used again)."""
        self._closed.set()
        watcher = self._watcher
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(timeout=5)
        self._closed.clear()

    def long_poll(
        self,
        user_id: int,
        since: int,
        query: Callable[[], Listing],
        wait_seconds: int,
        gone: Callable[[], bool] = lambda: False,
        parking: Parking | None = None,
    ) -> tuple[Listing, str | None]:
        """Run the query, and while it finds nothing, again after each change, for a while.

        Past max_waiters waiting polls (past max_holding where a poll holds its thread), or
        while the server stops, the query answers at once with the reason the wait was
        declined ("busy", "stopping"). Raises Parked where the server keeps the poll.
        """
        if not wait_seconds:
            return query(), None
        with self._lock:
            declined = None
            if parking is not None and parking.admitted:
                pass  # a parked poll runs again
            elif self._stopping:
                declined = "stopping"
            elif parking is not None and self.parked < self.max_waiters:
                self.parked += 1
                parking.admitted = True
                parking.deadline = time.monotonic() + wait_seconds
                parking.release = functools.partial(self._leave, parking)
            elif parking is None and self.holding < self.max_holding:
                self.holding += 1
            else:
                declined = "busy"
        if declined:
            listing = query()
            return listing, None if listing.entries else declined
        if parking is None:
            try:
                return self._hold(user_id, since, query, time.monotonic() + wait_seconds, gone)
            finally:
                with self._lock:
                    self.holding -= 1
        return self._park(user_id, since, query, parking, gone), None

    def _hold(
        self,
        user_id: int,
        since: int,
        query: Callable[[], Listing],
        deadline: float,
        gone: Callable[[], bool],
    ) -> tuple[Listing, None]:
        """Wait on this thread; a client that went away (gone) is seen within a second."""
        while True:
            waiter = self._enter(user_id, since)
            try:
                listing = query()
                with self._lock:
                    while not (waiter.woken or self._stopping):
                        remaining = deadline - time.monotonic()
                        if listing.entries or remaining <= 0 or gone():
                            return listing, None
                        self._woken.wait(min(remaining, 1.0))
                    if self._stopping:
                        return listing, None
            finally:
                self._forget(waiter)

    def _park(
        self,
        user_id: int,
        since: int,
        query: Callable[[], Listing],
        parking: Parking,
        gone: Callable[[], bool],
    ) -> Listing:
        """Answer what the query finds, or park the poll (raise Parked) until a change."""
        while True:
            waiter = self._enter(user_id, since)
            try:
                listing = query()
            except BaseException:
                self._forget(waiter)
                raise
            with self._lock:
                done = listing.entries or self._stopping or gone()
                if done or time.monotonic() >= parking.deadline:
                    self._forget_locked(waiter)
                    self._leave_locked(parking)
                    return listing
                if waiter.woken:  # a change came while the query ran: look again
                    self._forget_locked(waiter)
                    continue
                waiter.resume, parking.waiter = parking.resume, waiter
                heapq.heappush(self._deadlines, (parking.deadline, id(parking), parking))
            raise Parked

    def _enter(self, user_id: int, since: int) -> Waiter:
        """Register a poll before its query runs, so that no wake-up meanwhile is lost."""
        waiter = Waiter(user_id, since)
        with self._lock:
            self._users.setdefault(user_id, set()).add(waiter)
            if self._watcher is None:
                self._watcher = threading.Thread(
                    target=self._watch, name="syncnode-watcher", daemon=True
                )
                self._watcher.start()
        return waiter

    def _forget(self, waiter: Waiter) -> None:
        with self._lock:
            self._forget_locked(waiter)

    def _forget_locked(self, waiter: Waiter) -> None:
        waiters = self._users.get(waiter.user_id)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._users[waiter.user_id]

    def _leave(self, parking: Parking) -> None:
        """Free a parked poll's place: it was answered, failed, or its client went away."""
        with self._lock:
            self._leave_locked(parking)

    def _leave_locked(self, parking: Parking) -> None:
        if parking.waiter is not None:
            self._forget_locked(parking.waiter)
            parking.waiter = None
        if parking.admitted:
            parking.admitted = False
            self.parked -= 1

    def _wake(self, changes: dict[int, int | None] | None) -> None:
        """Wake the polls of these users (all with None) whose cursor is before their change.

        A change of None concerns every poll of its user (a change this process committed,
        or a credential that ended).
        """
        resumes, woken = [], False
        with self._lock:
            users = self._users.keys() if changes is None else changes.keys() & self._users
            for user_id in list(users):
                seq = None if changes is None else changes[user_id]
                for waiter in list(self._users[user_id]):
                    if seq is not None and waiter.since >= seq:
                        continue
                    if waiter.resume is None:
                        waiter.woken = woken = True
                    else:
                        self._forget_locked(waiter)
                        resumes.append(waiter.resume)
            if woken or self._stopping:
                self._woken.notify_all()
        for resume in resumes:
            resume()

    def _expire(self) -> None:
        """Run again the parked polls whose wait is over, so that they answer."""
        resumes = []
        with self._lock:
            now = time.monotonic()
            while self._deadlines and self._deadlines[0][0] <= now:
                parking = heapq.heappop(self._deadlines)[2]
                waiter = parking.waiter
                if waiter is not None and waiter.resume is not None:
                    if waiter in self._users.get(waiter.user_id, ()):
                        self._forget_locked(waiter)
                        resumes.append(waiter.resume)
        for resume in resumes:
            resume()

    def _watch(self) -> None:
        """The watcher: runs while polls wait, looking every WATCH_SECONDS (see Waiters)."""
        conn = None
        try:
            conn = self.connections.open()
            conn.data_version()  # PostgreSQL: listening before the first look
            version, seq, revocations = self._look(conn)
            while not conn.wait_for_change(self._closed, WATCH_SECONDS):
                with self._lock:
                    if not self._users and not self._deadlines:
                        self._watcher = None
                        return
                self._expire()
                if conn.data_version() == version:
                    continue
                last_seq, last_revocations = seq, revocations
                version, seq, revocations = self._look(conn)
                if revocations != last_revocations:
                    self._wake(None)  # each poll checks its credential
                elif seq != last_seq:
                    self._wake(self._changed_since(conn, last_seq))
        except (sqlite3.Error, *self.connections.errors()) as error:
            reason = error_name(error)
            log.warning("The long-poll watcher stopped and will start again: %s", reason)
        finally:
            with self._lock:
                if self._watcher is threading.current_thread():
                    self._watcher = None
            if conn is not None:
                conn.close()

    @staticmethod
    def _look(conn: Connection) -> tuple[int, int, int]:
        """Return the database's data version, its latest change and its revocation count."""
        with transaction(conn):
            version = conn.data_version()
            seq, revocations = conn.execute("SELECT seq, revocations FROM sync_state").fetchone()
        return version, seq, revocations

    def _changed_since(self, conn: Connection, seq: int) -> dict[int, int | None]:
        """Return the waiting users whose feed changed past seq, with their latest change."""
        with self._lock:
            user_ids = conn.id_list(self._users)
        rows = conn.execute(
            f"""
            SELECT user_id, max(seq) FROM permissions
            WHERE user_id {conn.IDS_IN} AND seq > ? GROUP BY user_id
            UNION ALL
            SELECT user_id, max(seq) FROM tombstones
            WHERE user_id {conn.IDS_IN} AND seq > ? GROUP BY user_id
            """,
            (user_ids, seq, user_ids, seq),
        ).fetchall()
        changes: dict[int, int | None] = {}
        for user_id, latest in rows:
            changes[user_id] = max(latest, changes.get(user_id) or 0)
        return changes


class Housekeeping:
    """Purging what has expired, cutting tombstones, vacuum and checkpoint, now and then.

    Runs inside whichever request comes first after HOUSEKEEPING_MS, so that no separate
    process or thread is needed; one request pays a few indexed deletes.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._next_ms = 0

    def due(self, now_ms: int) -> bool:
        """Take the next run if it is due (or the clock was set back past the last one)."""
        if self._next_ms - 2 * HOUSEKEEPING_MS < now_ms < self._next_ms:
            return False  # the common case, decided again under the lock otherwise
        with self._lock:
            if self._next_ms - 2 * HOUSEKEEPING_MS < now_ms < self._next_ms:
                return False
            self._next_ms = now_ms + HOUSEKEEPING_MS
            return True

    def run(self, connections: Connections, now_ms: int) -> None:
        """Run once; a failure is logged and tried again next time."""
        settings = self.settings
        longest_window = max(
            settings.login_window, settings.reset_window, settings.registration_window
        )
        try:
            conn = connections.connection()
            with conn.housekeeping_turn() as mine:
                if not mine:
                    return  # another node's turn
                purge_expired(conn, now_ms, now_ms - longest_window * 1000)
                purge_tombstones(conn, now_ms - settings.tombstone_ttl * 1000)
                trim_tombstones(conn, settings.tombstones_per_user)
                conn.tidy(connections.write_lock)
        except (sqlite3.Error, *connections.errors()) as error:
            log.warning("Housekeeping failed and will be tried again: %s", error_name(error))


class Context:
    """What one app owns: its settings and clock, and its parts, each with one job."""

    def __init__(self, settings: Settings, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.clock = clock
        self.db = Connections(settings)
        self.waiters = Waiters(settings, self.db)
        self.hashing = Hashing(settings, lambda: self.waiters.holding, self.db.held_descriptor)
        self.housekeeping = Housekeeping(settings)
        self.trusted_proxies = parse_networks(settings.trusted_proxies)
        self.data_dir = os.path.dirname(os.path.abspath(settings.database))
        self._documents: dict[str, bytes] = {}
        self._disk_ok_until = 0.0

    def now_ms(self) -> int:
        """Return the app clock's time in milliseconds since the Unix epoch."""
        return int(self.clock() * 1000)

    def document(self, prefix: str) -> bytes:
        """Return the served OpenAPI document as JSON, for the path the app is mounted under."""
        document = self._documents.get(prefix)
        if document is None:  # a prefix or two per app: built once each
            document = json.dumps(openapi_document(prefix), separators=(",", ":")).encode()
            self._documents[prefix] = document
        return document

    def connection(self) -> Connection:
        """Return this thread's database connection (see Connections)."""
        return self.db.connection()

    def housekeep(self) -> None:
        """Run housekeeping if it is due, with this request's connection."""
        now_ms = self.now_ms()
        if self.housekeeping.due(now_ms):
            self.housekeeping.run(self.db, now_ms)

    def close(self) -> None:
        """Close the app's connections and stop its watcher and hashing threads."""
        self.waiters.close()
        self.db.close()
        self.hashing.close()

    def quota(self) -> Quota:
        """Return the per-user storage limits, and whether the disk is at its floor."""
        return Quota(self.settings.quota_bytes, self.settings.quota_keys, not self.disk_ok())

    def from_trusted_proxy(self, environ: Mapping[str, Any]) -> bool:
        """Whether the request came from one of the trusted reverse proxies."""
        try:
            address = ipaddress.ip_address(environ.get("REMOTE_ADDR", ""))
        except ValueError:
            return False
        return any(address in network for network in self.trusted_proxies)

    def client_address(self, environ: Mapping[str, Any]) -> str:
        """Return the client address: the socket's, or X-Forwarded-For's behind trusted proxies."""
        address = environ.get("REMOTE_ADDR", "")
        if not self.trusted_proxies:
            return address
        hops = [hop.strip() for hop in environ.get("HTTP_X_FORWARDED_FOR", "").split(",")]
        for hop in reversed([*filter(None, hops), address]):
            try:
                if not any(ipaddress.ip_address(hop) in net for net in self.trusted_proxies):
                    return hop
            except ValueError:
                return hop
        return address

    def disk_ok(self) -> bool:
        """Whether the data directory is writable with at least min_free_bytes free.

        A yes holds for HEALTHY_FOR_SECONDS (two system calls fewer for most writes); a no is
        asked again each time. PostgreSQL keeps its files on its own server: there a full
        disk answers DISK01 when the server refuses the write (see cannot_write).
        """
        if self.db.postgresql or time.monotonic() < self._disk_ok_until:
            return True
        try:
            free = shutil.disk_usage(self.data_dir).free
        except OSError:
            return False
        if not (os.access(self.data_dir, os.W_OK) and free >= self.settings.min_free_bytes):
            return False
        self._disk_ok_until = time.monotonic() + HEALTHY_FOR_SECONDS
        return True

    def require_disk(self) -> None:
        """Raise DISK01 unless the data directory can take a write."""
        if not self.disk_ok():
            raise out_of_space()


def prepare_hash_thread(cpus: set[int] | None) -> None:
    """Lower the calling thread's CPU priority (Linux keeps a nice value per thread), and let
    it run on the given CPUs (those of the process, where the serving threads were pinned).

    Argon2's lane threads, started from this one, inherit both.
    """
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            thread = threading.get_native_id()
            niceness = os.getpriority(os.PRIO_PROCESS, thread)
            os.setpriority(os.PRIO_PROCESS, thread, min(19, niceness + HASH_NICENESS))
            if cpus:
                os.sched_setaffinity(0, cpus)


def answer(body: Any, status: int, headers: Mapping[str, str]) -> Any:
    """Set the status and headers of this request's answer and return its body.

    Setting them on bottle's response, as a route usually does, costs less than building an
    HTTPResponse, which bottle would copy over it. An error raised later still answers with
    its own HTTPResponse, which replaces all of this.
    """
    response = bottle.response
    response.status = status
    stored = getattr(response, "_headers", None)
    if stored is None:  # (not bottle 0.13)
        for name, value in headers.items():
            response[name] = value
        return body
    # bottle 0.13 keeps each header as a list under its title-cased name: set so, a third of
    # the cost of response[name] = value, with the same checks of the value.
    for name, value in headers.items():
        stored[header_key(name)] = [bottle._hval(value)]
    if isinstance(body, bytes):  # (what bottle would set, the cheaper way)
        stored["Content-Length"] = [str(len(body))]
    return body


@functools.cache
def header_key(name: str) -> str:
    """The name under which bottle keeps a response header (a handful of names: cached)."""
    return bottle._hkey(name)


def add_headers(response: Any, headers: Mapping[str, str]) -> None:
    """Add headers to a route's answer: an HTTPResponse, or a body whose headers bottle holds."""
    target = response if isinstance(response, bottle.HTTPResponse) else bottle.response
    for name, value in headers.items():
        target.set_header(name, value)


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None):
    """Return a JSON answer."""
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
    return answer(body, status, {"Content-Type": "application/json", **(headers or {})})


def empty_response(headers: Mapping[str, str] | None = None):
    """Return 204 No Content."""
    return answer(b"", 204, headers or {})


def error_response(error: ApiError):
    """Return the JSON error body for an ApiError."""
    body: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.index is not None:
        body["index"] = error.index
    return json_response(body, error.status, error.headers)


def body_chunks(limit: int, code: str = "REQ01") -> Iterator[bytes]:
    """Yield the request body in chunks; SIZE01 as soon as it is known to pass limit bytes.

    A Content-Length over the limit is refused before anything is read; the given code
    answers a Content-Length that is not a whole number.
    """
    environ = bottle.request.environ
    length_text = environ.get("CONTENT_LENGTH") or ""
    if length_text and not (length_text.isascii() and length_text.isdigit()):
        raise ApiError(code, "The Content-Length header must be a whole number.")
    remaining = int(length_text) if length_text else limit + 1
    if remaining > limit and length_text:
        raise ApiError("SIZE01", f"The request body is larger than {limit:,} bytes.")
    stream, received = environ["wsgi.input"], 0
    while remaining > 0:
        chunk = stream.read(min(READ_CHUNK_BYTES, remaining))
        if not chunk:
            break
        received += len(chunk)
        remaining -= len(chunk)
        if received > limit:
            raise ApiError("SIZE01", f"The request body is larger than {limit:,} bytes.")
        yield chunk


def read_body(limit: int, code: str = "REQ01") -> bytes:
    """Read the request body; SIZE01 when it is longer than limit bytes."""
    return b"".join(body_chunks(limit, code))


def read_value(limit: int) -> NewValue:
    """Read a PUT body of at most limit bytes (SIZE01 past it) with its X-Sync-Meta.

    A body up to STREAM_FROM_BYTES stays in memory; a larger one is spooled to a temporary
    file, so that the write transaction copies it into the row without waiting on the
    network and without holding the value in memory.
    """
    meta = read_meta()
    length_text = bottle.request.environ.get("CONTENT_LENGTH") or ""
    if length_text.isascii() and length_text.isdigit() and int(length_text) <= STREAM_FROM_BYTES:
        body = read_body(limit)
        return NewValue(body, len(body), meta)
    try:
        spool, size = tempfile.TemporaryFile(), 0
    except OSError:
        raise out_of_space() from None
    try:
        for chunk in body_chunks(limit):
            try:
                spool.write(chunk)
            except OSError:
                raise out_of_space() from None
            size += len(chunk)
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return NewValue(spool, size, meta)


def parse_json(raw: bytes) -> Any:
    """Parse JSON text; ValueError also for nesting too deep to parse or a lone surrogate.

    JSON may write a lone UTF-16 surrogate ("\\ud800"), which is no text that SQLite or a
    reply could carry.
    """
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ValueError("The JSON is nested too deeply.") from None
    try:
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ValueError("The JSON holds a lone surrogate.") from None
    return data


def read_json(code: str = "REQ01", limit: int = MAX_JSON_BYTES) -> Any:
    """Read and parse a JSON body; the given code when it is not JSON."""
    try:
        return parse_json(read_body(limit, code))
    except (ValueError, UnicodeDecodeError):
        raise ApiError(code, "The request body must be valid JSON.") from None


def read_credentials() -> tuple[str, str, dict]:
    """Read {"id", "password"} from the body; ACCT02 for any other shape; return the body too."""
    body = read_json("ACCT02")
    if not (
        isinstance(body, dict)
        and isinstance(body.get("id"), str)
        and isinstance(body.get("password"), str)
    ):
        raise ApiError("ACCT02", "The body must be a JSON object with string id and password.")
    name = normalize_id(body["id"])
    check_password(body["password"])
    return name, body["password"], body


def header(name: str) -> str | None:
    """Return a request header as sent (latin-1 text per WSGI), or None when absent."""
    return bottle.request.environ.get(environ_name(name))


@functools.cache
def environ_name(name: str) -> str:
    """The WSGI environ key of a request header (a handful of names: cached)."""
    return "HTTP_" + name.upper().replace("-", "_")


def token_candidates(tag: str) -> tuple[str, ...]:
    """Return the store token an entity tag names: as sent and without a proxy's changes.

    Proxies that compress answers weaken ETags (W/"t") or append their coding to the token
    ("t-gzip"); both forms still name the token. The tag as sent stays a candidate, so a
    token that happens to end in such a suffix still matches itself.
    """
    value = tag.strip()
    value = value[2:] if value.startswith("W/") else value
    if len(value) >= 2 and value[0] == '"':
        closing = value.rfind('"')
        value = value[1:closing] + value[closing + 1 :] if closing > 0 else value[1:]
    candidates = [value]
    candidates += [value[: -len(suffix)] for suffix in PROXY_SUFFIXES if value.endswith(suffix)]
    return tuple(candidates)


def query_text(name: str, query: Mapping[str, str] | None = None) -> str | None:
    """Return a query parameter (of the request's query, or the one given) as text, None when
    absent; REQ01 when it is not UTF-8.

    (bottle's getunicode would answer None for a value that does not decode, as if absent.)
    """
    raw = (bottle.request.query if query is None else query).get(name)
    if raw is None:
        return None
    try:
        return raw.encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise ApiError("REQ01", f"The {name} parameter must be UTF-8 text.") from None


def read_store_token() -> tuple[str, ...] | None:
    """Return the token a PUT or DELETE names by X-Sync-Token or If-Match, None if neither.

    A value that is not ASCII can match no token, so it stays as sent (KEY01 later); one with
    a control character is left out (PostgreSQL's text cannot even hold a NUL to compare).
    """
    sync_token, if_match = header("X-Sync-Token"), header("If-Match")
    if if_match is None:
        if sync_token is None:
            return None
        return () if CONTROL_CHARS.search(sync_token) else (sync_token,)
    if if_match.strip() == "*":
        raise ApiError("REQ01", "If-Match must name the stored token, not *.")
    # RFC 9110 allows a list of entity tags; any of them may name the token.
    tags = [tag for tag in if_match.split(",") if tag.strip()]
    candidates = tuple(dict.fromkeys(c for tag in tags for c in token_candidates(tag)))
    if sync_token is not None and sync_token not in candidates:
        raise ApiError("REQ01", "X-Sync-Token and If-Match name different tokens.")
    return tuple(candidate for candidate in candidates if not CONTROL_CHARS.search(candidate))


def matches_none(if_none_match: str, token: str) -> bool:
    """Whether an If-None-Match header names the token (or is *)."""
    tags = [tag for tag in if_none_match.split(",") if tag.strip()]
    return any(tag.strip() == "*" or token in token_candidates(tag) for tag in tags)


@dataclass(frozen=True, slots=True)
class ListingQuery:
    """The query of GET /store."""

    since: int | None = None
    wait: int = 0
    limit: int = 0
    prefix: str = ""
    after: str | None = None
    #: A listing's later pages: the cursor of its first page, which they carry on.
    cursor: int | None = None
    #: Whether the entries carry their values and meta (values=true).
    values: bool = False


def read_listing_query() -> ListingQuery:
    """Read the listing's or feed's parameters (since also from X-Sync-Cursor); REQ01 if bad."""
    query = bottle.request.query

    def number(name: str, low: int, high: int) -> int | None:
        text = query_text(name, query)
        if text is None:
            return None
        if not text.isascii() or not text.isdigit() or not low <= int(text) <= high:
            raise ApiError("REQ01", f"The {name} parameter must be a whole number {low} to {high}.")
        return int(text)

    def text(name: str) -> str | None:
        value = query_text(name, query)
        if value is not None and (len(value) > MAX_KEY_CHARS or CONTROL_CHARS.search(value)):
            raise ApiError("REQ01", f"The {name} parameter must be key text.")
        return value

    since, cursor = number("since", 0, 2**62), number("cursor", 0, 2**62)
    sent = header("X-Sync-Cursor")  # since, where a browser's poll URL should stay the same
    if sent is not None:
        if not (sent.isascii() and sent.isdigit() and int(sent) <= 2**62):
            message = f"The X-Sync-Cursor header must be a whole number 0 to {2**62}."
            raise ApiError("REQ01", message)
        if since is not None and since != int(sent):
            raise ApiError("REQ01", "The since parameter and the X-Sync-Cursor header differ.")
        since = int(sent)
    values = query_text("values", query)
    if values not in (None, "true", "false"):
        raise ApiError("REQ01", "The values parameter must be true or false.")
    after = text("after")
    if since is not None and (after is not None or cursor is not None):
        raise ApiError("REQ01", "The after parameter pages a listing; a feed pages by since.")
    return ListingQuery(
        since=since,
        wait=number("wait", 0, MAX_WAIT_SECONDS) or 0,
        limit=number("limit", 1, MAX_PAGE_ENTRIES) or 0,
        prefix=text("prefix") or "",
        after=after,
        cursor=cursor,
        values=values == "true",
    )


def resume_cursor(query: ListingQuery, listing: Listing) -> int:
    """Return the cursor to follow the feed from once this page is applied (X-Sync-Cursor).

    A listing's is its first page's X-Sync-Seq, carried on by its Link; a feed page's is the
    last change it holds, or on its last page the server's X-Sync-Seq.
    """
    if query.since is None:
        return listing.seq if query.cursor is None else query.cursor
    return listing.entries[-1].seq if listing.more else listing.seq


def base_url(ctx: Context) -> str:
    """Return this request's scheme, host and mount prefix, as the client reached it.

    Behind a trusted proxy, X-Forwarded-Proto and X-Forwarded-Host say what the client used.
    """
    environ = bottle.request.environ
    scheme = environ.get("wsgi.url_scheme", "http")
    host = (
        environ.get("HTTP_HOST")
        or f"{environ.get('SERVER_NAME', '')}:{environ.get('SERVER_PORT', '')}"
    )
    if ctx.from_trusted_proxy(environ):
        proto = (header("X-Forwarded-Proto") or "").split(",")[0].strip().lower()
        forwarded = (header("X-Forwarded-Host") or "").split(",")[0].strip()
        scheme = proto if proto in ("http", "https") else scheme
        host = forwarded or host
    if not HOST_NAME.fullmatch(host):
        host = environ.get("SERVER_NAME", "localhost")
    return f"{scheme}://{host}{mount_prefix()}"


def next_page_link(ctx: Context, query: ListingQuery, listing: Listing) -> str:
    """Return the Link header value, an absolute URL, pointing after the listing's last entry."""
    params = {"limit": str(query.limit)} if query.limit else {}
    if query.prefix:
        params["prefix"] = query.prefix
    if query.values:
        params["values"] = "true"
    if query.since is None:
        params["after"] = listing.entries[-1].key
        params["cursor"] = str(resume_cursor(query, listing))
    else:
        params["since"] = str(listing.entries[-1].seq)
    query_string = urllib.parse.urlencode(params, quote_via=urllib.parse.quote)
    return f'<{base_url(ctx)}/store?{query_string}>; rel="next"'


def read_batch(max_value_bytes: int) -> list[dict]:
    """Read the operations of POST /batch; REQ01 or SIZE01 with the index of a bad one."""
    body = read_json(limit=MAX_BATCH_BYTES)
    operations = body.get("operations") if isinstance(body, dict) else None
    if not isinstance(operations, list) or len(operations) > MAX_BATCH_OPERATIONS:
        raise ApiError(
            "REQ01",
            f'The body must be {{"operations": [...]}} with at most '
            f"{MAX_BATCH_OPERATIONS} operations.",
        )
    keys, parsed = set(), []
    for index, operation in enumerate(operations):
        try:
            parsed.append(read_operation(operation, max_value_bytes))
        except ApiError as error:
            raise error.at(index) from None
        if parsed[-1]["key"] in keys:
            raise ApiError("REQ01", "Each key may appear only once in a batch.", index=index)
        keys.add(parsed[-1]["key"])
    return parsed


def read_operation(operation: Any, max_value_bytes: int) -> dict:
    """Check one batch operation and decode its value and token."""
    if not isinstance(operation, dict) or operation.get("method") not in ("PUT", "DELETE"):
        raise ApiError("REQ01", "Each operation needs a method of PUT or DELETE.")
    key, token, meta = operation.get("key"), operation.get("token"), operation.get("meta")
    if not isinstance(key, str):
        raise ApiError("REQ01", "Each operation needs a string key.")
    check_key(key)
    if token is not None and not isinstance(token, str):
        raise ApiError("REQ01", "An operation's token must be a string or null.")
    result = {"method": operation["method"], "key": key, "token": token and (token,)}
    if operation["method"] == "DELETE":
        return result
    value = operation.get("value")
    if not isinstance(value, str):
        raise ApiError("REQ01", "A PUT operation needs its value as a base64 string.")
    if len(value) > (max_value_bytes + 2) // 3 * 4:
        raise ApiError("SIZE01", f"A value is larger than {max_value_bytes:,} bytes.")
    try:
        data = base64.b64decode(value, validate=True)
    except ValueError:
        raise ApiError("REQ01", "A PUT operation's value must be valid base64.") from None
    if len(data) > max_value_bytes:
        raise ApiError("SIZE01", f"A value is larger than {max_value_bytes:,} bytes.")
    if meta is not None:
        if not isinstance(meta, str) or not PRINTABLE_ASCII.fullmatch(meta):
            raise ApiError("REQ01", "An operation's meta must be printable ASCII or null.")
        if len(meta) > MAX_META_BYTES:
            raise ApiError(
                "SIZE01", f"An operation's meta is larger than {MAX_META_BYTES:,} bytes."
            )
    result["value"] = NewValue(data, len(data), meta)
    return result


def cors_headers(settings: Settings, allow: str) -> dict[str, str]:
    """Return the CORS headers for this request's Origin, if cors_origins admits it
    (an OPTIONS request is a preflight)."""
    origin = header("Origin")
    if not settings.cors_origins or origin is None:
        return {}
    preflight = bottle.request.method == "OPTIONS"
    allowed = [item.strip() for item in settings.cors_origins.split(",")]
    if "*" in allowed:
        headers = {"Access-Control-Allow-Origin": "*"}
    elif origin in allowed:
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    else:
        return {"Vary": "Origin"}  # the answer depends on the Origin, for caches
    if preflight:
        headers["Access-Control-Allow-Methods"] = allow
        headers["Access-Control-Allow-Headers"] = CORS_ALLOW_HEADERS
        headers["Access-Control-Max-Age"] = str(CORS_MAX_AGE_SECONDS)
    else:
        headers["Access-Control-Expose-Headers"] = CORS_EXPOSE_HEADERS
    return headers


def read_meta() -> str | None:
    """Return X-Sync-Meta; REQ01 unless printable ASCII, SIZE01 past MAX_META_BYTES."""
    meta = header("X-Sync-Meta")
    if meta is None:
        return None
    if not PRINTABLE_ASCII.fullmatch(meta):
        raise ApiError("REQ01", "X-Sync-Meta must be printable ASCII.")
    if len(meta) > MAX_META_BYTES:
        raise ApiError("SIZE01", f"X-Sync-Meta is larger than {MAX_META_BYTES:,} bytes.")
    return meta


def read_key(key: str) -> str:
    """Check a key taken from the path; REQ01 when it is not 1 to 1,024 characters of text."""
    environ = bottle.request.environ
    raw_path = environ.get("syncnode.raw_path", environ.get("bottle.raw_path", ""))
    try:
        raw_path.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError("REQ01", "The key must be UTF-8 text.") from None
    except UnicodeEncodeError:
        pass  # An outer application already decoded the path.
    return check_key(key)


def check_key(key: str) -> str:
    """Return the key; REQ01 unless it is 1 to 1,024 characters without control characters."""
    if not 1 <= len(key) <= MAX_KEY_CHARS or CONTROL_CHARS.search(key):
        raise ApiError(
            "REQ01",
            f"The key must be 1 to {MAX_KEY_CHARS:,} characters without control characters.",
        )
    return key


def bearer_token() -> str | None:
    """Return the Authorization: Bearer token, None without the header; AUTH01 when malformed."""
    value = header("Authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if (
        scheme.lower() != "bearer"
        or len(token) > MAX_BEARER_CHARS
        or not BEARER_TOKEN.fullmatch(token)
    ):
        raise ApiError("AUTH01", "The Authorization header must be 'Bearer' and a token.")
    return token


def store_headers(token: str) -> dict[str, str]:
    """Return the headers that name a stored version."""
    return {"X-Sync-Token": token, "ETag": f'"{token}"', "Cache-Control": VALUE_CACHE_CONTROL}


#: Each kind of counted attempt: the settings that hold its limit and its window.
THROTTLES = {
    "login_id": ("login_fails_per_id", "login_window"),
    "login_address": ("login_fails_per_address", "login_window"),
    "reset_id": ("resets_per_id", "reset_window"),
    "reset_address": ("resets_per_address", "reset_window"),
    "register_address": ("registrations_per_address", "registration_window"),
}

BROWSER_MARKS = (
    ("Edg/", "Edge"), ("OPR/", "Opera"), ("Firefox/", "Firefox"), ("Chrome/", "Chrome"),
    ("CriOS/", "Chrome"), ("Safari/", "Safari"),
)  # fmt: skip
SYSTEM_MARKS = (
    ("Windows", "Windows"), ("Android", "Android"), ("iPhone", "iOS"), ("iPad", "iOS"),
    ("CrOS", "Chrome OS"), ("Mac OS X", "macOS"), ("Linux", "Linux"),
)  # fmt: skip
APP_VERSION = re.compile(r"(?:immich-android/|immich-ios/|Immich_Android_|Immich_iOS_)(.+)")


def device_from_environ(environ: Mapping[str, Any]) -> Device:
    """Derive a session's device fields from the request (README, App API)."""
    agent = environ.get("HTTP_USER_AGENT", "")
    device_type = device_os = ""
    if agent.startswith("Mozilla/"):
        device_type = next((name for mark, name in BROWSER_MARKS if mark in agent), "")
        device_os = next((name for mark, name in SYSTEM_MARKS if mark in agent), "")
    device_type = device_type or environ.get("HTTP_DEVICEMODEL", "")
    device_os = device_os or environ.get("HTTP_DEVICETYPE", "")
    version = app_version_of(environ)
    return Device(  # control characters dropped: PostgreSQL's text cannot hold a NUL
        CONTROL_CHARS.sub("", device_type)[:MAX_DEVICE_CHARS],
        CONTROL_CHARS.sub("", device_os)[:MAX_DEVICE_CHARS],
        None if version is None else CONTROL_CHARS.sub("", version),
    )


def app_version_of(environ: Mapping[str, Any]) -> str | None:
    """Return the Immich app version a User-Agent names, or None."""
    version = APP_VERSION.fullmatch(environ.get("HTTP_USER_AGENT", ""))
    return version.group(1)[:MAX_DEVICE_CHARS] if version else None


def session_of(ctx: Context, token: str) -> Caller:
    """Find the caller behind a session token of this request (refreshing its device)."""
    environ = bottle.request.environ
    return find_session(
        ctx.connection(),
        token,
        ctx.now_ms(),
        app_version_of(environ),
        functools.partial(device_from_environ, environ),
    )


def count_attempts(ctx: Context, attempts: list[tuple[str, str]]) -> list[int]:
    """Count one attempt for each (kind, subject) whose limit is on; AUTH02 past a limit."""
    counted = []
    for kind, subject in attempts:
        limit, window = (getattr(ctx.settings, name) for name in THROTTLES[kind])
        if limit:
            counted.append((kind, subject, limit, window * 1000))
    try:
        return take_attempts(ctx.connection(), counted, ctx.now_ms())
    except ApiError:
        kinds = ", ".join(kind for kind, *_ in counted)
        log.warning("Refused a request: too many attempts of kind %s.", kinds)
        raise


def check_login(ctx: Context, name: str, password: str) -> int | None:
    """Check an id and password under the login limits; return the user's row id, or None.

    AUTH02 while a limit holds (even for the right password). The attempt is counted before
    the password is verified, so racing guesses never pass the limit, and uncounted when the
    password is right or was never verified (BUSY01). A hash with outdated parameters is
    replaced.
    """
    attempts = [("login_id", name), ("login_address", ctx.client_address(bottle.request.environ))]
    counted = count_attempts(ctx, attempts)
    conn = ctx.connection()
    try:
        user = find_user(conn, name)
        verified = ctx.hashing.verify(user[1] if user else None, password)
    except BaseException:
        release_attempts(conn, counted)
        raise
    if not verified or user is None:
        return None
    release_attempts(conn, counted)
    user_id, password_hash = user
    if ctx.hashing.hasher.check_needs_rehash(password_hash):
        update_password_hash(conn, user_id, ctx.hashing.hash(password))
    return user_id


def log_in(ctx: Context, name: str, password: str) -> int:
    """Return the row id of the user an id and password name; AUTH01 when they do not."""
    user_id = check_login(ctx, name, password)
    if user_id is None:
        raise ApiError(
            "AUTH01", "The user id or password is wrong.",
            app_message="Incorrect email or password",
        )  # fmt: skip
    return user_id


def register_user(ctx: Context, name: str, password: str, invite: str | None = None) -> int:
    """Create an account under the registration limit; return its row id.

    The attempt counts only if the account is made.
    """
    conn = ctx.connection()
    counted = count_attempts(
        ctx, [("register_address", ctx.client_address(bottle.request.environ))]
    )
    try:
        if find_user(conn, name) is not None:
            raise ApiError("ACCT03", "This user id is already in use.")
        ctx.require_disk()
        return create_user(conn, name, ctx.hashing.hash(password), ctx.now_ms(), invite=invite)
    except BaseException:
        release_attempts(conn, counted)
        raise


EMAIL_ADDRESS = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


def deliver_reset_token(settings: Settings, name: str, token: str) -> None:
    """Send a reset token by mail when SMTP is set and the id is an address, else log it.

    The mail goes out on a thread of its own, so the answer takes as long whether or not
    the id exists, and a slow or failing mail server never holds a request.
    """
    if not settings.smtp_host or not EMAIL_ADDRESS.fullmatch(name):
        # README, Accounts and sessions: without SMTP the log line is the delivery.
        log.warning("Password reset token for %s: %s", name, token)
        return
    threading.Thread(
        target=send_reset_mail, args=(settings, name, token), name="syncnode-mail", daemon=True
    ).start()


def send_reset_mail(settings: Settings, address: str, token: str) -> None:
    """Send one reset mail; log, never raise, when it fails."""
    message = email.message.EmailMessage()
    message["From"] = settings.smtp_from
    message["To"] = address
    message["Subject"] = "Your syncnode password reset"
    message.set_content(
        f"Someone asked to reset the password of the syncnode account {address}.\n\n"
        f"If it was you, send this reset token as a bearer token to POST /password within "
        f"{max(1, settings.reset_ttl // 60)} minutes:\n\n{token}\n\n"
        "If it was not you, ignore this mail: your password stays as it is.\n"
    )
    try:
        factory = smtplib.SMTP_SSL if settings.smtp_security == "tls" else smtplib.SMTP
        with factory(settings.smtp_host, settings.smtp_port, timeout=30) as smtp:
            if settings.smtp_security == "starttls":
                smtp.starttls(context=ssl.create_default_context())
            if settings.smtp_user:
                smtp.login(settings.smtp_user, settings.smtp_password)
            smtp.send_message(message)
        log.info("Sent a password reset mail to %s.", address)
    except (OSError, smtplib.SMTPException) as error:
        log.error("Could not send the password reset mail to %s: %s", address, type(error).__name__)


def after_answer(callback: Callable[[], None]) -> None:
    """Run callback once this request's answer is out (SyncNodeApp or the server does)."""
    bottle.request.environ[AFTER_ANSWER].append(callback)


def run_after_answer(callbacks: list[Callable[[], None]]) -> None:
    """Run the callbacks a request left for after its answer; log, never raise, a failure."""
    while callbacks:
        try:
            callbacks.pop(0)()
        except Exception:
            log.exception("A task after an answer failed.")


def issue_reset_token(ctx: Context, name: str) -> None:
    """Make and deliver a reset token if the id exists (after the answer of POST /resetpassword)."""
    conn = ctx.connection()
    user = find_user(conn, name)
    if user is not None:
        token = create_reset_token(conn, user[0], ctx.now_ms(), ctx.settings.reset_ttl * 1000)
        deliver_reset_token(ctx.settings, name, token)


def read_invite(ctx: Context, body: dict) -> str | None:
    """Return the live invite code of a sign-up body (None unless registration is invite).

    ACCT01 for a missing, wrong, used or expired code; the code is spent with the account.
    """
    if ctx.settings.registration != "invite":
        return None
    invite = body.get("invite")
    if not isinstance(invite, str) or not invite_is_live(ctx.connection(), invite, ctx.now_ms()):
        raise ApiError(
            "ACCT01", "Registration on this server needs a live invite code.",
            app_message=NEEDS_INVITE,
        )  # fmt: skip
    return invite


def start_session(ctx: Context, user_id: int) -> NewSession:
    """Start a session of the configured lifetime for the requesting device."""
    now_ms = ctx.now_ms()
    return create_session(
        ctx.connection(),
        user_id,
        now_ms,
        now_ms + ctx.settings.session_ttl * 1000,
        device_from_environ(bottle.request.environ),
    )


#: What an operation's row says of its caller, beside a permission an API key needs.
PUBLIC = None  # reads no credential
ANY_CREDENTIAL = ""  # any valid session or API key
SESSION_ONLY = "session"  # a session; an API key is PERM01
SYNC_API, APP_API = "sync", "app"


@dataclass(frozen=True, slots=True)
class Operation:
    """One row of an API's route table: an operation and who may call it."""

    method: str
    #: A bottle rule under the API's root.
    path: str
    operation_id: str
    #: PUBLIC, ANY_CREDENTIAL, SESSION_ONLY, or the permission an API key needs.
    permission: str | None
    #: handler(ctx, caller, **path_arguments) -> answer; caller is None when PUBLIC.
    handler: Callable[..., Any]
    #: What the document says: a summary, the request body (a schema or REQUESTS name), the
    #: answers (status: a schema or ANSWERS name), PARAMETERS names and error statuses.
    summary: str = ""
    request: str | None = None
    request_required: bool = True
    answers: Mapping[str, str] = field(default_factory=dict)
    parameters: tuple[str, ...] = ()
    errors: tuple[int, ...] = ()
    #: Who the document says may call, where the handler resolves the caller itself.
    security: str | None = None


def resolve_caller(ctx: Context, api: str, permission: str) -> Caller:
    """Find who calls, for either API: a session token decides alone, else an API key.

    The Sync Node API reads Authorization: Bearer and x-api-key; the App API also Immich's
    other places (README, App API) and refuses shared links first. An API key acts within
    its permissions.
    """
    if api == APP_API:
        query = bottle.request.query
        if header("x-immich-share-key") is not None or "key" in query:
            raise ApiError(
                "AUTH01", "Shared links are not served.", app_message="Invalid share key"
            )
        if header("x-immich-share-slug") is not None or "slug" in query:
            raise ApiError(
                "AUTH01", "Shared links are not served.", app_message="Invalid share slug"
            )
        token, secret = session_token_from_request(), header("x-api-key") or query.get("apiKey")
    else:
        token, secret = bearer_token(), header("x-api-key")
    if token is not None:
        return session_of(ctx, token)
    if secret is None:
        raise ApiError(
            "AUTH01", "This request needs an Authorization: Bearer token.",
            app_message="Authentication required",
        )  # fmt: skip
    caller = find_api_key(ctx.connection(), secret)
    if caller is None:
        raise ApiError(
            "AUTH01", "The API key is unknown or deleted.", app_message="Invalid API key"
        )
    if permission == SESSION_ONLY:
        raise ApiError("PERM01", "This operation needs a session token")
    if permission and not caller.allows(permission):
        missing = f"Missing required permission: {permission}"
        raise ApiError("PERM01", missing, app_message=missing)
    return caller


def session_answer(session: NewSession):
    """Answer a new session: its token and expiry."""
    return json_response({"token": session.token, "expiration": session.expires_ms})


# Accounts and sessions --------------------------------------------------------------------------


def sync_register(ctx: Context, caller: None):
    if ctx.settings.registration == "closed":
        raise ApiError("ACCT01", "Registration is disabled on this server.")
    name, password, body = read_credentials()
    invite = read_invite(ctx, body)  # before the id, so a stranger learns nothing of it
    return session_answer(start_session(ctx, register_user(ctx, name, password, invite=invite)))


def sync_list_sessions(ctx: Context, caller: Caller):
    conn, settings = ctx.connection(), ctx.settings
    keys, size = get_usage(conn, caller.user_id)
    usage = {"X-Sync-Usage-Keys": str(keys), "X-Sync-Usage-Bytes": str(size)}
    if settings.quota_keys:
        usage["X-Sync-Quota-Keys"] = str(settings.quota_keys)
    if settings.quota_bytes:
        usage["X-Sync-Quota-Bytes"] = str(settings.quota_bytes)
    sessions = [
        {"id": session.public_id, "expiration": session.expires_ms,
         "current": session.row_id == caller.session_id, "createdAt": session.created_ms}
        for session in list_sessions(conn, caller.user_id, ctx.now_ms())
    ]  # fmt: skip
    return json_response(sessions, headers=usage)


def sync_delete_account(ctx: Context, caller: Caller):
    delete_account(ctx.connection(), caller.user_id, ctx.now_ms())
    return empty_response()


def sync_log_in(ctx: Context, caller: None):
    name, password, _ = read_credentials()
    return session_answer(start_session(ctx, log_in(ctx, name, password)))


def sync_log_out(ctx: Context, caller: Caller):
    end_session(ctx.connection(), caller.session_id)
    return empty_response()


# Passwords and reset ----------------------------------------------------------------------------


def sync_set_password(ctx: Context, caller: None):
    # A session, or a reset token (README, Accounts and sessions): resolved here.
    token, conn = bearer_token(), ctx.connection()
    if token is None or find_reset_token(conn, token, ctx.now_ms()) is None:
        caller = resolve_caller(ctx, SYNC_API, SESSION_ONLY)
    body = read_json()
    if not isinstance(body, dict) or not isinstance(body.get("password"), str):
        raise ApiError("REQ01", "The body must be a JSON object with a string password.")
    check_password(body["password"])
    password_hash = ctx.hashing.hash(body["password"])
    if caller is None:
        reset_password(conn, token, password_hash, ctx.now_ms())
    else:
        set_password(conn, caller.user_id, password_hash, caller.session_id, ctx.now_ms())
    return empty_response()


def sync_request_password_reset(ctx: Context, caller: None):
    body = read_json()
    if not isinstance(body, dict) or not isinstance(body.get("id"), str):
        raise ApiError("REQ01", "The body must be a JSON object with a string id.")
    try:
        name = normalize_id(body["id"])
    except ApiError:
        return empty_response()  # No such id can exist; answer as for any unknown id.
    address = ctx.client_address(bottle.request.environ)
    count_attempts(ctx, [("reset_id", name), ("reset_address", address)])
    # Whether the id exists is decided after the answer, so its timing tells nothing.
    after_answer(functools.partial(issue_reset_token, ctx, name))
    return empty_response()


def sync_create_invite(ctx: Context, caller: Caller):
    conn = ctx.connection()
    if not caller_user(conn, caller.user_id).is_admin:
        raise ApiError("PERM01", "Only the admin (the oldest account) may mint invites.")
    code, expires_ms = create_invite(conn, ctx.now_ms(), ctx.settings.invite_ttl * 1000)
    return json_response({"invite": code, "expiration": expires_ms})


# Store ------------------------------------------------------------------------------------------


def sync_list_keys(ctx: Context, caller: Caller):
    query, conn, headers = read_listing_query(), ctx.connection(), {}
    if query.since is None:
        listing = list_keys(
            conn, caller.user_id, query.prefix, query.after, query.limit, query.values
        )
    else:

        def changes() -> Listing:
            if not credential_is_live(conn, caller, "store.read", ctx.now_ms()):
                raise ApiError("AUTH01", "The credential of this long-poll was revoked.")
            return list_changes(
                conn, caller.user_id, query.since, query.prefix, query.limit, query.values
            )

        environ = bottle.request.environ
        gone = environ.get("waitress.client_disconnected", lambda: False)
        listing, declined = ctx.waiters.long_poll(
            caller.user_id, query.since, changes, query.wait, gone, environ.get(PARKING)
        )
        if declined:  # so that a client backs off instead of polling again at once
            headers = {"Retry-After": "1", "X-Sync-Wait-Declined": declined}
    headers = {
        "X-Sync-Seq": str(listing.seq),
        "X-Sync-Cursor": str(resume_cursor(query, listing)),
        **headers,
    }
    if listing.more:
        headers["Link"] = next_page_link(ctx, query, listing)
    if query.since is None and not listing.values:
        body = plain_listing_json(listing.entries)
        return answer(body, 200, {"Content-Type": "application/json", **headers})
    entries = [item_json(item, listing.values) for item in listing.entries]
    return json_response(entries, headers=headers)


def plain_listing_json(entries: list[Item]) -> bytes:
    """Write a listing without values as JSON text, each entry as item_json shapes it.

    A listing answers an object per key: written directly, it costs a third of building
    dicts for json.dumps (bench/run, list). The strings are quoted as json.dumps does.
    """
    quote = json.encoder.encode_basestring  # json.dumps' quoting with ensure_ascii=False
    names = LEVEL_NAMES
    text = ",".join(
        f'{{"key":{quote(item.key)},"permission":"{names[item.level]}",'
        f'"token":{quote(item.token)}}}'
        for item in entries
    )
    return f"[{text}]".encode()


def item_json(item: Item, values: bool) -> dict:
    """Shape an entry of a listing or a feed (with seq), a deleted key as a tombstone.

    With values, a live entry carries its value in base64 and its meta, or "large": true
    for a value over INLINE_VALUE_BYTES, to be read with a GET.
    """
    if not item.level:
        return {"key": item.key, "deleted": True, "seq": item.seq}
    entry = {"key": item.key, "permission": LEVEL_NAMES[item.level], "token": item.token}
    if item.seq is not None:
        entry["seq"] = item.seq
    if values:
        if item.value is None:
            entry["large"] = True
        else:
            entry["value"] = base64.b64encode(item.value).decode()
        entry["meta"] = item.meta
    return entry


def sync_get_value(ctx: Context, caller: Caller, key: str):
    key = read_key(key)
    stored = get_value(ctx.connection(), key, caller.user_id)
    if_none_match = header("If-None-Match")
    if if_none_match is not None and matches_none(if_none_match, stored.token):
        return bottle.HTTPResponse(b"", 304, store_headers(stored.token))
    if stored.body is None:  # a large value: read from a snapshot of its own
        stored = stream_value(ctx.db.open(), key, caller.user_id)
    headers = {"Content-Type": "application/octet-stream", **store_headers(stored.token)}
    if isinstance(stored.body, BlobReader):
        headers["Content-Length"] = str(stored.size)  # bottle counts bytes itself
    if stored.meta is not None:
        headers["X-Sync-Meta"] = stored.meta
    return answer(stored.body, 200, headers)


def sync_put_value(ctx: Context, caller: Caller, key: str):
    key, sent_token = read_key(key), read_store_token()
    create_only = (header("If-None-Match") or "").strip() == "*"
    value = read_value(ctx.settings.max_value_bytes)
    try:
        token = put_value(
            ctx.connection(), key, caller.user_id, value, sent_token, ctx.now_ms(), ctx.quota(),
            create_only,
        )  # fmt: skip
    finally:
        if not isinstance(value.body, bytes):
            value.body.close()
    return empty_response(store_headers(token))


def sync_delete_value(ctx: Context, caller: Caller, key: str):
    key, sent_token = read_key(key), read_store_token()
    delete_value(ctx.connection(), key, caller.user_id, sent_token, ctx.now_ms())
    return empty_response()


def sync_apply_batch(ctx: Context, caller: Caller):
    operations = read_batch(ctx.settings.max_value_bytes)
    for index, operation in enumerate(operations):
        if operation["method"] == "DELETE" and not caller.allows("store.own"):
            raise ApiError("PERM01", "Missing required permission: store.own", index=index)
    conn = ctx.connection()
    results = apply_batch(conn, caller.user_id, operations, ctx.now_ms(), ctx.quota())
    return json_response({"results": results})


# Permissions ------------------------------------------------------------------------------------


def sync_get_permissions(ctx: Context, caller: Caller, key: str):
    return json_response(get_permissions(ctx.connection(), read_key(key), caller.user_id))


def sync_set_permissions(ctx: Context, caller: Caller, key: str):
    key, grants = read_key(key), read_grants()
    set_permissions(ctx.connection(), key, caller.user_id, grants, ctx.quota())
    return empty_response()


def sync_remove_permissions(ctx: Context, caller: Caller, key: str):
    key = read_key(key)
    users = query_text("users")
    if users is None:
        raise ApiError("REQ01", "The users query parameter is required.")
    names = set()
    for raw in users.split(","):
        with contextlib.suppress(ApiError):  # Ids that cannot exist are ignored.
            names.add(normalize_id(raw))
    remove_permissions(ctx.connection(), key, caller.user_id, names, ctx.now_ms())
    return empty_response()


# Health and discovery ---------------------------------------------------------------------------


def sync_get_health(ctx: Context, caller: None):
    database, disk = ctx.db.writable(), ctx.disk_ok()
    return json_response({"database": database, "disk": disk}, 200 if database and disk else 500)


def sync_get_openapi_document(ctx: Context, caller: None):
    return bottle.HTTPResponse(
        ctx.document(mount_prefix()), 200, {"Content-Type": "application/json"}
    )


def sync_get_immich_discovery(ctx: Context, caller: None):
    return json_response({"api": {"endpoint": mount_prefix() + "/api"}})


def sync_get_front_page(ctx: Context, caller: None):
    if "text/html" not in (header("Accept") or ""):
        return sync_unknown_path(ctx, caller)  # API clients keep the JSON answer
    page = FRONT_PAGE.format(version=__version__, prefix=html.escape(mount_prefix()))
    return answer(page.encode(), 200, {"Content-Type": "text/html; charset=utf-8"})


def sync_unknown_path(ctx: Context, caller: None, path: str = ""):
    raise ApiError("ERR01", "There is nothing at this path.")


def sync_other_method(ctx: Context, caller: None, allow: str, **path: str):
    """Answer a preflight (OPTIONS) or REQ02 for a method that the path does not take."""
    if bottle.request.method == "OPTIONS":
        return empty_response({"Allow": allow})
    raise ApiError("REQ02", f"This path takes only {allow}.", headers={"Allow": allow})


#: What GET / shows a browser.
FRONT_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>syncnode</title></head>
<body><h1>syncnode {version} is running</h1>
<p>This is a sync server for local-first apps; there is nothing to see here in a browser.</p>
<ul><li>Its API is described by <a href="{prefix}/openapi.json">{prefix}/openapi.json</a>.</li>
<li>Immich-compatible accounts, sessions and API keys are under <code>{prefix}/api</code>.</li>
<li><a href="{prefix}/health">{prefix}/health</a> tells whether it can store data.</li></ul>
</body></html>
"""

KEY_PATH = "<key:re:[\\s\\S]*>"
#: Error statuses of the operations: a request with a body, one that writes, one on a key.
BODY_ERRORS = (400, 413)
KEY_ERRORS = (400, 401, 403, 404)

#: The Sync Node API, one row per operation: method, path, operation id, what an API key
#: needs (PUBLIC: no credential), the handler, and what the document says of it.
SYNC_OPERATIONS = (
    Operation("GET", "/account", "listSessions", "session.read", sync_list_sessions,
              "List the caller's live sessions (usage and quotas in the headers)",
              answers={"200": "SessionList"}, errors=(401, 403)),
    Operation("POST", "/account", "register", PUBLIC, sync_register,
              "Create an account and its first session", request="Credentials",
              answers={"200": "Session"}, errors=(*BODY_ERRORS, 403, 409, 429, 503, 507)),
    Operation("DELETE", "/account", "deleteAccount", SESSION_ONLY, sync_delete_account,
              "Delete the account, its sessions and the keys only it owns",
              answers={"204": "Empty"}, errors=(401, 403)),
    Operation("POST", "/auth", "logIn", PUBLIC, sync_log_in,
              "Log in: start a session", request="Credentials",
              answers={"200": "Session"}, errors=(*BODY_ERRORS, 401, 429, 503)),
    Operation("DELETE", "/auth", "logOut", SESSION_ONLY, sync_log_out,
              "Log out: end this session", answers={"204": "Empty"}, errors=(401, 403)),
    Operation("POST", "/password", "setPassword", PUBLIC, sync_set_password,
              "Set the password with a session or a reset token (as the bearer token)",
              request="UpdatePasswordRequest", answers={"204": "Empty"},
              errors=(*BODY_ERRORS, 401, 403, 503, 507), security=SESSION_ONLY),
    Operation("POST", "/resetpassword", "requestPasswordReset", PUBLIC,
              sync_request_password_reset, "Ask for a password reset token",
              request="ResetPasswordTokenRequest", answers={"204": "Empty"},
              errors=(*BODY_ERRORS, 429)),
    Operation("POST", "/invite", "createInvite", SESSION_ONLY, sync_create_invite,
              "Mint an invite code (the admin)", answers={"200": "Invite"},
              errors=(401, 403, 507)),
    Operation("GET", "/store", "listKeys", "store.read", sync_list_keys,
              "List the keys the caller holds, or with since what changed after a cursor",
              parameters=("since", "wait", "limit", "prefix", "after", "cursor", "values",
                          "X-Sync-Cursor"),
              answers={"200": "Listing"}, errors=(400, 401, 403, 410)),
    Operation("POST", "/batch", "applyBatch", "store.write", sync_apply_batch,
              "Apply PUTs and DELETEs all or nothing", request="BatchRequest",
              answers={"200": "BatchResponse"}, errors=(*KEY_ERRORS, 409, 413, 507)),
    Operation("GET", "/store/" + KEY_PATH, "getValue", "store.read", sync_get_value,
              "Read a value", parameters=("If-None-Match",),
              answers={"200": "Value", "304": "NotModified"}, errors=KEY_ERRORS),
    Operation("PUT", "/store/" + KEY_PATH, "putValue", "store.write", sync_put_value,
              "Create a value, or replace it by compare-and-swap on its token",
              parameters=("X-Sync-Token", "If-Match", "X-Sync-Meta", "If-None-Match: *"),
              request="Value", answers={"204": "Stored"},
              errors=(400, 401, 403, 409, 413, 507)),
    Operation("DELETE", "/store/" + KEY_PATH, "deleteValue", "store.own", sync_delete_value,
              "Delete a value (OWN and its token)", parameters=("X-Sync-Token", "If-Match"),
              answers={"204": "Empty"}, errors=(*KEY_ERRORS, 409)),
    Operation("GET", "/permission/" + KEY_PATH, "getPermissions", "store.read",
              sync_get_permissions, "List a key's holders",
              answers={"200": "UserPermissions"}, errors=KEY_ERRORS),
    Operation("PUT", "/permission/" + KEY_PATH, "setPermissions", "store.own",
              sync_set_permissions, "Grant or change permissions, all or nothing",
              request="UserPermissions", answers={"204": "Empty"},
              errors=(*KEY_ERRORS, 409, 413, 507)),
    Operation("DELETE", "/permission/" + KEY_PATH, "removePermissions", "store.own",
              sync_remove_permissions, "Remove users' permissions", parameters=("users",),
              answers={"204": "Empty"}, errors=(*KEY_ERRORS, 409)),
    Operation("GET", "/health", "getHealth", PUBLIC, sync_get_health,
              "Whether the database and the disk can take a write",
              answers={"200": "Health", "500": "Unhealthy"}),
    Operation("GET", "/.well-known/immich", "getImmichDiscovery", PUBLIC,
              sync_get_immich_discovery, "Where the App API is", answers={"200": "Discovery"}),
    Operation("GET", "/openapi.json", "getOpenApiDocument", PUBLIC, sync_get_openapi_document,
              "This document", answers={"200": "Document"}),
)  # fmt: skip


def mount_prefix() -> str:
    """Return the path the app is mounted under, without a trailing slash ('' at the root)."""
    return bottle.request.environ.get("SCRIPT_NAME", "").rstrip("/") + merged_prefix()


def merged_prefix() -> str:
    """Return the prefix bottle's mount("/prefix/", app) copied this app's routes under, or ''.

    That form of mounting puts the routes into the parent app instead of calling this one,
    so SCRIPT_NAME does not show the prefix; the app's config does.
    """
    route = bottle.request.environ.get("bottle.route")
    return route.app.config.get("_mount.prefix", "").rstrip("/") if route else ""


def read_grants() -> dict[str, int]:
    """Read the body of PUT /permission: a list of {"user", "permission"}; REQ01 otherwise."""
    body = read_json()
    if not isinstance(body, list):
        raise ApiError("REQ01", "The body must be a JSON array of {user, permission} objects.")
    grants: dict[str, int] = {}
    for entry in body:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("user"), str)
            and isinstance(entry.get("permission"), str)
            and entry["permission"] in LEVELS
        ):
            raise ApiError(
                "REQ01", "Each entry needs a string user and a permission of READ, WRITE or OWN."
            )
        try:
            name = normalize_id(entry["user"])
        except ApiError:
            raise ApiError("ERR01", "A user in the list does not exist.") from None
        if name in grants:
            raise ApiError("REQ01", "Each user may appear only once in the list.")
        grants[name] = LEVELS[entry["permission"]]
    return grants


def classify_error(ctx: Context, error: Exception) -> ApiError:
    """Return the ApiError that any exception a route raised answers as, for either API.

    DISK01 for a database that cannot be written (a connection that met a read-only file is
    replaced, so writes work again once the file does); ERR02, logged with its traceback,
    for anything unexpected.
    """
    if isinstance(error, ApiError):
        return error
    if isinstance(error, (sqlite3.OperationalError, *ctx.db.errors())) and cannot_write(error):
        log.error("The database could not be written: %s", error_name(error))
        ctx.db.discard()
        return out_of_space()
    log.error("Unexpected error in %s", bottle.request.method, exc_info=error)
    return ApiError("ERR02", "The server encountered an unexpected error.")


# ==================================================================================================
# App API
# ==================================================================================================

#: README, Errors under /api: the reason phrase of each status the App API answers with.
REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    410: "Gone",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
    507: "Insufficient Storage",
}
#: How each code reads on the App API: Immich's status and usual sentence (an error's own
#: app_message wins; ERR02 says "Failed to ..." the operation).
APP_ERRORS = {
    "AUTH01": (401, "Invalid user token"),
    "AUTH02": (429, "Too many failed attempts, try again later"),
    "ACCT01": (403, "Registration is disabled on this server"),
    "ACCT02": (400, "Bad Request"),
    "ACCT03": (400, "Email already in use by another account"),
    "ERR01": (404, "Not Found"),
    "ERR02": (500, None),
    "KEY01": (409, "Conflict"),
    "PERM01": (403, "Forbidden"),
    "PERM02": (409, "Conflict"),
    "REQ01": (400, "Bad Request"),
    "REQ02": (405, "Method Not Allowed"),
    "SIZE01": (413, "Request body too large"),
    "DISK01": (507, "Insufficient storage"),
    "QUOTA01": (507, "Insufficient storage"),
    "BUSY01": (503, "Server busy, try again later"),
    "SYNC01": (410, "Gone"),
}
MAX_APP_BODY_BYTES = 64 * 1024
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", re.I)
COOKIE_NAMES = ("immich_access_token", "immich_auth_type", "immich_is_authenticated")


def immich_json(data: Any, status: int = 200):
    """Return an App API JSON answer."""
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
    return bottle.HTTPResponse(body, status, {"Content-Type": "application/json; charset=utf-8"})


def immich_error(error: ApiError, correlation_id: str, failure: str):
    """Return Immich's error body for an ApiError, in the code's App API status (APP_ERRORS).

    failure is the operation's "Failed to ..." sentence, for unexpected errors. Of the
    headers only Retry-After crosses over: Immich answers no WWW-Authenticate.
    """
    status, message = APP_ERRORS[error.code]
    response = immich_json(
        immich_error_body(status, error.app_message or message or failure, correlation_id),
        status,
    )
    if "Retry-After" in error.headers:
        response.set_header("Retry-After", error.headers["Retry-After"])
    return response


def immich_error_body(status: int, message: str | list[str], correlation_id: str) -> dict:
    """Return Immich's error layout."""
    return {
        "message": message,
        "error": REASONS[status],
        "statusCode": status,
        "correlationId": correlation_id,
    }


def is_app_path(path: str) -> bool:
    """Whether a path (under the app's root) belongs to the App API."""
    return path == "/api" or path.startswith("/api/")


def correlation_id() -> str:
    """Return the request's x-immich-cid if 1 to 64 printable ASCII characters, else a new id."""
    sent = header("x-immich-cid")
    if sent and len(sent) <= 64 and PRINTABLE_ASCII.fullmatch(sent):
        return sent
    return secrets.token_hex(4)


def read_app_body() -> dict:
    """Read a JSON object body; a body without Content-Type: application/json counts as empty."""
    content_type = bottle.request.environ.get("CONTENT_TYPE", "")
    if content_type.partition(";")[0].strip().lower() != "application/json":
        return {}
    malformed = ApiError(
        "REQ01", "The body must be a JSON object.", app_message="Malformed JSON body"
    )
    try:
        raw = read_body(MAX_APP_BODY_BYTES)
    except ApiError as error:
        raise (error if error.code == "SIZE01" else malformed) from None
    try:
        body = parse_json(raw)
    except (ValueError, UnicodeDecodeError):
        raise malformed from None
    if not isinstance(body, dict):
        raise malformed
    return body


def check_path_id(value: str) -> str:
    """Return a path id in lower case; 400 unless it is a version 4 UUID."""
    if not UUID4.fullmatch(value):
        raise ApiError("REQ01", "The id must be a UUID.", app_message=["id must be a UUID"])
    return value.lower()


class BodyChecks:
    """Check a request body field by field, collecting class-validator sentences in order."""

    def __init__(self, body: dict) -> None:
        self.body = body
        self.messages: list[str] = []

    def done(self) -> None:
        """Raise 400 with every broken rule, if any."""
        if self.messages:
            raise ApiError("REQ01", "The body breaks the rules.", app_message=self.messages)

    def email(self, field: str, required: bool) -> str | None:
        """An id in the email field: IsNotEmpty (when required), then the Sync Node id rules."""
        value = self.body.get(field)
        if value is None and not required:
            return None
        if required and value in (None, ""):
            self.messages.append(f"{field} should not be empty")
        try:
            if isinstance(value, str):
                return normalize_id(value)
        except ApiError:
            pass
        self.messages.append(f"{field} must be an email")
        return None

    def text(
        self,
        field: str,
        required: bool,
        min_chars: int = 1,
        max_chars: int = 0,
        not_empty: bool = True,
    ):
        """A string: IsNotEmpty, IsString, then the length rules; None when absent or broken."""
        value = self.body.get(field)
        if value is None and not required:
            return None
        before = len(self.messages)
        if not_empty and value in (None, ""):
            self.messages.append(f"{field} should not be empty")
        if not isinstance(value, str):
            self.messages.append(f"{field} must be a string")
        elif value and len(value) < min_chars:
            self.messages.append(f"{field} must be longer than or equal to {min_chars} characters")
        elif max_chars and len(value) > max_chars:
            self.messages.append(f"{field} must be shorter than or equal to {max_chars} characters")
        return value if len(self.messages) == before else None

    def device(self, field: str) -> str | None:
        """A device field: up to 255 characters, empty allowed, no control characters."""
        value = self.text(field, False, 0, MAX_NAME_CHARS, not_empty=False)
        if value is not None and CONTROL_CHARS.search(value):
            self.messages.append(f"{field} must not contain control characters")
            return None
        return value

    def name(self, field: str, required: bool) -> str | None:
        """A display name: 1 to 255 characters without control characters."""
        value = self.text(field, required, max_chars=MAX_NAME_CHARS)
        if value is not None and CONTROL_CHARS.search(value):
            self.messages.append(f"{field} must not contain control characters")
            return None
        return value

    def new_password(self, field: str) -> str | None:
        """A new password: MinLength(8) first, as Immich's ChangePasswordDto reports it."""
        value = self.body.get(field)
        if not isinstance(value, str) or len(value) < MIN_PASSWORD_CHARS:
            self.messages.append(
                f"{field} must be longer than or equal to {MIN_PASSWORD_CHARS} characters"
            )
        return self.text(field, True, max_chars=MAX_PASSWORD_CHARS)

    def boolean(self, field: str) -> None:
        """An optional boolean."""
        if self.body.get(field) is not None and not isinstance(self.body[field], bool):
            self.messages.append(f"{field} must be a boolean value")

    def permissions(self, field: str, required: bool) -> list[str] | None:
        """A list of API key permissions: ArrayMinSize(1), IsNotEmpty, IsEnum(each)."""
        value = self.body.get(field)
        if value is None and not required:
            return None
        before = len(self.messages)
        if not isinstance(value, list) or not value:
            self.messages.append(f"{field} must contain at least 1 elements")
        if required and value in (None, ""):
            self.messages.append(f"{field} should not be empty")
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(item, str) and item in API_KEY_PERMISSIONS for item in items):
            self.messages.append(
                f"each value in {field} must be one of the following values: "
                + ", ".join(API_KEY_PERMISSIONS)
            )
        return list(dict.fromkeys(value)) if len(self.messages) == before else None

    def duration(self, field: str) -> int | None:
        """An optional whole number of seconds, at least 1."""
        value = self.body.get(field)
        if value is None:
            return None
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or value <= 0:
            self.messages.append(f"{field} must be a positive number")
        if not number or not float(value).is_integer():
            self.messages.append(f"{field} must be an integer number")
            return None
        return int(value) if value > 0 else None


def session_token_from_request() -> str | None:
    """Return the session token of an App API request, first found in Immich's order."""
    request = bottle.request
    for value in (
        header("x-immich-user-token"),
        header("x-immich-session-token"),
        request.query.get("sessionKey"),
    ):
        if value is not None:
            return value
    scheme, _, token = (header("Authorization") or "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.get_cookie("immich_access_token")


def cookie_headers(values: dict[str, str], max_age: int | None, now: float = 0) -> list[str]:
    """Return Set-Cookie values for the login cookies, or their clearing when max_age is None."""
    path = mount_prefix() or "/"
    if max_age is None:
        return [f"{name}=; Path={path}; Expires=Thu, 01 Jan 1970 00:00:00 GMT" for name in values]
    expires = email.utils.formatdate(now + max_age, usegmt=True)
    secure = "; Secure" if bottle.request.environ.get("wsgi.url_scheme") == "https" else ""
    return [
        f"{name}={value}; Max-Age={max_age}; Path={path}; Expires={expires}"
        + ("; HttpOnly" if name != "immich_is_authenticated" else "")
        + f"; SameSite=Lax{secure}"
        for name, value in values.items()
    ]


def user_dto(user: User, admin: bool = False) -> dict:
    """Shape a user as UserResponseDto, or UserAdminResponseDto with admin=True."""
    answer = {"id": user.public_id, "name": user.display_name, "email": user.name}
    if admin:
        answer |= {
            "shouldChangePassword": False,
            "isAdmin": user.is_admin,
            "createdAt": iso_time(user.created_ms),
            "deletedAt": None,
            "updatedAt": iso_time(user.updated_ms),
            "status": "active",
        }
    return answer


def admin_dto(conn: Connection, user_id: int) -> dict:
    """Return a user as UserAdminResponseDto; AUTH01 if the account went meanwhile."""
    return user_dto(caller_user(conn, user_id), admin=True)


def caller_user(conn: Connection, user_id: int) -> User:
    """Return the caller's account; AUTH01 if it was deleted since the credential was read."""
    user = get_user(conn, row_id=user_id)
    if user is None:
        raise ApiError("AUTH01", "The account was deleted.")
    return user


def api_key_dto(key: ApiKey) -> dict:
    """Shape an API key as APIKeyResponseDto."""
    return {
        "id": key.public_id,
        "name": key.name,
        "createdAt": iso_time(key.created_ms),
        "updatedAt": iso_time(key.updated_ms),
        "permissions": list(key.permissions),
    }


def session_dto(session: Session, current_id: int | None) -> dict:
    """Shape a session as SessionResponseDto."""
    return {
        "id": session.public_id,
        "createdAt": iso_time(session.created_ms),
        "updatedAt": iso_time(session.updated_ms),
        "expiresAt": iso_time(session.expires_ms),
        "current": session.row_id == current_id,
        "deviceType": session.device.device_type,
        "deviceOS": session.device.device_os,
        "appVersion": session.device.app_version,
        "isPendingSyncReset": False,
    }


def check_grant(caller: Caller, permissions: list[str] | None) -> None:
    """Refuse an API key that would grant permissions its creator's credential lacks."""
    if permissions and not all(caller.allows(permission) for permission in permissions):
        raise ApiError(
            "REQ01", "An API key cannot get permissions its creator lacks.",
            app_message="Cannot grant permissions you do not have",
        )  # fmt: skip


# Authentication ---------------------------------------------------------------------------------


def app_login(ctx: Context, caller: None):
    checks = BodyChecks(read_app_body())
    name, password = checks.email("email", True), checks.text("password", True)
    checks.done()
    user_id = log_in(ctx, name, password)
    session = start_session(ctx, user_id)
    user = admin_dto(ctx.connection(), user_id)
    response = immich_json(
        {
            "accessToken": session.token,
            "userId": user["id"],
            "userEmail": user["email"],
            "name": user["name"],
            "isAdmin": user["isAdmin"],
            "shouldChangePassword": False,
        },
        201,
    )
    cookies = dict(zip(COOKIE_NAMES, (session.token, "password", "true"), strict=True))
    for value in cookie_headers(cookies, ctx.settings.session_ttl, ctx.clock()):
        response.add_header("Set-Cookie", value)
    return response


def app_sign_up_admin(ctx: Context, caller: None):
    body = read_app_body()
    checks = BodyChecks(body)
    display_name = checks.name("name", True)
    name = checks.email("email", True)
    password = checks.text(
        "password", True, min_chars=MIN_PASSWORD_CHARS, max_chars=MAX_PASSWORD_CHARS
    )
    checks.done()
    if ctx.settings.registration == "closed":
        raise ApiError("ACCT01", "Registration is disabled on this server.")
    invite = read_invite(ctx, body)
    conn = ctx.connection()
    if has_users(conn):
        raise ApiError("ACCT03", "The server already has an admin.", app_message=HAS_ADMIN)
    ctx.require_disk()
    user_id = create_user(
        conn, name, ctx.hashing.hash(password), ctx.now_ms(), first=True,
        display_name=display_name, invite=invite,
    )  # fmt: skip
    return immich_json(admin_dto(conn, user_id), 201)


def app_validate_access_token(ctx: Context, caller: Caller):
    return immich_json({"authStatus": True})


def app_change_password(ctx: Context, caller: Caller):
    checks = BodyChecks(read_app_body())
    password = checks.text("password", True)
    new_password = checks.new_password("newPassword")
    checks.boolean("invalidateSessions")
    checks.done()
    conn = ctx.connection()
    user = get_user(conn, row_id=caller.user_id)
    if user is None or check_login(ctx, user.name, password) is None:
        raise ApiError("REQ01", "The current password is wrong.", app_message="Wrong password")
    password_hash = ctx.hashing.hash(new_password)
    set_password(conn, caller.user_id, password_hash, caller.session_id, ctx.now_ms())
    return immich_json(admin_dto(conn, caller.user_id))


def app_logout(ctx: Context, caller: Caller):
    if caller.session_id is not None:
        end_session(ctx.connection(), caller.session_id)
    response = immich_json({"successful": True, "redirectUri": "/auth/login?autoLaunch=0"})
    for value in cookie_headers(dict.fromkeys(COOKIE_NAMES, ""), None):
        response.add_header("Set-Cookie", value)
    return response


# API keys ---------------------------------------------------------------------------------------


def app_create_api_key(ctx: Context, caller: Caller):
    checks = BodyChecks(read_app_body())
    name = checks.name("name", False)
    permissions = checks.permissions("permissions", True)
    checks.done()
    check_grant(caller, permissions)
    ctx.require_disk()
    secret, key = create_api_key(
        ctx.connection(), caller.user_id, name or "API Key", permissions, ctx.now_ms()
    )
    return immich_json({"secret": secret, "apiKey": api_key_dto(key)}, 201)


def app_get_api_keys(ctx: Context, caller: Caller):
    return immich_json(
        [api_key_dto(key) for key in list_api_keys(ctx.connection(), caller.user_id)]
    )


def app_get_my_api_key(ctx: Context, caller: Caller):
    if caller.api_key_id is None:
        raise ApiError(
            "PERM01", "This operation needs an API key.",
            app_message="Not authenticated with an API Key",
        )  # fmt: skip
    key = get_api_key(ctx.connection(), caller.user_id, row_id=caller.api_key_id)
    if key is None:
        raise ApiError("AUTH01", "The API key was deleted.", app_message="Invalid API key")
    return immich_json(api_key_dto(key))


def app_get_api_key(ctx: Context, caller: Caller, key_id: str):
    key = get_api_key(ctx.connection(), caller.user_id, public_id=check_path_id(key_id))
    if key is None:
        raise api_key_not_found()
    return immich_json(api_key_dto(key))


def app_update_api_key(ctx: Context, caller: Caller, key_id: str):
    key_id = check_path_id(key_id)
    checks = BodyChecks(read_app_body())
    name = checks.name("name", False)
    permissions = checks.permissions("permissions", False)
    checks.done()
    check_grant(caller, permissions)
    key = update_api_key(ctx.connection(), caller.user_id, key_id, name, permissions, ctx.now_ms())
    if key is None:
        raise api_key_not_found()
    return immich_json(api_key_dto(key))


def app_delete_api_key(ctx: Context, caller: Caller, key_id: str):
    if not delete_api_key(ctx.connection(), caller.user_id, check_path_id(key_id)):
        raise api_key_not_found()
    return empty_response()


def api_key_not_found() -> ApiError:
    """Immich's answer for an API key id the caller has none of (400, not 404)."""
    return ApiError("REQ01", "There is no such API key.", app_message="API Key not found")


# Server -----------------------------------------------------------------------------------------


def app_ping_server(ctx: Context, caller: None):
    return immich_json({"res": "pong"})


def app_get_server_version(ctx: Context, caller: None):
    major, minor, patch = map(int, re.match(r"(\d+)\.(\d+)\.(\d+)", __version__).groups())
    return immich_json({"major": major, "minor": minor, "patch": patch})


def app_get_about_info(ctx: Context, caller: Caller):
    return immich_json({"version": f"v{__version__}", "versionUrl": ""})


def app_get_server_features(ctx: Context, caller: None):
    return immich_json({"passwordLogin": True})


def app_get_server_config(ctx: Context, caller: None):
    initialized = has_users(ctx.connection())
    return immich_json({"loginPageMessage": "", "userDeleteDelay": 0, "isInitialized": initialized})


# Sessions ---------------------------------------------------------------------------------------


def app_create_session(ctx: Context, caller: Caller):
    checks = BodyChecks(read_app_body())
    duration = checks.duration("duration")
    device_type, device_os = checks.device("deviceType"), checks.device("deviceOS")
    checks.done()
    if caller.session_id is None:
        raise ApiError(
            "REQ01", "This operation needs a session token.",
            app_message="This endpoint can only be used with a session token",
        )  # fmt: skip
    conn, now_ms = ctx.connection(), ctx.now_ms()
    expires_ms = find_session_expiry(conn, caller.session_id)
    if duration is not None:
        expires_ms = min(expires_ms, now_ms + duration * 1000)
    device = Device(device_type or "", device_os or "", None)
    session = create_session(
        conn, caller.user_id, now_ms, expires_ms, device, parent_id=caller.session_id
    )
    made = Session(session.row_id, session.public_id, now_ms, now_ms, expires_ms, device)
    return immich_json({**session_dto(made, None), "token": session.token}, 201)


def app_get_sessions(ctx: Context, caller: Caller):
    sessions = list_sessions(ctx.connection(), caller.user_id, ctx.now_ms(), by_use=True)
    return immich_json([session_dto(session, caller.session_id) for session in sessions])


def app_delete_all_sessions(ctx: Context, caller: Caller):
    end_other_sessions(ctx.connection(), caller.user_id, caller.session_id)
    return empty_response()


def app_delete_session(ctx: Context, caller: Caller, session_id: str):
    if not end_user_session(ctx.connection(), caller.user_id, check_path_id(session_id)):
        raise ApiError(
            "REQ01", "There is no such session.",
            app_message="Not found or no authDevice.delete access",
        )  # fmt: skip
    return empty_response()


# Users ------------------------------------------------------------------------------------------


def app_search_users(ctx: Context, caller: Caller):
    conn = ctx.connection()
    everyone = ctx.settings.public_users or caller_user(conn, caller.user_id).is_admin
    users = list_users(conn, None if everyone else caller.user_id)
    return immich_json([user_dto(user) for user in users])


def app_get_my_user(ctx: Context, caller: Caller):
    return immich_json(admin_dto(ctx.connection(), caller.user_id))


def app_update_my_user(ctx: Context, caller: Caller):
    checks = BodyChecks(read_app_body())
    name = checks.email("email", False)
    display_name = checks.name("name", False)
    checks.done()
    conn = ctx.connection()
    update_user(conn, caller.user_id, name, display_name, ctx.now_ms())
    return immich_json(admin_dto(conn, caller.user_id))


def app_get_user(ctx: Context, caller: Caller, user_id: str):
    user = get_user(ctx.connection(), public_id=check_path_id(user_id))
    if user is None:
        raise ApiError("REQ01", "There is no such user.", app_message="User not found")
    return immich_json(user_dto(user))


def app_unknown_path(ctx: Context, caller: None, path: str = ""):
    request = bottle.request
    raise ApiError(
        "ERR01", "There is nothing at this path.",
        app_message=f"Cannot {request.method} {request.path[len(merged_prefix()) :]}",
    )  # fmt: skip


#: The App API under /api, one row per operation (see SYNC_OPERATIONS).
APP_OPERATIONS = (
    Operation("POST", "/auth/login", "login", PUBLIC, app_login, "Log in",
              request="LoginCredentialDto", answers={"201": "LoginResponseDto"},
              errors=(*BODY_ERRORS, 401, 429, 503)),
    Operation("POST", "/auth/admin-sign-up", "signUpAdmin", PUBLIC, app_sign_up_admin,
              "Create the first account, the admin", request="SignUpDto",
              answers={"201": "UserAdminResponseDto"},
              errors=(*BODY_ERRORS, 403, 429, 503, 507)),
    Operation("POST", "/auth/validateToken", "validateAccessToken", ANY_CREDENTIAL,
              app_validate_access_token, "Validate the credentials",
              answers={"200": "ValidateAccessTokenResponseDto"}, errors=(401,)),
    Operation("POST", "/auth/change-password", "changePassword", "auth.changePassword",
              app_change_password, "Change the password", request="ChangePasswordDto",
              answers={"200": "UserAdminResponseDto"},
              errors=(*BODY_ERRORS, 401, 403, 429, 503, 507)),
    Operation("POST", "/auth/logout", "logout", "all", app_logout, "Log out",
              answers={"200": "LogoutResponseDto"}, errors=(401, 403)),
    Operation("POST", "/api-keys", "createApiKey", "apiKey.create", app_create_api_key,
              "Create an API key", request="APIKeyCreateDto",
              answers={"201": "APIKeyCreateResponseDto"},
              errors=(*BODY_ERRORS, 401, 403, 507)),
    Operation("GET", "/api-keys", "getApiKeys", "apiKey.read", app_get_api_keys,
              "List API keys", answers={"200": "APIKeyList"}, errors=(401, 403)),
    Operation("GET", "/api-keys/me", "getMyApiKey", ANY_CREDENTIAL, app_get_my_api_key,
              "The API key making the request", answers={"200": "APIKeyResponseDto"},
              errors=(401, 403)),
    Operation("GET", "/api-keys/<key_id>", "getApiKey", "apiKey.read", app_get_api_key,
              "Retrieve an API key", answers={"200": "APIKeyResponseDto"},
              errors=(400, 401, 403)),
    Operation("PUT", "/api-keys/<key_id>", "updateApiKey", "apiKey.update", app_update_api_key,
              "Update an API key", request="APIKeyUpdateDto",
              answers={"200": "APIKeyResponseDto"}, errors=(*BODY_ERRORS, 401, 403, 507)),
    Operation("DELETE", "/api-keys/<key_id>", "deleteApiKey", "apiKey.delete",
              app_delete_api_key, "Delete an API key", answers={"204": "Empty"},
              errors=(400, 401, 403)),
    Operation("GET", "/server/ping", "pingServer", PUBLIC, app_ping_server, "Ping",
              answers={"200": "ServerPingResponse"}),
    Operation("GET", "/server/version", "getServerVersion", PUBLIC, app_get_server_version,
              "Version", answers={"200": "ServerVersionResponseDto"}),
    Operation("GET", "/server/about", "getAboutInfo", "server.about", app_get_about_info,
              "About", answers={"200": "ServerAboutResponseDto"}, errors=(401, 403)),
    Operation("GET", "/server/features", "getServerFeatures", PUBLIC, app_get_server_features,
              "Features", answers={"200": "ServerFeaturesDto"}),
    Operation("GET", "/server/config", "getServerConfig", PUBLIC, app_get_server_config,
              "Configuration", answers={"200": "ServerConfigDto"}),
    Operation("POST", "/sessions", "createSession", "session.create", app_create_session,
              "Create a child session", request="SessionCreateDto", request_required=False,
              answers={"201": "SessionCreateResponseDto"},
              errors=(*BODY_ERRORS, 401, 403, 507)),
    Operation("GET", "/sessions", "getSessions", "session.read", app_get_sessions,
              "List sessions", answers={"200": "SessionResponseList"}, errors=(401, 403)),
    Operation("DELETE", "/sessions", "deleteAllSessions", "session.delete",
              app_delete_all_sessions, "End every other session", answers={"204": "Empty"},
              errors=(401, 403)),
    Operation("DELETE", "/sessions/<session_id>", "deleteSession", "session.delete",
              app_delete_session, "End a session", answers={"204": "Empty"},
              errors=(400, 401, 403)),
    Operation("GET", "/users", "searchUsers", "user.read", app_search_users, "List users",
              answers={"200": "UserResponseList"}, errors=(401, 403)),
    Operation("GET", "/users/me", "getMyUser", "user.read", app_get_my_user,
              "The caller's account", answers={"200": "UserAdminResponseDto"},
              errors=(401, 403)),
    Operation("PUT", "/users/me", "updateMyUser", "user.update", app_update_my_user,
              "Update the caller's account", request="UserUpdateMeDto",
              answers={"200": "UserAdminResponseDto"}, errors=(*BODY_ERRORS, 401, 403, 507)),
    Operation("GET", "/users/<user_id>", "getUser", "user.read", app_get_user,
              "Retrieve a user", answers={"200": "UserResponseDto"}, errors=(400, 401, 403)),
)  # fmt: skip


# ==================================================================================================
# OpenAPI document
# ==================================================================================================


def _ref(name: str) -> dict:
    """A reference to a schema of the document."""
    return {"$ref": f"#/components/schemas/{name}"}


def _object(required: Mapping[str, Any], optional: Mapping[str, Any] = {}, closed: bool = False):
    """An object schema; closed=True (answers) forbids properties beyond the named ones."""
    schema: dict[str, Any] = {"type": "object", "properties": {**required, **optional}}
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    return schema


def _json(schema: dict, description: str = "OK", headers: dict | None = None) -> dict:
    """A JSON response."""
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        response["headers"] = headers
    return response


def _header(description: str, schema: dict | None = None, required: bool = True) -> dict:
    """A response header."""
    return {"description": description, "required": required, "schema": schema or _STRING}


def _parameter(name: str, where: str, schema: dict, description: str, required: bool = False):
    """A parameter of an operation."""
    return {"name": name, "in": where, "required": required, "schema": schema,
            "description": description}  # fmt: skip


_STRING = {"type": "string"}
_INTEGER = {"type": "integer"}
_BOOLEAN = {"type": "boolean"}
_TIME = {"type": "string", "format": "date-time"}
_BINARY = {"type": "string", "format": "binary"}
_KEY_TEXT = {"type": "string", "minLength": 1, "maxLength": MAX_KEY_CHARS}
_ID = {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS}
_PASSWORD = {"type": "string", "minLength": MIN_PASSWORD_CHARS, "maxLength": MAX_PASSWORD_CHARS}
_TOKEN_HEADERS = {
    "X-Sync-Token": _header("The store token of the stored version."),
    "ETag": _header("The store token as a strong entity tag."),
}
#: Parameters the rows of the route tables name.
PARAMETERS = {
    "key": _parameter("key", "path", _KEY_TEXT,
                      "The key; slashes and percent-encoded characters belong to it.", True),
    "id": _parameter("id", "path", {"type": "string", "format": "uuid",
                                    "pattern": "^" + UUID4.pattern + "$"}, "The id.", True),
    "since": _parameter("since", "query", {**_INTEGER, "minimum": 0, "maximum": 2**62},
                        "List what changed after this cursor (X-Sync-Seq)."),
    "wait": _parameter("wait", "query", {**_INTEGER, "minimum": 0, "maximum": MAX_WAIT_SECONDS},
                       "With since: seconds to wait for a change."),
    "limit": _parameter("limit", "query",
                        {**_INTEGER, "minimum": 1, "maximum": MAX_PAGE_ENTRIES},
                        "Entries per page."),
    "prefix": _parameter("prefix", "query", {**_STRING, "maxLength": MAX_KEY_CHARS},
                         "Only keys starting with it, taken literally."),
    "after": _parameter("after", "query", {**_STRING, "maxLength": MAX_KEY_CHARS},
                        "A listing page: keys after it."),
    "cursor": _parameter("cursor", "query", {**_INTEGER, "minimum": 0, "maximum": 2**62},
                         "A listing page: the cursor its first page gave (Link carries it)."),
    "values": _parameter("values", "query", {**_STRING, "enum": ["true", "false"]},
                         "Whether entries carry their values (base64) and meta, within a "
                         "budget per page."),
    "X-Sync-Cursor": _parameter("X-Sync-Cursor", "header",
                                {**_INTEGER, "minimum": 0, "maximum": 2**62},
                                "As since, in a header: a long-poll's URL then stays the same "
                                "from poll to poll, so a browser preflights it once."),
    "users": _parameter("users", "query", {**_STRING, "minLength": 1},
                        "Comma-separated user ids.", True),
    "X-Sync-Token": _parameter("X-Sync-Token", "header", _STRING,
                               "The token of the stored version this write replaces."),
    "If-Match": _parameter("If-Match", "header", _STRING,
                           "The stored version's entity tag (instead of X-Sync-Token)."),
    "X-Sync-Meta": _parameter("X-Sync-Meta", "header",
                              {**_STRING, "maxLength": MAX_META_BYTES},
                              "Metadata stored with the value (printable ASCII)."),
    "If-None-Match": _parameter("If-None-Match", "header", _STRING,
                                "Answer 304 when the stored version is one of these tags."),
    "If-None-Match: *": _parameter("If-None-Match", "header", {**_STRING, "enum": ["*"]},
                                   "Only create: KEY01 if the key exists."),
}  # fmt: skip
#: Answers the rows name that are more than a JSON schema.
ANSWERS = {
    "Empty": {"description": "No content."},
    "Stored": {"description": "Stored.", "headers": _TOKEN_HEADERS},
    "NotModified": {"description": "Not modified.", "headers": _TOKEN_HEADERS},
    "Value": {
        "description": "The value.",
        "headers": {
            **_TOKEN_HEADERS,
            "X-Sync-Meta": _header("The value's metadata.", required=False),
            "Cache-Control": _header("no-cache, no-transform"),
        },
        "content": {"application/octet-stream": {"schema": _BINARY}},
    },
    "Listing": _json(
        _ref("Listing"),
        "The keys (or, with since, the changes); X-Sync-Seq is the cursor for since.",
        {
            "X-Sync-Seq": _header("The change-feed cursor of this answer.", _INTEGER),
            "X-Sync-Cursor": _header(
                "The cursor to follow the feed from (since) once this page is applied.", _INTEGER
            ),
            "Link": _header('The next page, rel="next", when more remain.', required=False),
            "X-Sync-Wait-Declined": _header(
                "Why a wait was declined (busy, stopping); Retry-After says when to poll again.",
                {**_STRING, "enum": ["busy", "stopping"]},
                required=False,
            ),
            "Retry-After": _header("Seconds to wait before polling again.", required=False),
        },
    ),
    "Unhealthy": _json(_ref("Health"), "The database or the disk cannot take a write."),
}
#: Request bodies the rows name that are not JSON.
REQUESTS = {
    "Value": {"required": True, "content": {"application/octet-stream": {"schema": _BINARY}}}
}


def sync_schemas() -> dict:
    """Return the Sync Node API's schemas, answers closed to other properties."""
    level = {"type": "string", "enum": list(LEVELS)}
    inline = {  # with values=true
        "value": {**_STRING, "contentEncoding": "base64"},
        "meta": {"type": ["string", "null"]},
        "large": {"type": "boolean", "enum": [True]},
    }
    batch_base = {"key": _KEY_TEXT}
    batch_token = {"token": {"type": ["string", "null"]}}
    return {
        "Credentials": _object(
            {"id": _ID, "password": _PASSWORD},
            {"invite": {**_STRING, "description": "An invite code (registration=invite)."}},
        ),
        "Session": _object(
            {"token": _STRING, "expiration": {**_INTEGER, "description": "Milliseconds."}},
            closed=True,
        ),
        "SessionInfo": _object(
            {
                "id": {"type": "string", "format": "uuid"},
                "expiration": _INTEGER,
                "current": _BOOLEAN,
                "createdAt": _INTEGER,
            },
            closed=True,
        ),  # fmt: skip
        "SessionList": {"type": "array", "items": _ref("SessionInfo")},
        "Permission": level,
        "StoreKey": _object(
            {"key": _STRING, "permission": _ref("Permission"), "token": _STRING},
            inline,
            closed=True,
        ),  # fmt: skip
        "StoreChange": _object(
            {"key": _STRING, "permission": _ref("Permission"), "token": _STRING, "seq": _INTEGER},
            inline,
            closed=True,
        ),  # fmt: skip
        "StoreTombstone": _object(
            {"key": _STRING, "deleted": {"type": "boolean", "enum": [True]}, "seq": _INTEGER},
            closed=True,
        ),
        "Listing": {
            "description": "A listing's entries are StoreKeys; a feed's (since), StoreChanges "
            "and StoreTombstones.",
            "type": "array",
            "items": {"oneOf": [_ref("StoreChange"), _ref("StoreTombstone"), _ref("StoreKey")]},
        },
        "UserPermission": _object({"user": _ID, "permission": _ref("Permission")}),
        "UserPermissions": {"type": "array", "items": _ref("UserPermission")},
        "UpdatePasswordRequest": _object({"password": _PASSWORD}),
        "ResetPasswordTokenRequest": _object({"id": {**_STRING, "minLength": 1}}),
        "Invite": _object({"invite": _STRING, "expiration": _INTEGER}, closed=True),
        "Health": _object({"database": _BOOLEAN, "disk": _BOOLEAN}, closed=True),
        "Discovery": _object({"api": _object({"endpoint": _STRING})}, closed=True),
        "Document": {"type": "object", "description": "This document."},
        "BatchPut": _object(
            {
                "method": {"type": "string", "enum": ["PUT"]},
                **batch_base,
                "value": {**_STRING, "contentEncoding": "base64"},
            },
            {**batch_token, "meta": {"type": ["string", "null"], "maxLength": MAX_META_BYTES}},
        ),  # fmt: skip
        "BatchDelete": _object(
            {"method": {"type": "string", "enum": ["DELETE"]}, **batch_base}, batch_token
        ),
        "BatchRequest": _object(
            {
                "operations": {
                    "type": "array",
                    "maxItems": MAX_BATCH_OPERATIONS,
                    "items": {"oneOf": [_ref("BatchPut"), _ref("BatchDelete")]},
                }
            }
        ),  # fmt: skip
        "BatchResponse": _object(
            {
                "results": {
                    "type": "array",
                    "items": _object(
                        {"key": _STRING, "token": {"type": ["string", "null"]}}, closed=True
                    ),
                }
            },
            closed=True,
        ),  # fmt: skip
        "Error": _object(
            {"code": {"type": "string", "enum": list(ERROR_STATUS)}, "message": _STRING},
            {"index": {**_INTEGER, "description": "The failing operation of a batch."}},
            closed=True,
        ),
    }


def openapi_path(rule: str) -> str:
    """Return the OpenAPI path of a bottle rule: <key:re:...> is {key}, <..._id> is {id}."""

    def variable(match: re.Match) -> str:
        return "{id}" if match[1].endswith("_id") else "{" + match[1] + "}"

    return re.sub(r"<(\w+)(?::[^>]*)?>", variable, rule)


def document_operation(api: str, operation: Operation) -> dict:
    """Return the OpenAPI operation object of a row of a route table."""
    app = api == APP_API
    error = {"$ref": "#/components/responses/" + ("AppError" if app else "Error")}
    cid = {"x-immich-cid": _header("The request's correlation id.")}
    responses: dict[str, Any] = {}
    for status, name in operation.answers.items():
        answer = ANSWERS.get(name) or _json(_ref(name))
        responses[status] = (
            {**answer, "headers": {**answer.get("headers", {}), **cid}} if app else answer
        )
    for status in operation.errors:
        responses[str(status)] = error
    responses["default"] = error
    entry: dict[str, Any] = {
        "operationId": operation.operation_id,
        "summary": operation.summary,
        "tags": ["App API" if app else "Sync Node API"],
    }
    path_names = re.findall(r"\{(\w+)\}", openapi_path(operation.path))
    parameters = [PARAMETERS[name] for name in (*path_names, *operation.parameters)]
    if parameters:
        entry["parameters"] = parameters
    if operation.request is not None:
        entry["requestBody"] = REQUESTS.get(operation.request) or {
            "required": operation.request_required,
            "content": {"application/json": {"schema": _ref(operation.request)}},
        }
    entry["responses"] = responses
    caller = operation.permission if operation.security is None else operation.security
    if caller is PUBLIC:
        entry["security"] = []
    elif caller == SESSION_ONLY:
        entry["security"] = [{"bearer": []}]
    elif app:
        entry["security"] = [{"bearer": []}, {"cookie": []}, {"api_key": []}]
    else:
        entry["security"] = [{"bearer": []}, {"api_key": []}]
    return entry


def openapi_document(prefix: str = "") -> dict:
    """Return the OpenAPI 3.1 document of everything syncnode serves (GET /openapi.json).

    The paths come from the route tables; only the schemas are written here. The server is
    the path the app is mounted under (prefix).
    """
    paths: dict[str, dict] = {}
    for api, root, operations in (
        (SYNC_API, "", SYNC_OPERATIONS),
        (APP_API, "/api", APP_OPERATIONS),
    ):
        for operation in operations:
            path = paths.setdefault(root + openapi_path(operation.path), {})
            path[operation.method.lower()] = document_operation(api, operation)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "syncnode",
            "summary": "A generic sync server, with an Immich-compatible App API under /api",
            "license": {"name": "AGPL-3.0-or-later", "identifier": "AGPL-3.0-or-later"},
            "version": __version__,
        },
        "servers": [{"url": prefix or "/", "description": "This server."}],
        "paths": paths,
        "components": {
            "schemas": {**sync_schemas(), **app_api_schemas()},
            "responses": {
                "Error": _json(_ref("Error"), "An error in the Sync Node layout."),
                "AppError": _json(
                    _ref("AppError"),
                    "An error in Immich's layout.",
                    {"x-immich-cid": _header("The request's correlation id.")},
                ),
            },
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "api_key": {"type": "apiKey", "in": "header", "name": "x-api-key"},
                "cookie": {"type": "apiKey", "in": "cookie", "name": "immich_access_token"},
            },
        },
    }


def app_api_schemas() -> dict:
    """Return the App API's schemas, answers closed to other properties."""
    session = {
        "id": _STRING, "createdAt": _STRING, "updatedAt": _STRING, "expiresAt": _STRING,
        "current": _BOOLEAN, "deviceType": _STRING, "deviceOS": _STRING,
        "appVersion": {"type": ["string", "null"]}, "isPendingSyncReset": _BOOLEAN,
    }  # fmt: skip
    api_key = {
        "id": _STRING, "name": _STRING, "createdAt": _TIME, "updatedAt": _TIME,
        "permissions": {"type": "array", "items": _ref("AppPermission")},
    }  # fmt: skip
    user = {"id": _STRING, "name": _STRING, "email": _STRING}
    permissions = {"type": "array", "minItems": 1, "items": _ref("AppPermission")}
    return {
        "AppPermission": {"type": "string", "enum": list(API_KEY_PERMISSIONS)},
        "UserStatus": {"type": "string", "enum": ["active", "removing", "deleted"]},
        "AppError": _object(
            {
                "message": {"oneOf": [_STRING, {"type": "array", "items": _STRING}]},
                "error": _STRING,
                "statusCode": _INTEGER,
                "correlationId": _STRING,
            },
            closed=True,
        ),  # fmt: skip
        "LoginCredentialDto": _object({"email": _STRING, "password": _STRING}),
        "SignUpDto": _object({"email": _STRING, "password": _STRING, "name": _STRING}),
        "ChangePasswordDto": _object(
            {"password": _STRING, "newPassword": {**_STRING, "minLength": MIN_PASSWORD_CHARS}},
            {"invalidateSessions": _BOOLEAN},
        ),
        "APIKeyCreateDto": _object({"permissions": permissions}, {"name": _STRING}),
        "APIKeyUpdateDto": _object({}, {"name": _STRING, "permissions": permissions}),
        "SessionCreateDto": _object(
            {},
            {
                "duration": {"type": "integer", "minimum": 1},
                "deviceType": _STRING,
                "deviceOS": _STRING,
            },
        ),  # fmt: skip
        "UserUpdateMeDto": _object({}, {"email": _STRING, "name": _STRING}),
        "LoginResponseDto": _object(
            {
                "accessToken": _STRING,
                "userId": _STRING,
                "userEmail": _STRING,
                "name": _STRING,
                "isAdmin": _BOOLEAN,
                "shouldChangePassword": _BOOLEAN,
            },
            closed=True,
        ),  # fmt: skip
        "UserAdminResponseDto": _object(
            {
                **user,
                "shouldChangePassword": _BOOLEAN,
                "isAdmin": _BOOLEAN,
                "createdAt": _TIME,
                "deletedAt": {"type": ["string", "null"], "format": "date-time"},
                "updatedAt": _TIME,
                "status": _ref("UserStatus"),
            },
            closed=True,
        ),  # fmt: skip
        "UserResponseDto": _object(user, closed=True),
        "ValidateAccessTokenResponseDto": _object({"authStatus": _BOOLEAN}, closed=True),
        "LogoutResponseDto": _object({"successful": _BOOLEAN, "redirectUri": _STRING}, closed=True),
        "APIKeyResponseDto": _object(api_key, closed=True),
        "APIKeyCreateResponseDto": _object(
            {"secret": _STRING, "apiKey": _ref("APIKeyResponseDto")}, closed=True
        ),
        "SessionResponseDto": _object(session, closed=True),
        "SessionResponseList": {"type": "array", "items": _ref("SessionResponseDto")},
        "APIKeyList": {"type": "array", "items": _ref("APIKeyResponseDto")},
        "UserResponseList": {"type": "array", "items": _ref("UserResponseDto")},
        "SessionCreateResponseDto": _object({**session, "token": _STRING}, closed=True),
        "ServerPingResponse": _object({"res": _STRING}, closed=True),
        "ServerVersionResponseDto": _object(
            {"major": _INTEGER, "minor": _INTEGER, "patch": _INTEGER}, closed=True
        ),
        "ServerAboutResponseDto": _object({"version": _STRING, "versionUrl": _STRING}, closed=True),
        "ServerFeaturesDto": _object({"passwordLogin": _BOOLEAN}, closed=True),
        "ServerConfigDto": _object(
            {"loginPageMessage": _STRING, "userDeleteDelay": _INTEGER, "isInitialized": _BOOLEAN},
            closed=True,
        ),
    }


# ==================================================================================================
# App factory
# ==================================================================================================


class SyncNodeApp(bottle.Bottle):
    """The WSGI application: a bottle app that owns its Context."""

    def __init__(self, context: Context) -> None:
        super().__init__()
        self.context = context

    def __call__(self, environ: dict, start_response: Callable) -> Any:
        # An outer bottle app that mounted this one has already decoded PATH_INFO from
        # latin-1 to UTF-8; turn it back into WSGI's latin-1 form so keys survive.
        if "bottle.raw_path" in environ:
            environ = dict(environ)
            environ["PATH_INFO"] = environ["PATH_INFO"].encode("utf-8").decode("latin-1")
            # The outer app dropped bytes that are not UTF-8; read_key checks the original.
            environ["syncnode.raw_path"] = environ.pop("bottle.raw_path")
        # syncnode's own server runs these after sending the answer; other servers, when
        # they close it (after sending it, too, as WSGI has them do).
        callbacks = environ.setdefault(AFTER_ANSWER, [])
        if not self.context.settings.access_log:
            body = super().__call__(environ, start_response)
        else:
            body = AccessLogged(self.context, environ, start_response, super().__call__)
        if callbacks and environ.get("syncnode.server") != "syncnode":
            return AfterAnswer(body, callbacks)
        return body

    def close(self) -> None:
        """Close the app's database connections."""
        self.context.close()


class AfterAnswer:
    """An answer's body that runs the request's after-answer callbacks when closed."""

    def __init__(self, body: Iterable[bytes], callbacks: list[Callable[[], None]]) -> None:
        self.body, self.callbacks = body, callbacks

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.body)

    def close(self) -> None:
        """Close the body, then run the callbacks."""
        try:
            if hasattr(self.body, "close"):
                self.body.close()
        finally:
            run_after_answer(self.callbacks)


class AccessLogged:
    """A response that logs one access line when the server closes it.

    The line has the method, the path without its query string (which may carry an API
    key), the status, the bytes sent, the duration and the client address; never a header.
    """

    def __init__(
        self, ctx: Context, environ: dict, start_response: Callable, app: Callable
    ) -> None:
        parking = environ.get(PARKING)  # a parked long-poll lasts from its first run
        self.started = time.monotonic() if parking is None else parking.started
        self.ctx, self.environ, self.status, self.sent = ctx, environ, "-", 0

        def capture(status: str, headers: list, exc_info: Any = None) -> Callable:
            self.status = status.partition(" ")[0]
            return start_response(status, headers, exc_info)

        self.body = app(environ, capture)

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.body:
            self.sent += len(chunk)
            yield chunk

    def close(self) -> None:
        """Close the wrapped body and write the access line."""
        if hasattr(self.body, "close"):
            self.body.close()
        environ = self.environ
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        path = path.encode("latin-1", "replace").decode("utf-8", "replace")
        access_log.info(
            "%s %s %s %d %.1fms %s",
            environ.get("REQUEST_METHOD", "-"),
            # A %0A in the URL must not start a forged line of its own.
            CONTROL_CHARS.sub(lambda char: f"%{ord(char[0]):02X}", path),
            self.status,
            self.sent,
            (time.monotonic() - self.started) * 1000,
            self.ctx.client_address(environ) or "-",
        )


class OperationPlugin:
    """A bottle plugin that runs the operation of each route of a table.

    It housekeeps, resolves the caller the row asks for, calls the handler, wakes the
    long-polls after a change, and renders any error in the layout of the row's API; Sync
    Node answers also carry the CORS headers.
    """

    name, api = "syncnode", 2

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def apply(self, callback: Callable, route: bottle.Route) -> Callable:
        operation, api = route.config.get("operation"), route.config.get("api")
        if operation is None:
            return callback
        ctx, allow = self.ctx, route.config.get("allow")
        failure = "Failed to " + re.sub(
            "[A-Z]+", lambda match: " " + match[0].lower(), operation.operation_id
        )

        def run(**args: str) -> Any:
            ctx.housekeep()
            caller = None
            if operation.permission is not None:
                caller = resolve_caller(ctx, api, operation.permission)
            try:
                return operation.handler(ctx, caller, **args)
            finally:  # wake the long-polls of the users whose feed or credential changed
                ctx.waiters.notify(*ctx.db.take_changed())

        def sync_route(**args: str) -> Any:
            try:
                response = run(**args)
            except bottle.HTTPResponse:
                raise
            except Exception as error:
                response = error_response(classify_error(ctx, error))
            if allow is not None and ctx.settings.cors_origins:
                add_headers(response, cors_headers(ctx.settings, allow))
            return response

        def app_route(**args: str) -> Any:
            cid = correlation_id()
            try:
                response = run(**args)
            except bottle.HTTPResponse:
                raise
            except Exception as error:
                response = immich_error(classify_error(ctx, error), cid, failure)
            add_headers(response, {"x-immich-cid": cid})
            return response

        return sync_route if api == SYNC_API else app_route


def register_operations(app: bottle.Bottle) -> None:
    """Register both route tables, then the answers for every other path and method.

    Each Sync Node path also takes OPTIONS (a CORS preflight) and answers REQ02 with Allow
    for the methods it does not take; every other path answers ERR01, or Immich's 404
    under /api.
    """

    def add(rule: str, operation: Operation, api: str, allow: str | None = None) -> None:
        app.route(rule, operation.method, operation.handler, name=operation.operation_id,
                  operation=operation, api=api, allow=allow)  # fmt: skip

    methods: dict[str, set[str]] = {}
    for operation in SYNC_OPERATIONS:
        methods.setdefault(operation.path, set()).add(operation.method)
    allows = {path: allowed_methods(taken) for path, taken in methods.items()}
    for operation in SYNC_OPERATIONS:
        add(operation.path, operation, SYNC_API, allows[operation.path])
    for path, allow in allows.items():
        other = functools.partial(sync_other_method, allow=allow)
        add(path, Operation("ANY", path, "otherMethod", PUBLIC, other), SYNC_API, allow)
    for operation in APP_OPERATIONS:
        add("/api" + operation.path, operation, APP_API)
    unknown_app = Operation("ANY", "/api/<path:path>", "unknownAppPath", PUBLIC, app_unknown_path)
    for rule in ("/api", "/api/", "/api/<path:path>"):
        add(rule, unknown_app, APP_API)
    add("/", Operation("ANY", "/", "getFrontPage", PUBLIC, sync_get_front_page), SYNC_API)
    unknown = Operation("ANY", "/<path:path>", "unknownPath", PUBLIC, sync_unknown_path)
    add("/<path:path>", unknown, SYNC_API)


def allowed_methods(methods: Iterable[str]) -> str:
    """Return the Allow header of a path that takes these methods (HEAD with GET, OPTIONS)."""
    allowed = set(methods) | {"OPTIONS"} | ({"HEAD"} if "GET" in methods else set())
    return ", ".join(sorted(allowed))


def open_context(settings: Settings, clock: Callable[[], float]) -> Context:
    """Open the database of the settings, migrated to the newest schema, as a Context.

    A database written by a newer syncnode is refused before anything touches it (switching
    it to WAL mode would already change it).
    """
    postgresql = is_postgresql(settings.database)
    if not postgresql:
        check_database_path(settings.database)
        with contextlib.closing(sqlite3.connect(settings.database)) as conn:
            refuse_newer(conn.execute("PRAGMA user_version").fetchone()[0], len(SCHEMA))
    ctx = Context(settings, clock)
    try:
        ctx.db.hold()  # before anything changes it, so that no restore swaps it meanwhile
        conn = ctx.connection()
        migrate(conn)
        if not postgresql and conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
            make_vacuum_incremental(conn)
    except BaseException:
        ctx.close()
        raise
    return ctx


def check_database_path(path: str) -> None:
    """Raise DatabaseUnusable, saying what to do, for a database path SQLite could not use."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise DatabaseUnusable(
            f"The folder {folder} does not exist; create it or choose another database path."
        )
    if os.path.exists(path) and not os.path.isfile(path):
        raise DatabaseUnusable(f"{path} is not a file; choose another database path.")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise DatabaseUnusable(
            f"The folder {folder} or the database in it is not writable by this user; "
            "change its owner or permissions, or choose another database path."
        )


def make_vacuum_incremental(conn: SQLiteConnection) -> None:
    """Switch a database made before incremental vacuum to it, once (VACUUM rewrites it).

    Housekeeping then gives the pages that deletions free back to the file system. Without
    room for the rewrite it stays as it is and says so.
    """
    log.info("Switching the database to incremental vacuum; this rewrites it once.")
    try:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("VACUUM")
    except sqlite3.OperationalError as error:
        log.warning("Could not switch to incremental vacuum: %s", error.sqlite_errorname)


def create_app(
    database: str = Settings.database, *, clock: Callable[[], float] = time.time, **settings: Any
) -> SyncNodeApp:
    """Return a WSGI app serving the database; keyword arguments override Settings' defaults."""
    ctx = open_context(Settings(database=database, **settings), clock)
    app = SyncNodeApp(ctx)
    for status in (400, 404, 405, 413, 500):
        app.error_handler[status] = functools.partial(error_body, status)
    ctx.document("")  # built now, so that a broken table fails at start
    app.install(OperationPlugin(ctx))
    register_operations(app)
    return app


def error_body(status: int, error: bottle.HTTPError) -> bytes:
    """Answer bottle's own errors (raised before a route runs) in the Sync Node JSON layout."""
    code = {400: "REQ01", 404: "ERR01", 405: "REQ02", 413: "SIZE01"}.get(status, "ERR02")
    bottle.response.content_type = "application/json"
    return json.dumps({"code": code, "message": "The request could not be handled."}).encode()


# ==================================================================================================
# HTTP server
# ==================================================================================================

#: Bytes of earlier answers a client may leave unread before its next pipelined request waits
#: (without a serving thread) until it reads them.
PARKED_ANSWER_BYTES = OUTBUF_HIGH_WATERMARK_BYTES // 2
#: Seconds between the server's sweeps for stalled, idle and surplus connections.
SWEEP_SECONDS = 1
#: A request must arrive within client_timeout plus a second for each this many bytes of body.
MIN_BODY_BYTES_PER_SECOND = 16 * 1024
#: Sleeping long-polls leave the main loop where poll() can watch them apart (not on Windows).
CAN_SLEEP = hasattr(select, "poll")
POLLRDHUP = getattr(select, "POLLRDHUP", 0)
#: How often the server looks whether the clients of sleeping long-polls went away, and at
#: most how long its main loop waits for an event.
GONE_CHECK_SECONDS = 0.25
SERVER_ERROR_MESSAGES = {
    "REQ01": "The request could not be parsed.",
    "SIZE01": "The request is larger than this server accepts.",
    "ERR02": "The server encountered an unexpected error.",
}


def request_body_limit(settings: Settings, method: str, path: str) -> int:
    """Return the largest body the route of a request reads, so the server refuses more early.

    The same limits as the readers': a value for PUT /store, a batch for POST /batch, an
    App API body under /api, a JSON body elsewhere.
    """
    if is_app_path(path):
        return MAX_APP_BODY_BYTES
    if method == "PUT" and path.startswith("/store/"):
        return settings.max_value_bytes
    if path == "/batch":
        return MAX_BATCH_BYTES
    return MAX_JSON_BYTES


def server_error_answer(status: int, path: str) -> tuple[str, bytes]:
    """Return the status line and JSON body of an error the HTTP server answers itself.

    Such errors (a request line or header that cannot be parsed, a body or headers too
    large) come before any route, so the path alone chooses the API's layout.
    """
    code = "SIZE01" if status in (413, 431) else "ERR02" if status >= 500 else "REQ01"
    status = ERROR_STATUS[code]
    message = SERVER_ERROR_MESSAGES[code]
    if is_app_path(path):
        body = immich_error_body(status, message, secrets.token_hex(4))
    else:
        body = {"code": code, "message": message}
    return f"{status} {REASONS[status]}", json.dumps(body).encode()


def server_class(settings: Settings) -> type:
    """Return waitress's TCP server class, hardened against slow and stalled clients.

    - A declared body larger than its route reads is refused (413) before it is read.
    - The server's own errors are JSON in the layout of the path's API.
    - 204 and 304 answers keep the connection open.
    - A pipelining client that leaves earlier answers unread waits for its next answer
      without holding a serving thread; a large value is sent by the main loop (see
      BlobReader), so no serving thread waits on a client that does not read.
    - Once a second, connections are closed that stalled for client_timeout seconds reading
      an answer, or that hold a request not complete within client_timeout (plus a second per
      MIN_BODY_BYTES_PER_SECOND of its declared body); past half of max_connections such
      connections, the longest waiting ones go first.
    - The work a request leaves for after its answer runs on a thread of its own, so that
      the next request on the connection does not wait for it.
    """
    import waitress.channel
    import waitress.parser
    import waitress.server
    import waitress.task
    import waitress.utilities

    timeout, waiting_limit = settings.client_timeout, settings.max_connections // 2

    class Parser(waitress.parser.HTTPRequestParser):
        #: The largest body the request's route reads, known once its headers are.
        body_limit = 0
        #: Where a long-poll waits between its runs (see Parking).
        parking: Parking | None = None

        def received(self, data: bytes) -> int:
            had_headers = self.headers_finished
            # The request line, kept while the headers come in (see the 431 case below).
            start = b"" if had_headers else (self.header_plus or data)[: MAX_KEY_CHARS * 12]
            consumed = super().received(data)
            if self.headers_finished and not had_headers and self.error is None:
                self.body_limit = request_body_limit(settings, self.command, self.path)
            chunked = len(self.body_rcv) if self.chunked and self.body_rcv is not None else 0
            too_large = max(self.content_length, chunked) > self.body_limit
            if self.headers_finished and self.error is None and too_large:
                # Declared, or (a chunked body) received so far: refused before more is read.
                self.error = waitress.utilities.RequestEntityTooLarge(f"over {self.body_limit}")
                self.completed, self.expect_continue = True, False
            elif self.error is not None and self.error.code == 431:
                # Waitress forgets the request line of headers too large; its path picks
                # the API whose layout the answer takes.
                target = start.partition(b"\r\n")[0].split(b" ")[1:2]
                self.path = target[0].decode("latin-1").partition("?")[0] if target else "/"
            return consumed

    class ErrorTask(waitress.task.ErrorTask):
        def execute(self) -> None:
            # A request line that could not be parsed leaves no path.
            path = getattr(self.request, "path", None) or ""
            self.status, body = server_error_answer(self.request.error.code, path)
            self.response_headers.append(("Content-Type", "application/json"))
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    class Task(waitress.task.WSGITask):
        #: Set while the headers of a 204 or 304 answer are built that may keep the connection.
        keep_bodiless = False

        def build_response_header(self) -> bytes:
            # Waitress closes after every answer without a Content-Length, and a 204 or 304
            # may not carry one: keep the connection unless the client asked to close it.
            self.keep_bodiless = (
                not self.has_body
                and self.version == "1.1"
                and self.request.headers.get("CONNECTION", "").lower() != "close"
            )
            try:
                return super().build_response_header()
            finally:
                self.keep_bodiless = False

        def set_close_on_finish(self) -> None:
            if not self.keep_bodiless:
                super().set_close_on_finish()

        def get_environment(self) -> dict:
            environ = super().get_environment()
            environ.setdefault(AFTER_ANSWER, [])
            environ["syncnode.server"] = "syncnode"
            if self.request.parking is None:  # kept with the request across its runs
                self.request.parking = Parking(self.channel.wake_poll)
            environ[PARKING] = self.request.parking
            return environ

        def service(self) -> None:
            try:
                super().service()
            except Parked:
                raise  # not answered yet: Channel.service keeps the request
            except BaseException:
                self.finished()
                raise
            self.finished()

        def finished(self) -> None:
            """Free the request's long-poll place, and run its after-answer work."""
            self.channel.answered = True
            if self.request.parking is not None:
                self.request.parking.release()
            callbacks = self.environ.get(AFTER_ANSWER) if self.environ else None
            if callbacks:  # also when the client left: the work is the server's
                self.channel.server.after_answers.submit(run_after_answer, callbacks)

    class Channel(waitress.channel.HTTPChannel):
        task_class, error_task_class, parser_class = Task, ErrorTask, Parser
        #: Whether the next request waits, without a thread, for the client to read.
        parked = False
        #: Whether the current request's answer is complete.
        answered = False
        #: Whether the first request is a parked long-poll, asleep until wake_poll.
        poll_asleep = False
        #: Set when the long-poll was woken before it fell asleep.
        poll_woken_early = False

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            #: Since when the connection holds no request: its opening or its last answer.
            self.idle_since = self.creation_time
            self.poll_lock = threading.Lock()

        def service(self) -> None:
            with self.outbuf_lock:
                if self.connected and self.total_outbufs_len > PARKED_ANSWER_BYTES:
                    self.parked = True  # handle_write schedules the request again
                    self.server.pull_trigger()
                    return
            self.answered = False
            try:
                super().service()
            except Parked:
                self.sleep_poll()  # the request stays first; its Parking wakes it
                return
            self.idle_since = time.time()

        # A sleeping long-poll's socket leaves the main loop's map, whose every pass asks each
        # socket in it what it waits for: a thousand sleeping polls would slow every request.
        # Once a second the server looks whether their clients sent anything or went away.

        def sleep_poll(self) -> None:
            """Take the parked long-poll's socket out of the main loop until it wakes."""
            with self.poll_lock:
                if self.poll_woken_early:
                    self.poll_woken_early = False
                    self.server.add_task(self)
                    return
                self.poll_asleep = True
            self.server.trigger.pull_trigger(self.leave_loop)

        def wake_poll(self) -> None:
            """Run the parked long-poll's request again (Parking.resume; any thread)."""
            with self.poll_lock:
                if not self.poll_asleep:
                    self.poll_woken_early = True
                    return
                self.poll_asleep = False
            self.server.trigger.pull_trigger(self.rejoin_and_run)

        def leave_loop(self) -> None:
            with self.poll_lock:
                if CAN_SLEEP and self.poll_asleep and self._map.pop(self._fileno, None):
                    self.server.sleeping[self._fileno] = self

        def rejoin_loop(self) -> None:
            if self.server.sleeping.pop(self._fileno, None) is not None:
                self._map[self._fileno] = self

        def rejoin_and_run(self) -> None:
            self.rejoin_loop()
            self.server.add_task(self)

        def handle_close(self) -> None:
            for request in list(self.requests):  # a parked long-poll frees its place at once
                if request.parking is not None:
                    request.parking.release()
            super().handle_close()

        def writable(self) -> bool:
            # A parked request must come back even if its answers went out meanwhile.
            return self.parked or super().writable()

        def handle_write(self) -> None:
            if not self.parked:
                return super().handle_write()
            with self.outbuf_lock:
                self._flush_exception(self._flush_some)
                if self.connected and self.total_outbufs_len <= PARKED_ANSWER_BYTES:
                    self.parked = False
                    self.server.add_task(self)
            if self.will_close:
                self.handle_close()

        def _flush_outbufs_below_high_watermark(self) -> None:
            # Between two pipelined answers: service() parks the next one instead.
            if self.answered:
                return
            # Within an answer: wait for the client to read, but not past client_timeout.
            with self.outbuf_lock:
                left, since = self.total_outbufs_len, time.monotonic()
                while self.connected and self.total_outbufs_len > self.adj.outbuf_high_watermark:
                    self.server.pull_trigger()
                    self.outbuf_lock.wait(SWEEP_SECONDS)
                    if self.total_outbufs_len < left:
                        left, since = self.total_outbufs_len, time.monotonic()
                    elif time.monotonic() - since > timeout:
                        self.will_close, self.connected = True, False
                        self.server.pull_trigger()

    class Server(waitress.server.TcpWSGIServer):
        channel_class = Channel

        #: Runs the work requests leave for after their answers (see Task.service).
        after_answers: concurrent.futures.ThreadPoolExecutor

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            #: The channels of sleeping long-polls, out of the loop's map (see sleep_poll).
            self.sleeping: dict[int, Channel] = {}
            self.next_gone_check = 0.0
            super().__init__(*args, **kwargs)

        def readable(self) -> bool:
            # As waitress's, with the sleeping polls' connections counted as open.
            now = time.time()
            if now >= self.next_channel_cleanup:
                self.next_channel_cleanup = now + self.adj.cleanup_interval
                self.maintenance(now)
            if now >= self.next_gone_check:
                self.next_gone_check = now + GONE_CHECK_SECONDS
                self.wake_the_gone()
            if not self.accepting:
                return False
            overflow = len(self._map) + len(self.sleeping) >= self.adj.connection_limit
            if overflow and not self.in_connection_overflow:
                log.warning("Reached --max-connections; accepting again once some close.")
            self.in_connection_overflow = overflow
            return not overflow

        def wake_the_gone(self) -> None:
            """Close the sleeping polls whose client went away, which frees their places.

            A client that sent its next request meanwhile sleeps on (the request is read once
            the poll has answered); a hang-up behind those bytes still shows as POLLRDHUP.
            """
            if not self.sleeping:
                return
            poller = select.poll()
            for fd in self.sleeping:
                poller.register(fd, select.POLLIN | POLLRDHUP)
            for fd, events in poller.poll(0):
                channel = self.sleeping.get(fd)
                if channel is None:
                    continue
                gone = bool(events & (select.POLLHUP | select.POLLERR | POLLRDHUP))
                if not gone:
                    try:
                        gone = not channel.socket.recv(1, socket.MSG_PEEK)
                    except (BlockingIOError, InterruptedError):
                        pass  # nothing to read after all
                    except OSError:
                        gone = True
                if gone:
                    del self.sleeping[fd]
                    channel.handle_close()  # frees the poll's place (Channel.handle_close)

        def maintenance(self, now: float) -> None:
            for channel in self.active_channels.values():
                request = channel.request
                if channel.parked or channel.total_outbufs_len:
                    stalled = channel.last_activity < now - timeout  # an answer left unread
                elif channel.requests:
                    continue  # being answered
                else:  # no complete request: it must arrive in time, its body at a pace
                    body = request.content_length if request and request.headers_finished else 0
                    allowed = timeout + body / MIN_BODY_BYTES_PER_SECOND
                    stalled = channel.idle_since < now - allowed
                if stalled:
                    channel.will_close = True
            self.close_surplus()

        def handle_accept(self) -> None:
            super().handle_accept()
            self.close_surplus()

        def close_surplus(self) -> None:
            """Close the connections without a complete request past the limit, oldest first."""
            waiting = [
                channel
                for channel in self.active_channels.values()
                if not (channel.requests or channel.total_outbufs_len or channel.will_close)
            ]
            if len(waiting) > waiting_limit:
                waiting.sort(key=lambda channel: channel.idle_since)
                for channel in waiting[: len(waiting) - waiting_limit]:
                    channel.will_close = True

    return Server


def open_files_limit() -> int:
    """Raise the soft limit of open files to the hard one, and return it.

    A thousand waiting long-polls are a thousand sockets; many systems start processes with
    a soft limit of 1,024 files.
    """
    try:
        import resource
    except ImportError:  # not on this system: trust it
        return 1 << 20
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return min(soft, hard)
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def pin_python_threads(settings: Settings) -> set[int] | None:
    """Run the calling thread, and the threads it starts from now on, on one CPU of those the
    process may use; return those CPUs (for the hashing threads), or None if nothing moved.

    Python runs one thread at a time: threads spread over several CPUs hand that lock from
    CPU to CPU and serve many times fewer requests than on one (bench/run, postgresql).
    The CPU is chosen by process id, so that nodes started on one machine tend to differ.
    """
    if not settings.pin_threads or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2:
        return None
    os.sched_setaffinity(0, {sorted(cpus)[os.getpid() % len(cpus)]})
    return cpus


def make_server(settings: Settings, app: Callable | None = None, map: dict | None = None) -> Any:
    """Bind the hardened waitress server to the settings' host and port; app may come later.

    serve() runs it; tests run it on a socket map of their own.
    """
    import waitress.adjustments
    import waitress.task

    # Waitress warns about queue depth on nearly every request under load: an SD card pays for
    # every line, and a full queue is what the thread setting is for.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    # Each connection is a file; so are SQLite's files of each thread, the watcher's and the
    # after-answer work's.
    connection_limit = min(settings.max_connections, open_files_limit() - 4 * settings.threads - 64)
    if connection_limit < settings.max_connections:
        log.warning(
            "Only %d connections fit the open-files limit (ulimit -n); max_connections is %d.",
            connection_limit, settings.max_connections,
        )  # fmt: skip
    adjustments = waitress.adjustments.Adjustments(
        host=settings.host,
        port=settings.port,
        threads=settings.threads,
        ident="syncnode",
        # Waitress holds up to this much of an answer in memory before the serving thread
        # waits for the client (16 MiB by default): one large streamed value would cost that.
        outbuf_high_watermark=OUTBUF_HIGH_WATERMARK_BYTES,
        connection_limit=max(2, connection_limit),
        cleanup_interval=SWEEP_SECONDS,
        # No reading ahead while a request is served: it costs every request, and a parked
        # long-poll's client is watched apart (Server.wake_the_gone).
        channel_request_lookahead=0,
        # select() takes no file number past 1,023, and a thousand polls are as many sockets.
        asyncore_use_poll=True,
        channel_timeout=settings.client_timeout,
        max_request_body_size=max(settings.max_value_bytes, MAX_BATCH_BYTES) + 1,
    )
    # The loop wakes at least this often to look after sleeping long-polls (set past the
    # constructor, which would round it to whole seconds).
    adjustments.asyncore_loop_timeout = GONE_CHECK_SECONDS
    dispatcher = waitress.task.ThreadedTaskDispatcher()
    dispatcher.set_thread_count(settings.threads)
    # A host name may resolve to several addresses; the server listens on the first.
    server = server_class(settings)(
        app, {} if map is None else map, dispatcher=dispatcher, adj=adjustments,
        sockinfo=adjustments.listen[0],
    )  # fmt: skip
    server.after_answers = concurrent.futures.ThreadPoolExecutor(1, "syncnode-after-answer")
    return server


# ==================================================================================================
# CLI
# ==================================================================================================


def add_setting_flags(parser: argparse.ArgumentParser, default: Any = None) -> None:
    """Add a flag for every setting; with default=SUPPRESS a flag given earlier is kept."""
    for item in dataclasses.fields(Settings):
        variable = "SYNCNODE_" + item.name.upper()
        parser.add_argument(
            "--" + item.name.replace("_", "-"),
            choices=item.metadata.get("choices"),
            metavar={"int": "N", "bool": "BOOL"}.get(item.type),
            default=default,
            help=f"{item.metadata['help']} [{variable}; default: {item.default}]",
        )


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser: settings flags, then an optional subcommand."""
    parser = argparse.ArgumentParser(
        prog="syncnode",
        description="A self-hosted sync server for local-first apps. Each setting is a flag or "
        "a SYNCNODE_<NAME> environment variable; a flag wins. Without a command it serves.",
    )
    parser.add_argument("--version", action="version", version=f"syncnode {__version__}")
    add_setting_flags(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help: str, parent: Any = commands) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help, description=help)
        if name == "serve":
            add_setting_flags(sub, argparse.SUPPRESS)
        else:
            sub.add_argument(
                "--database",
                default=argparse.SUPPRESS,
                help="SQLite database file or postgresql:// URL.",
            )
        return sub

    command("serve", "Serve the API (the default).")
    users = command("user", "Manage accounts.").add_subparsers(
        dest="user_command", metavar="ACTION", required=True
    )
    command("add", "Add an account; the password is asked for.", users).add_argument("id")
    command("list", "List the accounts.", users)
    command("delete", "Delete an account and the keys only it owns.", users).add_argument("id")
    command("passwd", "Set an account's password; ends its sessions.", users).add_argument("id")
    command("reset-token", "Print a one-time reset token for an account.").add_argument("id")
    command("unlock", "Clear an account's failed logins, so it may log in at once.").add_argument(
        "id"
    )
    command("invite", "Print a single-use invite code (registration=invite).")
    backup = command("backup", "Copy the database consistently, even while it serves.")
    backup.add_argument("file")
    backup.add_argument("--force", action="store_true", help="Replace an existing file.")
    command(
        "restore", "Check a backup and swap it in for the database (no server may be running)."
    ).add_argument("backup")
    command("check", "Check the database's integrity; exit 1 on any problem.")
    copy = command(
        "copy", "Copy a syncnode database into a new, empty one (SQLite to PostgreSQL, say)."
    )
    copy.add_argument("source", help="The database to copy: a file or a postgresql:// URL.")
    copy.add_argument("target", help="The empty database to fill: a file or a postgresql:// URL.")
    command("stats", "Print counts of users, keys, bytes and sessions.").add_argument(
        "--json", action="store_true", help="Print one JSON object."
    )
    return parser


def parse_setting(kind: str, text: str) -> int | bool | str:
    """Convert a flag's or variable's text to a setting of the given kind; ValueError if not."""
    text = text.strip()
    if kind == "int":
        if not (text.isascii() and text.isdigit()):
            raise ValueError("must be a whole number")
        return int(text)
    if kind == "bool":
        if text.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            raise ValueError("must be one of true, false, 1, 0, yes, no, on, off")
        return text.lower() in ("true", "1", "yes", "on")
    return text


def parse_command(
    argv: list[str], environ: Mapping[str, str]
) -> tuple[argparse.Namespace, Settings]:
    """Parse the command line into its command and Settings (flags, SYNCNODE_*, defaults)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for item in dataclasses.fields(Settings):
        flag, variable = "--" + item.name.replace("_", "-"), "SYNCNODE_" + item.name.upper()
        source, text = flag, getattr(args, item.name, None)
        if text is None:
            source, text = variable, environ.get(variable)
        if text is not None:
            try:
                values[item.name] = parse_setting(item.type, text)
            except ValueError as error:
                parser.error(f"{source} {error}.")
    try:
        return args, Settings(**values)
    except ValueError as error:
        parser.error(str(error))


def parse_args(argv: list[str], environ: Mapping[str, str]) -> Settings:
    """Build Settings from flags, then SYNCNODE_* environment variables, then defaults."""
    return parse_command(argv, environ)[1]


def app_from_environment(environ: Mapping[str, str] | None = None) -> SyncNodeApp:
    """Return the app for another WSGI server (gunicorn), with settings from SYNCNODE_* variables.

    Loaded in a server's main thread, SIGTERM and SIGINT first answer this process's
    long-polls, then do what they did before: a graceful stop does not wait for polls.
    """
    settings = parse_command([], os.environ if environ is None else environ)[1]
    app = create_app(**dataclasses.asdict(settings))
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)

            def stop(number: int, frame: Any, previous: Any = previous) -> None:
                app.context.waiters.stop()
                if callable(previous):
                    previous(number, frame)
                elif previous == signal.SIG_DFL:  # as if unhandled
                    signal.signal(number, signal.SIG_DFL)
                    os.kill(os.getpid(), number)

            signal.signal(signum, stop)
    return app


def serve(app: SyncNodeApp, settings: Settings, server: Any = None) -> None:
    """Serve the app with waitress until SIGTERM or SIGINT, then stop gracefully.

    Stopping closes the listening socket, lets the requests whose headers have arrived
    finish (for shutdown_timeout seconds at most), closes every connection and finally the
    database, so that SQLite checkpoints and removes the -wal file.
    """
    import waitress.channel
    import waitress.wasyncore

    if server is None:
        server = make_server(settings, app)
    server.application = app
    stopping = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, lambda *_: stopping.set())
    log.info(
        "syncnode %s serving %s on http://%s:%s (registration %s)",
        __version__,
        database_label(settings.database),
        settings.host,
        server.effective_port,
        settings.registration,
    )
    try:
        while not stopping.is_set():
            server.asyncore.loop(
                timeout=STOP_CHECK_SECONDS, use_poll=True, map=server._map, count=1
            )
        log.info("Stopping: finishing the requests under way.")
        waitress.wasyncore.dispatcher.close(server)  # no new connections
        app.context.waiters.stop()
        deadline = time.monotonic() + settings.shutdown_timeout
        while time.monotonic() < deadline:
            busy = bool(server.sleeping)  # woken by waiters.stop(), on their way back
            for channel in list(server._map.values()):
                if not isinstance(channel, waitress.channel.HTTPChannel):
                    continue
                receiving = channel.request is not None and channel.request.headers_finished
                if channel.requests or channel.total_outbufs_len or receiving:
                    busy = True
                else:
                    channel.close()
            if not busy:
                break
            server.asyncore.loop(timeout=0.1, use_poll=True, map=server._map, count=1)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=1)
        server.after_answers.shutdown()
        waitress.wasyncore.close_all({**server._map, **server.sleeping})
        app.close()
        log.info("Stopped.")


def copy_database(conn: Connection, target: str) -> None:
    """Copy a database consistently into target (through a .partial file, then a rename)."""
    partial = target + ".partial"
    with contextlib.closing(sqlite3.connect(partial)) as copy:
        conn.backup(copy)
    os.replace(partial, target)


def check_backup_target(target: str, database: str, force: bool) -> None:
    """Refuse a backup target that is the database itself, in no folder, or taken (unless force)."""
    folder = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(folder):
        raise ApiError("REQ01", f"The folder {folder} for the backup does not exist.")
    if os.path.exists(target):
        if os.path.samefile(target, database):
            raise ApiError("REQ01", f"{target} is the database itself; back up to another file.")
        if not force:
            raise ApiError("REQ01", f"{target} exists; pass --force to replace it.")


def restore_database(backup: str, database: str) -> str:
    """Swap a checked backup in for the database; return what was done.

    The backup must be a whole syncnode database of a schema this syncnode knows. No server
    may hold the database (see Connections.hold). The previous database is kept as
    DATABASE.before-restore with its -wal, so that no old WAL is replayed into the backup.
    """
    if not os.path.isfile(backup):
        raise ApiError("ERR01", f"There is no backup at {backup}.")
    check_database_path(database)
    uri = "file:" + urllib.parse.quote(os.path.abspath(backup)) + "?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True, isolation_level=None)) as source:
            problems = check_database(source, newest=False)
            version = source.execute("PRAGMA user_version").fetchone()[0]
            if version > len(SCHEMA):
                raise ApiError("REQ01", f"{backup} was written by a newer syncnode; upgrade first.")
            if version < 1:
                raise ApiError("REQ01", f"{backup} is not a syncnode database.")
            if problems:
                raise ApiError("REQ01", f"{backup} is not a sound syncnode database: {problems[0]}")
            users, keys = (
                source.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("users", "items")
            )
            held = None
            if os.path.exists(database) and fcntl is not None:
                held = os.open(database, os.O_RDONLY)
                try:
                    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(held)
                    raise ApiError(
                        "REQ01", f"A server has {database} open; stop it, then restore."
                    ) from None
            try:
                copy_database(source, database + ".restoring")
                kept = database + ".before-restore"
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(kept + suffix)
                if os.path.exists(database):
                    os.replace(database, kept)
                    with contextlib.suppress(FileNotFoundError):
                        os.replace(database + "-wal", kept + "-wal")
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(database + "-shm")
                os.replace(database + ".restoring", database)
            finally:
                if held is not None:
                    os.close(held)
    except sqlite3.DatabaseError as error:
        raise ApiError("REQ01", f"{backup} is not a syncnode database: {error}") from None
    previous = f" The previous database is at {kept}." if os.path.exists(kept) else ""
    return f"Restored {database} from {backup}: {users} users, {keys} keys.{previous}"


def read_new_password(stdin: Any) -> str:
    """Read a password: asked twice on a terminal, else one line of standard input."""
    if stdin.isatty():
        password = getpass.getpass("New password: ")
        if getpass.getpass("Repeat it: ") != password:
            raise ApiError("ACCT02", "The two passwords differ.")
    else:
        password = stdin.readline().rstrip("\r\n")
    check_password(password)
    return password


#: What to do instead of backup and restore on PostgreSQL.
PG_DUMP_ADVICE = (
    "On PostgreSQL, back up with the server's own tools: pg_dump --format=custom "
    "--file=syncnode.dump 'postgresql://...' while syncnode serves, and restore with "
    "pg_restore --clean --dbname='postgresql://...' syncnode.dump with every node stopped."
)

#: The tables in the order syncnode copy fills them, each after those its rows point to.
COPY_TABLES = (
    "users", "sessions", "reset_tokens", "api_keys", "invites", "items", "permissions",
    "tombstones", "attempts", "sync_state", "id_counters",
)  # fmt: skip


def open_database(database: str, settings: Settings) -> Connection:
    """Open a connection to a database for an admin command, migrated to the newest schema."""
    if not is_postgresql(database):
        check_database_path(database)
    conn = open_connection(database, settings)
    try:
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def copy_rows(source: Connection, target: Connection) -> dict[str, int]:
    """Copy every row of a syncnode database into an empty one; return the count per table.

    The source is read in one snapshot and the target written in one transaction, which
    commits only when every table holds as many rows as the source's: all or nothing.
    Values are copied one at a time, a large one streamed, so none is held whole in memory.
    """
    counts = {}
    with transaction(source), transaction(target, write=True):
        if target.execute(
            "SELECT (SELECT count(*) FROM users) + (SELECT count(*) FROM items)"
        ).fetchone()[0]:
            raise ApiError("REQ01", "The target database is not empty; copy into a new one.")
        target.execute("DELETE FROM sync_state")
        target.execute("DELETE FROM id_counters")
        for table in COPY_TABLES:
            if table == "items":
                copy_items(source, target)
            else:
                described = source.execute(f"SELECT * FROM {table} LIMIT 0").description
                # PostgreSQL's attempts.rowid: the target numbers its rows itself.
                columns = [column[0] for column in described if column[0] != "rowid"]
                names = ", ".join(columns)
                order = " ORDER BY id" if table == "sessions" else ""  # parents before children
                rows = source.execute(f"SELECT {names} FROM {table}{order}")
                statement = f"INSERT INTO {table} ({names}) VALUES ({placeholders(len(columns))})"
                while batch := [tuple(row) for row in itertools.islice(rows, 500)]:
                    target.executemany(statement, batch)
            counts[table] = source.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            copied = target.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            if copied != counts[table]:
                raise ApiError(
                    "ERR02", f"The copy of {table} has {copied} rows, not {counts[table]}."
                )
        target.restart_ids()
    return counts


def copy_items(source: Connection, target: Connection) -> None:
    """Copy the items with their ids, each value read whole only when it is small."""
    rows = source.execute(
        "SELECT id, key, token, meta, updated_ms, size FROM items ORDER BY id"
    ).fetchall()
    for item_id, key, token, meta, updated_ms, size in rows:
        small = size <= STREAM_FROM_BYTES
        value = (
            source.execute("SELECT value FROM items WHERE id = ?", (item_id,)).fetchone()[0]
            if small
            else None
        )
        target.execute(
            """
            INSERT INTO items (id, key, token, meta, updated_ms, size, value)
            VALUES (?, ?, ?, ?, ?, ?, coalesce(?, zeroblob(?)))
            """,
            (item_id, key, token, meta, updated_ms, size, value, size),
        )
        if not small:
            target.fill_value(
                item_id, source.blobopen("items", "value", item_id, readonly=True), size
            )


def copy_database_to(source_name: str, target_name: str, settings: Settings) -> str:
    """Copy a syncnode database into a new one (SQLite to PostgreSQL, say); say what moved."""
    source = open_database(source_name, settings)
    try:
        target = open_database(target_name, settings)
        try:
            counts = copy_rows(source, target)
        finally:
            target.close()
    finally:
        source.close()
    moved = ", ".join(f"{counts[table]} {table}" for table in ("users", "items", "sessions"))
    return (
        f"Copied {database_label(source_name)} to {database_label(target_name)}: {moved}; "
        "every table holds as many rows as the source's."
    )


def run_command(args: argparse.Namespace, settings: Settings, stdin: Any, stdout: Any) -> int:
    """Run an admin command on the database; return the exit status."""
    if args.command == "copy":
        print(copy_database_to(args.source, args.target, settings), file=stdout)
        return 0
    if args.command in ("backup", "restore") and is_postgresql(settings.database):
        raise ApiError("REQ01", PG_DUMP_ADVICE)
    if args.command == "check" and is_postgresql(settings.database):
        with contextlib.closing(open_connection(settings.database, settings)) as conn:
            problems = check_database(conn)
        print("\n".join(problems) if problems else "ok", file=stdout)
        return 1 if problems else 0
    if args.command == "restore":
        print(restore_database(args.backup, settings.database), file=stdout)
        return 0
    if args.command in ("backup", "check"):
        if not os.path.isfile(settings.database):
            raise ApiError("ERR01", f"There is no database at {settings.database}.")
        if args.command == "backup":
            check_backup_target(args.file, settings.database, args.force)
        conn = sqlite3.connect(settings.database, isolation_level=None)
        try:
            if args.command == "check":
                problems = check_database(conn)
                print("\n".join(problems) if problems else "ok", file=stdout)
                return 1 if problems else 0
            copy_database(conn, args.file)
            print(f"Backed up {settings.database} to {args.file}.", file=stdout)
            return 0
        finally:
            conn.close()
    ctx = open_context(settings, time.time)
    try:
        conn = ctx.connection()
        now_ms = ctx.now_ms()
        if args.command == "stats":
            stats = get_stats(conn, now_ms)
            lines = (f"{name}: {value}" for name, value in stats.items())
            print(json.dumps(stats) if args.json else "\n".join(lines), file=stdout)
            return 0
        if args.command == "invite":
            print(create_invite(conn, now_ms, settings.invite_ttl * 1000)[0], file=stdout)
            return 0
        if args.command == "user" and args.user_command == "list":
            for user in sorted(list_users(conn), key=lambda user: user.row_id):
                admin = "admin" if user.is_admin else ""
                created = iso_time(user.created_ms)
                print(user.name, user.public_id, created, admin, sep="\t", file=stdout)
            return 0
        name = normalize_id(args.id)
        if args.command == "user" and args.user_command == "add":
            password_hash = ctx.hashing.hash(read_new_password(stdin))
            create_user(conn, name, password_hash, now_ms)
            print(f"Added {name}.", file=stdout)
            return 0
        user = find_user(conn, name)
        if user is None:
            raise ApiError("ERR01", f"There is no user {name}.")
        if args.command == "reset-token":
            print(create_reset_token(conn, user[0], now_ms, settings.reset_ttl * 1000), file=stdout)
        elif args.command == "unlock":
            cleared = clear_attempts(conn, "login_id", name)
            print(f"Cleared {cleared} failed logins of {name}.", file=stdout)
        elif args.user_command == "delete":
            delete_account(conn, user[0], now_ms)
            print(f"Deleted {name}.", file=stdout)
        else:
            password_hash = ctx.hashing.hash(read_new_password(stdin))
            set_password(conn, user[0], password_hash, None, now_ms)
            print(f"Set the password of {name}; its sessions have ended.", file=stdout)
        return 0
    finally:
        ctx.close()


def main(argv: list[str] | None = None) -> int:
    """Run the command line: serve (the default) or run an admin command."""
    args, settings = parse_command(sys.argv[1:] if argv is None else argv, os.environ)
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    server = None
    try:
        if args.command not in (None, "serve"):
            return run_command(args, settings, sys.stdin, sys.stdout)
        cpus = pin_python_threads(settings)  # before the serving threads start
        try:  # listen first: a taken port must not create or migrate a database
            server = make_server(settings)
        except (OSError, ValueError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            print(
                f"syncnode: cannot listen on {settings.host}:{settings.port}: {reason}",
                file=sys.stderr,
            )
            return 1
        app = create_app(**dataclasses.asdict(settings))
        app.context.hashing.cpus = cpus
        server.application = app
    except (KeyboardInterrupt, EOFError):
        print("syncnode: stopped before the command finished.", file=sys.stderr)
        return 1
    except (ApiError, DatabaseUnusable) as error:
        print(f"syncnode: {error}", file=sys.stderr)
        return 1
    except (sqlite3.Error, *database_errors(settings.database), DatabaseTooNew, OSError) as error:
        database = database_label(settings.database)
        print(f"syncnode: cannot use the database {database}: {error}", file=sys.stderr)
        return 1
    finally:
        if server is not None and server.application is None:
            server.close()  # the database could not be opened
    serve(app, settings, server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
