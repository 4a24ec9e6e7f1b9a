import { api, get } from "./api.js";
import { $, composer, emptyItem, fail, nav, pagedList, params, postItem, show, spaceItem } from "./ui.js";

const handle = params().handle;
const posts = pagedList({
  url: `/api/v1/accounts/${handle}/posts?limit=20`,
  key: "posts",
  list: $("#posts"),
  more: $("#more"),
  item: postItem,
  empty: "No posts yet.",
});

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
    $("#spaces").replaceChildren(...(spaces.length ? spaces.map(spaceItem) : [emptyItem("No spaces yet.")]));
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
composer(() => posts());

main().catch(fail);
