// Drives headless Chromium with playwright-core for tests/test_browser.py.
//   node drive.mjs URL [URL...]   -> prints {"<url>": <window.results of that page>, ...}
// Environment: CHROMIUM (default /usr/bin/chromium), CONDUIT_NODE_MODULES (the
// node_modules holding playwright-core; default tests/node/node_modules).
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const nodeModules = process.env.CONDUIT_NODE_MODULES || path.join(here, "..", "node", "node_modules");
const require = createRequire(import.meta.url);
const { chromium } = require(path.join(nodeModules, "playwright-core"));

// Without the background-networking flags Chromium dials Google services at start-up,
// which a closed network refuses (and which a test has no business doing anyway).
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  timeout: 60000,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const out = {};
try {
  const context = await browser.newContext();
  await Promise.all(process.argv.slice(2).map(async (url) => {
    const page = await context.newPage();
    page.on("console", (m) => process.stderr.write(`[page ${new URL(url).searchParams.get("scenario")}] ${m.text()}\n`));
    page.on("pageerror", (e) => process.stderr.write(`[page error] ${e}\n`));
    await page.goto(url);
    await page.waitForFunction(() => window.done === true, null, { timeout: 30000 });
    out[url] = await page.evaluate(() => window.results);
    out[url].userAgent = await page.evaluate(() => navigator.userAgent);
  }));
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(out) + "\n");
