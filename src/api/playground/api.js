// Calls to this server's HTTP API, the same endpoints scripts use. Adds the API key the user
// typed, and turns failures (the API's JSON errors, network errors, broken streams) into
// ApiError with a message a person can read.

const KEY_STORAGE = 'slotserve.apiKey';

/** The API key the user gave, kept in localStorage so a reload does not ask again. */
export function apiKey() {
  return localStorage.getItem(KEY_STORAGE) ?? '';
}

/** Stores (or, when empty, forgets) the API key. */
export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

/** A failed call: the server's message, its `error_type` and the HTTP status (0: none). */
export class ApiError extends Error {
  constructor(message, type, status) {
    super(message);
    this.type = type;
    this.status = status;
  }
}

// fetch() with the key, resolving only to successful responses.
async function call(path, options = {}) {
  const headers = new Headers(options.headers);
  const key = apiKey();
  if (key) headers.set('Authorization', `Bearer ${key}`);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (e) {
    throw new ApiError(`cannot reach the server: ${e.message}`, 'network', 0);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

// The API answers errors as {"error", "error_type"}; anything else (say, a proxy's HTML page)
// is reported by its status.
async function errorOf(response) {
  const body = await response.json().catch(() => null);
  if (typeof body?.error === 'string') {
    return new ApiError(body.error, body.error_type, response.status);
  }
  const text = `${response.status} ${response.statusText}`.trim();
  return new ApiError(`the server answered ${text}`, 'http', response.status);
}

/** GET /info: the model, samplers and limits. */
export async function info() {
  return (await call('/info')).json();
}

/** GET /scene: the procedural scene of `seed`, as a PNG blob. */
export async function scene(seed) {
  return (await call(`/scene?seed=${seed}`)).blob();
}

/** POST /decompose with the image as the raw body: its slots, masks and areas. */
export async function decompose(blob) {
  const headers = { 'Content-Type': blob.type || 'application/octet-stream' };
  const answer = await (await call('/decompose', { method: 'POST', headers, body: blob })).json();
  return answer.images[0];
}

/**
 * POST /render as server-sent events: calls `onProgress({index, step, of})` after every model
 * evaluation and resolves to the images ({index, png, seed, num_slots}) in request order.
 * EventSource cannot POST, so the stream is read and split into events here.
 */
export async function render(request, onProgress) {
  const response = await call('/render', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream' },
    body: JSON.stringify(request),
  });
  const images = [];
  for await (const { name, data } of events(response.body)) {
    if (name === 'progress') onProgress(data);
    else if (name === 'image') images[data.index] = data;
    else if (name === 'error') throw new ApiError(data.error, data.error_type, response.status);
  }
  if (images.filter(Boolean).length !== request.slots.length) {
    throw new ApiError('the render stream ended before every image arrived', 'stream', 0);
  }
  return images;
}

// The events of an SSE body: blocks separated by a blank line, with `event:` and `data:`
// lines; comment-only blocks (keep-alives) are skipped.
async function* events(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replaceAll('\r\n', '\n');
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = 'message';
      let data = '';
      for (const line of block.split('\n')) {
        if (line.startsWith('event:')) name = line.slice(6).trim();
        else if (line.startsWith('data:')) data += line.slice(5).trim();
      }
      if (data) yield { name, data: JSON.parse(data) };
    }
  }
}
