// The edit state: for each image panel, the slots its render will use, as references
// {image, slot} into the decomposed images. Each edit returns a new state and leaves the old
// one alone, so history.js can undo by keeping old states. The order of slots in a set does
// not matter to the model (it attends to slots as a set).

/** A reference to slot `slot` of image `image`. */
export const ref = (image, slot) => ({ image, slot });

/** Whether two references name the same slot. */
export const same = (a, b) => a.image === b.image && a.slot === b.slot;

/** No edits: every image renders from all of its own slots. */
export function initial(slotCounts) {
  return slotCounts.map((count, image) => Array.from({ length: count }, (_, slot) => ref(image, slot)));
}

// The state with image `image`'s slot list replaced.
const withSlots = (state, image, slots) => state.map((list, i) => (i === image ? slots : list));

/** Removes `r` from image `image`, or puts it back when it is not there. */
export function toggle(state, image, r) {
  const list = state[image];
  const kept = list.filter((x) => !same(x, r));
  return withSlots(state, image, kept.length < list.length ? kept : [...list, r]);
}

/** Adds slot `r` (of another image) to image `image`; no change when it is there already. */
export function insert(state, image, r) {
  if (state[image].some((x) => same(x, r))) return state;
  return withSlots(state, image, [...state[image], r]);
}

/**
 * Swaps slot `target` of image `image` with slot `r` of image `r.image`: each image renders
 * the other's slot in place of its own. When `target` is not in `image` it becomes an insert.
 */
export function swap(state, image, target, r) {
  if (!state[image].some((x) => same(x, target))) return insert(state, image, r);
  const replace = (list, from, to) => list.map((x) => (same(x, from) ? to : x));
  const swapped = withSlots(state, image, replace(state[image], target, r));
  return withSlots(swapped, r.image, replace(state[r.image], r, target));
}
