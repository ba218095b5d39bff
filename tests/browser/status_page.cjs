// The status page in a real headless Chromium (Debian's), driven by playwright-core.
// Run by tests/status_browser.rs against a running gateway; scripts/test installs
// playwright-core into target/browser-test. Every check throws on failure (exit 1).
//
// Env: QG_PLAYWRIGHT (path of the playwright-core package), QG_CHROMIUM (the browser),
// QG_URL, QG_ADMIN (admin token), QG_CLIENT (client key), QG_MODEL, QG_PROVIDER,
// QG_SHOTS (directory for screenshots), QG_README_SHOT (optional: also write the README's PNG).
"use strict";
const assert = require("node:assert/strict");
const fs = require("node:fs");
const path = require("node:path");
const { chromium } = require(process.env.QG_PLAYWRIGHT);

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const URL = env("QG_URL");
const ADMIN = env("QG_ADMIN");
const CLIENT = env("QG_CLIENT");
const MODEL = env("QG_MODEL");
const PROVIDER = env("QG_PROVIDER");
const SHOTS = env("QG_SHOTS");

// The flags this closed network needs (no background connections to Google's hosts).
const FLAGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
];

const log = (...args) => console.log("[browser]", ...args);

async function stats() {
  const r = await fetch(`${URL}/api/v1/stats/pool/${PROVIDER}`, {
    headers: { Authorization: `Bearer ${ADMIN}` },
  });
  assert.equal(r.status, 200);
  return r.json();
}

async function chat(n) {
  for (let i = 0; i < n; i++) {
    const r = await fetch(`${URL}/v1/chat/completions`, {
      method: "POST",
      headers: { Authorization: `Bearer ${CLIENT}`, "Content-Type": "application/json" },
      body: JSON.stringify({ model: MODEL, messages: [{ role: "user", content: "hello from the browser test" }] }),
    });
    assert.equal(r.status, 200, await r.text());
  }
}

const thousands = (n) => String(n).replace(/\B(?=(\d{3})+(?!\d))/g, ",");

// The accounts as the page shows them.
async function rows(page) {
  return page.$$eval("tr[data-account]", (trs) =>
    trs.map((tr) => ({
      name: tr.dataset.account,
      state: tr.dataset.state,
      used: Number(tr.dataset.quotaUsed),
      limit: Number(tr.dataset.quotaLimit),
      quotaText: tr.querySelector('[data-field="quota"]')?.textContent ?? "",
    })),
  );
}

async function main() {
  fs.mkdirSync(SHOTS, { recursive: true });
  const browser = await chromium.launch({
    executablePath: process.env.QG_CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: FLAGS,
  });
  const results = {};
  try {
    // 1. Without the token: the login form, and no data anywhere.
    const anon = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    const page = await anon.newPage();
    await page.goto(URL + "/");
    await page.locator('form[action="/login"] input[name="token"]').waitFor();
    const before = await stats();
    const names = before.accounts_status.map((a) => a.account);
    const anonHtml = await page.content();
    for (const name of [PROVIDER, ...names]) {
      assert.ok(!anonHtml.includes(name), `"${name}" shown without the token`);
    }
    const live401 = await page.evaluate(async () => (await fetch("/status/live")).status);
    assert.equal(live401, 401, "the live fragment without a session");
    await page.screenshot({ path: path.join(SHOTS, "status-login.png") });
    log("login form shown, no data without the token");

    // 2. A wrong token is refused; the right one logs in.
    await page.fill('input[name="token"]', "not-the-admin-token");
    await Promise.all([page.waitForLoadState(), page.click('button[type="submit"]')]);
    await page.getByText("That is not the admin token.").waitFor();
    assert.ok(!(await page.content()).includes(names[0]));
    await page.fill('input[name="token"]', ADMIN);
    await Promise.all([page.waitForURL(URL + "/"), page.click('button[type="submit"]')]);
    await page.locator("tr[data-account]").first().waitFor();
    const cookies = await anon.cookies();
    const session = cookies.find((c) => c.name === "quotagate_session");
    assert.ok(session, "a session cookie");
    assert.equal(session.httpOnly, true);
    assert.equal(session.sameSite, "Strict");
    assert.equal(await page.evaluate(() => document.cookie.includes("quotagate_session")), false);
    assert.ok(!(await page.content()).includes(ADMIN), "the token is not in the page");
    log("logged in with an HttpOnly, SameSite=Strict session cookie");

    // 3. Account names and quota figures match the stats API.
    const shown = await rows(page);
    const api = await stats();
    assert.equal(shown.length, api.accounts_status.length);
    for (const a of api.accounts_status) {
      const row = shown.find((r) => r.name === a.account);
      assert.ok(row, `${a.account} on the page`);
      assert.equal(row.used, a.quota_used, `${a.account} quota used`);
      assert.equal(row.limit, a.quota_limit, `${a.account} quota limit`);
      const text = a.quota_limit > 0
        ? `${thousands(a.quota_used)} / ${thousands(a.quota_limit)} tokens`
        : `${thousands(a.quota_used)} tokens`;
      assert.ok(row.quotaText.includes(text), `${a.account}: "${row.quotaText}" shows "${text}"`);
    }
    const available = await page.textContent('[data-field="available"]');
    assert.equal(available.trim(), `${api.available_accounts} / ${api.total_accounts}`);
    log("accounts and quota figures match the stats API");

    // 4. Live: new requests show up without a reload.
    await page.evaluate(() => { window.__notReloaded = true; });
    const usedBefore = shown.reduce((s, r) => s + r.used, 0);
    await chat(5);
    const after = await stats();
    const usedAfter = after.accounts_status.reduce((s, a) => s + a.quota_used, 0);
    assert.ok(usedAfter > usedBefore, "the requests were counted");
    // Worker threads report what they admitted within a report interval (25 ms), so the page
    // may show a later, higher figure than the one read just above: at least that one.
    await page.waitForFunction(
      (want) => [...document.querySelectorAll("tr[data-account]")]
        .reduce((s, tr) => s + Number(tr.dataset.quotaUsed), 0) >= want,
      usedAfter,
      { timeout: 15000 },
    );
    assert.equal(await page.evaluate(() => window.__notReloaded), true, "no reload");
    assert.equal(await page.evaluate(() => performance.getEntriesByType("navigation").length), 1);
    const rpm = Number((await page.textContent('[data-field="rpm"]')).replace(/,/g, ""));
    log(`live update without a reload: quota used ${usedBefore} -> ${usedAfter}, ${rpm} req/min shown`);

    // 5. Screenshots: desktop (light and dark) and a phone.
    await page.screenshot({ path: path.join(SHOTS, "status-page.png"), fullPage: true });
    if (process.env.QG_README_SHOT) {
      await page.screenshot({ path: process.env.QG_README_SHOT, fullPage: true });
    }
    await page.emulateMedia({ colorScheme: "dark" });
    const background = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
    const [r, g, b] = background.match(/\d+/g).map(Number);
    assert.ok(0.2126 * r + 0.7152 * g + 0.0722 * b < 60, `dark background, got ${background}`);
    await page.screenshot({ path: path.join(SHOTS, "status-page-dark.png"), fullPage: true });
    const storage = await anon.storageState();
    const phone = await browser.newContext({
      viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true, deviceScaleFactor: 2,
      storageState: storage,
    });
    const phonePage = await phone.newPage();
    await phonePage.goto(URL + "/");
    await phonePage.locator("tr[data-account]").first().waitFor();
    const overflow = await phonePage.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 1, `no sideways scrolling on a phone (${overflow} px too wide)`);
    const fontSize = await phonePage.evaluate(() => parseFloat(getComputedStyle(document.body).fontSize));
    assert.ok(fontSize >= 14, `readable text on a phone (${fontSize} px)`);
    await phonePage.screenshot({ path: path.join(SHOTS, "status-page-phone.png"), fullPage: true });
    await phone.close();
    log("dark theme and phone layout checked; screenshots in " + SHOTS);

    // 6. Weight: what a first visit loads (cookie already set), and what one live update costs.
    const weighed = await browser.newContext({ viewport: { width: 1280, height: 800 }, storageState: storage });
    const wpage = await weighed.newPage();
    const loads = [];
    wpage.on("requestfinished", (req) => loads.push(req));
    await wpage.goto(URL + "/", { waitUntil: "load" });
    const firstLoad = [...loads];
    loads.length = 0;
    await wpage.waitForResponse((r) => r.url().endsWith("/status/live"), { timeout: 10000 });
    await wpage.waitForTimeout(200);
    const sizes = async (reqs) => {
      let body = 0, headers = 0;
      for (const req of reqs) {
        const s = await req.sizes();
        body += s.responseBodySize;
        headers += s.responseHeadersSize;
      }
      return { requests: reqs.length, body_bytes: body, header_bytes: headers, urls: reqs.map((r) => new globalThis.URL(r.url()).pathname) };
    };
    results.first_load = await sizes(firstLoad);
    results.live_update = await sizes(loads.filter((r) => r.url().endsWith("/status/live")).slice(0, 1));
    await weighed.close();

    // 7. Logging out shows the login form again, and the old cookie shows nothing.
    await Promise.all([page.waitForURL(URL + "/"), page.click('form[action="/logout"] button')]);
    await page.locator('input[name="token"]').waitFor();
    const out = await page.evaluate(async () => (await fetch("/status/live")).status);
    assert.equal(out, 401);
    log("logout shows the login form");
    await anon.close();
  } finally {
    await browser.close();
  }
  console.log("RESULT " + JSON.stringify(results));
}

main().catch((e) => {
  console.error(e && e.stack ? e.stack : e);
  process.exit(1);
});
