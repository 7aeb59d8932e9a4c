'use strict';
// node-app entry: load TypeScript, warm up, then listen. A transparent template: no SDK; the pool
// knows it is ready when GET /health answers (the port only opens after the warm-up).
const fs = require('fs');
const http = require('http');
const path = require('path');

const t0 = process.hrtime.bigint();
const ts = require('typescript');
const createApp = require('./app');

const port = Number(process.env.PORT || 8080);
const app = createApp({ ts, path, libDir: path.dirname(require.resolve('typescript/lib/lib.d.ts')) });
const libs = app.warmUp(fs.readFileSync(path.join(__dirname, 'sample.ts'), 'utf8'), Number(process.env.WARMUP_ROUNDS || 100));
app.listen(http, port, () => {
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  console.log(`node-app: TypeScript ${ts.version}, ${libs} lib files cached, warm after ${ms.toFixed(0)} ms, listening on ${port}`);
});
