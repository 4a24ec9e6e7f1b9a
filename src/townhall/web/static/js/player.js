// Playing HLS in an <audio> element: hls.js (served by this node from npm's package) where the
// browser has Media Source Extensions, the browser's own HLS (Safari) otherwise.
//
// The listener ticket: the join response sets it as the townhall_ticket cookie of /hls/{id}/,
// so on this origin every request of the player carries it without a query string, and every
// listener asks for the same URLs (what an edge cache wants). Renewing is joining again: the
// cookie is replaced. Only when the playlist is on another origin (public_url pointing at a
// CDN host) does the player append ?ticket= to each request itself.

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
    this.carryTicket = false;
    this.onFatal = null;
  }

  /** A renewed ticket, for a player that carries it itself (the cookie is renewed by the join). */
  setTicket(ticket) {
    this.ticket = ticket;
  }

  /**
   * Play `url`. live: LL-HLS low-latency mode, starting near the live edge.
   * Resolves once playback has started (or rejects with the reason).
   */
  async play(url, { ticket = null, live = true } = {}) {
    this.stop();
    const source = new URL(url, location.href);
    this.carryTicket = Boolean(ticket) && source.origin !== location.origin;
    this.ticket = ticket;
    if (!this.carryTicket) source.searchParams.delete("ticket"); // the cookie carries it
    const Hls = await loadHls().catch(() => null);
    if (Hls && Hls.isSupported()) {
      const hls = new Hls({
        lowLatencyMode: live,
        enableWorker: false, // audio-only fMP4 is passed through; a worker would save nothing
        backBufferLength: live ? 30 : 90,
        liveDurationInfinity: live,
        manifestLoadingMaxRetry: 6,
        xhrSetup: (xhr, requestUrl) => {
          xhr.open("GET", this.carryTicket ? withTicket(requestUrl, this.ticket) : requestUrl, true);
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
      hls.loadSource(this.carryTicket ? withTicket(source.href, ticket) : source.href);
      await new Promise((resolve, reject) => {
        hls.once(Hls.Events.MANIFEST_PARSED, resolve);
        hls.once(Hls.Events.ERROR, (_e, data) => data.fatal && reject(new Error(data.details)));
      });
    } else if (this.audio.canPlayType("application/vnd.apple.mpegurl")) {
      // Safari keeps the cookie a ticketed playlist request sets, on any origin.
      this.audio.src = this.carryTicket ? withTicket(source.href, ticket) : source.href;
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
