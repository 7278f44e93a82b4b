// Two users of the demo chat page (served at / by the default config) talk
// through the gateway, each in their own headless Chromium context:
//
//   node tests/browser/demo-chat.mjs http://127.0.0.1:PORT/ OUT_DIR
//
// Prints one JSON line: what each page's message list shows at the end.
// Keeps a screenshot of each page in OUT_DIR. Exits non-zero (with the
// reason on stderr) if a step does not happen within its timeout.
import { chromium } from "playwright-core";
import { launchOptions } from "./launch.mjs";

const [url, out] = process.argv.slice(2);
if (!url || !out) {
  console.error("usage: node demo-chat.mjs URL OUT_DIR");
  process.exit(2);
}
const room = "browser-" + process.pid;
const browser = await chromium.launch(launchOptions());
try {
  const open = async (name) => {
    const context = await browser.newContext();
    const page = await context.newPage();
    page.on("pageerror", (e) => console.error(`${name}: page error: ${e}`));
    await page.goto(url);
    await page.fill("#name", name);
    await page.fill("#room", room);
    await page.click("#join");
    // Joined: the send box is enabled once the socket is open.
    await page.waitForSelector("#text:not([disabled])", { timeout: 10_000 });
    return page;
  };
  const lines = (page) =>
    page.$$eval("#log li", (items) => items.map((li) => li.textContent));
  const waitForLine = (page, text) =>
    page.waitForFunction(
      (t) => [...document.querySelectorAll("#log li")].some((li) => li.textContent === t),
      text,
      { timeout: 10_000 },
    );
  const say = async (page, text) => {
    await page.fill("#text", text);
    await page.click("#send");
  };

  const ana = await open("ana");
  const bob = await open("bob");
  await waitForLine(ana, "bob joined");
  await say(ana, "hello from ana");
  await waitForLine(bob, "ana: hello from ana");
  await say(bob, "hi ana, bob here");
  await waitForLine(ana, "bob: hi ana, bob here");

  await ana.screenshot({ path: `${out}/demo-chat-ana.png`, fullPage: true });
  await bob.screenshot({ path: `${out}/demo-chat-bob.png`, fullPage: true });
  const status = await bob.textContent("#status");
  console.log(JSON.stringify({ ana: await lines(ana), bob: await lines(bob), status }));
} catch (e) {
  console.error(`demo-chat: ${e.message}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
