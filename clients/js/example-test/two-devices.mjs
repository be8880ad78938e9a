// The example todo app on two pages of headless Chromium, as two devices of one account,
// cross-origin against a live syncnode: PAGE_URL serves clients/js, SYNCNODE_URL the API,
// CHROMIUM the browser. One device goes offline for a while, edits, and comes back.
import assert from "node:assert/strict";
import { test } from "node:test";
import puppeteer from "puppeteer-core";

const titles = (page) =>
  page.$$eval("#todos li span", (spans) => spans.map((span) => span.textContent).sort());

async function until(page, condition, timeoutMs = 20000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await condition(page);
    if (value) return value;
    if (Date.now() > deadline) assert.fail(`timed out; the page shows ${JSON.stringify(await titles(page))}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

// Typed and clicked through the DOM: keyboard and mouse events go to the front tab only.
async function add(page, title) {
  await page.$eval("#title", (input, text) => { input.value = text; }, title);
  await page.$eval("form", (form) => form.requestSubmit());
}

const click = (page, selector) => page.$eval(selector, (node) => node.click());

test("two devices share a todo list, one of them offline for a while", async () => {
  const browser = await puppeteer.launch({
    executablePath: process.env.CHROMIUM,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
  });
  const errors = [];
  try {
    const account = `id=todo-${process.pid}&password=correct+horse+battery&server=${encodeURIComponent(process.env.SYNCNODE_URL)}`;
    const open = async (device) => {
      const page = await browser.newPage();
      page.on("pageerror", (error) => errors.push(`${device}: ${error.message}`));
      await page.goto(`${process.env.PAGE_URL}/example/index.html?${account}&device=${device}`);
      await until(page, (p) => p.$eval("#status", (node) => node.textContent === "in sync"));
      return page;
    };
    const laptop = await open("laptop");
    const phone = await open("phone");

    await add(laptop, "milk");
    await until(phone, async (p) => (await titles(p)).includes("milk"));

    // The phone goes offline and edits; the laptop edits meanwhile.
    await phone.setOfflineMode(true);
    await add(phone, "eggs");
    await click(phone, "#todos li input[type=checkbox]"); // milk: done, on the phone only
    await add(laptop, "bread");
    await new Promise((resolve) => setTimeout(resolve, 1500));
    assert.deepEqual(await titles(laptop), ["bread", "milk"]);
    assert.ok(await phone.$eval("#status", (node) => node.textContent.endsWith("to send")));

    // Back online: the queue goes out, the feed comes in, and both show the same list.
    await phone.setOfflineMode(false);
    for (const page of [laptop, phone]) {
      await until(page, async (p) => JSON.stringify(await titles(p)) === '["bread","eggs","milk"]');
    }
    await until(laptop, (p) => p.$eval("#todos li.done span", (node) => node.textContent === "milk").catch(() => false));

    // A delete on one device leaves the other.
    await click(laptop, "#todos li:first-child button");
    await until(phone, async (p) => (await titles(p)).length === 2);
    assert.deepEqual(await titles(phone), await titles(laptop));
    assert.deepEqual(errors, []);
  } finally {
    await browser.close();
  }
});
