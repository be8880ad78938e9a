// A two-device todo list on syncnode: open it on two devices (or two browsers) with the same
// account; edits show on the other at once, and work offline until the network comes back.
// app.js?server=URL&id=ID&password=PASSWORD&device=NAME (the device names the local storage).
import { AuthError, Conflict, SyncNode, indexedDBStorage } from "../syncnode.js";

const params = new URLSearchParams(location.search);
const id = params.get("id");
const device = params.get("device") ?? "browser";
const client = new SyncNode({ url: params.get("server"), token: localStorage.getItem(`token:${device}`) });
const list = document.querySelector("#todos");
const input = document.querySelector("#title");
const status = document.querySelector("#status");

async function signIn(password) {
  if (client.token) return;
  try {
    await client.logIn(id, password);
  } catch (error) {
    if (!(error instanceof AuthError)) throw error;
    try {
      await client.register(id, password);
    } catch (taken) {
      if (!(taken instanceof Conflict)) throw taken;
      await client.logIn(id, password); // the other device registered first
    }
  }
  localStorage.setItem(`token:${device}`, client.token);
}

// A todo edited on both devices keeps each side's changed fields.
const merge = (base, mine, theirs) => {
  if (mine === undefined || theirs === undefined) return mine ?? theirs;
  const merged = { ...theirs };
  for (const field of Object.keys(mine)) if (mine[field] !== base?.[field]) merged[field] = mine[field];
  return merged;
};

function render() {
  const items = replica.keys().map((key) => {
    const todo = replica.get(key);
    const item = document.createElement("li");
    item.className = todo.done ? "done" : "";
    const box = Object.assign(document.createElement("input"), { type: "checkbox", checked: todo.done });
    box.onchange = () => replica.set(key, { ...todo, done: box.checked });
    const title = Object.assign(document.createElement("span"), { textContent: todo.title });
    const remove = Object.assign(document.createElement("button"), { textContent: "×", title: "Delete" });
    remove.onclick = () => replica.delete(key);
    item.append(box, " ", title, " ", remove);
    return item;
  });
  list.replaceChildren(...items);
  status.textContent = replica.pending.size ? `${replica.pending.size} to send` : "in sync";
}

await signIn(params.get("password"));
const replica = client.replica({ prefix: `${id}/todos/`, merge, storage: indexedDBStorage(`todos-${device}`), wait: 10 });
replica.on(render);
await replica.start();
render();
setInterval(render, 500); // the queue's count, as it drains

document.querySelector("form").onsubmit = async (event) => {
  event.preventDefault();
  const key = `${id}/todos/${Date.now()}-${Math.random().toString(36).slice(2, 8)}`;
  await replica.set(key, { title: input.value, done: false });
  input.value = "";
};
window.todos = { replica, client }; // for the browser test
