// Two RxDB databases on two clients replicate one collection through a live syncnode
// (SYNCNODE_URL) and converge under concurrent edits and deletes. Run from a folder where
// rxdb and rxjs are installed, beside copies of syncnode.js and rxdb.js.
import assert from "node:assert/strict";
import { test } from "node:test";
import { createRxDatabase } from "rxdb";
import { getRxStorageMemory } from "rxdb/plugins/storage-memory";
import { SyncNode } from "./syncnode.js";
import { replicateSyncNode } from "./rxdb.js";

const schema = {
  version: 0,
  primaryKey: "id",
  type: "object",
  properties: {
    id: { type: "string", maxLength: 100 },
    title: { type: "string" },
    done: { type: "boolean" },
  },
  required: ["id", "title", "done"],
};

async function device(name, token, prefix) {
  const db = await createRxDatabase({ name, storage: getRxStorageMemory(), multiInstance: false });
  await db.addCollections({ todos: { schema } });
  const client = new SyncNode({ url: process.env.SYNCNODE_URL, token });
  const replication = replicateSyncNode({ collection: db.todos, client, prefix, wait: 2 });
  replication.error$.subscribe((error) => console.error("replication error", name, error));
  return { db, replication };
}

async function documents(db) {
  const docs = await db.todos.find().exec();
  const sorted = (doc) => Object.fromEntries(Object.entries(doc).sort(([a], [b]) => a.localeCompare(b)));
  return docs.map((doc) => sorted(doc.toJSON())).sort((a, b) => a.id.localeCompare(b.id));
}

async function converged(one, two, check, timeoutMs = 20000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const [a, b] = [await documents(one.db), await documents(two.db)];
    if (JSON.stringify(a) === JSON.stringify(b) && check(a)) return a;
    if (Date.now() > deadline) {
      assert.fail(`no convergence: ${JSON.stringify(a)} against ${JSON.stringify(b)}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

test("two RxDB databases converge through syncnode", async () => {
  const owner = new SyncNode({ url: process.env.SYNCNODE_URL });
  const id = `rxdb-${process.pid}-${Date.now()}`;
  await owner.register(id, "correct horse battery");
  // Keys are one namespace for the whole server: an app keeps each user's under a prefix.
  const prefix = `${id}/todos/`;
  const one = await device("one", owner.token, prefix);
  const two = await device("two", owner.token, prefix);
  try {
    await one.db.todos.insert({ id: "a", title: "milk", done: false });
    await two.db.todos.insert({ id: "b", title: "bread", done: false });
    await converged(one, two, (docs) => docs.length === 2);

    // Concurrent edits of one document, and of two others: one side's edit of "a" wins whole.
    const [a1, a2] = [await one.db.todos.findOne("a").exec(), await two.db.todos.findOne("a").exec()];
    await Promise.all([
      a1.incrementalPatch({ title: "milk, 2 l" }),
      a2.incrementalPatch({ done: true }),
      one.db.todos.insert({ id: "c", title: "eggs", done: false }),
      two.db.todos.insert({ id: "d", title: "tea", done: true }),
    ]);
    const docs = await converged(one, two, (docs) => docs.length === 4);
    const a = docs.find((doc) => doc.id === "a");
    assert.ok(
      (a.title === "milk, 2 l" && a.done === false) || (a.title === "milk" && a.done === true),
      JSON.stringify(a),
    );

    // Deletes on one side, an edit of another document on the other, at once.
    const [b1, c2] = [await one.db.todos.findOne("b").exec(), await two.db.todos.findOne("c").exec()];
    await Promise.all([b1.remove(), c2.incrementalPatch({ done: true })]);
    const after = await converged(one, two, (docs) => docs.length === 3 && docs.find((doc) => doc.id === "c")?.done);
    assert.deepEqual(after.map((doc) => doc.id), ["a", "c", "d"]);

    // The server holds what both hold.
    const stored = await owner.getJSON(prefix + "c");
    assert.equal(stored.value.done, true);
    assert.equal((await owner.getJSON(prefix + "b")).value._deleted, true);
  } finally {
    await one.replication.cancel();
    await two.replication.cancel();
    await one.db.remove();
    await two.db.remove();
  }
});
