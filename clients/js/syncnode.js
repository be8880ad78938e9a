// syncnode's JavaScript client: one ES module for browsers and Node.js 18+, no dependencies.
//
// new SyncNode({url}) talks to a syncnode server: accounts and sessions, values with
// compare-and-swap on their store token, batches, listings and the change feed (paging, the
// cursor rule, long-polls, backoff and SYNC01 recovery hidden behind async iterators), and
// replicas: local mirrors of a prefix with an offline queue and three-way merge.

// Errors ------------------------------------------------------------------------------------------

/** Any error the server answered, with its status and code (see the README's error table). */
export class SyncNodeError extends Error {
  constructor(message, { status = 0, code = "", retryAfter = null, index = null } = {}) {
    super(message);
    this.name = new.target.name;
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
    this.index = index;
  }
}
/** 401: the token or API key is missing, unknown, expired or revoked; or a wrong password. */
export class AuthError extends SyncNodeError {}
/** 403: the caller lacks the permission (PERM01), or registration is refused (ACCT01). */
export class Forbidden extends SyncNodeError {}
/** 404: no such key, or none the caller may see. */
export class NotFound extends SyncNodeError {}
/** 409: someone wrote first (KEY01; currentToken and value say what is stored now). */
export class Conflict extends SyncNodeError {
  constructor(message, details = {}) {
    super(message, details);
    this.currentToken = details.currentToken ?? null;
    this.value = details.value ?? null;
  }
}
/** 410: the change feed no longer reaches back to the cursor (SYNC01). */
export class Gone extends SyncNodeError {}
/** 413: a value, meta or body over its limit. */
export class TooLarge extends SyncNodeError {}
/** 507: an owner's quota (QUOTA01) or the server's disk (DISK01). */
export class QuotaExceeded extends SyncNodeError {}
/** 503 or 429: try again after retryAfter seconds. */
export class Busy extends SyncNodeError {}
/** 400 or 405: the request was malformed. */
export class InvalidRequest extends SyncNodeError {}
/** 500, any other status, or no answer at all (status 0). */
export class ServerError extends SyncNodeError {}

const ERROR_CLASSES = {
  400: InvalidRequest, 401: AuthError, 403: Forbidden, 404: NotFound, 405: InvalidRequest,
  409: Conflict, 410: Gone, 413: TooLarge, 429: Busy, 503: Busy, 507: QuotaExceeded,
};

async function errorOf(response) {
  let body = {};
  try {
    body = await response.json();
  } catch {
    // not JSON: the status alone tells
  }
  const retry = response.headers.get("Retry-After");
  const details = {
    status: response.status,
    code: body.code ?? "",
    retryAfter: retry === null ? null : Number(retry),
    index: body.index ?? null,
  };
  const Class = ERROR_CLASSES[response.status] ?? ServerError;
  return new Class(body.message ?? `The server answered ${response.status}.`, details);
}

// Bytes ------------------------------------------------------------------------------------------

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** Bytes of a value: a Uint8Array as it is, an ArrayBuffer or view, or a string as UTF-8. */
export function toBytes(value) {
  if (value instanceof Uint8Array) return value;
  if (value instanceof ArrayBuffer) return new Uint8Array(value);
  if (ArrayBuffer.isView(value)) return new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
  if (typeof value === "string") return encoder.encode(value);
  throw new TypeError("A value is a Uint8Array, an ArrayBuffer, a typed array or a string.");
}

export function toBase64(bytes) {
  let text = "";
  for (let start = 0; start < bytes.length; start += 0x8000) {
    text += String.fromCharCode(...bytes.subarray(start, start + 0x8000));
  }
  return btoa(text);
}

export function fromBase64(text) {
  const raw = atob(text);
  const bytes = new Uint8Array(raw.length);
  for (let index = 0; index < raw.length; index++) bytes[index] = raw.charCodeAt(index);
  return bytes;
}

/** A key as a path: each segment percent-encoded and its slashes kept, unless a segment is
 * "." or "..", which URLs would collapse: then the slashes are encoded too. */
function keyPart(key) {
  const segments = key.split("/");
  if (segments.some((segment) => segment === "." || segment === "..")) return encodeURIComponent(key);
  return segments.map(encodeURIComponent).join("/");
}

const keyPath = (key) => "/store/" + keyPart(key);

const PRINTABLE_ASCII = /^[\x20-\x7e]*$/;

function checkMeta(meta) {
  if (meta !== null && meta !== undefined && !PRINTABLE_ASCII.test(meta)) {
    throw new InvalidRequest("Meta must be printable ASCII.", { code: "REQ01" });
  }
}

const sleep = (seconds, signal) =>
  new Promise((resolve) => {
    const done = () => { clearTimeout(timer); signal?.removeEventListener("abort", done); resolve(); };
    const timer = setTimeout(done, seconds * 1000);
    signal?.addEventListener("abort", done, { once: true });
  });

// The client -------------------------------------------------------------------------------------

/** A connection to one syncnode server, as one user (a session token or an API key). */
export class SyncNode {
  constructor({ url, token = null, apiKey = null, fetch: fetchImpl = null } = {}) {
    if (!url) throw new TypeError("new SyncNode({url}) needs the server's URL.");
    this.url = url.replace(/\/+$/, "");
    /** The session token: persist it to stay logged in. */
    this.token = token;
    this.apiKey = apiKey;
    this.fetchImpl = fetchImpl ?? ((...args) => globalThis.fetch(...args));
    /** Tokens and values read, for revalidation with If-None-Match. */
    this.cache = new Map();
  }

  useApiKey(key) {
    this.apiKey = key;
    this.token = null;
  }

  headers(extra = {}) {
    const headers = { ...extra };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    else if (this.apiKey) headers["x-api-key"] = this.apiKey;
    return headers;
  }

  /** Send a request; a non-2xx, non-304 answer throws its error class. */
  async request(method, path, { headers = {}, body, signal } = {}) {
    const target = path.startsWith("http") ? path : this.url + path;
    let response;
    try {
      response = await this.fetchImpl(target, { method, headers: this.headers(headers), body, signal });
    } catch (error) {
      if (signal?.aborted || error?.name === "AbortError") throw error;
      throw new ServerError(`The server could not be reached: ${error?.message ?? error}`);
    }
    if (!response.ok && response.status !== 304) throw await errorOf(response);
    return response;
  }

  async json(method, path, data, options = {}) {
    const headers = { "Content-Type": "application/json", ...(options.headers ?? {}) };
    return this.request(method, path, { ...options, headers, body: JSON.stringify(data) });
  }

  // Accounts and sessions.

  async register(id, password, { invite } = {}) {
    const body = invite === undefined ? { id, password } : { id, password, invite };
    const session = await (await this.json("POST", "/account", body)).json();
    this.token = session.token;
    return session;
  }

  async logIn(id, password) {
    const session = await (await this.json("POST", "/auth", { id, password })).json();
    this.token = session.token;
    return session;
  }

  async logOut() {
    await this.request("DELETE", "/auth");
    this.token = null;
    this.cache.clear();
  }

  // Values.

  /** {value: Uint8Array, token, meta} of a key, or null when it does not exist. */
  async get(key, { signal } = {}) {
    const cached = this.cache.get(key);
    const headers = cached ? { "If-None-Match": `"${cached.token}"` } : {};
    let response;
    try {
      response = await this.request("GET", keyPath(key), { headers, signal });
    } catch (error) {
      if (error instanceof NotFound) {
        this.cache.delete(key);
        return null;
      }
      throw error;
    }
    if (response.status === 304) return { ...cached, value: cached.value.slice() };
    const stored = {
      value: new Uint8Array(await response.arrayBuffer()),
      token: response.headers.get("X-Sync-Token"),
      meta: response.headers.get("X-Sync-Meta"),
    };
    this.cache.set(key, stored);
    return { ...stored, value: stored.value.slice() };
  }

  async getText(key) {
    const stored = await this.get(key);
    return stored && { ...stored, value: decoder.decode(stored.value) };
  }

  async getJSON(key) {
    const stored = await this.getText(key);
    return stored && { ...stored, value: JSON.parse(stored.value) };
  }

  /** Write a value: {token} replaces that version, {create: true} only creates; the new token.
   *
   * Throws Conflict (with currentToken and value) when someone else wrote first. */
  async put(key, value, { token, create = false, meta } = {}) {
    const bytes = toBytes(value).slice(); // the caller may change its array afterwards
    checkMeta(meta);
    const headers = { "Content-Type": "application/octet-stream" };
    if (token) headers["X-Sync-Token"] = token;
    else if (create) headers["If-None-Match"] = "*";
    if (meta !== undefined && meta !== null) headers["X-Sync-Meta"] = meta;
    let response;
    try {
      response = await this.request("PUT", keyPath(key), { headers, body: bytes });
    } catch (error) {
      if (error instanceof Conflict) throw await this.conflictOn(key, error);
      throw error;
    }
    const written = response.headers.get("X-Sync-Token");
    this.cache.set(key, { value: bytes, token: written, meta: meta ?? null });
    return written;
  }

  /** A Conflict that says what the key holds now (one GET). */
  async conflictOn(key, error) {
    let current = null;
    try {
      this.cache.delete(key);
      current = await this.get(key);
    } catch {
      // the conflict stands without the current value
    }
    return new Conflict(error.message, {
      status: error.status, code: error.code, index: error.index,
      currentToken: current?.token ?? null, value: current?.value ?? null,
    });
  }

  /** Read, apply fn to the value (null when absent), write with the token read; retry on a
   * conflict. fn returning undefined writes nothing. Returns the token of what is stored. */
  async update(key, fn, { retries = 5, meta } = {}) {
    for (let attempt = 0; ; attempt++) {
      const current = await this.get(key);
      const next = await fn(current ? current.value : null, current);
      if (next === undefined) return current?.token ?? null;
      try {
        const kept = meta === undefined ? current?.meta : meta; // a PUT replaces the meta too
        const options = current ? { token: current.token, meta: kept } : { create: true, meta };
        return await this.put(key, next, options);
      } catch (error) {
        if (!(error instanceof Conflict) || attempt >= retries) throw error;
        this.cache.delete(key);
      }
    }
  }

  async delete(key, token) {
    await this.request("DELETE", keyPath(key), { headers: { "X-Sync-Token": token } });
    this.cache.delete(key);
  }

  batch() {
    return new Batch(this);
  }

  // Permissions.

  async share(key, grants) {
    const body = Object.entries(grants).map(([user, permission]) => ({ user, permission }));
    await this.json("PUT", "/permission/" + keyPart(key), body);
  }

  async permissions(key) {
    return (await this.request("GET", "/permission/" + keyPart(key))).json();
  }

  // Listings and the change feed.

  /** Every key the caller holds (under prefix), page after page: {key, permission, token[,
   * value (Uint8Array) and meta with values]}. */
  async *list({ prefix = "", values = false, limit, signal } = {}) {
    for await (const page of this.pages(this.listingPath({ prefix, values, limit }), { signal })) {
      yield* page.entries;
    }
  }

  listingPath({ prefix = "", values = false, limit, since } = {}) {
    const query = new URLSearchParams();
    if (prefix) query.set("prefix", prefix);
    if (values) query.set("values", "true");
    if (limit) query.set("limit", String(limit));
    if (since !== undefined) query.set("since", String(since));
    const text = query.toString();
    return "/store" + (text ? "?" + text : "");
  }

  /** The pages of a listing or feed from path on, following Link; each {entries, cursor}. */
  async *pages(path, { signal, headers } = {}) {
    while (path) {
      const response = await this.request("GET", path, { signal, headers });
      headers = undefined; // a Link carries the cursor itself
      const entries = (await response.json()).map(decodeEntry);
      yield { entries, cursor: Number(response.headers.get("X-Sync-Cursor")), response };
      path = nextLink(response.headers.get("Link"));
    }
  }

  /** The full key set (under prefix) as one event, and the cursor to follow the feed from. */
  async listAll({ prefix = "", values = false, signal } = {}) {
    const entries = [];
    let cursor = null;
    for await (const page of this.pages(this.listingPath({ prefix, values }), { signal })) {
      entries.push(...page.entries);
      cursor ??= page.cursor;
    }
    return { type: "reset", entries, cursor };
  }

  /** Follow the change feed: yields {type: "changes", entries, cursor} for each page, and
   * {type: "reset", entries, cursor} with every current key first (without since) and after
   * SYNC01, so that an app drops what it holds beyond that set. Long-polls wait seconds each;
   * declined polls, network errors and busy servers are retried with backoff. Stop it with an
   * AbortSignal or by leaving the for-await loop. */
  async *changes({ prefix = "", since, wait = 30, values = false, signal } = {}) {
    let cursor = since;
    let delay = 0.5;
    while (!signal?.aborted) {
      try {
        if (cursor === undefined || cursor === null) {
          const reset = await this.listAll({ prefix, values, signal });
          cursor = reset.cursor;
          yield reset;
        }
        // The cursor goes in a header: the poll's URL stays the same, so a browser asks its
        // CORS preflight once.
        const path = this.listingPath({ prefix, values }) + (prefix || values ? "&" : "?") + `wait=${wait}`;
        let declined = null;
        for await (const page of this.pages(path, { signal, headers: { "X-Sync-Cursor": String(cursor) } })) {
          cursor = page.cursor;
          if (page.entries.length) yield { type: "changes", entries: page.entries, cursor };
          const reason = page.response.headers.get("X-Sync-Wait-Declined");
          if (reason) declined = Number(page.response.headers.get("Retry-After") ?? 1);
        }
        delay = 0.5;
        if (declined !== null) await sleep(declined, signal);
      } catch (error) {
        if (error?.name === "AbortError" || signal?.aborted) return;
        if (error instanceof Gone) {
          cursor = undefined; // list everything again
          continue;
        }
        if (error instanceof AuthError || error instanceof Forbidden || error instanceof InvalidRequest) throw error;
        await sleep(error.retryAfter ?? delay, signal);
        delay = Math.min(delay * 2, 30);
      }
    }
  }

  /** A local mirror of the keys under prefix; see Replica. */
  replica(options = {}) {
    return new Replica(this, options);
  }
}

function decodeEntry(entry) {
  if (typeof entry.value === "string") return { ...entry, value: fromBase64(entry.value) };
  return entry;
}

function nextLink(header) {
  const match = header && /<([^>]+)>\s*;\s*rel="?next"?/.exec(header);
  return match ? match[1] : null;
}

// Batches ----------------------------------------------------------------------------------------

/** Up to 100 PUTs and DELETEs applied together or not at all. */
export class Batch {
  constructor(client) {
    this.client = client;
    this.operations = [];
  }

  put(key, value, { token = null, meta = null } = {}) {
    checkMeta(meta);
    this.operations.push({ method: "PUT", key, token, value: toBase64(toBytes(value)), meta });
    return this;
  }

  delete(key, token) {
    this.operations.push({ method: "DELETE", key, token });
    return this;
  }

  /** Apply them; the results, one per operation. An error names its operation in index. */
  async commit() {
    const response = await this.client.json("POST", "/batch", { operations: this.operations });
    const { results } = await response.json();
    for (const operation of this.operations) this.client.cache.delete(operation.key);
    return results;
  }
}

// Replicas ---------------------------------------------------------------------------------------

/** JSON values, stored as UTF-8. */
export const jsonCodec = {
  encode: (value) => encoder.encode(JSON.stringify(value)),
  decode: (bytes) => JSON.parse(decoder.decode(bytes)),
};

/** Keeps a replica's state in memory (lost when the page or process ends). */
export function memoryStorage() {
  let saved = null;
  return {
    async load() { return saved && structuredClone(saved); },
    async save(state) { saved = structuredClone(state); },
  };
}

/** Keeps a replica's state in the browser's IndexedDB, under a name. */
export function indexedDBStorage(name = "syncnode") {
  const open = () =>
    new Promise((resolve, reject) => {
      const request = indexedDB.open(name, 1);
      request.onupgradeneeded = () => request.result.createObjectStore("state");
      request.onsuccess = () => resolve(request.result);
      request.onerror = () => reject(request.error);
    });
  const run = async (mode, action) => {
    const db = await open();
    try {
      return await new Promise((resolve, reject) => {
        const store = db.transaction("state", mode).objectStore("state");
        const request = action(store);
        request.onsuccess = () => resolve(request.result);
        request.onerror = () => reject(request.error);
      });
    } finally {
      db.close();
    }
  };
  return {
    async load() { return (await run("readonly", (store) => store.get("replica"))) ?? null; },
    async save(state) { await run("readwrite", (store) => store.put(state, "replica")); },
  };
}

/** Last writer's value wins: what the server holds replaces a local edit made meanwhile. */
export const theirsWin = (base, mine, theirs) => theirs;

/**
 * A local mirror of the keys under a prefix: get, set and delete work offline; edits queue
 * (in storage) and are written with compare-and-swap once the server is reachable; a conflict
 * is settled by merge(base, mine, theirs), base being the last value both sides agreed on.
 * "change" listeners hear {key, value, origin: "local" | "remote"} (value undefined when
 * deleted); the replica's own writes are not heard again as remote changes. Errors the
 * replica cannot retry (a write the server refuses, a session that ended) go to onError
 * listeners; a refused edit leaves the queue.
 */
export class Replica {
  constructor(client, { prefix = "", codec = jsonCodec, merge = theirsWin, storage = memoryStorage(), wait = 30 } = {}) {
    Object.assign(this, { client, prefix, codec, merge, storage, wait });
    /** key -> {value, token, base, deleted}: base is the last value known to the server. */
    this.docs = new Map();
    /** Keys edited locally and not yet written. */
    this.pending = new Set();
    /** key -> how many local edits it had, so that a write tells whether one came meanwhile. */
    this.edits = new Map();
    /** Keys whose remote change was heard while their own write was under way. */
    this.missed = new Set();
    this.cursor = null;
    this.listeners = new Set();
    this.errorListeners = new Set();
    this.controller = null;
    this.flushing = null;
    this.retry = null;
    this.stopped = true;
  }

  on(listener) {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  onError(listener) {
    this.errorListeners.add(listener);
    return () => this.errorListeners.delete(listener);
  }

  emit(key, value, origin) {
    for (const listener of this.listeners) listener({ key, value, origin });
  }

  fail(error, key = null) {
    if (!this.errorListeners.size) console.error("syncnode replica:", key ?? "", error);
    for (const listener of this.errorListeners) listener(error, key);
  }

  get(key) {
    const doc = this.docs.get(key);
    return doc && !doc.deleted ? doc.value : undefined;
  }

  keys() {
    return [...this.docs].filter(([, doc]) => !doc.deleted).map(([key]) => key).sort();
  }

  async edit(key, doc, value) {
    this.docs.set(key, doc);
    this.edits.set(key, (this.edits.get(key) ?? 0) + 1);
    this.pending.add(key);
    this.emit(key, value, "local");
    await this.save();
    this.flush();
  }

  async set(key, value) {
    const doc = this.docs.get(key) ?? { token: null, base: undefined };
    await this.edit(key, { ...doc, value, deleted: false }, value);
  }

  async delete(key) {
    const doc = this.docs.get(key);
    if (!doc || doc.deleted) return;
    await this.edit(key, { ...doc, value: undefined, deleted: true }, undefined);
  }

  async load() {
    const state = await this.storage.load();
    if (!state) return;
    this.cursor = state.cursor;
    this.pending = new Set(state.pending);
    this.docs = new Map(state.docs);
  }

  async save() {
    await this.storage.save({ cursor: this.cursor, pending: [...this.pending], docs: [...this.docs] });
  }

  /** Load the saved state, then write queued edits and follow the feed until stop(). */
  async start() {
    await this.load();
    this.stopped = false;
    this.controller = new AbortController();
    const signal = this.controller.signal;
    this.running = this.follow(signal).catch((error) => {
      if (!signal.aborted) this.fail(error);
    });
    this.flush();
    return this;
  }

  async stop() {
    this.stopped = true;
    clearTimeout(this.retry);
    this.retry = null;
    this.controller?.abort();
    await this.running;
    await this.flushing;
  }

  /** Write every queued edit, one at a time; while the server is unreachable, try again. */
  flush() {
    if (!this.flushing && !this.stopped) {
      this.flushing = this.writeQueued()
        .catch((error) => this.fail(error))
        .finally(() => { this.flushing = null; });
    }
    return this.flushing ?? Promise.resolve();
  }

  async writeQueued() {
    while (this.pending.size && !this.stopped) {
      const [key] = this.pending;
      const edits = this.edits.get(key) ?? 0;
      try {
        await this.writeOne(key);
      } catch (error) {
        if (error instanceof ServerError || error instanceof Busy) {
          if (!this.stopped) {
            this.retry ??= setTimeout(() => { this.retry = null; this.flush(); }, 1000 * (error.retryAfter ?? 1));
          }
          return; // offline: the queue waits
        }
        this.pending.delete(key); // refused for good: reported, and out of the queue
        this.fail(error, key);
        await this.save();
        continue;
      }
      this.pending.delete(key);
      if ((this.edits.get(key) ?? 0) !== edits) this.pending.add(key); // edited meanwhile
      if (this.missed.delete(key) && !this.pending.has(key)) await this.refresh(key);
      await this.save();
    }
  }

  async writeOne(key) {
    for (let attempt = 0; attempt < 10; attempt++) {
      const doc = this.docs.get(key);
      if (!doc) return;
      try {
        if (doc.deleted) {
          if (doc.token) await this.client.delete(key, doc.token);
          const latest = this.docs.get(key);
          if (latest?.deleted) this.docs.delete(key);
          else if (latest) this.docs.set(key, { ...latest, token: null, base: undefined }); // re-created
          return;
        }
        const written = doc.value;
        const options = doc.token ? { token: doc.token } : { create: true };
        const token = await this.client.put(key, this.codec.encode(written), options);
        this.docs.set(key, { ...this.docs.get(key), token, base: written });
        return;
      } catch (error) {
        if (error instanceof NotFound && doc.deleted) {
          if (this.docs.get(key)?.deleted) this.docs.delete(key);
          return;
        }
        if (!(error instanceof Conflict)) throw error;
        const current = await this.client.get(key);
        const theirs = current ? this.codec.decode(current.value) : undefined;
        const latest = this.docs.get(key); // a newer local edit counts as mine
        const mine = latest.deleted ? undefined : latest.value;
        const merged = this.merge(latest.base, mine, theirs);
        if (merged === undefined && !current) {
          this.docs.delete(key);
          if (mine !== undefined) this.emit(key, undefined, "remote");
          return;
        }
        this.docs.set(key, {
          value: merged, deleted: merged === undefined, token: current?.token ?? null, base: theirs,
        });
        if (merged !== mine) this.emit(key, merged, "remote");
      }
    }
    throw new Conflict(`The key ${key} kept changing while it was written.`);
  }

  /** Read a key again: a change heard while its own write was under way may be newer. */
  async refresh(key) {
    const current = await this.client.get(key);
    const doc = this.docs.get(key);
    if (!current) {
      if (doc) {
        this.docs.delete(key);
        this.emit(key, undefined, "remote");
      }
    } else if (doc?.token !== current.token) {
      const value = this.codec.decode(current.value);
      this.docs.set(key, { value, token: current.token, base: value, deleted: false });
      this.emit(key, value, "remote");
    }
  }

  async follow(signal) {
    const options = { prefix: this.prefix, values: true, wait: this.wait, signal };
    if (this.cursor !== null) options.since = this.cursor;
    for await (const event of this.client.changes(options)) {
      if (event.type === "reset") {
        const present = new Set(event.entries.map((entry) => entry.key));
        for (const [key, doc] of this.docs) {
          if (!present.has(key) && doc.token && !this.pending.has(key)) {
            this.docs.delete(key);
            this.emit(key, undefined, "remote");
          }
        }
      }
      for (const entry of event.entries) await this.apply(entry);
      this.cursor = event.cursor;
      await this.save();
    }
  }

  async apply(entry) {
    const doc = this.docs.get(entry.key);
    if (this.pending.has(entry.key)) {
      // The queued edit meets it when it is written (its token moved on), unless the write
      // is under way: then the key is read again once it is done.
      this.missed.add(entry.key);
      return;
    }
    if (entry.deleted) {
      if (doc) {
        this.docs.delete(entry.key);
        this.emit(entry.key, undefined, "remote");
      }
      return;
    }
    if (doc && doc.token === entry.token) return; // its own write, or nothing new
    let bytes = entry.value;
    let token = entry.token;
    if (bytes === undefined || entry.large) {
      const stored = await this.client.get(entry.key);
      if (!stored) return;
      ({ value: bytes, token } = stored);
    }
    const value = this.codec.decode(bytes);
    this.docs.set(entry.key, { value, token, base: value, deleted: false });
    this.emit(entry.key, value, "remote");
  }
}
