// Drives the dashboard page in headless chromium for tests/browser/test_dashboard.py.
// Arguments: JSON in $FEDFLEET_BROWSER_ARGS ({chromium, url, job, hostile, screenshot, timeoutMs}).
// Prints one JSON line with what the page showed; the Python test asserts on it.
'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');
const { chromium } = require('playwright-core');

const args = JSON.parse(process.env.FEDFLEET_BROWSER_ARGS);

async function readJob(page) {
  return page.evaluate(() => {
    const round = document.getElementById('job-round');
    const acc = document.querySelector('figure[data-chart="accuracy"] svg');
    return {
      name: document.getElementById('job-name').textContent,
      phase: document.getElementById('job-phase').textContent,
      round: Number(round.dataset.round),
      roundText: round.textContent,
      accuracyPoints: acc ? Number(acc.dataset.points) : 0,
      accuracyMarkers: acc ? acc.querySelectorAll('circle.pt').length : 0,
    };
  });
}

(async () => {
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'fedfleet-chromium-'));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: args.chromium,
    headless: true,
    viewport: { width: 1400, height: 1000 },
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
  const problems = [];
  const requests = [];
  try {
    const page = await context.newPage();
    page.on('pageerror', (e) => problems.push(`pageerror: ${e.message}`));
    page.on('console', (m) => { if (m.type() === 'error') problems.push(`console: ${m.text()}`); });
    page.on('request', (r) => requests.push(r.url()));
    const timeout = args.timeoutMs;
    await page.goto(`${args.url}/#job=${encodeURIComponent(args.job)}`, { waitUntil: 'load' });

    // The job shows up with at least one committed round and a point on the accuracy plot...
    await page.waitForFunction(() => {
      const r = document.getElementById('job-round');
      const acc = document.querySelector('figure[data-chart="accuracy"] svg');
      return Number(r.dataset.round) >= 1 && acc && Number(acc.dataset.points) >= 1;
    }, null, { timeout, polling: 200 });
    const first = await readJob(page);

    // ...and, without a reload, the round and the plot advance.
    await page.waitForFunction((before) => {
      const r = document.getElementById('job-round');
      const acc = document.querySelector('figure[data-chart="accuracy"] svg');
      return Number(r.dataset.round) > before.round && Number(acc.dataset.points) > before.accuracyPoints;
    }, first, { timeout, polling: 200 });
    const second = await readJob(page);

    // The hostile job's row: its name and state shown as text, nothing run.
    const hostileRow = await page.evaluate((key) => {
      const row = [...document.querySelectorAll('#jobs tbody tr')].find((tr) => tr.dataset.job === key);
      if (!row) return null;
      return {
        cells: [...row.cells].map((c) => c.textContent),
        elements: row.querySelectorAll('img, script, b, iframe').length,
      };
    }, args.hostile);
    const pwned = await page.evaluate(() => window.__fedfleetPwned === true);
    const charts = await page.evaluate(() =>
      [...document.querySelectorAll('figure.chart')].map((f) => ({
        id: f.dataset.chart,
        points: Number(f.querySelector('svg').dataset.points),
      })));
    const status = await page.evaluate(() => document.getElementById('status').dataset.state);
    const text = await page.evaluate(() => document.body.innerText);
    const html = await page.content();
    await page.screenshot({ path: args.screenshot, fullPage: true });
    const origin = new URL(args.url).origin;
    console.log(JSON.stringify({
      first, second, hostileRow, pwned, charts, status, text, html, problems,
      foreignRequests: requests.filter((u) => !u.startsWith(origin)),
    }));
  } finally {
    await context.close();
    fs.rmSync(userDataDir, { recursive: true, force: true });
  }
})().catch((error) => {
  console.error(error);
  process.exit(1);
});
