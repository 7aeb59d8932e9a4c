"""py-embed: a sentence-embedding HTTP service (torch CPU + sentence-transformers), the heavy Python
template. Start-up (import torch, load the model, warm it up) takes seconds; then it opens its port
and checkpoints with the SDK. Every copy answers

    POST /embed {"text": "..."}  ->  {"dim": 384, "embedding": [384 floats, unit length]}
"""
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import embedder  # the expensive import: torch + the model, warmed up

import pool.runtime

PORT = int(os.environ.get("PORT", "8080"))
MAX_BODY = 1 << 20


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802
        self._reply(200, {"ok": True} if self.path == "/health" else {"error": "not found"})

    def do_POST(self):  # noqa: N802
        if self.path != "/embed":
            return self._reply(404, {"error": "not found"})
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                return self._reply(413, {"error": "body too large"})
            text = json.loads(self.rfile.read(length))["text"]
            if not isinstance(text, str):
                raise TypeError("text must be a string")
        except (ValueError, KeyError, TypeError) as e:
            return self._reply(400, {"error": f"expected {{\"text\": \"...\"}}: {e}"})
        vec = embedder.embed(text)
        self._reply(200, {"dim": len(vec), "embedding": vec})

    def _reply(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass


def serve(port: int) -> None:
    """Serve on port until killed (the benchmark's forkserver peer runs this in each worker)."""
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
    print(f"py-embed: model loaded and warmed up, listening on {PORT}", flush=True)
    identity = pool.runtime.checkpoint()  # returns at once outside the pool
    print(f"py-embed: serving as instance {identity.instance_id}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
