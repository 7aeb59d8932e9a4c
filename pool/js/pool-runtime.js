'use strict';
// prewarm-pool Node SDK: make an app a template, and give each restored copy its identity.
// No dependencies; CommonJS; Node 18+.
//
//   const pool = require('pool-runtime');   // the builder puts this directory on NODE_PATH
//   pool.afterRestore((id) => log(`I am ${id.instanceId}`));
//   ... boot, warm up, listen ...
//   const identity = pool.checkpoint();      // returns in every restored copy
//
// The pool starts the app with POOL_CONTROL_FDS="R,W" (inherited pipe ends). checkpoint() runs the
// before-checkpoint hooks, writes a "ready" frame and blocks in a synchronous read of R: the whole
// event loop stops there, so CRIU checkpoints an idle Node (nothing may be in flight: close client
// connections first). Each restored copy resumes that read with its own "identity" frame, applies it
// (process.env overrides, process.argv[2..], POOL_INSTANCE_ID; the pool has already set the hostname),
// gives the copy its own randomness (pool-fresh-random.js: Math.random reseeded from the identity's
// seed, crypto's random functions drawn from /dev/urandom), runs the after-restore hooks and acks.
// Frames: 4-byte big-endian length + a msgpack map (pool-msgpack.js), as in pool/wire/control.py.
// After the ack the SDK keeps reading the channel, without holding the event loop open: each
// checkpoint of the running copy (`pool checkpoint`, suspend, migrate) runs the before-checkpoint
// hooks before the freeze and the after-checkpoint ones after it.
//
// Without POOL_CONTROL_FDS, checkpoint() runs the hooks in place (before, then after) and returns a
// "local" identity with the app's own argv, so the same app runs unchanged outside the pool.
//
// Require this module before anything that keeps a reference to a crypto random function or to
// Math.random (best: `node -r pool-runtime app.js`): those are wrapped when it loads.
const fs = require('fs');
const net = require('net');
const msgpack = require('./pool-msgpack');
const freshRandom = require('./pool-fresh-random');

const ENV_VAR = 'POOL_CONTROL_FDS';
const LOCAL_INSTANCE_ID = 'local';
const MAX_FRAME = 1 << 20;  // pool/wire/control.py MAX_CONTROL_FRAME

class ControlError extends Error {
  constructor(message, options) {
    super(message, options);
    this.name = 'ControlError';
  }
}

const beforeHooks = [];
const afterHooks = [];
const afterCheckpointHooks = [];
let identity = null;

function controlFds() {
  const raw = process.env[ENV_VAR];
  if (!raw) return null;
  const m = /^\s*(\d+)\s*,\s*(\d+)\s*$/.exec(raw);
  if (!m) throw new ControlError(`${ENV_VAR}=${JSON.stringify(raw)} is not "R,W"`);
  return { r: Number(m[1]), w: Number(m[2]) };
}

const underPool = Boolean(process.env[ENV_VAR]);
if (underPool) freshRandom.install();

// ---------------------------------------------------------------- framing

function writeFrame(fd, message) {
  const body = msgpack.encode(message);
  const frame = Buffer.allocUnsafe(4 + body.length);
  frame.writeUInt32BE(body.length, 0);
  body.copy(frame, 4);
  for (let done = 0; done < frame.length;) done += fs.writeSync(fd, frame, done, frame.length - done);
}

const pause = new Int32Array(new SharedArrayBuffer(4));

function readExact(fd, n) {
  const buf = Buffer.alloc(n);
  for (let done = 0; done < n;) {
    let got;
    try {
      got = fs.readSync(fd, buf, done, n - done, null);
    } catch (e) {
      if (e.code === 'EINTR') continue;
      if (e.code !== 'EAGAIN') throw new ControlError(`reading the control channel: ${e.message}`, { cause: e });
      Atomics.wait(pause, 0, 0, 5);  // a non-blocking pipe: no poll() in sync Node, so wait a little
      continue;
    }
    if (got === 0) throw new ControlError('control channel closed by the other side');
    done += got;
  }
  return buf;
}

function checkLength(length) {
  if (length > MAX_FRAME) {
    throw new ControlError(`control frame of ${length} bytes is over the ${MAX_FRAME} limit`);
  }
  return length;
}

function readFrame(fd) {
  return decodeMessage(readExact(fd, checkLength(readExact(fd, 4).readUInt32BE(0))));
}

function decodeMessage(body) {
  let msg;
  try {
    msg = msgpack.decode(body);
  } catch (e) {
    throw new ControlError(`control frame is not valid msgpack: ${e.message}`, { cause: e });
  }
  if (msg === null || typeof msg !== 'object' || msg instanceof Map || typeof msg.type !== 'string') {
    throw new ControlError('control message is not a map with a type');
  }
  return msg;
}

// ---------------------------------------------------------------- identity

function field(msg, name, check, what, fallback) {
  const v = msg[name];
  if (v === undefined || v === null) return fallback;
  if (!check(v)) throw new ControlError(`identity: ${name} must be ${what}`);
  return v;
}

function parseIdentity(msg) {
  const isString = (v) => typeof v === 'string';
  const instanceId = field(msg, 'instance_id', isString, 'a string', undefined);
  if (instanceId === undefined) throw new ControlError('identity: instance_id is missing');
  const env = field(msg, 'env', (v) => typeof v === 'object' && !(v instanceof Map) && !Array.isArray(v) &&
    !Buffer.isBuffer(v) && Object.values(v).every(isString), 'a map of strings to strings', {});
  const args = field(msg, 'args', (v) => Array.isArray(v) && v.every(isString), 'a list of strings', []);
  const isInt = (v) => Number.isSafeInteger(v) || typeof v === 'bigint';
  return Object.freeze({
    instanceId,
    env: Object.freeze({ ...env }),
    args: Object.freeze([...args]),
    hostname: field(msg, 'hostname', isString, 'a string or nil', null),
    seed: BigInt(field(msg, 'seed', isInt, 'an integer', 0)),
    deadline: field(msg, 'deadline', (v) => typeof v === 'number', 'a number', 0),  // unix time
    restored: true,
  });
}

function apply(id) {
  Object.assign(process.env, id.env);
  process.env.POOL_INSTANCE_ID = id.instanceId;
  if (id.args.length) process.argv.splice(2, process.argv.length - 2, ...id.args);
  freshRandom.reseed(id.seed);
}

// ---------------------------------------------------------------- hooks and checkpoint

function hook(list, fn, name) {
  if (typeof fn !== 'function') throw new TypeError(`${name}(fn): fn must be a function`);
  list.push(fn);
  return fn;
}

/**
 * Run fn() just before the checkpoint (close connections, flush caches...): the template's, and each
 * `pool checkpoint` (suspend, migrate) of a running copy. Returns fn.
 */
function beforeCheckpoint(fn) {
  return hook(beforeHooks, fn, 'beforeCheckpoint');
}

/**
 * Run fn() once a running copy's checkpoint is taken, in the copy that kept running and in each
 * process restored from that snapshot (rollback, resume, restart, migrate). Returns fn.
 */
function afterCheckpoint(fn) {
  return hook(afterCheckpointHooks, fn, 'afterCheckpoint');
}

/** Run fn(identity) in each restored copy, after the identity is applied. Returns fn. */
function afterRestore(fn) {
  return hook(afterHooks, fn, 'afterRestore');
}

function runHooks(list, phase, arg) {
  for (const fn of list) {
    let result;
    try {
      result = fn(arg);
    } catch (e) {
      throw new Error(`${phase} hook failed: ${e && e.message}`, { cause: e });
    }
    if (result && typeof result.then === 'function') {
      // checkpoint() is synchronous: a promise would still be pending when CRIU freezes the process
      throw new TypeError(`${phase} hooks must be synchronous (${fn.name || 'a hook'} returned a promise)`);
    }
  }
}

/**
 * Hand the booted process to the pool to be checkpointed; returns in every restored copy with that
 * copy's identity: {instanceId, env, args, hostname, seed (BigInt), deadline, restored}. Later calls
 * return the same identity.
 */
function checkpoint() {
  if (identity !== null) return identity;
  const fds = controlFds();
  if (fds === null) {
    runHooks(beforeHooks, 'before-checkpoint');
    identity = Object.freeze({ instanceId: LOCAL_INSTANCE_ID, env: Object.freeze({}),
      args: Object.freeze(process.argv.slice(2)), hostname: null, seed: 0n, deadline: 0, restored: false });
    runHooks(afterHooks, 'after-restore', identity);
    return identity;
  }
  runHooks(beforeHooks, 'before-checkpoint');
  writeFrame(fds.w, { type: 'ready', pid: process.pid, runtime: 'node' });
  let id;
  try {
    const msg = readFrame(fds.r);  // CRIU checkpoints us here; each copy continues from this read
    if (msg.type !== 'identity') throw new ControlError(`expected an identity message, got ${JSON.stringify(msg.type)}`);
    id = parseIdentity(msg);
    identity = id;  // hooks may already ask for it
    apply(id);
    runHooks(afterHooks, 'after-restore', id);
  } catch (e) {
    identity = null;
    sendError(fds.w, `${e.name}: ${e.message}`);
    throw e;
  }
  writeFrame(fds.w, { type: 'ack', instance_id: id.instanceId, pid: process.pid, serves: ['checkpoint'] });
  serveCheckpoints(fds);
  return id;
}

/**
 * A running copy's side of its control channel: run the checkpoint hooks when told. The pipe is
 * read through an unref'd handle, so a copy whose work is done still exits; the loop ends when the
 * pool closes the channel (or it breaks).
 */
function serveCheckpoints(fds) {
  const channel = new net.Socket({ fd: fds.r, readable: true, writable: false });
  channel.unref();
  let pending = Buffer.alloc(0);
  const stop = () => channel.destroy();
  channel.on('data', (chunk) => {
    pending = Buffer.concat([pending, chunk]);
    try {
      while (pending.length >= 4) {
        const length = checkLength(pending.readUInt32BE(0));
        if (pending.length < 4 + length) break;
        const msg = decodeMessage(pending.subarray(4, 4 + length));
        pending = pending.subarray(4 + length);
        writeFrame(fds.w, runCheckpointHooks(msg.type));
      }
    } catch {
      stop();  // a frame the pool would never send, or the reply side broke: as if closed
    }
  });
  channel.on('end', stop);
  channel.on('error', stop);
}

const checkpointHooks = new Map([
  ['before_checkpoint', [beforeHooks, 'before-checkpoint']],
  ['after_checkpoint', [afterCheckpointHooks, 'after-checkpoint']],
]);

/** The reply to one control message: ok, or the error the pool reports. */
function runCheckpointHooks(type) {
  const hooks = checkpointHooks.get(type);
  if (!hooks) return { type: 'error', message: `unknown control message ${JSON.stringify(type)}` };
  try {
    runHooks(...hooks);
  } catch (e) {
    return { type: 'error', message: `${e.name}: ${e.message}` };
  }
  return { type: 'ok' };
}

function sendError(fd, message) {
  try {
    writeFrame(fd, { type: 'error', message });
  } catch {
    // the pool is gone or the channel broke: the caller throws the first error anyway
  }
}

/** This copy's identity, or null before checkpoint() returned. */
function currentIdentity() {
  return identity;
}

module.exports = {
  checkpoint, beforeCheckpoint, afterCheckpoint, afterRestore, identity: currentIdentity, underPool,
  ControlError, LOCAL_INSTANCE_ID, ENV_VAR,
};
