// Slot sets travel as {shape: [K, D], dtype: "f32", data: base64 of little-endian f32, model}.
// Edits only recombine whole slot vectors, so the page keeps each slot as its D·4 bytes and
// never needs the numbers themselves.

/** The slots of a set, as one byte array per slot. */
export function slotRows(set) {
  const bytes = Uint8Array.from(atob(set.data), (c) => c.charCodeAt(0));
  const rowBytes = set.shape[1] * 4;
  return Array.from({ length: set.shape[0] }, (_, k) => bytes.subarray(k * rowBytes, (k + 1) * rowBytes));
}

/** A slot set made of `rows` (from `slotRows`), for the model that made `like`. */
export function slotSet(rows, like) {
  const bytes = new Uint8Array(rows.reduce((n, row) => n + row.length, 0));
  rows.reduce((at, row) => (bytes.set(row, at), at + row.length), 0);
  // btoa takes a "binary string"; build it in chunks to stay within argument limits.
  let binary = '';
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return { shape: [rows.length, like.shape[1]], dtype: like.dtype, data: btoa(binary), model: like.model };
}
