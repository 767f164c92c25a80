// Drawing decomposed images: the input as the model saw it, the slot overlay, and a cut-out
// of each slot for the strip. Slot colours are the server's (palette.js is made from the
// palette of its segmentation PNGs), so the page and the API's pictures agree.

import { SLOT_COLORS } from './palette.js';

/** The colour [r, g, b] of slot `slot`. */
export const slotColor = (slot) => SLOT_COLORS[slot % SLOT_COLORS.length];

/** CSS form of a colour. */
export const rgb = ([r, g, b]) => `rgb(${r} ${g} ${b})`;

// How removed slots look on the overlay: a dark veil over the image.
const REMOVED = [16, 16, 16, 170];
// Overlay opacity of kept slots, and of the slot under the pointer.
const ALPHA = 105;
const ALPHA_HIGHLIGHT = 190;

// The part of a width×height image the model sees: the server's preprocessing
// (`preprocess` in src/imageio.rs) crops this square, or takes the whole image, and then
// resizes it to the model's resolution.
function modelCrop(width, height, rule) {
  const centred = (side) => [Math.floor((width - side) / 2), Math.floor((height - side) / 2), side, side];
  switch (rule.kind) {
    case 'center_crop_resize':
      return centred(Math.min(rule.crop, width, height));
    case 'short_side_center_crop':
      return centred(Math.min(width, height));
    default: // 'resize': the whole image, aspect ratio not kept
      return [0, 0, width, height];
  }
}

// A 2D context on a fresh canvas of the given size.
function context(width, height) {
  const canvas = document.createElement('canvas');
  canvas.width = width;
  canvas.height = height;
  return canvas.getContext('2d', { willReadFrequently: true });
}

// The RGBA pixels of a base64 PNG.
async function pngPixels(base64, width, height) {
  const img = new Image();
  img.src = `data:image/png;base64,${base64}`;
  await img.decode();
  const ctx = context(width, height);
  ctx.drawImage(img, 0, 0, width, height);
  return ctx.getImageData(0, 0, width, height).data;
}

/**
 * What the page draws for one decomposed image (`/decompose` answer, with masks): the
 * input at the model's resolution, each slot's soft mask (0–255 a pixel), the slot owning
 * each pixel (argmax of the masks, the server's rule for its segmentation) and a cut-out
 * of each slot (the input with the mask as opacity) as an image URL.
 */
export async function prepareView(bitmap, decomposed, preprocess) {
  const { width, height, objects } = decomposed;
  const input = context(width, height);
  input.drawImage(bitmap, ...modelCrop(bitmap.width, bitmap.height, preprocess), 0, 0, width, height);
  const pixels = input.getImageData(0, 0, width, height);
  const masks = await Promise.all(
    objects.map(async ({ mask }) => {
      const rgba = await pngPixels(mask, width, height);
      return Uint8Array.from({ length: width * height }, (_, p) => rgba[4 * p]);
    }),
  );
  const labels = new Uint8Array(width * height);
  for (let p = 0; p < labels.length; p++) {
    let best = 0;
    for (let s = 1; s < masks.length; s++) if (masks[s][p] > masks[best][p]) best = s;
    labels[p] = best;
  }
  const cutouts = masks.map((mask) => {
    const cut = new ImageData(new Uint8ClampedArray(pixels.data), width, height);
    mask.forEach((value, p) => (cut.data[4 * p + 3] = value));
    const ctx = context(width, height);
    ctx.putImageData(cut, 0, 0);
    return ctx.canvas.toDataURL();
  });
  return { width, height, pixels, labels, cutouts };
}

/** Draws the input on `canvas`, sized to the model's resolution. */
export function drawInput(canvas, view) {
  canvas.width = view.width;
  canvas.height = view.height;
  canvas.getContext('2d').putImageData(view.pixels, 0, 0);
}

/**
 * Draws the slot overlay on `canvas`: each pixel in its slot's colour, or veiled when
 * `kept[slot]` is false; the slot `highlight` (or none: -1) stands out.
 */
export function drawOverlay(canvas, view, kept, highlight) {
  canvas.width = view.width;
  canvas.height = view.height;
  const ctx = canvas.getContext('2d');
  const overlay = ctx.createImageData(view.width, view.height);
  view.labels.forEach((slot, p) => {
    const alpha = slot === highlight ? ALPHA_HIGHLIGHT : ALPHA;
    overlay.data.set(kept[slot] ? [...slotColor(slot), alpha] : REMOVED, 4 * p);
  });
  ctx.putImageData(overlay, 0, 0);
}

/** The slot that owns the pixel under a pointer event on `canvas`. */
export function slotAt(canvas, view, event) {
  const box = canvas.getBoundingClientRect();
  const x = Math.min(view.width - 1, Math.floor(((event.clientX - box.left) / box.width) * view.width));
  const y = Math.min(view.height - 1, Math.floor(((event.clientY - box.top) / box.height) * view.height));
  return view.labels[y * view.width + x];
}
