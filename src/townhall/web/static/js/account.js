import { api, get, post } from "./api.js";
import { $, el, fail, nav, params, postItem, show, spaceItem, toast } from "./ui.js";

const handle = params().handle;
let cursor = null;

async function posts(more = false) {
  const query = `limit=20${more && cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`;
  const page = await get(`/api/v1/accounts/${handle}/posts?${query}`);
  const items = page.posts.map(postItem);
  if (more) $("#posts").append(...items);
  else $("#posts").replaceChildren(...(items.length ? items : [el("li", { class: "muted empty" }, "No posts yet.")]));
  cursor = page.next_cursor;
  show($("#more"), Boolean(cursor));
}

async function profile() {
  const account = await get(`/api/v1/accounts/${handle}`);
  $("#handle-h").textContent = `@${account.handle}`;
  $("#avatar").textContent = account.handle[0].toUpperCase();
  $("#followers").textContent = account.followers ?? 0;
  $("#following").textContent = account.following ?? 0;
  show($("#suspended"), account.suspended);
  return account;
}

async function main() {
  const viewer = await nav();
  let account;
  try {
    account = await profile();
  } catch (err) {
    $("#handle-h").textContent = err.status === 404 ? `No account @${handle}` : err.message;
    return;
  }
  const mine = viewer && viewer.handle.toLowerCase() === account.handle.toLowerCase();
  show($("#compose"), Boolean(mine));
  show($("#follow"), Boolean(viewer && !mine));
  get(`/api/v1/spaces?host=${encodeURIComponent(account.handle)}&limit=20`).then(({ spaces }) => {
    $("#spaces").replaceChildren(...(spaces.length ? spaces.map(spaceItem) : [el("li", { class: "muted empty" }, "No spaces yet.")]));
  }).catch(fail);
  await posts();
}

$("#follow").addEventListener("click", async (event) => {
  const button = event.currentTarget;
  const following = button.getAttribute("aria-pressed") === "true";
  try {
    await api(following ? "DELETE" : "POST", `/api/v1/accounts/${handle}/follow`);
    button.setAttribute("aria-pressed", String(!following));
    button.textContent = following ? "Follow" : "Following";
    await profile();
  } catch (err) {
    fail(err);
  }
});
$("#post-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    await post("/api/v1/posts", { text: $("#post-text").value });
    $("#post-text").value = "";
    toast("Posted");
    await posts();
  } catch (err) {
    fail(err);
  }
});
$("#more").addEventListener("click", () => posts(true).catch(fail));

main().catch(fail);
