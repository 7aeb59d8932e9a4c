'use strict';
// The node-app service, written against injected modules so that server.js (plain require) and
// snapshot-entry.js (the Node startup-snapshot peer, whose entry may only require built-ins) share it.
//
//   POST /transpile {"code": "...", "check": false}  ->  {"js": "...", "diagnostics": [...]}
//   GET  /health                                     ->  {"ok": true}
//
// Start-up work: parse the default lib .d.ts files (ES2020 + DOM, several MB) into a cache that every
// type-check reuses, type-check and transpile the bundled sample until V8 has compiled the hot paths.

module.exports = function createApp({ ts, path, libDir }) {
  const options = { target: ts.ScriptTarget.ES2020, module: ts.ModuleKind.CommonJS, strict: true,
    noEmit: true, types: [], skipLibCheck: true };  // the libs are trusted: check only the input
  const libCache = new Map();  // lib file name -> parsed SourceFile, shared by every check

  const host = ts.createCompilerHost(options);
  const readFile = host.getSourceFile.bind(host);
  host.getSourceFile = (fileName, languageVersion, onError) => {
    if (path.dirname(fileName) !== libDir) return readFile(fileName, languageVersion, onError);
    if (!libCache.has(fileName)) libCache.set(fileName, readFile(fileName, languageVersion, onError));
    return libCache.get(fileName);
  };
  host.getDefaultLibLocation = () => libDir;
  host.getDefaultLibFileName = (o) => path.join(libDir, ts.getDefaultLibFileName(o));

  function check(code) {
    const name = '/input/main.ts';
    const input = ts.createSourceFile(name, code, ts.ScriptTarget.ES2020, true);
    const get = host.getSourceFile;
    const program = ts.createProgram([name], options, {
      ...host, getSourceFile: (f, v, e) => (f === name ? input : get(f, v, e)),
      fileExists: (f) => f === name || host.fileExists(f),
    });
    return ts.getPreEmitDiagnostics(program).map((d) => ts.flattenDiagnosticMessageText(d.messageText, '\n'));
  }

  function transpile(code, withCheck) {
    const out = ts.transpileModule(code, { compilerOptions: { ...options, noEmit: false }, reportDiagnostics: true });
    const diagnostics = out.diagnostics.map((d) => ts.flattenDiagnosticMessageText(d.messageText, '\n'));
    return { js: out.outputText, diagnostics: withCheck ? diagnostics.concat(check(code)) : diagnostics };
  }

  function warmUp(sample, rounds) {
    const problems = check(sample);  // parses the libs into the cache, runs the whole checker once
    if (problems.length) throw new Error(`sample.ts does not type-check: ${problems.join('; ')}`);
    for (let i = 0; i < rounds; i++) transpile(sample + `\nexport const round${i} = ${i};\n`, false);
    return libCache.size;
  }

  function handle(req, res) {
    const send = (status, obj) => {
      const body = JSON.stringify(obj);
      res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) });
      res.end(body);
    };
    if (req.method === 'GET' && req.url === '/health') return send(200, { ok: true });
    if (req.method !== 'POST' || req.url !== '/transpile') return send(404, { error: 'not found' });
    const chunks = [];
    let size = 0;
    req.on('data', (c) => { size += c.length; if (size <= 1 << 20) chunks.push(c); });
    req.on('end', () => {
      let body;
      try {
        body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
        if (size > 1 << 20 || typeof body.code !== 'string') throw new Error('expected {"code": "..."} under 1 MiB');
      } catch (e) {
        return send(400, { error: String(e.message || e) });
      }
      send(200, transpile(body.code, Boolean(body.check)));
    });
  }

  // http is passed here, not to createApp: the snapshot builder cannot load it (Node 20).
  function listen(http, port, onListening) {
    const server = http.createServer(handle);
    server.listen(port, '127.0.0.1', () => onListening(server));
    return server;
  }

  return { warmUp, transpile, check, listen };
};
