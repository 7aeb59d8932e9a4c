'use strict';
// Test driver for the Node SDK (used by tests/unit/test_node_sdk_unit.py).
//
//   echo        read frames from stdin, write each decoded value back re-encoded to stdout; a decode
//               error goes to stderr with exit status 2
//   checkpoint  register hooks, call checkpoint() and print what this copy sees, one key=value a line;
//               with SDK_CHECK_SERVE set it then runs on (the SDK serving its control channel) until
//               stdin closes, and prints every hook that ran as events=...
const fs = require('fs');
const path = require('path');

const js = path.resolve(__dirname, '..', '..', '..', 'pool', 'js');
const msgpack = require(path.join(js, 'pool-msgpack'));

function echo() {
  const data = fs.readFileSync(0);
  const out = [];
  for (let pos = 0; pos < data.length;) {
    const n = data.readUInt32BE(pos);
    let value;
    try {
      value = msgpack.decode(data.subarray(pos + 4, pos + 4 + n));
    } catch (e) {
      process.stderr.write(`error: ${e.name}: ${e.message}\n`);
      process.exit(2);
    }
    const body = msgpack.encode(value);
    const len = Buffer.alloc(4);
    len.writeUInt32BE(body.length);
    out.push(len, body);
    pos += 4 + n;
  }
  fs.writeSync(1, Buffer.concat(out));
}

function checkpoint() {
  const crypto = require('crypto');
  const pool = require(path.join(js, 'pool-runtime'));
  const { randomUUID } = require('crypto');  // a reference kept from before the checkpoint
  const events = [];
  pool.beforeCheckpoint(() => events.push('before:A'));
  pool.beforeCheckpoint(() => events.push('before:B'));
  pool.afterRestore((id) => events.push(`after:A:${id.instanceId}`));
  pool.afterRestore(() => {
    if (process.env.FAIL_HOOK) throw new Error(`hook asked to fail: ${process.env.FAIL_HOOK}`);
    events.push('after:B');
  });
  pool.afterCheckpoint(() => events.push('checkpoint:A'));
  pool.afterCheckpoint(() => {
    if (process.env.FAIL_CHECKPOINT_HOOK) throw new Error('checkpoint hook asked to fail');
    events.push('checkpoint:B');
  });
  Math.random();  // used before the checkpoint, like a warmed-up app would
  const id = pool.checkpoint();
  const line = (k, v) => console.log(`${k}=${v}`);
  line('instance', id.instanceId);
  line('restored', id.restored);
  line('greeting', process.env.GREETING);
  line('fallback', process.env.SDK_CHECK_FALLBACK);
  line('pool_instance_id', process.env.POOL_INSTANCE_ID);
  line('hostname', id.hostname);
  line('seed', id.seed);
  line('deadline', id.deadline);
  line('hooks', events.join(','));
  line('same', pool.checkpoint() === id && pool.identity() === id);
  line('random', [Math.random(), Math.random()].join(','));
  line('bytes', crypto.randomBytes(16).toString('hex'));
  line('uuid', randomUUID());
  line('argv01', process.argv.slice(0, 2).map((a) => path.basename(a)).join(','));
  for (const a of process.argv.slice(2)) line('arg', a);
  line('done', '');
  if (process.env.SDK_CHECK_SERVE) {
    process.stdin.resume();  // the pool's side drives the control channel meanwhile
    process.stdin.on('end', () => line('events', events.join(',')));
  }
}

const mode = process.argv[2];
if (mode === 'echo') echo();
else if (mode === 'checkpoint') checkpoint();
else {
  process.stderr.write('usage: sdk_check.js echo|checkpoint [args...]\n');
  process.exit(64);
}
