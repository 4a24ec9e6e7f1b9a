// The replay page: the space's VOD playlist (/hls/{id}/replay.m3u8) in an <audio> element with
// the browser's controls, and the single-file recording offered for download.
import { get } from "./api.js";
import { Player } from "./player.js";
import { $, fail, nav, params, show, when } from "./ui.js";

const spaceId = params().spaceId;
const playlist = `/hls/${spaceId}/replay.m3u8`;
const status = (text) => {
  $("#replay-status").textContent = text;
};
const player = new Player($("#replay"), status);

/** The replay is published within a second of the end; wait a little for it, then say so. */
async function available() {
  for (let attempt = 0; attempt < 20; attempt += 1) {
    const response = await fetch(playlist, { method: "GET", cache: "no-store" });
    if (response.ok) return true;
    if (response.status !== 404 && response.status !== 503 && response.status !== 425) return false;
    status("The replay is being prepared…");
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
  return false;
}

async function main() {
  await nav();
  let space;
  try {
    space = await get(`/api/v1/spaces/${spaceId}`);
  } catch (err) {
    $("#title").textContent = err.status === 404 ? "This space does not exist" : err.message;
    return;
  }
  document.title = `Replay: ${space.title} · townhall`;
  $("#title").textContent = space.title;
  $("#host-link").textContent = `@${space.host}`;
  $("#host-link").href = `/@${space.host}`;
  if (space.state !== "ended") {
    $("#when").textContent = "";
    status(space.state === "live" ? "This space is still live." : "This space has not happened yet.");
    const link = document.createElement("a");
    link.href = `/spaces/${spaceId}`;
    link.textContent = space.state === "live" ? "Listen live" : "Open the space";
    $("#replay-status").append(" ", link);
    return;
  }
  $("#when").textContent = `· ended ${when(space.ended_at)}`;
  if (!space.recorded) {
    status("This space was not recorded: there is no replay.");
    return;
  }
  const download = $("#download");
  download.href = `/api/v1/spaces/${spaceId}/recording.m4a`;
  download.setAttribute("download", `${space.title.replace(/[^\p{L}\p{N} _-]+/gu, "").trim() || spaceId}.m4a`);
  if (!(await available())) {
    status("The replay is not available yet. Try again in a moment.");
    return;
  }
  show(download, true);
  try {
    await player.play(playlist, { live: false });
    status("Playing the replay.");
  } catch (err) {
    // Autoplay may be refused without a gesture: the controls are there to press play.
    status(err.name === "NotAllowedError" ? "Press play to listen." : `Cannot play: ${err.message}`);
  }
}

main().catch(fail);
