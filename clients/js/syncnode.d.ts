// Types of syncnode's JavaScript client (syncnode.js).

export interface ErrorDetails {
  status?: number;
  code?: string;
  retryAfter?: number | null;
  index?: number | null;
}
export class SyncNodeError extends Error {
  constructor(message: string, details?: ErrorDetails);
  /** The HTTP status (0 when the server could not be reached). */
  status: number;
  /** The server's error code, e.g. "KEY01". */
  code: string;
  /** Seconds to wait before trying again, when the server said. */
  retryAfter: number | null;
  /** In a batch: the position of the operation that failed. */
  index: number | null;
}
export class AuthError extends SyncNodeError {}
export class Forbidden extends SyncNodeError {}
export class NotFound extends SyncNodeError {}
export class Conflict extends SyncNodeError {
  constructor(message: string, details?: ErrorDetails & { currentToken?: string | null; value?: Uint8Array | null });
  /** The token of what the key holds now, or null when it does not exist. */
  currentToken: string | null;
  value: Uint8Array | null;
}
export class Gone extends SyncNodeError {}
export class TooLarge extends SyncNodeError {}
export class QuotaExceeded extends SyncNodeError {}
export class Busy extends SyncNodeError {}
export class InvalidRequest extends SyncNodeError {}
export class ServerError extends SyncNodeError {}

export type Value = Uint8Array | ArrayBuffer | ArrayBufferView | string;

export interface Session {
  token: string;
  expiration: number;
}
export interface Stored<T = Uint8Array> {
  value: T;
  token: string;
  meta: string | null;
}
export interface Entry {
  key: string;
  permission?: "READ" | "WRITE" | "OWN";
  token?: string;
  seq?: number;
  deleted?: true;
  /** With values: the value, or large: true for one to fetch with get(). */
  value?: Uint8Array;
  large?: true;
  meta?: string | null;
}
export interface FeedEvent {
  /** "reset": entries is every current key (drop the others); "changes": what changed. */
  type: "reset" | "changes";
  entries: Entry[];
  /** Where to follow the feed from once these entries are applied. */
  cursor: number;
}

export class SyncNode {
  constructor(options: { url: string; token?: string | null; apiKey?: string | null; fetch?: typeof fetch });
  url: string;
  token: string | null;
  apiKey: string | null;
  useApiKey(key: string): void;
  register(id: string, password: string, options?: { invite?: string }): Promise<Session>;
  logIn(id: string, password: string): Promise<Session>;
  logOut(): Promise<void>;
  get(key: string, options?: { signal?: AbortSignal }): Promise<Stored | null>;
  getText(key: string): Promise<Stored<string> | null>;
  getJSON<T = unknown>(key: string): Promise<Stored<T> | null>;
  put(key: string, value: Value, options?: { token?: string; create?: boolean; meta?: string | null }): Promise<string>;
  update(
    key: string,
    fn: (value: Uint8Array | null, stored: Stored | null) => Value | undefined | Promise<Value | undefined>,
    options?: { retries?: number; meta?: string | null },
  ): Promise<string | null>;
  delete(key: string, token: string): Promise<void>;
  batch(): Batch;
  share(key: string, grants: Record<string, "READ" | "WRITE" | "OWN">): Promise<void>;
  permissions(key: string): Promise<{ user: string; permission: string }[]>;
  list(options?: { prefix?: string; values?: boolean; limit?: number; signal?: AbortSignal }): AsyncGenerator<Entry>;
  changes(options?: {
    prefix?: string; since?: number; wait?: number; values?: boolean; signal?: AbortSignal;
  }): AsyncGenerator<FeedEvent>;
  replica<T = unknown>(options?: ReplicaOptions<T>): Replica<T>;
  request(method: string, path: string, options?: { headers?: Record<string, string>; body?: BodyInit; signal?: AbortSignal }): Promise<Response>;
  json(method: string, path: string, data: unknown, options?: { headers?: Record<string, string> }): Promise<Response>;
}

export class Batch {
  put(key: string, value: Value, options?: { token?: string | null; meta?: string | null }): Batch;
  delete(key: string, token: string): Batch;
  commit(): Promise<{ key: string; token: string | null }[]>;
}

export interface Codec<T> {
  encode(value: T): Uint8Array;
  decode(bytes: Uint8Array): T;
}
export interface Storage {
  load(): Promise<unknown | null>;
  save(state: unknown): Promise<void>;
}
export interface ReplicaOptions<T> {
  prefix?: string;
  codec?: Codec<T>;
  /** Settle a conflict: base is the last value both sides agreed on (undefined: none). */
  merge?: (base: T | undefined, mine: T | undefined, theirs: T | undefined) => T | undefined;
  storage?: Storage;
  /** Seconds each long-poll waits. */
  wait?: number;
}
export interface ReplicaEvent<T> {
  key: string;
  /** undefined when the key was deleted. */
  value: T | undefined;
  origin: "local" | "remote";
}
export class Replica<T = unknown> {
  get(key: string): T | undefined;
  keys(): string[];
  set(key: string, value: T): Promise<void>;
  delete(key: string): Promise<void>;
  on(listener: (event: ReplicaEvent<T>) => void): () => void;
  /** Errors it cannot retry: a write the server refuses (the edit leaves the queue), or a
   * session that ended (log in again and start a new replica). */
  onError(listener: (error: SyncNodeError | Error, key: string | null) => void): () => void;
  start(): Promise<Replica<T>>;
  stop(): Promise<void>;
  flush(): Promise<void>;
  cursor: number | null;
  pending: Set<string>;
}

export const jsonCodec: Codec<unknown>;
export function memoryStorage(): Storage;
export function indexedDBStorage(name?: string): Storage;
export function theirsWin<T>(base: T | undefined, mine: T | undefined, theirs: T | undefined): T | undefined;
export function toBytes(value: Value): Uint8Array;
export function toBase64(bytes: Uint8Array): string;
export function fromBase64(text: string): Uint8Array;
