// RxDB replication through syncnode: replicateSyncNode({collection, client, prefix}).
//
// Each document is one key, prefix + its primary key, whose value is the document's JSON
// (without RxDB's _meta, _rev and _attachments; a deleted document keeps its data with
// "_deleted": true, as RxDB keeps it). Pulls read the change feed by checkpoint with values
// inline; pushes write with compare-and-swap on the store token of the master state RxDB
// assumes, and a conflict returns the current master state, which RxDB's conflict handler
// (the default compares the documents' data) settles. Live changes arrive by long-poll;
// after SYNC01 the stream asks RxDB to RESYNC. RxDB is a peer dependency.
import { replicateRxCollection } from "rxdb/plugins/replication";
import { Subject } from "rxjs";
import { Conflict, Gone, fromBase64 } from "./syncnode.js";

const decoder = new TextDecoder();

/** The document's data as stored: without RxDB's own fields, keys in a stable order. */
function documentJSON(doc) {
  const data = {};
  for (const name of Object.keys(doc).sort()) {
    if (name !== "_meta" && name !== "_rev" && name !== "_attachments") data[name] = doc[name];
  }
  if (!data._deleted) delete data._deleted;
  return JSON.stringify(data);
}

export function replicateSyncNode({
  collection, client, prefix = collection.name + "/", batchSize = 100, wait = 30,
  live = true, retryTime = 2000, replicationIdentifier,
}) {
  const primary = collection.schema.primaryPath;
  /** key -> {token, json}: the master state last seen, so a push needs no read first. */
  const known = new Map();
  const stream = new Subject();
  const controller = new AbortController();

  const toDocument = async (entry) => {
    const id = entry.key.slice(prefix.length);
    if (entry.deleted) {
      known.delete(entry.key);
      return { [primary]: id, _deleted: true };
    }
    let bytes = entry.value;
    if (bytes === undefined || entry.large) {
      const stored = await client.get(entry.key);
      if (!stored) return { [primary]: id, _deleted: true };
      bytes = stored.value;
    }
    const json = decoder.decode(bytes);
    known.set(entry.key, { token: entry.token, json });
    return { _deleted: false, ...JSON.parse(json), [primary]: id };
  };

  /** One page of the listing (checkpoint.after set) or of the feed after checkpoint.cursor. */
  async function pull(checkpoint, size) {
    const query = new URLSearchParams({ prefix, values: "true", limit: String(size) });
    if (checkpoint && checkpoint.after === undefined) query.set("since", String(checkpoint.cursor));
    else if (checkpoint?.after) query.set("after", checkpoint.after);
    let response;
    try {
      response = await client.request("GET", "/store?" + query);
    } catch (error) {
      if (error instanceof Gone) return pull(null, size); // list everything again
      throw error;
    }
    const entries = (await response.json()).map((entry) =>
      typeof entry.value === "string" ? { ...entry, value: fromBase64(entry.value) } : entry);
    const cursor = Number(response.headers.get("X-Sync-Cursor"));
    const more = /rel="?next/.test(response.headers.get("Link") ?? "");
    const documents = await Promise.all(entries.map(toDocument));
    const listing = !checkpoint || checkpoint.after !== undefined;
    const next = listing && more
      ? { after: entries[entries.length - 1].key, cursor: checkpoint?.cursor ?? cursor }
      : { cursor: listing ? (checkpoint?.cursor ?? cursor) : cursor };
    return { documents, checkpoint: next };
  }

  async function push(rows) {
    const conflicts = [];
    for (const { newDocumentState, assumedMasterState } of rows) {
      const key = prefix + newDocumentState[primary];
      const body = documentJSON(newDocumentState);
      try {
        let options = { create: true };
        if (assumedMasterState) {
          const assumed = documentJSON(assumedMasterState);
          let master = known.get(key);
          if (!master || master.json !== assumed) {
            const stored = await client.get(key);
            master = stored && { token: stored.token, json: decoder.decode(stored.value) };
          }
          if (!master && assumedMasterState._deleted) {
            options = { create: true }; // deleted on the server: written anew
          } else if (!master) {
            conflicts.push({ [primary]: newDocumentState[primary], _deleted: true });
            continue; // the master state is: deleted
          } else if (master.json !== assumed) {
            throw new Conflict("The master state moved on.");
          } else {
            options = { token: master.token };
          }
        }
        const token = await client.put(key, body, options);
        known.set(key, { token, json: body });
      } catch (error) {
        if (!(error instanceof Conflict)) throw error;
        const stored = await client.get(key);
        if (!stored) throw error; // taken by a key this user cannot see: choose another prefix
        const json = decoder.decode(stored.value);
        known.set(key, { token: stored.token, json });
        conflicts.push({ _deleted: false, ...JSON.parse(json), [primary]: newDocumentState[primary] });
      }
    }
    return conflicts;
  }

  async function follow() {
    let cursor = null;
    while (!controller.signal.aborted) {
      try {
        if (cursor === null) {
          cursor = (await client.listAll({ prefix, signal: controller.signal })).cursor;
        }
        for await (const event of client.changes({ prefix, since: cursor, wait, values: true, signal: controller.signal })) {
          if (event.type === "reset") {
            stream.next("RESYNC");
          } else {
            stream.next({ documents: await Promise.all(event.entries.map(toDocument)), checkpoint: { cursor: event.cursor } });
          }
          cursor = event.cursor;
        }
      } catch (error) {
        if (controller.signal.aborted) return;
        if (error instanceof Gone) stream.next("RESYNC");
        await new Promise((resolve) => setTimeout(resolve, retryTime));
      }
    }
  }

  const state = replicateRxCollection({
    collection,
    replicationIdentifier: replicationIdentifier ?? `syncnode:${client.url}:${prefix}`,
    live,
    retryTime,
    pull: { handler: pull, batchSize, stream$: stream.asObservable() },
    push: { handler: push, batchSize },
  });
  if (live) follow();
  const cancel = state.cancel.bind(state);
  state.cancel = async () => {
    controller.abort();
    stream.complete();
    return cancel();
  };
  return state;
}
