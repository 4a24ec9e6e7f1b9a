// The space page: one page for everyone, showing what the visitor's role allows.
//
// - Everyone polls the state document (GET /spaces/{id}/state, cacheable for a second by any
//   edge): title, who is on stage and speaking, listener count, reactions, the space's state.
// - A listener presses Listen: POST /join gives a ticket and the LL-HLS playlist (or a place in
//   the waiting room: 202 with position and retry_after), played by Player.
// - Someone on stage also holds the SSE stream (pushes on every stage change) and connects the
//   microphone: WHIP out, WHEP in (StageConnection). The HLS player stops meanwhile: the room is
//   heard over WHEP, without the delay and without their own voice.
// - Hosts and co-hosts get the requests, invitations, per-speaker controls and End.
import { call, del, get, post, streamEvents } from "./api.js";
import { Player } from "./player.js";
import { proofOfWork } from "./pow.js";
import { StageConnection } from "./stage.js";
import { $, avatar, el, fail, nav, params, show, toast, when } from "./ui.js";

const spaceId = params().spaceId;
const emoji = (params().emoji ?? "").split(" ").filter(Boolean);
const api = (rest = "") => `/api/v1/spaces/${spaceId}${rest}`;
const POLL_MS = 1500;

let viewer = null;
let doc = null;
let onStage = null; // my entry in doc.stage, or null
let listening = false;
let joinAbort = null;
let renewTimer = 0;
let latencyTimer = 0;
let events = null; // AbortController of the SSE stream
let lastReactionSecond = null;
let requestsSignature = "";

const player = new Player($("#player"), (text) => playerStatus(text));
const stage = new StageConnection($("#room-audio"), (state) => {
  if (state === "failed") speakerStatus("The connection to the stage was lost. Connect again.");
});

const sleep = (seconds, signal) => new Promise((resolve, reject) => {
  const timer = setTimeout(resolve, seconds * 1000);
  signal?.addEventListener("abort", () => {
    clearTimeout(timer);
    reject(new DOMException("aborted", "AbortError"));
  }, { once: true });
});

function playerStatus(text) {
  $("#player-status").textContent = text;
}

function speakerStatus(text) {
  $("#speaker-status").textContent = text;
}

const same = (a, b) => a.toLowerCase() === b.toLowerCase();
const isManager = () => onStage && (onStage.role === "host" || onStage.role === "cohost");

// -- the state document --------------------------------------------------------------------------

async function refresh() {
  try {
    // Revalidated every time (ETag: a 304 when unchanged): the browser's own copy could be a
    // second older than a change this page has just made or been pushed, and must not undo it.
    // An edge answers the revalidation from its own cache, which the origin keeps fresh.
    apply((await call("GET", api("/state"), undefined, { cache: "no-cache" })).data);
  } catch (err) {
    if (err.status === 404) {
      $("#title").textContent = "This space does not exist";
      $("#badge").textContent = "";
      return false;
    }
    playerStatus(err.message);
  }
  return true;
}

function apply(next) {
  const previous = doc;
  doc = next;
  document.title = `${doc.title} · townhall`;
  $("#title").textContent = doc.title;
  $("#host-link").textContent = `@${doc.host}`;
  $("#host-link").href = `/@${doc.host}`;
  const badge = $("#badge");
  badge.textContent = { live: "LIVE", scheduled: "Scheduled", ended: "Ended" }[doc.state] ?? doc.state;
  badge.className = `badge ${doc.state}`;
  const n = doc.listeners.count;
  $("#listeners").textContent = `${doc.listeners.exact ? "" : "≈ "}${n.toLocaleString()} listening`;

  const wasOnStage = Boolean(onStage);
  onStage = viewer ? doc.stage.find((s) => same(s.handle, viewer.handle)) ?? null : null;
  const live = doc.state === "live";

  show($("#not-started"), doc.state === "scheduled");
  if (doc.state === "scheduled") {
    $("#starts-at").textContent = doc.scheduled_for
      ? `It starts ${when(new Date(doc.scheduled_for * 1000).toISOString())}.`
      : "The host has not started it yet.";
    const host = viewer && same(viewer.handle, doc.host);
    show($("#start"), Boolean(host));
    show($("#remind"), Boolean(viewer && !host));
  }
  show($("#ended"), doc.state === "ended");
  if (doc.state === "ended") ended();

  // On stage, the room is heard over WHEP once the microphone is connected (no HLS delay); the
  // live stream keeps playing until then.
  show($("#listen-panel"), live && !onStage);
  show($("#speaker-panel"), live && Boolean(onStage));
  show($("#host-panel"), live && Boolean(isManager()));
  show($("#audience-panel"), live && Boolean(viewer));
  show($("#raise-hand"), !onStage);
  show($("#login-hint"), live && !viewer);
  show($("#stage-section"), doc.state !== "ended");

  if (onStage && !wasOnStage && live && previous) {
    toast("You're on stage. Connect your microphone to speak.");
    $("#raise-hand").setAttribute("aria-pressed", "false");
    $("#raise-hand").textContent = "Request to speak";
  }
  // On stage in a live space (a host whose space just started included): hold the stream.
  if (onStage && live) follow();
  if (!onStage && wasOnStage) leftStage(live ? "You're back in the audience." : null);
  if (onStage) speakerControls();
  renderStage();
  if (isManager()) refreshRequests();
  if (!events) reactions(doc.reactions.second, doc.reactions.counts);
}

// Tiles are rebuilt only when what they show changes (role, mute, hand, the viewer's powers);
// the speaking ring and level are updated in place, so keyboard focus and screen readers are
// not disturbed by the poll every 1.5 s.
const tiles = new Map(); // handle -> {signature, li}

function renderStage() {
  const list = $("#stage");
  const manager = Boolean(isManager());
  const focused = document.activeElement?.dataset?.key;
  const items = doc.stage.map((s) => {
    const signature = [s.role, s.muted, s.hand_raised, manager, onStage?.role].join("|");
    let tile = tiles.get(s.handle);
    if (!tile || tile.signature !== signature) {
      tile = { signature, li: speakerTile(s) };
      tiles.set(s.handle, tile);
    }
    tile.li.classList.toggle("speaking", s.speaking);
    tile.li.style.setProperty("--level", String(s.level)); // CSSOM: allowed by the page's CSP
    tile.li.querySelector(".speaking-text").textContent = s.speaking ? ", speaking" : "";
    return tile.li;
  });
  for (const handle of [...tiles.keys()]) {
    if (!doc.stage.some((s) => s.handle === handle)) tiles.delete(handle);
  }
  const current = [...list.children];
  if (current.length !== items.length || current.some((li, i) => li !== items[i])) {
    list.replaceChildren(...items);
    if (focused) list.querySelector(`[data-key="${CSS.escape(focused)}"]`)?.focus();
  }
}

function speakerTile(s) {
  const muted = s.muted
    ? el("span", { class: "muted-mark", title: "muted" }, "🔇", el("span", { class: "visually-hidden" }, " muted"))
    : null;
  const label = { host: "Host", cohost: "Co-host", speaker: "Speaker" }[s.role] ?? s.role;
  const li = el("li", { class: `speaker-tile${s.muted ? " is-muted" : ""}`, "data-handle": s.handle },
    el("span", { class: "ring" }, avatar(s.handle)),
    el("a", { class: "who", href: `/@${s.handle}`, "data-key": `profile:${s.handle}` }, `@${s.handle}`),
    el("span", { class: "role" }, label, muted, s.hand_raised ? " ✋" : null,
      el("span", { class: "visually-hidden speaking-text" })));
  const controls = managerControls(s);
  if (controls.length) li.append(el("span", { class: "controls" }, ...controls));
  return li;
}

function managerControls(s) {
  if (!isManager() || same(s.handle, viewer.handle) || s.role === "host") return [];
  if (onStage.role === "cohost" && s.role === "cohost") return [];
  const button = (action, text, run, extra = {}) => el("button", {
    class: "small", "data-key": `${action}:${s.handle}`, "aria-label": `${text} @${s.handle}`, onclick: run, ...extra,
  }, text);
  const out = [
    s.muted
      ? button("unmute", "Unmute", () => act(post(api(`/speakers/${s.handle}/unmute`))))
      : button("mute", "Mute", () => act(post(api(`/speakers/${s.handle}/mute`)))),
    button("remove", "Move to audience", () => act(del(api(`/speakers/${s.handle}`))), { class: "small danger" }),
  ];
  if (onStage.role === "host" && s.role === "speaker") {
    out.push(button("cohost", "Make co-host", () => act(post(api("/cohosts"), { handle: s.handle }))));
  }
  if (onStage.role === "host" && s.role === "cohost") {
    out.push(button("speaker", "Make speaker", () => act(del(api(`/cohosts/${s.handle}`)))));
  }
  return out;
}

async function act(promise) {
  try {
    await promise;
  } catch (err) {
    fail(err);
  }
  await refresh();
}

// -- listening -----------------------------------------------------------------------------------

function duration(seconds) {
  const s = Math.max(1, Math.round(seconds));
  if (s < 90) return `${s} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

/**
 * POST /join until admitted: a 202 puts us in the waiting room (the signed queue token is
 * presented again after Retry-After; the position only goes down), 429/503 are retried after
 * their Retry-After, and 403 pow_required (attack mode, anonymous joins) is answered with a
 * proof of work solved in a worker.
 */
async function join(signal) {
  let queueToken = null;
  let proof = null;
  for (;;) {
    const body = { ...(queueToken ? { queue_token: queueToken } : {}), ...(proof ?? {}) };
    let response;
    try {
      response = await call("POST", api("/join"), Object.keys(body).length ? body : undefined, { signal });
    } catch (err) {
      if (err.status === 403 && err.code === "pow_required" && !proof) {
        playerStatus("So many people are joining that the server asks your browser to solve a small puzzle first. Solving…");
        try {
          proof = await proofOfWork({
            signal,
            onProgress: (tries, expected) => {
              playerStatus(`Solving the puzzle the server asks of anonymous listeners… ${Math.min(99, Math.round((100 * tries) / expected))}%`);
            },
          });
        } catch (challengeErr) {
          // The challenge itself can be shed or limited on a busy node: wait it out like a join.
          if (!(await waitedOutBusy(challengeErr, signal))) throw challengeErr;
          continue;
        }
        playerStatus("Puzzle solved. Joining…");
        continue;
      }
      if (await waitedOutBusy(err, signal)) continue;
      throw err;
    }
    proof = null; // a challenge admits once
    if (response.status === 202) {
      const { queue_token: token, position, retry_after: wait } = response.data;
      const estimate = response.data.estimated_wait_seconds ?? wait;
      queueToken = token;
      show($("#waiting"), true);
      $("#waiting-detail").textContent =
        `You're number ${Number(position).toLocaleString()} in line. Estimated wait: about ${duration(estimate)}. ` +
        "Keep this page open: you'll be let in automatically.";
      playerStatus("Waiting for a place…");
      await sleep(Math.max(1, wait), signal);
      continue;
    }
    show($("#waiting"), false);
    return response.data;
  }
}

/** A busy node's answer (429, 503, unreachable) is waited out for its Retry-After; true if so. */
async function waitedOutBusy(err, signal) {
  if (err.status !== 429 && err.status !== 503 && err.status !== 0) return false;
  const wait = err.retryAfter ?? 5;
  playerStatus(`The space is very busy. Trying again in ${wait} s…`);
  await sleep(wait, signal);
  return true;
}

/** A fresh ticket for the same listener before this one expires: the cheap renewal when the
 * server has it, else a join (the join's cookie replaces the old ticket). */
async function renew(ticket) {
  try {
    return await post(api("/tickets/renew"), { ticket });
  } catch (err) {
    if (err.status === 404 && err.code === "not_found") return join();
    throw err;
  }
}

async function listen() {
  const button = $("#listen");
  button.disabled = true;
  joinAbort = new AbortController();
  playerStatus("Joining…");
  try {
    const ticket = await join(joinAbort.signal);
    playerStatus("Connecting to the live audio…");
    await player.play(ticket.hls_url, { ticket: ticket.ticket, live: true });
    listening = true;
    setTimeout(() => {
      if (listening) recoveries = 0; // a minute of good playback earns the retries back
    }, 60_000);
    scheduleRenewal(ticket);
    show(button, false);
    show($("#stop"), true);
    if (document.activeElement === button || document.activeElement === document.body) $("#stop").focus();
    $("#live-meter").classList.add("on");
    playerStatus("Listening live.");
    clearInterval(latencyTimer);
    latencyTimer = setInterval(() => {
      const behind = player.latency();
      if (listening && behind !== null) playerStatus(`Listening live, ${behind.toFixed(1)} s behind the speakers.`);
    }, 2000);
  } catch (err) {
    if (err.name !== "AbortError") {
      playerStatus(err.message);
      fail(err);
    }
    player.stop();
    show($("#waiting"), false);
  } finally {
    button.disabled = false;
    joinAbort = null;
  }
}

// A fatal player error while the space is live (the node restarted, a network cut, a ticket
// that lapsed while the tab slept): join again and resume, a few times, then give up politely.
let recoveries = 0;
player.onFatal = () => {
  if (!listening) return;
  stopListening();
  if (doc?.state !== "live" || recoveries >= 5) {
    playerStatus(doc?.state === "live" ? "The live audio stopped. Press Listen to try again." : "");
    return;
  }
  recoveries += 1;
  playerStatus("The live audio stopped; reconnecting…");
  setTimeout(() => {
    if (doc?.state === "live" && !listening) listen();
  }, 1000 * 2 ** recoveries);
};

function scheduleRenewal(current) {
  clearTimeout(renewTimer);
  const remaining = new Date(current.expires_at).getTime() - Date.now();
  renewTimer = setTimeout(async () => {
    if (!listening) return;
    try {
      const ticket = await renew(current.ticket);
      player.setTicket(ticket.ticket);
      scheduleRenewal(ticket);
    } catch (err) {
      playerStatus(`Could not renew your ticket: ${err.message}`);
    }
  }, Math.max(5000, remaining * 0.8));
}

function stopListening() {
  listening = false;
  joinAbort?.abort();
  clearTimeout(renewTimer);
  clearInterval(latencyTimer);
  player.stop();
  $("#live-meter").classList.remove("on");
  show($("#listen"), true);
  show($("#stop"), false);
  playerStatus("");
}

// -- on stage ------------------------------------------------------------------------------------

function speakerControls() {
  const mute = $("#mute");
  show($("#connect"), !stage.connected);
  show($("#mute"), stage.connected);
  show($("#leave-stage"), onStage.role !== "host"); // the host's place is the stage: End instead
  mute.setAttribute("aria-pressed", String(onStage.muted));
  mute.textContent = onStage.muted ? "Unmute" : "Mute";
  if (stage.connected) {
    stage.setMuted(onStage.muted);
    speakerStatus(onStage.muted ? "You're muted." : onStage.speaking ? "You're speaking." : "Your microphone is live.");
  }
}

async function connect() {
  const button = $("#connect");
  button.disabled = true;
  speakerStatus("Connecting your microphone…");
  try {
    const grant = await post(api("/speaker-token"));
    if (listening) stopListening(); // the room comes over WHEP now, without the HLS delay
    await stage.connect(grant, { voiceProcessing: $("#voice-processing").checked });
    renewGrant(grant.expires_at);
    show($("#listen-panel"), false);
    speakerControls();
    $("#mute").focus();
  } catch (err) {
    speakerStatus(`Could not connect: ${err.message}`);
  } finally {
    button.disabled = false;
  }
}

// The speaker token opens sessions and ends them (DELETE): keep a current one while connected.
let grantTimer = 0;
function renewGrant(expiresAt) {
  clearTimeout(grantTimer);
  const remaining = new Date(expiresAt).getTime() - Date.now();
  grantTimer = setTimeout(async () => {
    if (!stage.connected) return;
    try {
      const grant = await post(api("/speaker-token"));
      stage.token = grant.speaker_token;
      renewGrant(grant.expires_at);
    } catch {
      /* off stage by now: the state document will say so */
    }
  }, Math.max(5000, remaining * 0.8));
}

async function toggleMute() {
  const muting = !onStage.muted;
  try {
    await post(api(`/speakers/${viewer.handle}/${muting ? "mute" : "unmute"}`));
    onStage.muted = muting;
    speakerControls();
  } catch (err) {
    fail(err);
  }
  refresh();
}

async function leaveStage() {
  await stage.close();
  try {
    await del(api(`/speakers/${viewer.handle}`));
  } catch (err) {
    fail(err);
  }
  await refresh();
}

function leftStage(message) {
  stopFollowing();
  if (stage.connected) stage.close({ notify: false }); // removed: the server has hung up
  show($("#speaker-panel"), false);
  if (message) toast(message);
}

/** People on stage hold the SSE stream: stage changes and reactions arrive at once. */
function follow() {
  if (events) return;
  const controller = new AbortController();
  events = controller;
  const run = async () => {
    while (!controller.signal.aborted) {
      try {
        await streamEvents(api("/events"), (name, data) => {
          if (name === "state") apply(JSON.parse(data));
          else if (name === "reactions") {
            const tally = JSON.parse(data);
            reactions(tally.second, tally.counts);
          } else if (name === "ended") refresh();
        }, controller.signal);
      } catch (err) {
        if (err.name === "AbortError") return;
        if (err.status === 403) break;
      }
      await sleep(2, controller.signal).catch(() => {});
    }
    if (events === controller) events = null;
  };
  run();
}

function stopFollowing() {
  events?.abort();
  events = null;
}

// -- hosts ---------------------------------------------------------------------------------------

async function refreshRequests() {
  let rows;
  try {
    rows = (await get(api("/speak-requests"))).requests;
  } catch {
    return;
  }
  const signature = rows.map((r) => r.handle).join(",");
  if (signature === requestsSignature) return;
  requestsSignature = signature;
  const focused = document.activeElement?.dataset?.key;
  const list = $("#requests");
  list.replaceChildren(...(rows.length ? rows.map((r) => el("li", {},
    avatar(r.handle, "small"), el("span", { class: "who" }, `@${r.handle}`),
    el("button", {
      class: "small primary", "data-key": `approve:${r.handle}`, "aria-label": `Approve @${r.handle}`,
      onclick: () => act(post(api("/speakers"), { handle: r.handle })),
    }, "Approve"),
    el("button", {
      class: "small", "data-key": `decline:${r.handle}`, "aria-label": `Decline @${r.handle}`,
      onclick: () => act(del(api(`/speak-requests/${r.handle}`))),
    }, "Decline"))) : [el("li", { class: "muted empty" }, "No requests.")]));
  if (focused) list.querySelector(`[data-key="${CSS.escape(focused)}"]`)?.focus();
}

function askToEnd() {
  const end = $("#end");
  if (end.dataset.confirm === "yes") {
    act(post(api("/end")));
    return;
  }
  end.dataset.confirm = "yes";
  end.textContent = "Press again to end the space for everyone";
  setTimeout(() => {
    end.dataset.confirm = "";
    end.textContent = "End space";
  }, 5000);
}

// -- reactions and the end -----------------------------------------------------------------------

function reactions(second, counts) {
  if (second === null || second === lastReactionSecond) return;
  lastReactionSecond = second;
  const parts = Object.entries(counts ?? {}).filter(([, n]) => n > 0);
  if (!parts.length) return;
  $("#reaction-tally").textContent = parts.map(([e, n]) => `${e} ${n}`).join("  ");
  const burst = $("#reaction-tally");
  burst.classList.remove("pop");
  void burst.offsetWidth; // restart the animation
  burst.classList.add("pop");
}

function ended() {
  if (listening) stopListening();
  stopFollowing();
  if (stage.connected) stage.close({ notify: false }); // the end closed every session
  const at = doc.ended_at ? when(new Date(doc.ended_at * 1000).toISOString()) : "";
  $("#ended-detail").textContent = `${doc.title} by @${doc.host}${at ? `, ended ${at}` : ""}.`;
  const link = $("#replay-link");
  link.href = `/spaces/${spaceId}/replay`;
  show(link, doc.recorded);
  if (!doc.recorded) $("#ended-detail").textContent += " It was not recorded.";
}

// -- wiring --------------------------------------------------------------------------------------

for (const e of emoji) {
  $("#reactions").append(el("button", {
    class: "emoji", "aria-label": `React ${e}`,
    onclick: () => post(api("/reactions"), { emoji: e }).catch(fail),
  }, e));
}
$("#login-link").href = `/login?next=${encodeURIComponent(location.pathname)}`;
$("#listen").addEventListener("click", listen);
$("#stop").addEventListener("click", () => {
  stopListening();
  $("#listen").focus();
});
$("#leave-line").addEventListener("click", () => {
  joinAbort?.abort();
  show($("#waiting"), false);
  playerStatus("You left the line.");
});
$("#connect").addEventListener("click", connect);
$("#mute").addEventListener("click", toggleMute);
$("#leave-stage").addEventListener("click", leaveStage);
$("#raise-hand").addEventListener("click", async (event) => {
  const button = event.currentTarget;
  const raised = button.getAttribute("aria-pressed") === "true";
  try {
    if (raised) await del(api(`/speak-requests/${viewer.handle}`));
    else await post(api("/speak-requests"));
    button.setAttribute("aria-pressed", String(!raised));
    button.textContent = raised ? "Request to speak" : "Requested: cancel";
    toast(raised ? "Request withdrawn." : "Request sent to the hosts.");
  } catch (err) {
    fail(err);
  }
});
$("#start").addEventListener("click", () => act(post(api("/start"))));
$("#remind").addEventListener("click", async (event) => {
  const button = event.currentTarget;
  const on = button.getAttribute("aria-pressed") === "true";
  try {
    if (on) await del(api("/reminders"));
    else await post(api("/reminders"));
    button.setAttribute("aria-pressed", String(!on));
    button.textContent = on ? "Remind me" : "Reminder set";
  } catch (err) {
    fail(err);
  }
});
$("#invite-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("#invite-handle");
  try {
    await post(api("/speakers"), { handle: input.value.trim().replace(/^@/, "") });
    toast(`@${input.value.trim()} is on stage.`);
    input.value = "";
  } catch (err) {
    fail(err);
  }
  refresh();
});
$("#end").addEventListener("click", askToEnd);
addEventListener("pagehide", () => {
  stage.close();
});

async function main() {
  viewer = await nav();
  if (!(await refresh())) return;
  const tick = async () => {
    if (doc?.state !== "ended") await refresh();
    setTimeout(tick, doc?.state === "scheduled" ? 3000 : POLL_MS);
  };
  setTimeout(tick, POLL_MS);
}

main().catch(fail);
