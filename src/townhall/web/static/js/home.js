import { get, post } from "./api.js";
import { $, composer, el, emptyItem, fail, nav, pagedList, postItem, show, spaceItem } from "./ui.js";

async function spaces(state, list, empty) {
  try {
    const { spaces } = await get(`/api/v1/spaces?state=${state}&limit=20`);
    list.replaceChildren(...(spaces.length ? spaces.map(spaceItem) : [emptyItem(empty)]));
  } catch (err) {
    list.replaceChildren(el("li", { class: "error" }, err.message));
  }
  list.removeAttribute("aria-busy");
}

const feed = pagedList({
  url: "/api/v1/feed?limit=20",
  key: "posts",
  list: $("#feed"),
  more: $("#feed-more"),
  item: postItem,
  empty: "Nothing yet: post something, or follow people.",
});

async function main() {
  const account = await nav();
  spaces("live", $("#live"), "No live spaces right now.");
  spaces("scheduled", $("#scheduled"), "Nothing scheduled.");
  spaces("ended", $("#ended"), "No replays yet.");
  show($("#start"), Boolean(account));
  show($("#feed-section"), Boolean(account));
  show($("#welcome"), !account);
  if (account) feed().catch(fail);
}

$("#space-later").addEventListener("change", (event) => show($("#schedule-at"), event.target.checked));
$("#start-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const button = event.submitter;
  button.disabled = true;
  const body = { title: $("#space-title").value.trim(), recorded: $("#space-recorded").checked };
  if ($("#space-later").checked && $("#space-when").value) {
    body.scheduled_for = new Date($("#space-when").value).toISOString();
  }
  try {
    const space = await post("/api/v1/spaces", body);
    location.assign(`/spaces/${space.id}`);
  } catch (err) {
    fail(err);
    button.disabled = false;
  }
});
composer(() => feed());

main().catch(fail);
