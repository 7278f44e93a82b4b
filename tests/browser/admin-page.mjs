// The admin page (GET / on the [admin] listener) in headless Chromium:
//
//   node tests/browser/admin-page.mjs http://127.0.0.1:ADMIN_PORT/ OUT_DIR WANT
//
// Waits (up to 10 s) until the page, kept current by server-sent events,
// shows WANT open connections in total, then prints one JSON line: the
// status line, the summary, each route row's cells and the reload errors
// listed. Keeps a screenshot in OUT_DIR/admin-page.png.
import { chromium } from "playwright-core";
import { launchOptions } from "./launch.mjs";

const [url, out, want] = process.argv.slice(2);
if (!url || !out || !want) {
  console.error("usage: node admin-page.mjs URL OUT_DIR CONNECTIONS");
  process.exit(2);
}
const browser = await chromium.launch(launchOptions());
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 700 } });
  page.on("pageerror", (e) => console.error(`page error: ${e}`));
  await page.goto(url);
  await page.waitForFunction(
    (n) => document.getElementById("summary").textContent.startsWith(n + " connection"),
    want,
    { timeout: 10_000 },
  );
  // A second update, so that rates have a previous state to compare with.
  const first = await page.textContent("#status");
  await page.waitForFunction((s) => document.getElementById("status").textContent !== s, first, {
    timeout: 10_000,
  });
  const rows = await page.$$eval("#routes tbody tr", (trs) =>
    trs.map((tr) => [...tr.cells].map((td) => td.textContent)),
  );
  const errors = await page.$$eval("#errors li", (lis) => lis.map((li) => li.textContent));
  await page.screenshot({ path: `${out}/admin-page.png`, fullPage: true });
  console.log(
    JSON.stringify({
      status: await page.textContent("#status"),
      summary: await page.textContent("#summary"),
      rows,
      errors,
    }),
  );
} catch (e) {
  console.error(`admin-page: ${e.message}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
