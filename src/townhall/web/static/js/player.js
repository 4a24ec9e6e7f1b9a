// Playing HLS in an <audio> element: hls.js (served by this node from npm's package) where the
// browser has Media Source Extensions, the browser's own HLS (Safari) otherwise.
//
// A listener ticket must reach every request under /hls/{id}/. The join response sets a
// townhall_ticket cookie scoped there where the server supports it; the player also appends
// ?ticket= to every request hls.js makes, so playback never depends on the cookie.

let HlsModule = null;

async function loadHls() {
  if (!HlsModule) HlsModule = (await import("/vendor/hls.mjs")).default;
  return HlsModule;
}

function withTicket(url, ticket) {
  if (!ticket) return url;
  const u = new URL(url, location.href);
  u.searchParams.set("ticket", ticket);
  return u.href;
}

export class Player {
  /** @param {HTMLAudioElement} audio  @param {(text: string) => void} onStatus */
  constructor(audio, onStatus = () => {}) {
    this.audio = audio;
    this.onStatus = onStatus;
    this.hls = null;
    this.ticket = null;
    this.onFatal = null;
  }

  /** Renew the ticket used on the next requests (before it expires). */
  setTicket(ticket) {
    this.ticket = ticket;
  }

  /**
   * Play `url`. live: LL-HLS low-latency mode, starting near the live edge.
   * Resolves once playback has started (or rejects with the reason).
   */
  async play(url, { ticket = null, live = true } = {}) {
    this.stop();
    this.ticket = ticket;
    const Hls = await loadHls().catch(() => null);
    if (Hls && Hls.isSupported()) {
      const hls = new Hls({
        lowLatencyMode: live,
        enableWorker: false, // audio-only fMP4 is passed through; a worker would save nothing
        backBufferLength: live ? 30 : 90,
        liveDurationInfinity: live,
        manifestLoadingMaxRetry: 6,
        xhrSetup: (xhr, requestUrl) => {
          xhr.open("GET", withTicket(requestUrl, this.ticket), true);
        },
      });
      this.hls = hls;
      hls.on(Hls.Events.ERROR, (_event, data) => {
        if (!data.fatal) return;
        if (data.type === Hls.ErrorTypes.MEDIA_ERROR) {
          hls.recoverMediaError();
          return;
        }
        this.onStatus(`Playback stopped: ${data.details}`);
        if (this.onFatal) this.onFatal(data);
      });
      hls.attachMedia(this.audio);
      hls.loadSource(withTicket(url, ticket));
      await new Promise((resolve, reject) => {
        hls.once(Hls.Events.MANIFEST_PARSED, resolve);
        hls.once(Hls.Events.ERROR, (_e, data) => data.fatal && reject(new Error(data.details)));
      });
    } else if (this.audio.canPlayType("application/vnd.apple.mpegurl")) {
      this.audio.src = withTicket(url, ticket);
    } else {
      throw new Error("this browser cannot play HLS audio");
    }
    await this.audio.play();
  }

  /** Seconds behind the live edge as hls.js estimates it, or null. */
  latency() {
    return this.hls && Number.isFinite(this.hls.latency) ? this.hls.latency : null;
  }

  stop() {
    if (this.hls) {
      this.hls.destroy();
      this.hls = null;
    }
    this.audio.pause();
    this.audio.removeAttribute("src");
    this.audio.load();
  }
}
