// Small DOM helpers shared by every page, and the top navigation.
import { clearSession, del, get, me, post, session } from "./api.js";

export const $ = (selector, root = document) => root.querySelector(selector);

/** el("button", {class: "x", onclick: f}, "text", child) */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function show(node, visible = true) {
  node.hidden = !visible;
}

let toastTimer = 0;
/** A short message read out by screen readers (the toast is a polite live region). */
export function toast(message, kind = "info") {
  const box = $("#toast");
  box.textContent = message;
  box.dataset.kind = kind;
  box.classList.add("visible");
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => box.classList.remove("visible"), 4000);
}

export function fail(err) {
  toast(err?.message ?? String(err), "error");
}

export function when(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

export function ago(iso) {
  const seconds = Math.round((Date.now() - new Date(iso).getTime()) / 1000);
  if (seconds < 60) return "just now";
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return when(iso);
}

export function avatar(handle, extra = "") {
  return el("span", { class: `avatar ${extra}`, "aria-hidden": "true" }, (handle || "?")[0].toUpperCase());
}

export function params() {
  return document.querySelector("main").dataset;
}

/** Fill the header: who is logged in, with links to their page and to log out. */
export async function nav() {
  const box = $("#nav");
  let account = null;
  try {
    account = await me();
  } catch {
    // The node is busy or unreachable: keep the session (only a 401 ends it) and show who we
    // believe is logged in.
    const s = session();
    account = s ? { handle: s.handle, is_admin: false, unconfirmed: true } : null;
  }
  box.replaceChildren();
  if (account) {
    if (account.is_admin) box.append(el("a", { href: "/admin" }, "Moderation"));
    box.append(
      el("a", { href: `/@${account.handle}`, class: "who" }, avatar(account.handle, "small"), `@${account.handle}`),
      el("button", {
        class: "link",
        onclick: async () => {
          try {
            await del("/api/v1/sessions/current");
          } catch {
            /* the token may already be gone */
          }
          clearSession();
          location.reload();
        },
      }, "Log out"),
    );
  } else {
    const next = `?next=${encodeURIComponent(location.pathname)}`;
    box.append(el("a", { href: `/login${next}` }, "Log in"), el("a", { href: `/signup${next}`, class: "button primary" }, "Sign up"));
  }
  return account;
}

export function spaceItem(space) {
  const live = space.state === "live";
  const href = space.state === "ended" ? `/spaces/${space.id}/replay` : `/spaces/${space.id}`;
  const detail = live
    ? `live since ${when(space.started_at)}`
    : space.state === "scheduled"
      ? space.scheduled_for ? `starts ${when(space.scheduled_for)}` : "not started yet"
      : `ended ${when(space.ended_at)}`;
  return el("li", { class: `space-item ${space.state}` },
    el("a", { href },
      el("span", { class: `badge ${space.state}` }, live ? "LIVE" : space.state === "scheduled" ? "Upcoming" : "Replay"),
      el("strong", { class: "space-title" }, space.title),
      el("span", { class: "muted" }, `@${space.host} · ${detail}`)));
}

export function postItem(post) {
  const body = [el("p", { class: "post-text" }, post.text)];
  if (post.space_id && post.kind === "replay") {
    body.push(el("a", { href: `/spaces/${post.space_id}/replay` }, "Play the replay"));
  } else if (post.space_id) {
    body.push(el("a", { href: `/spaces/${post.space_id}` }, "Open the space"));
  }
  return el("li", { class: "post" },
    avatar(post.author),
    el("div", {},
      el("p", { class: "post-head" }, el("a", { href: `/@${post.author}` }, `@${post.author}`),
        el("span", { class: "muted" }, ` · ${ago(post.created_at)}`)),
      ...body));
}

/** The muted line a list shows when it has nothing to list. */
export function emptyItem(text) {
  return el("li", { class: "muted empty" }, text);
}

/**
 * A list filled a page at a time from a cursor-paged API (`{[key]: [...], next_cursor}`):
 * `load()` puts the first page in `list`, the `more` button appends the next one and shows
 * while there is one. `empty` (optional) is the line shown when the first page is empty.
 */
export function pagedList({ url, key, list, more, item, empty }) {
  let cursor = null;
  async function load(next = false) {
    const after = next && cursor ? `${url.includes("?") ? "&" : "?"}cursor=${encodeURIComponent(cursor)}` : "";
    const page = await get(url + after);
    const items = page[key].map(item);
    if (next) list.append(...items);
    else list.replaceChildren(...(items.length || empty === undefined ? items : [emptyItem(empty)]));
    cursor = page.next_cursor;
    show(more, Boolean(cursor));
  }
  more.addEventListener("click", () => load(true).catch(fail));
  return load;
}

/** The post composer (`#post-form`, `#post-text`): posts, clears the box, then `posted()`. */
export function composer(posted) {
  $("#post-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await post("/api/v1/posts", { text: $("#post-text").value });
      $("#post-text").value = "";
      toast("Posted");
      await posted();
    } catch (err) {
      fail(err);
    }
  });
}
