"""The web app in a real browser: Debian's Chromium driven by Playwright, with fake media devices
whose microphone plays a WAV tone, against a real node on loopback.

The scenario of issue 8: a host starts a space from the home page; a second browser context
logs in, asks to speak, is approved by the host on the page and connects its (fake) microphone;
a third, anonymous, presses Listen. The listener page's audio is measured in the page itself
with a Web Audio ``AnalyserNode`` on the ``<audio>`` element that hls.js feeds: the tone must
be there while the speaker talks and gone once the host mutes them. The host ends the space and
the pages offer the replay. Screenshots of the three views, at desktop and phone sizes, are
saved to ``tests/artifacts/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import re
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from tests.spaces_support import generous_config
from tests.support import RunningServer, running_server
from townhall.config import Config
from townhall.web import pages

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
PASSWORD = "password123"
TONE_HZ = 660.0
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

# What the listener hears, measured in the page over ~0.7 s of audio (32768 samples at the
# output's rate, 44.1 or 48 kHz):
# - heard: at least half of the received power lies within ±20 Hz of the speaker's tone, and
#   the tone is loud (the WAV plays it at -13.5 dBFS RMS; the stage and AAC keep most of it);
HEARD_SHARE = 0.5
HEARD_DBFS = -40.0
# - gone: the tone's own level is below -65 dBFS (a muted stage sends digital silence; AAC
#   and the analyser's float noise floor sit far below this).
GONE_DBFS = -65.0

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed"),
    pytest.mark.skipif(pages.hls_js() is None, reason="the npm packages are not installed: run `npm ci`"),
]


def chromium_args(wav: Path) -> list[str]:
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
        "--autoplay-policy=no-user-gesture-required",
    ]


def write_tone(path: Path, frequency: float, seconds: float = 4.0, rate: int = 48000) -> Path:
    """A mono 16-bit WAV of a sine at 0.3 of full scale; Chromium loops it as the microphone.
    A whole number of cycles fits the file, so the loop has no click."""
    cycles = round(frequency * seconds)
    n = round(cycles * rate / frequency)
    samples = (0.3 * 32767 * np.sin(2 * np.pi * frequency * np.arange(n) / rate)).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())
    return path


@dataclasses.dataclass
class Site:
    server: RunningServer
    browser: Browser
    # A node whose spaces hold one listener (a waiting room for the second), when this checkout
    # has admission's capacity settings.
    crowded: RunningServer | None = None
    ended_space: str | None = None

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("web")
    wav = write_tone(root / "tone.wav", TONE_HZ)
    ARTIFACTS.mkdir(exist_ok=True)
    settings = {f.name for f in dataclasses.fields(Config)}
    # These tests are about pages and audio, not overload: on a busy machine (other suites,
    # benchmarks) the event loop's own scheduling delay passes admission's 5 ms shedding
    # target, and the node would shed the test's page loads. The target is raised here.
    relaxed: dict[str, Any] = {"shed_target_ms": 500.0} if "shed_target_ms" in settings else {}
    with contextlib.ExitStack() as stack:
        # Servers start (and stop) outside Playwright's sync scope: their set-up and tear-down
        # run asyncio.run, which cannot run inside it.
        server = stack.enter_context(running_server(generous_config("sqlite", root / "data", **relaxed)))
        anon = server.client()
        for handle in ("hana", "sami", "lou"):
            assert anon.register(handle, PASSWORD).status_code == 201
        server.create_admin("root", PASSWORD)
        crowded = None
        if "space_max_listeners" in settings:
            config = generous_config("sqlite", root / "crowded", space_max_listeners=1, **relaxed)
            crowded = stack.enter_context(running_server(config))
            assert crowded.client().register("lou", PASSWORD).status_code == 201
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=chromium_args(wav))
            try:
                yield Site(server, browser, crowded)
            finally:
                browser.close()


class PageErrors:
    """Uncaught errors and console errors of a page (a CSP violation is a console error), and
    the HTTP errors it met, apart (the console reports those too, as "Failed to load")."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        self.http: list[tuple[int, str]] = []
        self.methods: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        page.on("console", self._console)
        page.on("response", self._response)

    def _response(self, response: Any) -> None:
        if response.status >= 400:
            self.http.append((response.status, response.url))
            self.methods.append(response.request.method)

    def _console(self, msg: Any) -> None:
        if msg.type == "error" and not msg.text.startswith("Failed to load resource"):
            self.errors.append(msg.text)

    def unexpected_http(self) -> list[tuple[int, str]]:
        """HTTP errors other than 503: the live playlist's in the first second of a space (no
        part cut yet; hls.js retries), and a node shedding load (with admission's CoDel
        shedding on a busy machine), which the pages retry after Retry-After. Also expected: a
        403 to a co-host's poll of the request list (``GET .../speak-requests``) that was on
        its way when they stopped being a co-host (seen once); the page ignores it."""
        return [
            (s, u)
            for (s, u), method in zip(self.http, self.methods, strict=True)
            if s != 503 and not (s == 403 and method == "GET" and u.endswith("/speak-requests"))
        ]


def new_page(site: Site) -> tuple[BrowserContext, Page, PageErrors]:
    context = site.browser.new_context(viewport=DESKTOP, locale="en-US", timezone_id="UTC")
    context.set_default_timeout(15_000)
    page = context.new_page()
    return context, page, PageErrors(page)


def log_in(page: Page, site: Site, handle: str, next_path: str = "/") -> None:
    page.goto(f"{site.url}/login?next={next_path}")
    page.get_by_label("Handle").fill(handle)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    try:
        page.wait_for_url(f"{site.url}{next_path}")
    except Exception as exc:
        raise AssertionError(f"login as {handle}: {page.locator('#form-error').text_content()}") from exc
    expect(page.locator("#nav")).to_contain_text(f"@{handle}")


def shoot(page: Page, name: str) -> None:
    """Desktop and phone screenshots of the page as it is now."""
    page.screenshot(path=str(ARTIFACTS / f"{name}-desktop.png"), full_page=True)
    page.set_viewport_size(PHONE)
    page.wait_for_timeout(300)  # one layout and one state poll at the new size
    page.screenshot(path=str(ARTIFACTS / f"{name}-phone.png"), full_page=True)
    page.set_viewport_size(DESKTOP)


# In the page: an AnalyserNode on the <audio> element (hls.js feeds it through MSE), then for
# each measurement the share of power within ±20 Hz of a frequency and the tone's level.
PROBE = """
(selector) => {
  const audio = document.querySelector(selector);
  const ctx = new AudioContext();
  const analyser = ctx.createAnalyser();
  analyser.fftSize = 32768;
  analyser.smoothingTimeConstant = 0;
  ctx.createMediaElementSource(audio).connect(analyser);
  analyser.connect(ctx.destination);
  window.__probe = { ctx, analyser };
  return ctx.resume().then(() => ctx.sampleRate);
}
"""
MEASURE = """
(frequency) => {
  const { ctx, analyser } = window.__probe;
  const bins = new Float32Array(analyser.frequencyBinCount);
  analyser.getFloatFrequencyData(bins);
  const wave = new Float32Array(analyser.fftSize);
  analyser.getFloatTimeDomainData(wave);
  const hz = ctx.sampleRate / analyser.fftSize;
  let band = 0, total = 0, peak = 0;
  for (let i = 1; i < bins.length; i++) {
    const power = Number.isFinite(bins[i]) ? 10 ** (bins[i] / 10) : 0;
    total += power;
    if (Math.abs(i * hz - frequency) <= 20) band += power;
    if (bins[i] > bins[peak]) peak = i;
  }
  let sum = 0;
  for (const x of wave) sum += x * x;
  const rms = Math.sqrt(sum / wave.length);
  const share = total > 0 ? band / total : 0;
  const toneDb = share > 0 && rms > 0 ? 10 * Math.log10(share * rms * rms) : -200;
  const audio = document.querySelector("#player");
  return { share, toneDb, rmsDb: rms > 0 ? 20 * Math.log10(rms) : -200, peakHz: peak * hz,
           time: audio.currentTime, paused: audio.paused };
}
"""


def measure(page: Page) -> dict[str, Any]:
    result: dict[str, Any] = page.evaluate(MEASURE, TONE_HZ)
    result["at"] = time.monotonic()
    return result


def heard(m: dict[str, Any]) -> bool:
    return bool(m["share"] >= HEARD_SHARE and m["toneDb"] >= HEARD_DBFS)


def until(page: Page, condition: Any, what: str, seconds: float = 5.0) -> None:
    """Let the page run until ``condition()`` holds (events reach Python as the page runs)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds} s")
        page.wait_for_timeout(50)


def wait_for_audio(page: Page, condition: Any, seconds: float, what: str) -> list[dict[str, Any]]:
    """Measure every 0.4 s until ``condition`` holds on two measurements in a row."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.append(measure(page))
        if len(seen) >= 2 and condition(seen[-1]) and condition(seen[-2]):
            return seen
        page.wait_for_timeout(400)
    raise AssertionError(f"{what}: not within {seconds} s; last measurements {seen[-4:]}")


def test_host_speaker_and_listener_in_three_browsers(site: Site) -> None:
    started = time.monotonic()
    host_ctx, host, host_errors = new_page(site)
    speaker_ctx, speaker, speaker_errors = new_page(site)
    listener_ctx, listener, listener_errors = new_page(site)
    try:
        streams: list[str] = []  # event streams opened by the people on stage
        for name, page in (("host", host), ("speaker", speaker)):
            page.on("request", lambda r, n=name: r.url.endswith("/events") and streams.append(n))
        # The host creates a space from the home page and starts it.
        log_in(host, site, "hana")
        host.get_by_label("Title").fill("Tones at twilight")
        host.get_by_role("button", name="Create space").click()
        host.wait_for_url(re.compile(r".*/spaces/[A-Za-z0-9]+$"))
        space_path = host.url.removeprefix(site.url)
        space_id = space_path.rsplit("/", 1)[1]
        expect(host.get_by_role("heading", name="This space hasn't started yet")).to_be_visible()
        host.get_by_role("button", name="Start space").click()
        expect(host.locator("#badge")).to_have_text("LIVE")
        expect(host.get_by_role("heading", name="Host controls")).to_be_visible()
        until(host, lambda: "host" in streams, "the host's page opens the event stream")

        # An anonymous listener: one click.
        listener.goto(f"{site.url}{space_path}")
        expect(listener.locator("#title")).to_have_text("Tones at twilight")
        expect(listener.get_by_role("heading", name="Host controls")).to_be_hidden()
        hls_requests: list[str] = []
        listener.on("request", lambda r: "/hls/" in r.url and hls_requests.append(r.url))
        listener.get_by_role("button", name="Listen", exact=True).click()
        expect(listener.get_by_role("button", name="Stop listening")).to_be_visible()
        assert listener.evaluate(PROBE, "#player") in (44100, 48000)
        # Nobody speaks yet (the host has not connected a microphone): no tone.
        before = wait_for_audio(
            listener, lambda m: m["time"] > 0 and m["toneDb"] < GONE_DBFS, 15, "silence before the speaker"
        )

        # The speaker asks; the host approves on the page; the speaker connects the microphone.
        log_in(speaker, site, "sami", space_path)
        speaker.get_by_role("button", name="Request to speak").click()
        expect(speaker.get_by_role("button", name="Requested: cancel")).to_be_visible()
        host.get_by_role("button", name="Approve @sami").click()
        expect(speaker.get_by_role("heading", name="You're on stage")).to_be_visible()
        until(speaker, lambda: "speaker" in streams, "the speaker's page opens the event stream")
        # Voice processing (echo cancellation, noise suppression, gain control) stays on, as for
        # anyone: measured, the tone passes it (share ~0.98, louder by the gain control).
        expect(speaker.get_by_label("Voice processing")).to_be_checked()
        speaker.get_by_role("button", name="Connect microphone").click()
        expect(speaker.get_by_role("button", name="Mute", exact=True)).to_be_visible()
        # The speaker hears the room over WHEP: a live remote track in the page.
        speaker.wait_for_function(
            "() => document.querySelector('#room-audio').srcObject?.getAudioTracks()[0]?.readyState"
            " === 'live'"
        )

        talking = wait_for_audio(listener, heard, 20, "the speaker's tone at the listener")
        assert abs(talking[-1]["peakHz"] - TONE_HZ) < 10, talking[-1]
        # Everyone sees who is speaking (the state document carries the mixer's levels).
        for page in (listener, host):
            expect(page.locator('.speaker-tile[data-handle="sami"]')).to_have_class(re.compile("speaking"))
        expect(listener.locator("#listeners")).to_contain_text("1 listening")
        # The join's cookie carries the ticket: the player asks for the same URLs as everyone
        # (an edge's cache key), low-latency parts and blocking reloads included.
        assert hls_requests and not [u for u in hls_requests if "ticket=" in u], hls_requests[:3]
        assert any(re.search(r"/seg\d+\.\d+\.m4s$", u) for u in hls_requests), hls_requests[-5:]
        assert any("_HLS_msn=" in u for u in hls_requests), hls_requests[-5:]
        shoot(listener, "listener")
        shoot(speaker, "speaker")
        shoot(host, "host")

        # The host makes the speaker a co-host: they get the host controls, and keep talking.
        host.get_by_role("button", name="Make co-host @sami").click()
        expect(speaker.get_by_role("heading", name="Host controls")).to_be_visible()
        expect(listener.locator('.speaker-tile[data-handle="sami"] .role')).to_contain_text("Co-host")
        wait_for_audio(listener, heard, 10, "the co-host's tone at the listener")

        # The host mutes the co-host: the server drops their audio and the tone stops.
        muted_at = time.monotonic()
        host.get_by_role("button", name="Mute @sami").click()  # a host may mute a co-host
        expect(host.get_by_role("button", name="Unmute @sami")).to_be_visible()
        muted = wait_for_audio(listener, lambda m: m["toneDb"] < GONE_DBFS, 10, "silence after the mute")
        # How long the listener kept hearing the tone after the host's click: the mute acts on
        # the stage before the API answers, so this is the stage-to-ear delay of the LL-HLS
        # path (packager, parts, hls.js's buffer), to ±0.4 s. Reported, not asserted: timings
        # are benchmarks' business.
        silent_after = muted[-2]["at"] - muted_at
        assert not muted[-1]["paused"]  # still playing: silence, not a stalled player
        expect(speaker.get_by_role("button", name="Unmute")).to_be_visible()
        expect(speaker.locator("#speaker-status")).to_have_text("You're muted.")

        # Reactions: one from the speaker reaches the host's page within the second's tally.
        speaker.get_by_role("button", name="React 👏").click()
        expect(host.locator("#reaction-tally")).to_contain_text("👏 1")
        # The host invites someone by handle; everyone sees the new tile.
        host.get_by_label("Invite to speak").fill("lou")
        host.get_by_role("button", name="Invite", exact=True).click()
        expect(listener.locator('.speaker-tile[data-handle="lou"]')).to_have_count(1)
        # The speaker leaves the stage; the host moves the invited one back to the audience.
        speaker.get_by_role("button", name="Leave stage").click()
        expect(speaker.get_by_role("heading", name="You're on stage")).to_be_hidden()
        expect(speaker.get_by_role("button", name="Request to speak")).to_be_visible()
        host.get_by_role("button", name="Move to audience @lou").click()
        for handle in ("sami", "lou"):
            expect(listener.locator(f'.speaker-tile[data-handle="{handle}"]')).to_have_count(0)

        # The host ends the space (a second press confirms); every page says so and links the replay.
        host.get_by_role("button", name="End space").click()
        host.get_by_role("button", name="Press again to end the space for everyone").click()
        for page in (host, speaker, listener):
            expect(page.get_by_role("heading", name="This space has ended")).to_be_visible()
            expect(page.get_by_role("link", name="Play the replay")).to_have_attribute(
                "href", f"/spaces/{space_id}/replay"
            )
        expect(listener.get_by_role("button", name="Stop listening")).to_be_hidden()
        site.ended_space = space_id
        pages = {"host": host_errors, "speaker": speaker_errors, "listener": listener_errors}
        for name, errors in pages.items():
            assert errors.errors == [], (name, errors.errors)
            assert errors.unexpected_http() == [], (name, errors.http)
        print(
            f"tone share/level: before {before[-1]['share']:.3f}/{before[-1]['toneDb']:.1f} dBFS, "
            f"talking {talking[-1]['share']:.3f}/{talking[-1]['toneDb']:.1f} dBFS, "
            f"muted {muted[-1]['toneDb']:.1f} dBFS; tone gone at the listener {silent_after:.1f} s "
            f"after the mute click; scenario {time.monotonic() - started:.1f} s"
        )
    finally:
        for context in (host_ctx, speaker_ctx, listener_ctx):
            context.close()


def test_replay_page_plays_the_ended_space(site: Site) -> None:
    if site.ended_space is None:
        pytest.skip("the live scenario did not reach the end of its space")
    space_id = site.ended_space
    with httpx.Client(base_url=site.url) as http:
        deadline = time.monotonic() + 5
        while (status := (answer := http.get(f"/hls/{space_id}/replay.m3u8")).status_code) != 200:
            if time.monotonic() > deadline:
                break
            time.sleep(0.3)
        paths = http.get("/openapi.json").json()["paths"]
    if status == 404 and "/hls/{space_id}/replay.m3u8" not in paths:
        pytest.skip("GET /hls/{id}/replay.m3u8 is not in this checkout yet (recording, issue 6)")
    assert status == 200, answer.text
    context, page, errors = new_page(site)
    try:
        page.goto(f"{site.url}/spaces/{space_id}/replay")
        expect(page.locator("#title")).to_have_text("Tones at twilight")
        link = page.get_by_role("link", name="Download the recording (.m4a)")
        expect(link).to_have_attribute("href", f"/api/v1/spaces/{space_id}/recording.m4a")
        page.wait_for_function("() => document.querySelector('#replay').currentTime > 1.0", timeout=15_000)
        assert page.evaluate("document.querySelector('#replay').duration") > 2
        shoot(page, "replay")
        # The host's replay post links here from their page.
        page.goto(f"{site.url}/@hana")
        expect(page.get_by_role("link", name="Play the replay").first).to_have_attribute(
            "href", f"/spaces/{space_id}/replay"
        )
        with httpx.Client(base_url=site.url) as http:
            head = http.get(f"/api/v1/spaces/{space_id}/recording.m4a", headers={"Range": "bytes=0-7"})
        assert head.status_code == 206 and head.content[4:8] == b"ftyp", head
        assert errors.errors == []
    finally:
        context.close()


def test_pages_sign_up_post_and_moderate(site: Site) -> None:
    context, page, errors = new_page(site)
    admin_ctx, admin, admin_errors = new_page(site)
    try:
        page.goto(f"{site.url}/signup")
        page.get_by_label("Handle").fill("newbie")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign up").click()
        page.wait_for_url(f"{site.url}/")
        expect(page.get_by_role("heading", name="Start a space")).to_be_visible()
        page.locator("#nav").get_by_role("link", name="@newbie").click()
        page.wait_for_url(f"{site.url}/@newbie")
        page.get_by_label("New post").fill("first post from the browser")
        page.get_by_role("button", name="Post").click()
        expect(page.locator("#posts")).to_contain_text("first post from the browser")
        page.set_viewport_size(PHONE)
        page.screenshot(path=str(ARTIFACTS / "account-phone.png"), full_page=True)

        log_in(admin, site, "root", "/admin")
        admin.get_by_label("Handle").fill("newbie")
        admin.get_by_label("Reason").fill("spam in the browser test")
        admin.get_by_role("button", name="Suspend").click()
        expect(admin.locator("#audit")).to_contain_text("spam in the browser test")
        admin.screenshot(path=str(ARTIFACTS / "admin-desktop.png"), full_page=True)
        page.reload()
        expect(page.get_by_text("suspended", exact=True)).to_be_visible()
        admin.get_by_role("button", name="Reinstate").click()
        expect(admin.locator("#audit tbody tr").first).to_contain_text("reinstate")
        page.reload()
        expect(page.get_by_text("suspended", exact=True)).to_be_hidden()
        # A non-admin is told the page is not for them.
        page.goto(f"{site.url}/admin")
        expect(page.get_by_text("This page is for administrators.")).to_be_visible()
        assert errors.errors == [] and admin_errors.errors == []
    finally:
        context.close()
        admin_ctx.close()


def test_keyboard_reaches_listen_and_every_control_is_labelled(site: Site) -> None:
    live = site.server.client().as_token(site.server.client().login("lou", PASSWORD))
    space = live.post("/api/v1/spaces", json={"title": "Keyboard check"}).json()
    assert live.post(f"/api/v1/spaces/{space['id']}/start").status_code == 200
    context, page, errors = new_page(site)
    try:
        page.goto(f"{site.url}/spaces/{space['id']}")
        expect(page.locator("#badge")).to_have_text("LIVE")
        for _ in range(12):  # Tab from the top of the page to the Listen button
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.id") == "listen":
                break
        assert page.evaluate("document.activeElement.id") == "listen"
        page.keyboard.press("Enter")
        expect(page.get_by_role("button", name="Stop listening")).to_be_focused()
        unlabelled = page.evaluate(
            """() => [...document.querySelectorAll('button, input, textarea, a[href]')]
                 .filter((e) => e.checkVisibility())
                 .filter((e) => !(e.labels?.length || e.getAttribute('aria-label') || e.textContent.trim()))
                 .map((e) => e.outerHTML)"""
        )
        assert unlabelled == []
        assert errors.errors == []
    finally:
        context.close()
        live.post(f"/api/v1/spaces/{space['id']}/end")


def test_scheduled_space_page_turns_live_when_the_host_starts(site: Site) -> None:
    host = site.server.client().as_token(site.server.client().login("lou", PASSWORD))
    when = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    space = host.post("/api/v1/spaces", json={"title": "Later", "scheduled_for": when.isoformat()}).json()
    context, page, errors = new_page(site)
    try:
        log_in(page, site, "hana", f"/spaces/{space['id']}")
        expect(page.get_by_role("heading", name="This space hasn't started yet")).to_be_visible()
        expect(page.locator("#starts-at")).to_contain_text(f"It starts {when:%b} {when.day}, {when.year}")
        expect(page.get_by_role("button", name="Start space")).to_be_hidden()  # not hana's space
        page.get_by_role("button", name="Remind me").click()
        expect(page.get_by_role("button", name="Reminder set")).to_have_attribute("aria-pressed", "true")
        assert host.get(f"/api/v1/spaces/{space['id']}").json()["reminders"] == ["hana"]
        assert host.post(f"/api/v1/spaces/{space['id']}/start").status_code == 200
        expect(page.get_by_role("button", name="Listen", exact=True)).to_be_visible(timeout=8_000)
        expect(page.get_by_role("heading", name="This space hasn't started yet")).to_be_hidden()
        assert errors.errors == [] and errors.unexpected_http() == []
    finally:
        context.close()
        host.post(f"/api/v1/spaces/{space['id']}/end")


def plays_on(page: Page, seconds: float = 1.0) -> None:
    """The player's clock advances by ``seconds`` while it plays (hls.js may first jump to the
    live edge, so the start is read, not assumed)."""
    start = page.evaluate("document.querySelector('#player').currentTime")
    page.wait_for_function(
        "(t) => { const a = document.querySelector('#player'); return !a.paused && a.currentTime > t; }",
        arg=start + seconds,
    )


def test_listener_whose_ticket_lapses_is_reconnected(site: Site) -> None:
    """The node's clock jumps past the ticket's lifetime (a tab asleep for ten minutes, say):
    the origin refuses the old ticket, hls.js gives up, and the page joins again and resumes."""
    host = site.server.client().as_token(site.server.client().login("lou", PASSWORD))
    space = host.post("/api/v1/spaces", json={"title": "Lapse"}).json()
    assert host.post(f"/api/v1/spaces/{space['id']}/start").status_code == 200
    context, page, errors = new_page(site)
    joins: list[int] = []
    page.on("response", lambda r: r.url.endswith("/join") and joins.append(r.status))
    try:
        page.goto(f"{site.url}/spaces/{space['id']}")
        page.get_by_role("button", name="Listen", exact=True).click()
        expect(page.get_by_role("button", name="Stop listening")).to_be_visible()
        plays_on(page)
        site.server.clock.advance(site.server.config.ticket_ttl_seconds + 60)
        expect(page.locator("#player-status")).to_contain_text("reconnecting", timeout=15_000)
        expect(page.get_by_role("button", name="Stop listening")).to_be_visible(timeout=20_000)
        plays_on(page)
        assert joins == [200, 200], joins
        assert errors.errors == []
        assert {s for s, _ in errors.unexpected_http()} == {403}, errors.http  # the lapsed ticket
    finally:
        context.close()
        site.server.clock.advance(-(site.server.config.ticket_ttl_seconds + 60))
        host.post(f"/api/v1/spaces/{space['id']}/end")


def live_space(server: RunningServer, title: str) -> str:
    host = server.client().as_token(server.client().login("lou", PASSWORD))
    space = host.post("/api/v1/spaces", json={"title": title}).json()
    assert host.post(f"/api/v1/spaces/{space['id']}/start").status_code == 200
    return str(space["id"])


def test_a_full_space_puts_the_listener_in_line_and_lets_them_in(site: Site) -> None:
    if site.crowded is None:
        pytest.skip("capacity settings (admission, issue 7) are not in this checkout yet")
    node = site.crowded
    space_id = live_space(node, "Only one seat")
    first_ctx, first, first_errors = new_page(site)
    second_ctx, second, second_errors = new_page(site)
    try:
        first.goto(f"{node.url}/spaces/{space_id}")
        first.get_by_role("button", name="Listen", exact=True).click()
        expect(first.get_by_role("button", name="Stop listening")).to_be_visible()
        second.goto(f"{node.url}/spaces/{space_id}")
        second.get_by_role("button", name="Listen", exact=True).click()
        expect(second.get_by_role("heading", name="You're in line")).to_be_visible()
        expect(second.locator("#waiting-detail")).to_contain_text("You're number 1 in line")
        shoot(second, "listener-waiting")
        # The first listener leaves; their ticket lapses (the node's clock jumps past it) and
        # the one in line is let in on their next try, without pressing anything.
        first.get_by_role("button", name="Stop listening").click()
        node.clock.advance(node.config.ticket_ttl_seconds + 30)
        expect(second.get_by_role("button", name="Stop listening")).to_be_visible(timeout=20_000)
        expect(second.get_by_role("heading", name="You're in line")).to_be_hidden()
        plays_on(second)
        for errors in (first_errors, second_errors):
            assert errors.errors == [] and errors.unexpected_http() == [], errors.http
    finally:
        first_ctx.close()
        second_ctx.close()


def test_in_attack_mode_the_page_solves_the_proof_of_work(site: Site) -> None:
    admin = site.server.client().as_token(site.server.client().login("root", PASSWORD))
    if "/api/v1/pow/challenge" not in admin.get("/openapi.json").json()["paths"]:
        pytest.skip("proof of work (admission, issue 7) is not in this checkout yet")
    space_id = live_space(site.server, "Under attack")
    forced = admin.post("/api/v1/admin/attack-mode", json={"on": True, "seconds": 300})
    assert forced.status_code == 200 and forced.json()["active"], forced.text
    context, page, errors = new_page(site)
    joins: list[dict[str, Any]] = []
    page.on("request", lambda r: r.url.endswith("/join") and joins.append(json.loads(r.post_data or "{}")))
    try:
        page.goto(f"{site.url}/spaces/{space_id}")
        page.get_by_role("button", name="Listen", exact=True).click()
        expect(page.get_by_role("button", name="Stop listening")).to_be_visible()
        plays_on(page)
        # The first join was refused (403 pow_required); the second carried a proof the
        # server accepted, and it is one: SHA-256(challenge + "." + nonce) has the zero bits.
        assert len(joins) == 2 and joins[0] == {}, joins
        proof = joins[1]
        difficulty = forced.json()["difficulty"]
        digest = hashlib.sha256(f"{proof['pow_challenge']}.{proof['pow_nonce']}".encode()).digest()
        assert 256 - int.from_bytes(digest, "big").bit_length() >= difficulty >= 1, (proof, difficulty)
        assert errors.errors == []
        assert [s for s, _ in errors.unexpected_http()] == [403], errors.http
    finally:
        context.close()
        admin.post("/api/v1/admin/attack-mode", json={"on": None})
