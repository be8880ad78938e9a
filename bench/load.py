#!/usr/bin/env python3
"""Load generator for syncnode and bench/baseline.py: standard library only, 127.0.0.1 only.

Two steps, each a subcommand:

- ``load.py setup --port P --users N --out state.json`` creates N users over HTTP, each with a
  session and its own 1 KiB value, and 99 shared keys that the first user owns and every other
  user may read, so that GET /store lists 100 keys for everyone (``--shared-keys 0`` skips them
  when nothing will list). Against the baseline add ``--prefix /seed`` (its seed routes,
  enabled by ``baseline.py --allow-seed``).
- ``load.py run --state state.json --scenario get --clients 8 --server-pid PID`` drives one
  scenario for --duration seconds or --max-requests requests, whichever comes first, and prints
  one JSON line per group of clients on standard output and a summary on standard error.

Several servers on one database (syncnode nodes on one PostgreSQL database): give the state file
a ``"ports"`` list, and client i (the i-th user of the state, counted over every group) talks to
``ports[i % len(ports)]``; without it every client uses ``"port"``, the one setup wrote.

Scenarios (each client is one user of the state file, with its own key and session):

- ``get``: GET /store/<own key> (a 1 KiB value);
- ``put``: PUT /store/<own key> by compare-and-swap, sending the token of the previous answer;
- ``list``: GET /store (100 visible keys);
- ``login``: POST /auth with the user's id and password;
- ``mixed``: 80 % get, 20 % put;
- ``hello``: GET /hello (the baseline's constant route; syncnode has none).

``--with login:4`` runs a second group of clients (other users) at the same time, and reports it
on its own line: how logins slow down everyone else.

Clients run in min(clients, 4) processes of clients/processes threads each, so that the client
side is not held by one GIL, and each thread keeps one keep-alive http.client connection. A
request counts as an error when it fails or answers anything but 2xx. The server's CPU time per
request comes from /proc/<server pid>/stat (utime + stime) before and after the run; with
--server-pid given more than once (one per node), it is the sum over those processes.
"""

from __future__ import annotations

import argparse
import array
import http.client
import json
import math
import multiprocessing
import os
import random
import resource
import sys
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass

#: The only host this tool talks to.
HOST = "127.0.0.1"
SCENARIOS = ("get", "put", "list", "login", "mixed", "hello")
MAX_PROCESSES = 4
VALUE_BYTES = 1024
#: Keys the first user shares with all others: with their own key, each user sees 100.
SHARED_KEYS = 99
#: Seconds that connecting, priming and the end of a run may take beyond --duration.
GRACE_SECONDS = 120
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ==================================================================================================
# HTTP
# ==================================================================================================


class ServerError(Exception):
    """A setup request got an answer other than the expected one."""


def check_host(host: str) -> str:
    """Return the host if it is 127.0.0.1; this tool sends load nowhere else."""
    if host != HOST:
        raise SystemExit(f"load.py talks to {HOST} only, not to {host!r}.")
    return host


def connect(port: int, timeout: float = 30) -> http.client.HTTPConnection:
    """Open a keep-alive connection to the server on 127.0.0.1."""
    return http.client.HTTPConnection(check_host(HOST), port, timeout=timeout)


def quote_key(key: str) -> str:
    """Percent-encode a key for a URL path, keeping its slashes."""
    return urllib.parse.quote(key, safe="/")


def call(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """Send one request and read the whole answer; return (status, headers, body)."""
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    return response.status, response.headers, response.read()


def expect(answer: tuple[int, http.client.HTTPMessage, bytes], status: int, what: str):
    """Return the answer if it has the status, else raise ServerError naming the request."""
    if answer[0] != status:
        raise ServerError(f"{what}: expected {status}, got {answer[0]} {answer[2][:200]!r}")
    return answer


def bearer(token: str) -> dict[str, str]:
    """Return the Authorization header of a session token."""
    return {"Authorization": f"Bearer {token}"}


# ==================================================================================================
# Setup
# ==================================================================================================


def create_user(port: int, prefix: str, user_id: str, password: str) -> str:
    """Register a user with POST /account and return its session token."""
    conn = connect(port, timeout=120)
    try:
        body = json.dumps({"id": user_id, "password": password}).encode()
        answer = call(conn, "POST", f"{prefix}/account", body, {"Content-Type": "application/json"})
        return json.loads(expect(answer, 200, f"POST {prefix}/account")[2])["token"]
    finally:
        conn.close()


def create_key(conn: http.client.HTTPConnection, prefix: str, token: str, key: str, value: bytes):
    """Create a key with PUT /store/<key> (no X-Sync-Token) and return its store token."""
    headers = {**bearer(token), "Content-Type": "application/octet-stream"}
    answer = call(conn, "PUT", f"{prefix}/store/{quote_key(key)}", value, headers)
    return expect(answer, 204, f"PUT {prefix}/store")[1]["X-Sync-Token"]


def setup(
    port: int, prefix: str, users: int, shared_keys: int = SHARED_KEYS, hashing_threads: int = 2
) -> dict:
    """Create the users, their keys and the shared keys; return the state that `run` reads.

    Registration spends one Argon2 hash each, the slowest part, so a few run at once.
    """
    tag = os.urandom(4).hex()
    password = f"bench-password-{tag}"
    names = [f"bench-{tag}-{number:03d}" for number in range(users)]
    tokens: list[str | None] = [None] * users

    def register(number: int) -> None:
        tokens[number] = create_user(port, prefix, names[number], password)

    numbers = list(range(users))
    workers = [
        threading.Thread(target=lambda part=part: [register(n) for n in part])
        for part in (numbers[i::hashing_threads] for i in range(hashing_threads))
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if None in tokens:
        raise ServerError("Some users could not be registered; see the error above.")
    conn = connect(port)
    try:
        state_users = []
        for name, token in zip(names, tokens, strict=True):
            key = f"bench-{tag}/{name}/value"
            create_key(conn, prefix, token, key, os.urandom(VALUE_BYTES))
            state_users.append({"id": name, "password": password, "token": token, "key": key})
        readers = [{"user": name, "permission": "READ"} for name in names[1:]]
        for number in range(shared_keys):
            key = f"bench-{tag}/shared/{number:03d}"
            create_key(conn, prefix, tokens[0], key, os.urandom(VALUE_BYTES))
            if readers:
                headers = {**bearer(tokens[0]), "Content-Type": "application/json"}
                path = f"{prefix}/permission/{quote_key(key)}"
                answer = call(conn, "PUT", path, json.dumps(readers).encode(), headers)
                expect(answer, 204, f"PUT {prefix}/permission")
    finally:
        conn.close()
    return {"port": port, "tag": tag, "visible_keys": shared_keys + 1, "users": state_users}


# ==================================================================================================
# Clients
# ==================================================================================================


def port_of(state: dict, number: int) -> int:
    """Return the port of the state's client number: ports[number % len(ports)], else port."""
    ports = state.get("ports") or [state["port"]]
    return ports[number % len(ports)]


@dataclass(frozen=True, slots=True)
class Group:
    """Clients that run one scenario together, each as its own user."""

    scenario: str
    clients: int


class Client(threading.Thread):
    """One simulated client: a user, its key and session, and one keep-alive connection."""

    def __init__(
        self, state: dict, scenario: str, number: int, user: dict, max_requests: int, seed: int
    ) -> None:
        super().__init__(daemon=True)
        self.port, self.visible_keys = port_of(state, number), state["visible_keys"]
        self.scenario = scenario
        self.max_requests = max_requests
        self.random = random.Random(seed)
        self.value = self.random.randbytes(VALUE_BYTES)
        self.path = "/store/" + quote_key(user["key"])
        self.auth = bearer(user["token"])
        self.login_body = json.dumps({"id": user["id"], "password": user["password"]}).encode()
        self.conn: http.client.HTTPConnection | None = None
        self.store_token = ""
        self.deadline = 0.0
        self.ready: threading.Barrier | None = None
        self.go: threading.Event | None = None
        self.failure = ""
        self.latencies = array.array("d")
        self.statuses: Counter[str] = Counter()
        #: Seconds to wait before the next request, after a 503 with Retry-After.
        self.pause = 0.0

    def prime(self) -> None:
        """Connect and learn what the scenario needs before the clock starts."""
        self.conn = connect(self.port)
        self.conn.connect()
        if self.scenario in ("get", "put", "mixed"):
            self.fetch_token()
        elif self.scenario == "list":
            answer = expect(call(self.conn, "GET", "/store", headers=self.auth), 200, "GET /store")
            listed = len(json.loads(answer[2]))
            if listed != self.visible_keys:
                raise ServerError(f"GET /store lists {listed} keys, not {self.visible_keys}.")

    def fetch_token(self) -> None:
        """Read the client's own value to learn its current store token."""
        answer = call(self.conn, "GET", self.path, headers=self.auth)
        self.store_token = expect(answer, 200, "GET /store/<key>")[1]["X-Sync-Token"]

    def request(self, scenario: str) -> int:
        """Send one request of the scenario; return its status."""
        conn = self.conn
        if scenario == "get":
            conn.request("GET", self.path, headers=self.auth)
        elif scenario == "put":
            headers = {**self.auth, "X-Sync-Token": self.store_token}
            conn.request("PUT", self.path, body=self.value, headers=headers)
        elif scenario == "list":
            conn.request("GET", "/store", headers=self.auth)
        elif scenario == "login":
            headers = {"Content-Type": "application/json"}
            conn.request("POST", "/auth", body=self.login_body, headers=headers)
        else:
            conn.request("GET", "/hello")
        response = conn.getresponse()
        response.read()
        if scenario == "put":
            if response.status == 204:
                self.store_token = response.headers["X-Sync-Token"]
            else:
                self.fetch_token()
        if response.status == 503:  # BUSY01: come back when Retry-After says, as clients do
            self.pause = float(response.headers.get("Retry-After") or 1)
        return response.status

    def run(self) -> None:
        try:
            self.prime()
        except Exception as error:  # reported, and this client sends nothing
            self.failure = f"{type(error).__name__}: {error}"
        self.ready.wait(GRACE_SECONDS)
        self.go.wait(GRACE_SECONDS)
        if self.failure:
            return
        scenario, mixed = self.scenario, self.scenario == "mixed"
        clock, latencies, statuses = time.perf_counter, self.latencies, self.statuses
        for _ in range(self.max_requests):
            if time.monotonic() >= self.deadline:
                break
            kind = ("get" if self.random.random() < 0.8 else "put") if mixed else scenario
            started = clock()
            try:
                status = str(self.request(kind))
            except (OSError, http.client.HTTPException, ServerError) as error:
                status = type(error).__name__
                self.conn.close()
            latencies.append(clock() - started)
            statuses[status] += 1
            if self.pause:
                time.sleep(max(0.0, min(self.pause, self.deadline - time.monotonic())))
                self.pause = 0.0
        self.conn.close()


def run_process(
    state: dict,
    group_index: int,
    scenario: str,
    users: list[tuple[int, dict]],
    duration: float,
    max_per_client: int,
    barrier: multiprocessing.synchronize.Barrier,
    results: multiprocessing.Queue,
) -> None:
    """Run some clients of one group in threads of this process; put their results on the queue.

    Each user comes with its number in the state file, which chooses its port (see port_of).
    """
    clients = [
        Client(state, scenario, number, user, max_per_client, seed=hash((os.getpid(), n)))
        for n, (number, user) in enumerate(users)
    ]
    ready, go = threading.Barrier(len(clients) + 1), threading.Event()
    for client in clients:
        client.ready, client.go = ready, go
        client.start()
    ready.wait(GRACE_SECONDS)
    barrier.wait(GRACE_SECONDS)
    started = time.monotonic()
    for client in clients:
        client.deadline = started + duration
    go.set()
    for client in clients:
        client.join()
    ended = time.monotonic()
    latencies = array.array("d")
    statuses: Counter[str] = Counter()
    for client in clients:
        latencies.extend(client.latencies)
        statuses.update(client.statuses)
    results.put(
        {
            "group": group_index,
            "started": started,
            "ended": ended,
            "latencies": latencies.tobytes(),
            "statuses": dict(statuses),
            "failures": [client.failure for client in clients if client.failure],
        }
    )


def cpu_seconds(pid: int) -> float:
    """Return the CPU time (user + system) the process has used, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    # After the command name: state is field 3 of stat(5), utime 14 and stime 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def percentile(ordered: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of sorted values (0 for none)."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def run(
    state: dict,
    groups: list[Group],
    duration: float,
    max_requests: int,
    server_pids: list[int] | None,
) -> list[dict]:
    """Run the groups of clients at once and return one result per group.

    The clock starts when every client of every group has connected and primed, and each
    client stops at the deadline or after its share of max_requests, whichever comes first.
    The server CPU time is the sum over server_pids (one per node), None without any.
    """
    context = multiprocessing.get_context("fork")
    plans, offset = [], 0
    total_clients = sum(group.clients for group in groups)
    if total_clients > len(state["users"]):
        raise SystemExit(f"The state has {len(state['users'])} users; {total_clients} needed.")
    for index, group in enumerate(groups):
        users = list(enumerate(state["users"]))[offset : offset + group.clients]
        offset += group.clients
        processes = min(group.clients, MAX_PROCESSES)
        plans += [(index, group.scenario, users[n::processes]) for n in range(processes)]
    max_per_client = max(1, max_requests // total_clients)
    barrier, results = context.Barrier(len(plans) + 1), context.Queue()
    workers = [
        context.Process(
            target=run_process,
            args=(state, *plan, duration, max_per_client, barrier, results),
            daemon=True,
        )
        for plan in plans
    ]
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for worker in workers:
        worker.start()
    try:
        barrier.wait(GRACE_SECONDS)
        cpu_before = sum(map(cpu_seconds, server_pids)) if server_pids else None
        parts = [results.get(timeout=duration + GRACE_SECONDS) for _ in workers]
        cpu_after = sum(map(cpu_seconds, server_pids)) if server_pids else None
        for worker in workers:
            worker.join(GRACE_SECONDS)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = (children.ru_utime + children.ru_stime) - (
        children_before.ru_utime + children_before.ru_stime
    )
    answers = []
    for index, group in enumerate(groups):
        mine = [part for part in parts if part["group"] == index]
        latencies = array.array("d")
        statuses: Counter[str] = Counter()
        for part in mine:
            latencies.frombytes(part["latencies"])
            statuses.update(part["statuses"])
        seconds = max(part["ended"] for part in mine) - min(part["started"] for part in mine)
        ordered = sorted(latencies)
        busy = statuses.get("503", 0)
        errors = sum(n for status, n in statuses.items() if not status.startswith("2")) - busy
        answers.append(
            {
                "scenario": group.scenario,
                "clients": group.clients,
                "processes": len(mine),
                "seconds": round(seconds, 3),
                "requests": len(ordered),
                "requests_per_s": round(len(ordered) / seconds, 1) if seconds else 0.0,
                "ok_per_s": round((len(ordered) - errors - busy) / seconds, 1) if seconds else 0.0,
                "p50_ms": round(percentile(ordered, 0.50) * 1000, 2),
                "p99_ms": round(percentile(ordered, 0.99) * 1000, 2),
                "max_ms": round(ordered[-1] * 1000, 2) if ordered else 0.0,
                "errors": errors,
                "busy": busy,
                "statuses": dict(sorted(statuses.items())),
                "failures": [failure for part in mine for failure in part["failures"]],
            }
        )
    total = sum(answer["requests"] for answer in answers)
    for answer in answers:
        # The server's and the load generator's CPU are shared by all groups of the run.
        answer["server_cpu_ms_per_request"] = (
            round((cpu_after - cpu_before) * 1000 / total, 3) if server_pids and total else None
        )
        answer["client_cpu_ms_per_request"] = round(client_cpu * 1000 / total, 3) if total else None
    return answers


# ==================================================================================================
# CLI
# ==================================================================================================


def parse_group(text: str) -> Group:
    """Parse SCENARIO:CLIENTS."""
    scenario, _, clients = text.partition(":")
    if scenario not in SCENARIOS or not clients.isdigit() or int(clients) < 1:
        raise argparse.ArgumentTypeError(f"expected SCENARIO:CLIENTS, got {text!r}")
    return Group(scenario, int(clients))


def summary(result: dict) -> str:
    """Return one human line for a result."""
    cpu = result["server_cpu_ms_per_request"]
    return (
        f"{result['scenario']:>6} {result['clients']:>3} clients: "
        f"{result['requests_per_s']:>9.1f} req/s  p50 {result['p50_ms']:.2f} ms  "
        f"p99 {result['p99_ms']:.2f} ms  errors {result['errors']}"
        + (f"  server CPU {cpu:.3f} ms/req" if cpu is not None else "")
        + (f"  FAILED: {result['failures'][0]}" if result["failures"] else "")
    )


def main(argv: list[str] | None = None) -> int:
    """Run the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("setup", help="Create users, sessions and keys over HTTP.")
    make.add_argument("--host", default=HOST, type=check_host, help="Only 127.0.0.1.")
    make.add_argument("--port", type=int, required=True)
    make.add_argument("--users", type=int, default=36, help="Users to create (one per client).")
    make.add_argument("--prefix", default="", help="Path prefix of the setup routes (/seed).")
    make.add_argument("--shared-keys", type=int, default=SHARED_KEYS, help="Keys all may read.")
    make.add_argument("--out", required=True, help="State file to write (JSON).")
    drive = commands.add_parser("run", help="Run one scenario and report it.")
    drive.add_argument("--state", required=True, help="State file written by setup.")
    drive.add_argument("--scenario", choices=SCENARIOS, required=True)
    drive.add_argument("--clients", type=int, default=8)
    drive.add_argument(
        "--with", dest="extra", type=parse_group, action="append", default=[],
        metavar="SCENARIO:CLIENTS", help="Another group of clients running at the same time.",
    )  # fmt: skip
    drive.add_argument("--duration", type=float, default=5.0, help="Seconds (default 5).")
    drive.add_argument("--max-requests", type=int, default=200_000, help="Requests at most.")
    drive.add_argument(
        "--server-pid", type=int, action="append", dest="server_pids", metavar="PID",
        help="Server process to measure CPU time of; repeat for several (their sum).",
    )  # fmt: skip
    drive.add_argument("--quiet", action="store_true", help="No summary on standard error.")
    args = parser.parse_args(argv)
    if args.command == "setup":
        state = setup(args.port, args.prefix, args.users, args.shared_keys)
        with open(args.out, "w") as out:
            json.dump(state, out)
        print(f"Created {args.users} users on port {args.port}.", file=sys.stderr)
        return 0
    with open(args.state) as file:
        state = json.load(file)
    groups = [Group(args.scenario, args.clients), *args.extra]
    results = run(state, groups, args.duration, args.max_requests, args.server_pids)
    for result in results:
        print(json.dumps(result), flush=True)
        if not args.quiet:
            print(summary(result), file=sys.stderr)
    return 1 if any(result["failures"] for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
