'use strict';
// Test app for the Node SDK (tests/integration/test_node_sdk.py): boots, draws randomness, listens,
// checkpoints; every copy answers GET / with what it sees: identity, env, argv, hostname, its random
// streams and how often each hook ran (checkpointHooks: the checkpoint hooks as they ran in this process's
// history, for tests/integration/test_live_sdk_hooks.py; with FAIL_CHECKPOINT_HOOK in its identity's env its
// before-checkpoint hook throws).
const crypto = require('crypto');
// Taken before the SDK is loaded, so not wrapped: the control showing copies really share this state.
const rawRandomBytes = crypto.randomBytes;
const rawMathRandom = Math.random;

const pool = require('pool-runtime');
const http = require('http');
const os = require('os');
const { randomUUID } = require('crypto');  // a reference kept from before the checkpoint

const port = Number(process.env.PORT || 8080);
const hooks = { before: 0, after: [] };
pool.beforeCheckpoint(() => { hooks.before += 1; });
pool.afterRestore((id) => { hooks.after.push(id.instanceId); });
const checkpointHooks = [];
pool.beforeCheckpoint(() => {
  if (process.env.FAIL_CHECKPOINT_HOOK) throw new Error('node-sdk refuses: FAIL_CHECKPOINT_HOOK is set');
  checkpointHooks.push('before');
});
pool.afterCheckpoint(() => { checkpointHooks.push('after'); });

// Use every generator before the checkpoint, as a warmed-up app would.
const boot = { random: Math.random(), bytes: crypto.randomBytes(16).toString('hex'), uuid: randomUUID() };
let identity = null;

const server = http.createServer((req, res) => {
  const body = JSON.stringify({
    instance: identity && identity.instanceId,
    restored: identity && identity.restored,
    greeting: process.env.GREETING,
    poolInstanceId: process.env.POOL_INSTANCE_ID,
    argv: process.argv.slice(2),
    argv01: process.argv.slice(0, 2),
    hostname: os.hostname(),
    identityHostname: identity && identity.hostname,
    hooks,
    checkpointHooks,
    boot,
    random: [Math.random(), Math.random()],
    bytes: crypto.randomBytes(16).toString('hex'),
    fill: crypto.randomFillSync(Buffer.alloc(8)).toString('hex'),
    uuid: randomUUID(),
    webUuid: globalThis.crypto.randomUUID(),
    values: Array.from(crypto.getRandomValues(new Uint32Array(2))),
    int: crypto.randomInt(2 ** 40),
    raw: { bytes: rawRandomBytes(16).toString('hex'), random: rawMathRandom() },
  });
  res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) });
  res.end(body);
});

server.listen(port, '127.0.0.1', () => {
  console.log(`node-sdk: listening on ${server.address().port}`);
  identity = pool.checkpoint();
  console.log(`node-sdk: ${identity.instanceId} serving`);
});
