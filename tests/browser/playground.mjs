// Browser test of the playground page, against a running slotserve that requires an API key
// (scripts/playground-test.sh starts one). In headless Chromium, as a person would:
// enter the key, generate and decompose a scene, render it, remove its largest slot, render
// again and compare with the input where the slot was, undo and redo with the keyboard, upload
// a second image, drag slots between the two (insert and swap) and render both, and read an
// API error on the page. Screenshots of each
// stage go to --out.
//
//   node playground.mjs --url http://127.0.0.1:PORT --key KEY --chromium PATH --out DIR
//                       --upload IMAGE         (a PNG or JPEG for the second panel)
//                       [--screenshot PATH]    (a copy of the two-image screenshot)

import assert from 'node:assert/strict';
import { copyFile, mkdir } from 'node:fs/promises';
import { parseArgs } from 'node:util';
import { chromium } from 'playwright-core';

const { values: args } = parseArgs({
  options: {
    url: { type: 'string' },
    key: { type: 'string' },
    chromium: { type: 'string' },
    out: { type: 'string' },
    upload: { type: 'string' },
    screenshot: { type: 'string' },
  },
});
for (const name of ['url', 'key', 'chromium', 'out', 'upload']) assert.ok(args[name], `--${name} is required`);

// Rendering on a CPU in a debug build takes a while; these bound a hang, they time nothing.
const RENDER_TIMEOUT = 300_000;
const STEPS = 2;

const browser = await chromium.launch({ executablePath: args.chromium });
const page = await browser.newPage({ viewport: { width: 1240, height: 720 } });
page.setDefaultTimeout(60_000);

// The page must not throw, and must not load anything from anywhere but this server.
const pageErrors = [];
const outsiders = [];
page.on('pageerror', (e) => pageErrors.push(e.message));
page.on('request', (r) => {
  if (!/^(data|blob):/.test(r.url()) && !r.url().startsWith(args.url)) outsiders.push(r.url());
});

const panel = (i) => page.locator(`[data-panel="${i}"]`);
const tiles = (i) => panel(i).locator('.strip .slot');
const errorBox = page.locator('#error');
let checks = 0;

async function step(name, body) {
  console.log(`playground-test: ${name}`);
  await body();
  checks += 1;
}

async function screenshot(name) {
  const path = `${args.out}/${name}.png`;
  await page.screenshot({ path, fullPage: true });
  return path;
}

// RGBA pixels of a canvas or image element, as the page sees them.
function pixels(locator) {
  return locator.evaluate(async (el) => {
    if (el.decode) await el.decode();
    const [w, h] = el.naturalWidth ? [el.naturalWidth, el.naturalHeight] : [el.width, el.height];
    const ctx = Object.assign(document.createElement('canvas'), { width: w, height: h }).getContext('2d');
    ctx.drawImage(el, 0, 0);
    return { w, h, data: Array.from(ctx.getImageData(0, 0, w, h).data) };
  });
}

// Mean absolute RGB difference of two pixel sets over the pixels where `where(p)` holds.
function meanDiff(a, b, where = () => true) {
  assert.deepEqual([a.w, a.h], [b.w, b.h], 'images of different sizes');
  let sum = 0;
  let n = 0;
  for (let p = 0; p < a.w * a.h; p++) {
    if (!where(p)) continue;
    for (let c = 0; c < 3; c++) sum += Math.abs(a.data[4 * p + c] - b.data[4 * p + c]);
    n += 3;
  }
  return n ? sum / n : 0;
}

// Clicks Render and waits for panel `i`'s result to appear; returns its pixels. The old
// result is taken away first: renders of a random-weight model may look alike.
async function render(i) {
  const result = panel(i).locator('.result img');
  await result.evaluate((el) => el.removeAttribute('src'));
  await page.click('#render');
  await page.waitForFunction((el) => el.getAttribute('src') && el.complete, await result.elementHandle(), {
    timeout: RENDER_TIMEOUT,
  });
  assert.ok(await errorBox.isHidden(), `render failed: ${await errorBox.textContent()}`);
  return pixels(result);
}

async function generateScene(i) {
  await panel(i).locator('.scene').click();
  await tiles(i).first().waitFor();
  assert.match(await panel(i).locator('.status').textContent(), /^scene \d+$/);
}

try {
  await mkdir(args.out, { recursive: true });

  await step('without the key, the page loads and asks for it', async () => {
    await page.goto(args.url);
    await errorBox.waitFor();
    assert.match(await errorBox.textContent(), /API key.*HTTP 401, unauthorized/s);
    await screenshot('01-needs-key');
  });

  await step('with the key, the page shows the model', async () => {
    await page.fill('#api-key', args.key);
    await page.locator('#api-key').blur();
    await page.waitForFunction(() => /slots/.test(document.getElementById('model').textContent));
    assert.ok(await errorBox.isHidden());
    assert.ok((await page.locator('#sampler option').count()) >= 1);
  });

  await step('a generated scene is decomposed and renders', async () => {
    await generateScene(0);
    const info = await page.evaluate(async (key) => {
      const r = await fetch('/info', { headers: { Authorization: `Bearer ${key}` } });
      return r.json();
    }, args.key);
    assert.equal(await tiles(0).count(), info.model.num_slots);
    await page.fill('#seed', '5');
    await page.fill('#steps', String(STEPS));
    await render(0);
    const progress = await page.$eval('#progress', (p) => [p.value, p.max]);
    assert.deepEqual(progress, [STEPS, STEPS], 'the progress bar follows the streamed steps');
    assert.equal(await panel(0).locator('.download').getAttribute('download'), 'slotserve-A-seed5.png');
  });

  await step('removing the largest slot changes the render where the object was', async () => {
    const areas = await tiles(0).evaluateAll((els) => els.map((el) => Number(el.dataset.area)));
    const largest = areas.indexOf(Math.max(...areas));
    const overlay = panel(0).locator('canvas.overlay');
    const shown = await pixels(overlay);
    await tiles(0).nth(largest).click();
    assert.match(await tiles(0).nth(largest).getAttribute('class'), /removed/);
    // The removed slot's region: where the overlay changed (it now veils that slot).
    const veiled = await pixels(overlay);
    const region = (p) => shown.data.slice(4 * p, 4 * p + 4).some((v, c) => v !== veiled.data[4 * p + c]);
    const regionShare = Array.from({ length: shown.w * shown.h }, (_, p) => region(p)).filter(Boolean).length;
    const share = regionShare / (shown.w * shown.h);
    assert.ok(Math.abs(share - areas[largest]) < 0.02, `overlay region ${share}, slot area ${areas[largest]}`);

    const edited = await render(0);
    const k = areas.length;
    assert.match(await panel(0).locator('.result-caption').textContent(), new RegExp(`seed 5, ${k - 1} slots`));
    const input = await pixels(panel(0).locator('canvas.input'));
    const inside = meanDiff(edited, input, region);
    console.log(`playground-test:   region ${(share * 100).toFixed(1)}% of the image; mean |render - input| there ${inside.toFixed(1)} / 255`);
    assert.ok(inside > 10, `the render matches the input where the slot was removed (${inside})`);
    await screenshot('02-slot-removed');
  });

  await step('Ctrl+Z undoes the removal and Ctrl+Shift+Z redoes it', async () => {
    const removed = () => panel(0).locator('.strip .slot.removed').count();
    await page.click('h1'); // keyboard focus outside the fields, whose own undo wins
    await page.keyboard.press('Control+z');
    assert.equal(await removed(), 0);
    await page.keyboard.press('Control+Shift+z');
    assert.equal(await removed(), 1);
    assert.ok(await page.isEnabled('#undo'));
    await page.click('#undo');
    assert.equal(await removed(), 0);
  });

  await step('an uploaded second image: slots dragged between the two are inserted and swapped, and both render', async () => {
    await panel(1).locator('input.file').setInputFiles(args.upload);
    await tiles(1).first().waitFor();
    assert.equal(await panel(1).locator('.status').textContent(), args.upload.split('/').pop());
    const k = await tiles(0).count();
    await tiles(1).nth(0).dragTo(panel(0).locator('canvas.overlay'));
    assert.equal(await panel(0).locator('.slot.foreign').count(), 1, 'insert by dropping on the image');
    assert.match(await panel(0).locator('.slot.foreign').textContent(), /^B slot 0/);

    await tiles(1).nth(1).dragTo(tiles(0).nth(0));
    assert.equal(await panel(0).locator('.slot.foreign').count(), 2, 'swap: B slot 1 in A');
    assert.match(await tiles(0).nth(0).getAttribute('class'), /removed/, 'swap: A slot 0 out of A');
    assert.match(await panel(1).locator('.slot.foreign').textContent(), /^A slot 0/, 'swap: A slot 0 in B');
    assert.match(await tiles(1).nth(1).getAttribute('class'), /removed/, 'swap: B slot 1 out of B');
    assert.equal(await tiles(0).count(), k + 2);

    const resultB = await render(1);
    assert.ok(await panel(0).locator('.result img').isVisible());
    assert.match(await panel(0).locator('.result-caption').textContent(), new RegExp(`seed 5, ${k + 1} slots`));
    assert.match(await panel(1).locator('.result-caption').textContent(), new RegExp(`seed 6, ${k} slots`));
    assert.ok(resultB.w > 0);
    await page.mouse.move(0, 0);
    const path = await screenshot('03-two-images');
    if (args.screenshot) await copyFile(path, args.screenshot);
  });

  await step('an API error is shown as a readable message', async () => {
    await page.fill('#steps', '100000');
    await page.click('#render');
    await errorBox.waitFor();
    assert.match(await errorBox.textContent(), /100000 steps.*HTTP 422, invalid_parameters/s);
    await screenshot('04-api-error');
  });

  assert.deepEqual(pageErrors, [], 'uncaught errors in the page');
  assert.deepEqual(outsiders, [], 'requests to other origins');
  console.log(`playground-test: PASS (${checks} checks, screenshots in ${args.out})`);
} catch (e) {
  await screenshot('failure').catch(() => {});
  console.error(`playground-test: FAIL: ${e.stack ?? e}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
