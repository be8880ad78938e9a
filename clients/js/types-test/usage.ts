// Compiled with tsc --noEmit against syncnode.d.ts: the declarations cover the README's usage.
import {
  Busy, Conflict, SyncNode, indexedDBStorage, jsonCodec, type FeedEvent, type Replica,
} from "../syncnode.js";

async function usage(): Promise<void> {
  const client = new SyncNode({ url: "http://127.0.0.1:8080" });
  const session = await client.register("alice@example.org", "alice password");
  const expires: number = session.expiration;
  const token: string = await client.put("notes/today", "buy milk", { create: true, meta: "text/plain" });
  const stored = await client.getText("notes/today");
  if (stored) {
    const text: string = stored.value;
    await client.put("notes/today", text + " and eggs", { token: stored.token });
  }
  try {
    await client.put("notes/today", "late", { token });
  } catch (error) {
    if (error instanceof Conflict) console.log(error.currentToken, error.value?.length);
    if (error instanceof Busy) console.log(error.retryAfter);
  }
  await client.update("counter", (value) => String(Number(new TextDecoder().decode(value ?? new Uint8Array())) + 1));
  const results = await client.batch().put("a", new Uint8Array([1])).delete("b", "t").commit();
  console.log(results[0].token, expires);
  for await (const entry of client.list({ prefix: "notes/", values: true })) console.log(entry.key, entry.value);
  for await (const event of client.changes({ prefix: "notes/", wait: 30 })) {
    const typed: FeedEvent = event;
    if (typed.type === "reset") break;
  }
  const replica: Replica<{ title: string }> = client.replica<{ title: string }>({
    prefix: "todos/",
    storage: indexedDBStorage("todos"),
    merge: (base, mine, theirs) => mine ?? theirs,
  });
  await replica.start();
  replica.on(({ key, value, origin }) => console.log(key, value?.title, origin));
  await replica.set("todos/1", { title: "milk" });
  console.log(jsonCodec.decode(jsonCodec.encode({ a: 1 })));
}
void usage;
