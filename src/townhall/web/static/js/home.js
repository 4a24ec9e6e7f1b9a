import { get, post } from "./api.js";
import { $, el, fail, nav, postItem, show, spaceItem, toast } from "./ui.js";

async function spaces(state, list, empty) {
  try {
    const { spaces } = await get(`/api/v1/spaces?state=${state}&limit=20`);
    list.replaceChildren(...(spaces.length ? spaces.map(spaceItem) : [el("li", { class: "muted empty" }, empty)]));
  } catch (err) {
    list.replaceChildren(el("li", { class: "error" }, err.message));
  }
  list.removeAttribute("aria-busy");
}

let cursor = null;
async function feed(more = false) {
  const page = await get(`/api/v1/feed?limit=20${more && cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
  const items = page.posts.map(postItem);
  if (more) $("#feed").append(...items);
  else $("#feed").replaceChildren(...(items.length ? items : [el("li", { class: "muted empty" }, "Nothing yet: post something, or follow people.")]));
  cursor = page.next_cursor;
  show($("#feed-more"), Boolean(cursor));
}

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
$("#post-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    await post("/api/v1/posts", { text: $("#post-text").value });
    $("#post-text").value = "";
    toast("Posted");
    await feed();
  } catch (err) {
    fail(err);
  }
});
$("#feed-more").addEventListener("click", () => feed(true).catch(fail));

main().catch(fail);
