// Tests of the JavaScript client against live syncnode servers started by test_syncnode.py:
// SYNCNODE_URL (default settings) and SYNCNODE_ONE_WAITER_URL (--max-waiters 1).
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import {
  AuthError, Busy, Conflict, Forbidden, Gone, InvalidRequest, NotFound, QuotaExceeded,
  ServerError, SyncNode, SyncNodeError, TooLarge, fromBase64, jsonCodec, memoryStorage,
  toBase64,
} from "../syncnode.js";

const URL_ = process.env.SYNCNODE_URL;
const ONE_WAITER_URL = process.env.SYNCNODE_ONE_WAITER_URL;
const SMALL_QUOTA_URL = process.env.SYNCNODE_SMALL_QUOTA_URL;
const PASSWORD = "correct horse battery";
let users = 0;

async function newUser(url = URL_, options = {}) {
  const client = new SyncNode({ url, ...options });
  const id = `user${process.pid}-${++users}`;
  await client.register(id, PASSWORD);
  return { client, id };
}

async function collect(iterator, count, timeoutMs = 10000) {
  const items = [];
  const deadline = setTimeout(() => {}, timeoutMs);
  try {
    for await (const item of iterator) {
      items.push(item);
      if (items.length >= count) break;
    }
  } finally {
    clearTimeout(deadline);
  }
  return items;
}

const utf8 = (bytes) => new TextDecoder().decode(bytes);

test("register, log out, log in, and an API key", async () => {
  const { client, id } = await newUser();
  assert.match(client.token, /^[A-Za-z0-9_-]{20,}$/);
  const token = client.token;
  await client.logOut();
  assert.equal(client.token, null);
  await assert.rejects(new SyncNode({ url: URL_, token }).get("k"), AuthError);
  await assert.rejects(client.logIn(id, "wrong password"), (error) => {
    assert.ok(error instanceof AuthError && error instanceof SyncNodeError);
    assert.equal(error.status, 401);
    assert.equal(error.code, "AUTH01");
    return true;
  });
  await client.logIn(id, PASSWORD);
  const created = await (await client.json("POST", "/api/api-keys", { name: "k", permissions: ["store.read"] })).json();
  const reader = new SyncNode({ url: URL_ });
  reader.useApiKey(created.secret);
  await client.put("shared", "v", { create: true });
  assert.equal(utf8((await reader.get("shared")).value), "v");
  await assert.rejects(reader.put("other", "v"), Forbidden);
});

test("get, put with a token, create only, meta, and revalidation with If-None-Match", async () => {
  const { client } = await newUser();
  assert.equal(await client.get("notes/today"), null);
  const first = await client.put("notes/today", "buy milk", { create: true, meta: "text/plain" });
  const read = await client.getText("notes/today");
  assert.deepEqual(read, { value: "buy milk", token: first, meta: "text/plain" });
  const seen = [];
  const counting = new SyncNode({
    url: URL_, token: client.token,
    fetch: async (url, init) => { const response = await fetch(url, init); seen.push(response.status); return response; },
  });
  assert.equal(utf8((await counting.get("notes/today")).value), "buy milk");
  assert.equal(utf8((await counting.get("notes/today")).value), "buy milk");
  assert.deepEqual(seen, [200, 304]);
  const second = await client.put("notes/today", new Uint8Array([0, 255, 1]), { token: first });
  assert.notEqual(second, first);
  assert.deepEqual([...(await counting.get("notes/today")).value], [0, 255, 1]);
  assert.deepEqual(seen, [200, 304, 200]);
  assert.deepEqual((await client.getJSON("missing")), null);
  await client.put("j", JSON.stringify({ a: 1 }), { create: true });
  assert.deepEqual((await client.getJSON("j")).value, { a: 1 });
});

test("a stale token is a Conflict carrying the current token and value", async () => {
  const { client } = await newUser();
  const first = await client.put("k", "one", { create: true });
  const second = await client.put("k", "two", { token: first });
  await assert.rejects(client.put("k", "three", { token: first }), (error) => {
    assert.ok(error instanceof Conflict);
    assert.equal(error.code, "KEY01");
    assert.equal(error.currentToken, second);
    assert.equal(utf8(error.value), "two");
    return true;
  });
  await assert.rejects(client.put("k", "again", { create: true }), Conflict);
  assert.equal(utf8((await client.get("k")).value), "two");
});

test("update reads, applies, writes and retries on a conflict", async () => {
  const { client } = await newUser();
  const other = new SyncNode({ url: URL_, token: client.token });
  await client.put("counter", "0", { create: true });
  let calls = 0;
  const token = await client.update("counter", async (value) => {
    calls++;
    if (calls === 1) {  // someone else writes between the read and the write
      const current = await other.get("counter");
      await other.put("counter", "10", { token: current.token });
    }
    return String(Number(utf8(value)) + 1);
  });
  assert.equal(calls, 2);
  const stored = await client.get("counter");
  assert.equal(utf8(stored.value), "11");
  assert.equal(stored.token, token);
  assert.equal(await client.update("fresh", (value) => (value === null ? "new" : undefined)) !== null, true);
  assert.equal(utf8((await client.get("fresh")).value), "new");
});

test("delete needs the current token", async () => {
  const { client } = await newUser();
  const token = await client.put("gone", "v", { create: true });
  await assert.rejects(client.delete("gone", "not-the-token"), Conflict);
  await client.delete("gone", token);
  assert.equal(await client.get("gone"), null);
  await assert.rejects(client.delete("gone", token), NotFound);
});

test("a batch applies all or nothing and names the failing operation", async () => {
  const { client } = await newUser();
  const token = await client.put("a", "1", { create: true });
  await assert.rejects(
    client.batch().put("b", "2").delete("a", "stale").commit(),
    (error) => error instanceof Conflict && error.index === 1,
  );
  assert.equal(await client.get("b"), null);
  const results = await client.batch().put("b", "héllo").delete("a", token).commit();
  assert.equal(results.length, 2);
  assert.equal(utf8((await client.get("b")).value), "héllo");
  assert.equal(await client.get("a"), null);
  const reader = await newUser();
  await client.share("b", { [reader.id]: "READ" });
  await assert.rejects(
    reader.client.batch().put("mine", "x").put("b", "y", { token: (await client.get("b")).token }).commit(),
    (error) => error instanceof Forbidden && error.index === 1,
  );
  assert.equal(await reader.client.get("mine"), null);
});

test("list follows Link across pages, with values inline", async () => {
  const { client } = await newUser();
  for (let number = 0; number < 7; number++) await client.put(`p/${number}`, `v${number}`, { create: true });
  await client.put("other", "x", { create: true });
  const requests = [];
  const counting = new SyncNode({
    url: URL_, token: client.token,
    fetch: (url, init) => { requests.push(String(url)); return fetch(url, init); },
  });
  const entries = [];
  for await (const entry of counting.list({ prefix: "p/", limit: 3, values: true })) entries.push(entry);
  assert.deepEqual(entries.map((entry) => entry.key), [0, 1, 2, 3, 4, 5, 6].map((n) => `p/${n}`));
  assert.deepEqual(entries.map((entry) => utf8(entry.value)), [0, 1, 2, 3, 4, 5, 6].map((n) => `v${n}`));
  assert.equal(requests.length, 3);
  assert.ok(requests.slice(1).every((url) => url.startsWith("http://127.0.0.1:")), "Link is absolute");
});

test("changes yields a reset, then each change; the cursor follows", async () => {
  const { client } = await newUser();
  await client.put("c/old", "1", { create: true });
  const controller = new AbortController();
  const feed = client.changes({ prefix: "c/", wait: 5, values: true, signal: controller.signal });
  const first = await feed.next();
  assert.equal(first.value.type, "reset");
  assert.deepEqual(first.value.entries.map((entry) => entry.key), ["c/old"]);
  const writer = new SyncNode({ url: URL_, token: client.token });
  setTimeout(() => writer.put("c/new", "2", { create: true }), 200);
  const second = await feed.next();
  assert.equal(second.value.type, "changes");
  assert.deepEqual(second.value.entries.map((entry) => [entry.key, utf8(entry.value)]), [["c/new", "2"]]);
  assert.ok(second.value.cursor > first.value.cursor);
  const token = (await client.get("c/old")).token;
  setTimeout(() => writer.delete("c/old", token), 100);
  const third = await feed.next();
  assert.deepEqual(third.value.entries.map((entry) => [entry.key, entry.deleted]), [["c/old", true]]);
  controller.abort();
  assert.equal((await feed.next()).done, true);
});

test("a cursor the server no longer reaches (SYNC01) is recovered with a reset", async () => {
  const { client } = await newUser();
  await client.put("r/kept", "1", { create: true });
  await assert.rejects(client.request("GET", "/store?since=999999999999"), Gone);
  const controller = new AbortController();
  const feed = client.changes({ prefix: "r/", since: 999999999999, wait: 1, signal: controller.signal });
  const event = (await feed.next()).value;
  assert.equal(event.type, "reset");
  assert.deepEqual(event.entries.map((entry) => entry.key), ["r/kept"]);
  controller.abort();
  await feed.return();
});

test("a declined poll backs off instead of spinning, then sees the change", async () => {
  const waiter = await newUser(ONE_WAITER_URL);
  const { client } = await newUser(ONE_WAITER_URL);
  // The one place is taken by another user's poll.
  const controller = new AbortController();
  const holder = waiter.client.changes({ wait: 20, signal: controller.signal });
  await holder.next();  // its reset
  const holding = holder.next();
  await new Promise((resolve) => setTimeout(resolve, 300));
  let polls = 0;
  const counting = new SyncNode({
    url: ONE_WAITER_URL, token: client.token,
    fetch: (url, init) => { polls++; return fetch(url, init); },
  });
  const feed = counting.changes({ wait: 20, signal: controller.signal });
  await feed.next();  // the reset
  const started = Date.now();
  setTimeout(() => client.put("late", "v", { create: true }), 2500);
  const event = (await feed.next()).value;
  assert.deepEqual(event.entries.map((entry) => entry.key), ["late"]);
  const seconds = (Date.now() - started) / 1000;
  assert.ok(polls <= 2 + Math.ceil(seconds) + 1, `${polls} polls in ${seconds} s`);
  controller.abort();
  await holding.catch(() => {});
});

test("error classes carry the server's code", async () => {
  const { client } = await newUser();
  await assert.rejects(client.request("GET", "/store?limit=0"), (error) => error instanceof InvalidRequest && error.code === "REQ01");
  await assert.rejects(client.put("big", "x", { meta: "\u00e9" }), (error) => error instanceof InvalidRequest || error instanceof TypeError);
  await assert.rejects(client.put("", "x"), SyncNodeError);
  const huge = new Uint8Array(9000).fill(65);
  await assert.rejects(client.put("m", "x", { meta: new TextDecoder().decode(huge) }), TooLarge);
  const offline = new SyncNode({ url: "http://127.0.0.1:9", token: client.token });
  await assert.rejects(offline.get("k"), (error) => error instanceof ServerError && error.status === 0);
  for (const Class of [AuthError, Forbidden, NotFound, Conflict, Gone, TooLarge, QuotaExceeded, Busy, ServerError]) {
    assert.ok(new Class("m", { status: 1 }) instanceof SyncNodeError);
  }
  const busy = new Busy("m", { retryAfter: 3 });
  assert.equal(busy.retryAfter, 3);
});

test("permissions: share, list the holders, and a quota the server enforces", async () => {
  const { client, id } = await newUser(SMALL_QUOTA_URL);
  const reader = await newUser(SMALL_QUOTA_URL);
  await client.put(`${id}/a`, "1", { create: true });
  await client.share(`${id}/a`, { [reader.id]: "READ" });
  const holders = await client.permissions(`${id}/a`);
  assert.deepEqual(holders.map((holder) => [holder.user, holder.permission]).sort(), [[id, "OWN"], [reader.id, "READ"]].sort());
  assert.equal(utf8((await reader.client.get(`${id}/a`)).value), "1");
  await client.put(`${id}/b`, "2", { create: true });
  await assert.rejects(client.put(`${id}/c`, "3", { create: true }), (error) => {
    assert.ok(error instanceof QuotaExceeded);
    assert.equal(error.status, 507);
    assert.equal(error.code, "QUOTA01");
    return true;
  });
  assert.equal(await client.get(`${id}/c`), null);
});

test("keys with dot segments, spaces and signs are stored as given", async () => {
  const { client, id } = await newUser();
  const keys = [`${id}/f/../g`, `${id}/d/./e`, `${id}/..`, `${id}/a b?c#d%e`, `${id}/ünï/`];
  for (const key of keys) await client.put(key, key, { create: true });
  const listed = [];
  for await (const entry of client.list({ prefix: `${id}/` })) listed.push(entry.key);
  assert.deepEqual(listed.sort(), [...keys].sort());
  for (const key of keys) assert.equal(utf8((await client.get(key)).value), key);
});

test("update keeps the meta, and the cache never shares the caller's bytes", async () => {
  const { client, id } = await newUser();
  await client.put(`${id}/m`, "1", { create: true, meta: "text/plain" });
  await client.update(`${id}/m`, (value) => String(Number(utf8(value)) + 1));
  const fresh = new SyncNode({ url: URL_, token: client.token });
  assert.deepEqual(await fresh.getText(`${id}/m`), { value: "2", token: (await fresh.get(`${id}/m`)).token, meta: "text/plain" });
  const bytes = new TextEncoder().encode("hello");
  await client.put(`${id}/b`, bytes, { create: true });
  bytes[0] = 0x4a;
  const read = await client.get(`${id}/b`);
  assert.equal(utf8(read.value), "hello");
  read.value[0] = 0x58;
  assert.equal(utf8((await client.get(`${id}/b`)).value), "hello");
  await assert.rejects(client.put(`${id}/c`, "x", { create: true, meta: "café" }), InvalidRequest);
});

test("a replica keeps an edit made while the same key is being written", async () => {
  const { client, id } = await newUser();
  const slow = (url, init) => (init?.method === "PUT"
    ? new Promise((resolve) => setTimeout(resolve, 300)).then(() => fetch(url, init))
    : fetch(url, init));
  const writer = new SyncNode({ url: URL_, token: client.token, fetch: slow });
  const replica = await writer.replica({ prefix: `${id}/`, wait: 1 }).start();
  await replica.set(`${id}/k`, { title: "v1" });
  await new Promise((resolve) => setTimeout(resolve, 100)); // v1's PUT is under way
  await replica.set(`${id}/k`, { title: "v2" });
  await waitFor(async () => (await client.getJSON(`${id}/k`))?.value?.title === "v2" && replica.pending.size === 0);
  assert.deepEqual(replica.get(`${id}/k`), { title: "v2" });
  await replica.stop();
});

test("a replica reports a write the server refuses and goes on with the others", async () => {
  const { client, id } = await newUser();
  const replica = await client.replica({ prefix: `${id}/`, wait: 1 }).start();
  const errors = [];
  replica.onError((error, key) => errors.push([error.code, key]));
  const long = `${id}/` + "x".repeat(1100);
  await replica.set(long, { n: 1 });
  await replica.set(`${id}/fine`, { n: 2 });
  await waitFor(async () => (await client.getJSON(`${id}/fine`))?.value?.n === 2);
  assert.deepEqual(errors, [["REQ01", long]]);
  assert.equal(replica.pending.size, 0);
  await replica.stop();
});

test("a stopped replica sends nothing more", async () => {
  const { client, id } = await newUser();
  let requests = 0;
  const offline = new SyncNode({
    url: URL_, token: client.token,
    fetch: () => { requests++; return Promise.reject(new TypeError("fetch failed")); },
  });
  const replica = await offline.replica({ prefix: `${id}/`, wait: 1 }).start();
  await replica.set(`${id}/k`, { n: 1 });
  await new Promise((resolve) => setTimeout(resolve, 300));
  await replica.stop();
  const before = requests;
  await new Promise((resolve) => setTimeout(resolve, 2500));
  assert.equal(requests, before);
});

test("failed logins past the limit are Busy with Retry-After", async () => {
  const { id } = await newUser();
  const client = new SyncNode({ url: URL_ });
  let error;
  for (let attempt = 0; attempt < 12 && !(error instanceof Busy); attempt++) {
    error = await client.logIn(id, "wrong password").catch((caught) => caught);
  }
  assert.ok(error instanceof Busy, String(error));
  assert.equal(error.status, 429);
  assert.equal(error.code, "AUTH02");
  assert.ok(error.retryAfter > 0);
});

/** A free port on 127.0.0.1, a moment ago. */
const freePort = () =>
  new Promise((resolve) => {
    const probe = createServer().listen(0, "127.0.0.1", () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });

/** `python syncnode.py` on a port and database of its own; resolves once it answers. */
async function startSyncnode(port, database) {
  const child = spawn(process.env.SYNCNODE_PYTHON, [process.env.SYNCNODE_PY, "--port", String(port), "--database", database], {
    stdio: "ignore",
    env: { ...process.env, SYNCNODE_ARGON2_MEMORY_COST: "64", SYNCNODE_ARGON2_TIME_COST: "1", SYNCNODE_ARGON2_PARALLELISM: "1" },
  });
  const deadline = Date.now() + 15000;
  for (;;) {
    try {
      if ((await fetch(`http://127.0.0.1:${port}/health`)).ok) return child;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) { child.kill(); throw new Error("syncnode did not start"); }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

const stopped = (child) => new Promise((resolve) => { child.once("exit", resolve); child.kill("SIGTERM"); });

test("a replica's queue is written once the server comes back", { skip: !process.env.SYNCNODE_PY }, async () => {
  const folder = mkdtempSync(join(tmpdir(), "syncnode-client-"));
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  let server = await startSyncnode(port, join(folder, "sync.db"));
  try {
    const client = new SyncNode({ url });
    await client.register("back@example.org", PASSWORD);
    const storage = memoryStorage();
    const replica = await client.replica({ prefix: "back/", storage, wait: 1 }).start();
    await waitFor(() => replica.cursor !== null);
    await stopped(server); // the server goes away
    await replica.set("back/1", { n: 1 });
    await replica.set("back/2", { n: 2 });
    await new Promise((resolve) => setTimeout(resolve, 500));
    assert.deepEqual([...replica.pending].sort(), ["back/1", "back/2"]);
    server = await startSyncnode(port, join(folder, "sync.db")); // and comes back
    await waitFor(() => replica.pending.size === 0, 15000);
    const reader = new SyncNode({ url, token: client.token });
    assert.deepEqual((await reader.getJSON("back/1")).value, { n: 1 });
    assert.deepEqual((await reader.getJSON("back/2")).value, { n: 2 });
    await replica.stop();
  } finally {
    await stopped(server);
    rmSync(folder, { recursive: true, force: true });
  }
});

test("base64 helpers round-trip every byte", () => {
  const bytes = new Uint8Array(70000).map((_, index) => index % 256);
  assert.deepEqual(fromBase64(toBase64(bytes)), bytes);
});

test("two replicas converge, their own writes are not echoed, and conflicts merge", async () => {
  const { client } = await newUser();
  const second = new SyncNode({ url: URL_, token: client.token });
  const merge = (base, mine, theirs) => ({ ...theirs, ...mine, items: [...new Set([...(theirs?.items ?? []), ...(mine?.items ?? [])])] });
  const one = await client.replica({ prefix: "todo/", merge, wait: 2 }).start();
  const two = await second.replica({ prefix: "todo/", merge, wait: 2 }).start();
  const heard = [];
  one.on((event) => heard.push(event));
  await one.set("todo/list", { items: ["milk"] });
  await waitFor(() => two.get("todo/list")?.items?.length === 1);
  assert.deepEqual(heard.map((event) => event.origin), ["local"]);  // not echoed back
  // Both edit the same key; the second write conflicts and merges.
  await Promise.all([one.set("todo/list", { items: ["milk", "eggs"] }), two.set("todo/list", { items: ["milk", "bread"] })]);
  await waitFor(() => {
    const a = one.get("todo/list")?.items?.slice().sort().join();
    const b = two.get("todo/list")?.items?.slice().sort().join();
    return a === "bread,eggs,milk" && b === a;
  });
  await two.delete("todo/list");
  await waitFor(() => one.get("todo/list") === undefined);
  await one.stop();
  await two.stop();
});

test("an offline replica queues its edits in its storage and writes them once back", async () => {
  const { client } = await newUser();
  let online = true;
  const flaky = (url, init) => (online ? fetch(url, init) : Promise.reject(new TypeError("fetch failed")));
  const storage = memoryStorage();
  const offline = new SyncNode({ url: URL_, token: client.token, fetch: flaky });
  let replica = await offline.replica({ prefix: "q/", storage, wait: 1 }).start();
  await waitFor(() => replica.cursor !== null);
  online = false;
  await replica.set("q/1", { n: 1 });
  await replica.set("q/2", { n: 2 });
  assert.equal(await client.get("q/1"), null);
  await replica.stop();
  assert.deepEqual((await storage.load()).pending.sort(), ["q/1", "q/2"]);
  // A new replica (a reloaded page) on the same storage replays the queue once online.
  online = true;
  replica = await offline.replica({ prefix: "q/", storage, wait: 1 }).start();
  await waitFor(async () => (await client.getJSON("q/2"))?.value?.n === 2);
  assert.deepEqual((await client.getJSON("q/1")).value, { n: 1 });
  await waitFor(() => replica.pending.size === 0);
  await replica.stop();
  assert.deepEqual(jsonCodec.decode(jsonCodec.encode({ a: [1] })), { a: [1] });
});

async function waitFor(condition, timeoutMs = 10000) {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error("timed out waiting for the condition");
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}
