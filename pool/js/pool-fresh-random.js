'use strict';
// Per-copy randomness for the Node SDK (pool-runtime.js). Every copy restored from one image starts
// with the same V8 Math.random state and the same OpenSSL DRBG state, and OpenSSL does not notice
// the clone (same pid inside the copy's pid namespace, no fork). So:
//
//   install()   wraps Math.random and node:crypto's random functions. Until reseed() the wrappers
//               call the originals, so before the checkpoint everything behaves as plain Node.
//               Installed when the SDK is loaded, so that code which keeps a reference
//               (`const { randomUUID } = require('crypto')`, lodash's `Math.random`) loaded after
//               the SDK gets the wrapper; ESM named imports are re-synced (syncBuiltinESMExports).
//   reseed(seed) called in each restored copy: Math.random becomes xoshiro128** seeded from the
//               identity's seed (as Python's random.seed(seed): one seed, one stream), and the crypto
//               wrappers draw every byte from /dev/urandom, read on each call (no buffer, so a copy
//               checkpointed again and restored twice still gets distinct bytes).
//
// Covered: Math.random; crypto.randomBytes (sync and callback), randomFillSync, randomFill,
// randomInt (sync and callback), randomUUID, getRandomValues, webcrypto / globalThis.crypto
// .getRandomValues and .randomUUID, and the deprecated aliases pseudoRandomBytes, prng, rng.
// Not covered (they draw from OpenSSL's cloned DRBG inside C++): TLS handshakes (client/server
// randoms and ephemeral keys), crypto.generateKey*/generateKeyPair*/generatePrime*, createECDH /
// createDiffieHellman key generation, randomized signatures and padding, webcrypto.subtle, and
// references taken to the original functions before the SDK was loaded.
const crypto = require('crypto');
const fs = require('fs');
const { syncBuiltinESMExports } = require('module');

const v8Random = Math.random;
const original = {};
let nextDouble = null;   // after reseed(): this copy's Math.random
let urandomFd = null;    // after reseed(): /dev/urandom, opened in the copy
let installed = false;

// ---------------------------------------------------------------- Math.random: xoshiro128**

function splitmix64(state) {
  // One step of SplitMix64 on a BigInt state; returns [next state, 64-bit output].
  const mask = (1n << 64n) - 1n;
  const s = (state + 0x9E3779B97F4A7C15n) & mask;
  let z = s;
  z = ((z ^ (z >> 30n)) * 0xBF58476D1CE4E5B9n) & mask;
  z = ((z ^ (z >> 27n)) * 0x94D049BB133111EBn) & mask;
  return [s, z ^ (z >> 31n)];
}

function xoshiro128ss(seed) {
  let state = BigInt.asUintN(64, BigInt(seed));
  const words = [];
  for (let i = 0; i < 2; i++) {
    let out;
    [state, out] = splitmix64(state);
    words.push(Number(out & 0xffffffffn), Number(out >> 32n));
  }
  let [a, b, c, d] = words;  // SplitMix64 output is never all zero for four words in a row
  const next = () => {
    const result = Math.imul(rotl(Math.imul(b, 5), 7), 9) >>> 0;
    const t = b << 9;
    c ^= a; d ^= b; b ^= c; a ^= d; c ^= t; d = rotl(d, 11);
    return result;
  };
  // 53 random bits, like V8's own Math.random: 27 from one output, 26 from the next.
  return () => ((next() >>> 5) * 67108864 + (next() >>> 6)) / 9007199254740992;
}

function rotl(x, k) {
  return (x << k) | (x >>> (32 - k));
}

// ---------------------------------------------------------------- fresh bytes

function fill(view, offset = 0, size = view.byteLength - offset) {
  // Overwrite bytes [offset, offset + size) of an ArrayBuffer or ArrayBufferView from /dev/urandom.
  const bytes = ArrayBuffer.isView(view)
    ? new Uint8Array(view.buffer, view.byteOffset + offset, size)
    : new Uint8Array(view, offset, size);
  for (let done = 0; done < size;) done += fs.readSync(urandomFd, bytes, done, size - done, null);
  return view;
}

function freshUUID() {
  const b = fill(Buffer.alloc(16));
  b[6] = (b[6] & 0x0f) | 0x40;  // version 4
  b[8] = (b[8] & 0x3f) | 0x80;  // RFC 4122 variant
  const hex = b.toString('hex');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

function freshInt(min, max) {
  // Node's own method: 48-bit draws, rejection sampling to stay uniform over [min, max).
  const range = max - min;
  const limit = 2 ** 48 - (2 ** 48 % range);
  const b = Buffer.alloc(6);
  for (;;) {
    const x = fill(b).readUIntBE(0, 6);
    if (x < limit) return min + (x % range);
  }
}

// randomFillSync/randomFill count offset and size in elements of the view (Node's assertOffset).
function region(buf, offset, size) {
  const element = buf.BYTES_PER_ELEMENT || 1;
  const start = (offset === undefined ? 0 : offset) * element;
  return [start, size === undefined ? buf.byteLength - start : size * element];
}

const fresh = () => urandomFd !== null;

// ---------------------------------------------------------------- wrappers
// Each wrapper calls the original first: it validates the arguments and throws Node's own errors,
// and keeps the callback forms asynchronous; then, in a restored copy, the result is redrawn.

const wrappers = {
  randomBytes(size, callback) {
    if (typeof callback === 'function') {
      return original.randomBytes(size, (err, buf) => callback(err, err || !fresh() ? buf : fill(buf)));
    }
    const buf = original.randomBytes(size, callback);
    return fresh() ? fill(buf) : buf;
  },
  randomFillSync(buf, offset, size) {
    original.randomFillSync(buf, offset, size);
    return fresh() ? fill(buf, ...region(buf, offset, size)) : buf;
  },
  randomFill(buf, offset, size, callback) {
    const args = [buf, offset, size, callback];
    const cb = args.findIndex((a) => typeof a === 'function');
    if (cb < 1) return original.randomFill(buf, offset, size, callback);  // Node throws
    const done = args[cb];
    const [start, length] = region(buf, cb > 1 ? offset : undefined, cb > 2 ? size : undefined);
    args[cb] = (err, out) => done(err, err || !fresh() ? out : fill(out, start, length));
    return original.randomFill(...args.slice(0, cb + 1));
  },
  randomInt(min, max, callback) {
    if (!fresh()) return original.randomInt(min, max, callback);
    const onlyMax = max === undefined || typeof max === 'function';
    const cb = onlyMax ? max : callback;
    if (cb !== undefined && typeof cb !== 'function') return original.randomInt(min, max, callback);
    original.randomInt(...(onlyMax ? [min] : [min, max]));  // validates min and max
    const value = onlyMax ? freshInt(0, min) : freshInt(min, max);
    if (cb === undefined) return value;
    process.nextTick(cb, null, value);
    return undefined;
  },
  randomUUID(options) {
    const uuid = original.randomUUID(options);
    return fresh() ? freshUUID() : uuid;
  },
};

function install() {
  if (installed) return;
  installed = true;
  Math.random = function random() {
    return nextDouble === null ? v8Random() : nextDouble();
  };
  for (const name of Object.keys(wrappers)) {
    original[name] = crypto[name];
    crypto[name] = wrappers[name];
  }
  for (const alias of ['pseudoRandomBytes', 'prng', 'rng']) {  // deprecated aliases of randomBytes
    if (alias in crypto) crypto[alias] = wrappers.randomBytes;
  }
  // crypto.getRandomValues, crypto.webcrypto and globalThis.crypto all go through Crypto.prototype.
  const proto = Object.getPrototypeOf(crypto.webcrypto);
  const webGetRandomValues = proto.getRandomValues;
  const webRandomUUID = proto.randomUUID;
  proto.getRandomValues = function getRandomValues(array) {
    const out = webGetRandomValues.call(this, array);
    return fresh() ? fill(out) : out;
  };
  proto.randomUUID = function randomUUID() {
    const uuid = webRandomUUID.call(this);
    return fresh() ? freshUUID() : uuid;
  };
  syncBuiltinESMExports();
}

function reseed(seed) {
  install();
  if (urandomFd === null) urandomFd = fs.openSync('/dev/urandom', 'r');
  nextDouble = xoshiro128ss(seed);
}

module.exports = { install, reseed, xoshiro128ss };
