'use strict';
// node-app entry: load TypeScript, warm up, listen, then hand the process to the pool with the Node
// SDK (pool-runtime, on NODE_PATH under the pool's builder). Every restored copy answers on the port
// it inherited; outside the pool checkpoint() returns at once and the app just serves.
const pool = require('pool-runtime');  // first: it wraps the random functions before others keep them
const fs = require('fs');
const http = require('http');
const path = require('path');

const t0 = process.hrtime.bigint();
const ts = require('typescript');
const createApp = require('./app');

const port = Number(process.env.PORT || 8080);
const warmRequests = Number(process.env.WARMUP_REQUESTS || 20);
const WARMUP_BODY = JSON.stringify({ code: 'export const answer: number = 6 * 7;', check: true });

const app = createApp({ ts, path, libDir: path.dirname(require.resolve('typescript/lib/lib.d.ts')) });
const libs = app.warmUp(fs.readFileSync(path.join(__dirname, 'sample.ts'), 'utf8'), Number(process.env.WARMUP_ROUNDS || 100));

// One real request through the HTTP path (type-checked), on a connection that is closed afterwards:
// the checkpoint must not hold an open TCP connection.
function postTranspile() {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, path: '/transpile', method: 'POST', agent: false,
      headers: { 'Content-Type': 'application/json', Connection: 'close' } }, (res) => {
      res.resume();
      res.on('error', reject);
      res.socket.on('close', () => (res.statusCode === 200 ? resolve()
        : reject(new Error(`warm-up request answered ${res.statusCode}`))));
    });
    req.on('error', reject);
    req.end(WARMUP_BODY);
  });
}

function openConnections(server) {
  return new Promise((resolve, reject) => server.getConnections((e, n) => (e ? reject(e) : resolve(n))));
}

async function warmUpHttp(server) {
  for (let i = 0; i < warmRequests; i++) await postTranspile();
  server.closeIdleConnections();
  while (await openConnections(server) > 0) await new Promise((r) => setImmediate(r));
}

const server = app.listen(http, port, async () => {
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  console.log(`node-app: TypeScript ${ts.version}, ${libs} lib files cached, warm after ${ms.toFixed(0)} ms, listening on ${port}`);
  try {
    // Requests made here are kept by the checkpoint; outside the pool nothing would keep them.
    if (pool.underPool) await warmUpHttp(server);
    const id = pool.checkpoint();
    if (id.restored) console.log(`node-app: copy ${id.instanceId} serving`);
  } catch (e) {
    console.error(`node-app: ${e.stack || e}`);
    process.exit(1);
  }
});
