// Proof of work, off the page's thread: find a decimal nonce such that
// SHA-256(challenge + "." + nonce) begins with `difficulty` zero bits (admission/pow.py).
//
// Plain JavaScript SHA-256 rather than WebCrypto: crypto.subtle is missing outside secure
// contexts (a node reached over plain http on a LAN), and one promise per hash is slow. The
// constant prefix's whole 64-byte blocks are hashed once (the "midstate"); each try hashes
// only the tail with the nonce.

const K = new Uint32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
]);
const INITIAL = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];
const W = new Uint32Array(64);

/** Compress the 64-byte block at `offset` of `bytes` into the state `h` (8 words). */
function compress(h, bytes, offset) {
  for (let i = 0; i < 16; i++) {
    const j = offset + i * 4;
    W[i] = (bytes[j] << 24) | (bytes[j + 1] << 16) | (bytes[j + 2] << 8) | bytes[j + 3];
  }
  for (let i = 16; i < 64; i++) {
    const a = W[i - 15];
    const b = W[i - 2];
    const s0 = ((a >>> 7) | (a << 25)) ^ ((a >>> 18) | (a << 14)) ^ (a >>> 3);
    const s1 = ((b >>> 17) | (b << 15)) ^ ((b >>> 19) | (b << 13)) ^ (b >>> 10);
    W[i] = (W[i - 16] + s0 + W[i - 7] + s1) | 0;
  }
  let [a, b, c, d, e, f, g, k] = h;
  for (let i = 0; i < 64; i++) {
    const S1 = ((e >>> 6) | (e << 26)) ^ ((e >>> 11) | (e << 21)) ^ ((e >>> 25) | (e << 7));
    const t1 = (k + S1 + ((e & f) ^ (~e & g)) + K[i] + W[i]) | 0;
    const S0 = ((a >>> 2) | (a << 30)) ^ ((a >>> 13) | (a << 19)) ^ ((a >>> 22) | (a << 10));
    const t2 = (S0 + ((a & b) ^ (a & c) ^ (b & c))) | 0;
    k = g;
    g = f;
    f = e;
    e = (d + t1) | 0;
    d = c;
    c = b;
    b = a;
    a = (t1 + t2) | 0;
  }
  h[0] = (h[0] + a) | 0;
  h[1] = (h[1] + b) | 0;
  h[2] = (h[2] + c) | 0;
  h[3] = (h[3] + d) | 0;
  h[4] = (h[4] + e) | 0;
  h[5] = (h[5] + f) | 0;
  h[6] = (h[6] + g) | 0;
  h[7] = (h[7] + k) | 0;
}

function leadingZeroBits(h) {
  let bits = 0;
  for (const word of h) {
    if (word === 0) {
      bits += 32;
      continue;
    }
    return bits + Math.clz32(word);
  }
  return bits;
}

/** The first decimal nonce that solves the challenge; reports progress now and then. */
function solve(challenge, difficulty) {
  const prefix = new TextEncoder().encode(`${challenge}.`);
  const whole = Math.floor(prefix.length / 64) * 64;
  const mid = [...INITIAL];
  for (let offset = 0; offset < whole; offset += 64) compress(mid, prefix, offset);
  const tailStart = prefix.length - whole;
  const tail = new Uint8Array(192);
  tail.set(prefix.subarray(whole));
  const h = new Array(8);
  for (let n = 0; ; n++) {
    const nonce = String(n);
    let length = tailStart;
    for (let i = 0; i < nonce.length; i++) tail[length++] = nonce.charCodeAt(i);
    const bits = (prefix.length + nonce.length) * 8;
    const blocks = length + 9 <= 64 ? 1 : 2;
    const end = blocks * 64;
    tail[length] = 0x80;
    tail.fill(0, length + 1, end);
    // Message lengths here stay far below 2^32 bits: the high word of the length is zero.
    tail[end - 4] = bits >>> 24;
    tail[end - 3] = (bits >>> 16) & 0xff;
    tail[end - 2] = (bits >>> 8) & 0xff;
    tail[end - 1] = bits & 0xff;
    for (let i = 0; i < 8; i++) h[i] = mid[i];
    compress(h, tail, 0);
    if (blocks === 2) compress(h, tail, 64);
    if (leadingZeroBits(h) >= difficulty) return nonce;
    if ((n & 0xffff) === 0xffff) postMessage({ progress: n + 1 });
  }
}

self.onmessage = (event) => {
  const { challenge, difficulty } = event.data;
  const started = performance.now();
  const nonce = solve(challenge, difficulty);
  postMessage({ nonce, tries: Number(nonce) + 1, ms: performance.now() - started });
};
