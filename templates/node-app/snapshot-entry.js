'use strict';
// The peer the benchmark compares node-app with: Node's own start-up snapshot. Build it with
//   node --snapshot-blob snap.blob --build-snapshot snapshot-entry.js
// then start copies with `node --snapshot-blob snap.blob`. The heap after the same start-up work as
// server.js (TypeScript loaded, lib files parsed and cached, warm-up run) is in the blob; compiled
// code is not (V8 snapshots hold the heap, not the JIT's output).
// A snapshot entry may only require built-in modules, so typescript.js (one self-contained file) and
// app.js are evaluated here with vm.
const fs = require('fs');
const path = require('path');
const v8 = require('v8');
const vm = require('vm');

const here = __dirname;
const libDir = path.join(here, 'node_modules', 'typescript', 'lib');

function load(file) {
  const wrapped = `(function (exports, require, module, __filename, __dirname) {${fs.readFileSync(file, 'utf8')}\n})`;
  const module = { exports: {} };
  vm.runInThisContext(wrapped, { filename: file })(module.exports, require, module, file, path.dirname(file));
  return module.exports;
}

const ts = load(path.join(libDir, 'typescript.js'));
const app = load(path.join(here, 'app.js'))({ ts, path, libDir });
const libs = app.warmUp(fs.readFileSync(path.join(here, 'sample.ts'), 'utf8'), Number(process.env.WARMUP_ROUNDS || 100));

v8.startupSnapshot.setDeserializeMainFunction(() => {
  const port = Number(process.env.PORT || 8080);
  app.listen(require('http'), port, () => console.log(`node-app (snapshot): ${libs} lib files cached, listening on ${port}`));
});
