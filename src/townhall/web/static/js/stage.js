// A speaker's connection to the stage: the microphone published over WHIP (RFC 9725) and the
// room heard over WHEP, both with the speaker token from the API. The server gathers all its
// ICE candidates before answering and does not take trickled ones, so the offer is sent once
// gathering is complete.

const GATHER_LIMIT_MS = 3000;

function gathered(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState !== "complete") return;
      pc.removeEventListener("icegatheringstatechange", done);
      resolve();
    };
    pc.addEventListener("icegatheringstatechange", done);
    // Enough candidates arrive in well under a second on any real network; do not hang on a
    // slow interface.
    setTimeout(resolve, GATHER_LIMIT_MS);
  });
}

async function negotiate(pc, url, token) {
  await pc.setLocalDescription(await pc.createOffer());
  await gathered(pc);
  const response = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/sdp", Authorization: `Bearer ${token}` },
    body: pc.localDescription.sdp,
  });
  if (response.status !== 201) {
    let message = `the stage refused the connection (${response.status})`;
    try {
      message = (await response.json()).error.message;
    } catch {
      /* keep the status line */
    }
    throw new Error(message);
  }
  const location = new URL(response.headers.get("Location"), url).href;
  await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
  return location;
}

export class StageConnection {
  /** @param {HTMLAudioElement} roomAudio where the room (mix minus you) plays */
  constructor(roomAudio, onState = () => {}) {
    this.roomAudio = roomAudio;
    this.onState = onState;
    this.mic = null;
    this.publisher = null;
    this.subscriber = null;
    this.sessions = [];
    this.token = null;
  }

  get connected() {
    return this.publisher !== null;
  }

  /** grant: {speaker_token, whip_url, whep_url} from the API. */
  async connect(grant, { voiceProcessing = true } = {}) {
    await this.close();
    this.token = grant.speaker_token;
    this.mic = await navigator.mediaDevices.getUserMedia({
      audio: {
        echoCancellation: voiceProcessing,
        noiseSuppression: voiceProcessing,
        autoGainControl: voiceProcessing,
        channelCount: 1,
      },
      video: false,
    });
    try {
      const publisher = new RTCPeerConnection();
      this.publisher = publisher;
      const [track] = this.mic.getAudioTracks();
      publisher.addTransceiver(track, { direction: "sendonly", streams: [this.mic] });
      publisher.addEventListener("connectionstatechange", () => this.onState(publisher.connectionState));
      this.sessions.push(await negotiate(publisher, grant.whip_url, this.token));

      const subscriber = new RTCPeerConnection();
      this.subscriber = subscriber;
      subscriber.addTransceiver("audio", { direction: "recvonly" });
      subscriber.addEventListener("track", (event) => {
        this.roomAudio.srcObject = event.streams[0] ?? new MediaStream([event.track]);
        this.roomAudio.play().catch(() => {});
      });
      this.sessions.push(await negotiate(subscriber, grant.whep_url, this.token));
    } catch (err) {
      await this.close();
      throw err;
    }
  }

  /** Stop sending sound at the source as well (the server mutes too, through the API). */
  setMuted(muted) {
    for (const track of this.mic?.getAudioTracks() ?? []) track.enabled = !muted;
  }

  /**
   * Hang up. `notify`: DELETE the session URLs (RFC 9725 §4.2). Not when the server has ended
   * them itself (the space ended, or the grant was revoked): it would only answer 404.
   */
  async close({ notify = true } = {}) {
    const sessions = notify ? this.sessions : [];
    const token = this.token;
    const peers = [this.publisher, this.subscriber];
    this.sessions = [];
    this.publisher = null;
    this.subscriber = null;
    // End the sessions first, then hang up: a closed peer connection makes the server drop
    // the session on its own, and the DELETE would then find nothing (404).
    await Promise.all(sessions.map((url) => fetch(url, {
      method: "DELETE",
      headers: { Authorization: `Bearer ${token}` },
      keepalive: true,
    }).catch(() => {})));
    for (const pc of peers) pc?.close();
    for (const track of this.mic?.getTracks() ?? []) track.stop();
    this.mic = null;
    this.roomAudio.srcObject = null;
  }
}
