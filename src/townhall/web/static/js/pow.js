// Proof of work for anonymous joins while the node is in attack mode: a challenge from
// GET /api/v1/pow/challenge, solved in a worker (pow-worker.js) so the page stays responsive.
import { get } from "./api.js";

/** Solve a fresh challenge; resolves to {pow_challenge, pow_nonce} for the join's body. */
export async function proofOfWork({ signal, onProgress = () => {} } = {}) {
  const { challenge, difficulty } = await get("/api/v1/pow/challenge", { signal });
  const worker = new Worker("/static/js/pow-worker.js");
  try {
    const nonce = await new Promise((resolve, reject) => {
      worker.onmessage = (event) => {
        if (event.data.nonce !== undefined) resolve(event.data.nonce);
        else onProgress(event.data.progress, 2 ** difficulty);
      };
      worker.onerror = (event) => reject(new Error(event.message || "the puzzle could not be solved"));
      signal?.addEventListener("abort", () => reject(new DOMException("aborted", "AbortError")), { once: true });
      worker.postMessage({ challenge, difficulty });
    });
    return { pow_challenge: challenge, pow_nonce: nonce };
  } finally {
    worker.terminate();
  }
}
