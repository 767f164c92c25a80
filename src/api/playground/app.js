// The playground's wiring: two image panels, the edit history and the render controls.
// Everything goes through the server's public HTTP API (api.js), as a script would; any
// failure ends up as a message in the error box, never as a blank page.

import * as api from './api.js';
import * as edits from './editor.js';
import { History } from './history.js';
import { slotRows, slotSet } from './slots.js';
import { drawInput, drawOverlay, prepareView, rgb, slotAt, slotColor } from './view.js';

const $ = (id) => document.getElementById(id);
const LETTERS = ['A', 'B'];
// Drag-and-drop type of a slot reference {image, slot}.
const SLOT_TYPE = 'application/x-slotserve-slot';

const state = {
  info: null, // GET /info, once the server has answered it
  images: [null, null], // per panel: {name, decomposed, view, rows}
  history: new History(edits.initial([0, 0])),
};

// --- errors ----------------------------------------------------------------------------------

function showError(error) {
  let text = error?.message ?? String(error);
  if (error instanceof api.ApiError && error.status) text += ` (HTTP ${error.status}, ${error.type})`;
  if (error?.type === 'unauthorized') text += ' — enter the server’s API key at the top right.';
  $('error').textContent = text;
  $('error').hidden = false;
}

// Runs a UI action, showing its failure on the page.
const guarded = (action) => async (...args) => {
  $('error').hidden = true;
  try {
    await action(...args);
  } catch (e) {
    showError(e);
  }
};

window.addEventListener('error', (e) => showError(e.error ?? e.message));
window.addEventListener('unhandledrejection', (e) => showError(e.reason));

// --- server and images -----------------------------------------------------------------------

// Asks the server about its model and fills in the sampling controls.
async function connect() {
  state.info = null;
  $('model').textContent = 'connecting…';
  const info = await api.info().catch((e) => {
    $('model').textContent = 'not connected';
    throw e;
  });
  const { model } = info;
  state.info = info;
  $('model').textContent = `${model.name}: ${model.num_slots} slots, ${model.resolution}², ${model.device}`;
  const sampler = $('sampler');
  const chosen = sampler.value || model.default_sampler;
  sampler.replaceChildren(...info.samplers.map((name) => new Option(name, name, false, name === chosen)));
  $('steps').max = info.limits.max_steps;
  if (!$('steps').value) $('steps').value = model.default_steps;
}

// Decomposes `blob` and shows it in panel `i`; a new image starts a new edit, since slot
// references point into both images.
async function loadImage(i, blob, name) {
  const panel = panels[i];
  panel.status.textContent = `decomposing ${name}…`;
  try {
    if (!state.info) await connect();
    const decomposed = await api.decompose(blob);
    const view = await prepareView(await createImageBitmap(blob), decomposed, state.info.model.preprocess);
    state.images[i] = { name, decomposed, view, rows: slotRows(decomposed.slots) };
    panel.status.textContent = name;
  } catch (e) {
    panel.status.textContent = '';
    throw e;
  }
  drawInput(panel.input, state.images[i].view);
  panel.root.classList.remove('rendered');
  state.history = new History(edits.initial(state.images.map((image) => image?.rows.length ?? 0)));
  show();
}

// Files dropped or chosen on panel `i`: the first goes there, a second to the other panel.
async function loadFiles(i, files) {
  const images = [...files].slice(0, 2);
  for (const [n, file] of images.entries()) await loadImage((i + n) % 2, file, file.name);
}

async function loadScene(i) {
  const seed = Math.floor(Math.random() * 1_000_000);
  await loadImage(i, await api.scene(seed), `scene ${seed}`);
}

// --- edits -----------------------------------------------------------------------------------

function edit(next) {
  if (next === state.history.present) return;
  state.history.push(next);
  show();
}

function undo() {
  if (state.history.undo()) show();
}

function redo() {
  if (state.history.redo()) show();
}

// The slot reference being dragged onto panel `target`, if it comes from the other image.
function draggedSlot(event, target) {
  const text = event.dataTransfer.getData(SLOT_TYPE);
  const r = text ? JSON.parse(text) : null;
  return r && r.image !== target && state.images[target] ? r : null;
}

// Lets what `types` lists (slots, files) be dropped on an element.
function acceptDrops(element, types) {
  element.addEventListener('dragover', (e) => {
    if (types.some((type) => e.dataTransfer.types.includes(type))) e.preventDefault();
  });
}

// --- drawing ---------------------------------------------------------------------------------

function show() {
  const present = state.history.present;
  state.images.forEach((image, i) => image && showPanel(i, image, present[i]));
  $('undo').disabled = !state.history.canUndo;
  $('redo').disabled = !state.history.canRedo;
}

// Which of image `i`'s own slots its edited set keeps.
function keptSlots(i) {
  const slots = state.history.present[i];
  return state.images[i].rows.map((_, s) => slots.some((r) => edits.same(r, edits.ref(i, s))));
}

// Redraws only the overlay (for pointer highlights), leaving the strip's elements in place.
function showOverlay(i, highlight) {
  panels[i].highlight = highlight;
  drawOverlay(panels[i].overlay, state.images[i].view, keptSlots(i), highlight);
}

function showPanel(i, image, slots) {
  const panel = panels[i];
  const kept = keptSlots(i);
  panel.root.classList.remove('empty');
  showOverlay(i, panel.highlight);
  // The strip: the image's own slots (removed ones veiled), then slots taken from the other.
  const foreign = slots.filter((r) => r.image !== i);
  panel.strip.replaceChildren(
    ...kept.map((keep, s) => slotTile(i, edits.ref(i, s), !keep)),
    ...foreign.map((r) => slotTile(i, r, false)),
  );
}

// One slot of panel `owner`'s strip: a cut-out with its colour and area; click to remove or
// restore, drag onto the other panel, or drop a slot of the other panel on it to swap.
function slotTile(owner, r, removed) {
  const source = state.images[r.image];
  const area = source.decomposed.objects[r.slot].area;
  const tile = document.createElement('li');
  tile.className = `slot${removed ? ' removed' : ''}${r.image !== owner ? ' foreign' : ''}`;
  tile.style.setProperty('--slot-color', rgb(slotColor(r.slot)));
  Object.assign(tile.dataset, { image: r.image, slot: r.slot, area });
  tile.title = removed
    ? 'removed: click to bring it back'
    : 'click to remove; drag onto the other image to insert, onto one of its slots to swap';
  const img = new Image();
  img.src = source.view.cutouts[r.slot];
  img.alt = `slot ${r.slot}`;
  img.draggable = false;
  const label = document.createElement('span');
  const name = r.image === owner ? `slot ${r.slot}` : `${LETTERS[r.image]} slot ${r.slot}`;
  label.textContent = `${name} · ${(area * 100).toFixed(1)}%`;
  tile.append(img, label);

  tile.draggable = r.image === owner && !removed;
  tile.addEventListener('click', () => edit(edits.toggle(state.history.present, owner, r)));
  tile.addEventListener('dragstart', (e) => e.dataTransfer.setData(SLOT_TYPE, JSON.stringify(r)));
  acceptDrops(tile, [SLOT_TYPE]);
  tile.addEventListener('drop', (e) => {
    const dragged = draggedSlot(e, owner);
    if (!dragged) return;
    e.preventDefault();
    e.stopPropagation();
    edit(edits.swap(state.history.present, owner, r, dragged));
  });
  if (r.image === owner) {
    tile.addEventListener('mouseenter', () => showOverlay(owner, r.slot));
    tile.addEventListener('mouseleave', () => showOverlay(owner, -1));
  }
  return tile;
}

function showResult(i, image) {
  const panel = panels[i];
  const url = `data:image/png;base64,${image.png}`;
  panel.result.src = url;
  panel.download.href = url;
  panel.download.download = `slotserve-${LETTERS[i]}-seed${image.seed}.png`;
  panel.resultCaption.textContent = `seed ${image.seed}, ${image.num_slots} slots`;
  panel.root.classList.add('rendered');
}

// --- rendering -------------------------------------------------------------------------------

// A whole number from an input, or undefined when it is empty (the server's default).
function wholeNumber(input, what) {
  if (input.value.trim() === '') return undefined;
  const n = Number(input.value);
  if (!Number.isSafeInteger(n) || n < 0) throw new Error(`${what} must be a whole number ≥ 0`);
  return n;
}

// Renders every loaded image from its edited slot set, streaming the progress.
async function render() {
  const loaded = state.images.flatMap((image, i) => (image ? [i] : []));
  if (!loaded.length) throw new Error('load or generate an image first');
  const present = state.history.present;
  const empty = loaded.find((i) => !present[i].length);
  if (empty !== undefined) throw new Error(`image ${LETTERS[empty]} has no slots left: bring one back first`);
  const slots = loaded.map((i) =>
    slotSet(present[i].map((r) => state.images[r.image].rows[r.slot]), state.images[i].decomposed.slots),
  );
  const request = {
    slots,
    seed: wholeNumber($('seed'), 'the seed'),
    steps: wholeNumber($('steps'), 'steps'),
    sampler: $('sampler').value || undefined,
  };
  const steps = loaded.map(() => ({ step: 0, of: 1 }));
  const progress = () => {
    const done = steps.reduce((n, s) => n + s.step, 0);
    const all = steps.reduce((n, s) => n + s.of, 0);
    Object.assign($('progress'), { max: all, value: done });
    $('progress-text').textContent = `step ${done} of ${all}`;
  };
  progress();
  $('render').disabled = true;
  try {
    const images = await api.render(request, ({ index, step, of }) => {
      steps[index] = { step, of };
      progress();
    });
    images.forEach((image, k) => showResult(loaded[k], image));
  } finally {
    $('render').disabled = false;
  }
}

// --- set-up ----------------------------------------------------------------------------------

function makePanel(i) {
  const root = $('panel-template').content.firstElementChild.cloneNode(true);
  const find = (selector) => root.querySelector(selector);
  const panel = {
    root,
    input: find('canvas.input'),
    overlay: find('canvas.overlay'),
    status: find('.status'),
    strip: find('.strip'),
    result: find('.result img'),
    resultCaption: find('.result-caption'),
    download: find('.download'),
    highlight: -1,
  };
  root.dataset.panel = i;
  find('.letter').textContent = LETTERS[i];
  const file = find('.file');
  file.addEventListener(
    'change',
    guarded(async () => {
      await loadFiles(i, file.files);
      file.value = ''; // choosing the same file again is a change too
    }),
  );
  find('.scene').addEventListener('click', guarded(() => loadScene(i)));

  // The image: click a slot to remove or restore it, drop files or the other image's slots.
  const original = find('.original');
  acceptDrops(original, [SLOT_TYPE, 'Files']);
  original.addEventListener(
    'drop',
    guarded(async (e) => {
      e.preventDefault();
      const dragged = draggedSlot(e, i);
      if (dragged) edit(edits.insert(state.history.present, i, dragged));
      else if (e.dataTransfer.files.length) await loadFiles(i, e.dataTransfer.files);
    }),
  );
  panel.overlay.addEventListener('click', (e) => {
    const image = state.images[i];
    if (image) edit(edits.toggle(state.history.present, i, edits.ref(i, slotAt(panel.overlay, image.view, e))));
  });
  panel.overlay.addEventListener('mousemove', (e) => {
    const image = state.images[i];
    const slot = image ? slotAt(panel.overlay, image.view, e) : -1;
    if (image && slot !== panel.highlight) showOverlay(i, slot);
  });
  panel.overlay.addEventListener('mouseleave', () => state.images[i] && showOverlay(i, -1));
  $('panels').append(root);
  return panel;
}

const panels = LETTERS.map((_, i) => makePanel(i));

$('api-key').value = api.apiKey();
$('api-key').addEventListener(
  'change',
  guarded(() => {
    api.setApiKey($('api-key').value.trim());
    return connect();
  }),
);
$('render').addEventListener('click', guarded(render));
// A file dropped beside the drop zones must not make the browser leave the page to show it.
window.addEventListener('dragover', (e) => e.preventDefault());
window.addEventListener('drop', (e) => e.preventDefault());
$('undo').addEventListener('click', undo);
$('redo').addEventListener('click', redo);
document.addEventListener('keydown', (e) => {
  // Ctrl+Z / Ctrl+Shift+Z (Cmd on a Mac), except where a field has its own undo.
  if (!(e.ctrlKey || e.metaKey) || e.key.toLowerCase() !== 'z') return;
  if (e.target.closest('input, select, textarea')) return;
  e.preventDefault();
  if (e.shiftKey) redo();
  else undo();
});

guarded(connect)();
