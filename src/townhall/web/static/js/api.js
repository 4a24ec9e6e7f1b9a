// The public JSON API, as the pages call it: a bearer token from POST /api/v1/sessions kept in
// localStorage, errors as {"error": {"code", "message"}} turned into ApiError.

const SESSION_KEY = "townhall.session";

export function session() {
  try {
    const value = JSON.parse(localStorage.getItem(SESSION_KEY) ?? "null");
    return value && typeof value.token === "string" ? value : null;
  } catch {
    return null;
  }
}

export function saveSession(handle, token) {
  localStorage.setItem(SESSION_KEY, JSON.stringify({ handle, token }));
}

export function clearSession() {
  localStorage.removeItem(SESSION_KEY);
}

export class ApiError extends Error {
  constructor(status, code, message, retryAfter) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

const OVERLOAD_RETRIES = 3;

const pause = (seconds, signal) => new Promise((resolve, reject) => {
  const timer = setTimeout(resolve, seconds * 1000);
  signal?.addEventListener("abort", () => {
    clearTimeout(timer);
    reject(new DOMException("aborted", "AbortError"));
  }, { once: true });
});

/**
 * One API call; resolves to {status, data, headers}. Non-2xx answers throw ApiError.
 * A node shedding load answers 503 "overloaded" before it touches the request, so the request
 * is sent again after its Retry-After (a few times), whatever its method.
 */
export async function call(method, path, body, options = {}) {
  for (let attempt = 1; ; attempt += 1) {
    try {
      return await callOnce(method, path, body, options);
    } catch (err) {
      if (err.status !== 503 || err.code !== "overloaded" || attempt >= OVERLOAD_RETRIES) throw err;
      await pause(Math.min(err.retryAfter ?? 2, 5), options.signal);
    }
  }
}

async function callOnce(method, path, body, { signal, headers = {}, cache } = {}) {
  const h = { Accept: "application/json", ...headers };
  const s = session();
  if (s) h.Authorization = `Bearer ${s.token}`;
  const init = { method, headers: h, signal, ...(cache ? { cache } : {}) };
  if (body !== undefined) {
    h["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "network", "the server cannot be reached; check your connection", 2);
  }
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    const error = data?.error ?? {};
    const retry = Number(response.headers.get("Retry-After")) || null;
    if (response.status === 401 && s && error.code !== "login_required") clearSession();
    throw new ApiError(response.status, error.code ?? `http_${response.status}`,
      error.message ?? response.statusText, retry);
  }
  return { status: response.status, data, headers: response.headers };
}

export async function api(method, path, body, options) {
  return (await call(method, path, body, options)).data;
}

export const get = (path, options) => api("GET", path, undefined, options);
export const post = (path, body, options) => api("POST", path, body, options);
export const del = (path, options) => api("DELETE", path, undefined, options);

/** The caller's account, or null when logged out (or the token has lapsed). */
export async function me() {
  if (!session()) return null;
  try {
    return await get("/api/v1/me");
  } catch (err) {
    if (err.status === 401) return null;
    throw err;
  }
}

/**
 * Server-sent events over fetch (EventSource cannot send an Authorization header).
 * Calls onEvent(name, data) per event; resolves when the stream ends, rejects on error.
 */
export async function streamEvents(path, onEvent, signal) {
  const s = session();
  const response = await fetch(path, {
    headers: { Accept: "text/event-stream", ...(s ? { Authorization: `Bearer ${s.token}` } : {}) },
    signal,
  });
  if (!response.ok || !response.body) {
    throw new ApiError(response.status, `http_${response.status}`, "the live event stream was refused");
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message";
      const lines = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) lines.push(line.slice(5).replace(/^ /, ""));
      }
      if (lines.length) onEvent(name, lines.join("\n"));
    }
  }
}
