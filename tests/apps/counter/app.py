"""counter: a small SDK test app whose state lives in memory. GET /inc adds one and returns the count,
GET / returns it; GET /sum touches every page of an optional ballast (BALLAST_MB of varied bytes) and
returns its checksum, so a lazily restored copy must really have fetched all its memory."""
import hashlib
import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pool.runtime

PORT = int(os.environ.get("PORT", "8080"))
# Ballast: distinct 64 KiB blocks (not one repeated page), made fast at boot.
_seed = hashlib.sha256(b"counter").digest()
BALLAST = bytearray()
for i in range(int(os.environ.get("BALLAST_MB", "0")) * 16):
    BALLAST += (hashlib.sha256(_seed + i.to_bytes(4, "big")).digest() * 2048)
count = 0
identity = None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: no keep-alive socket to checkpoint

    def do_GET(self):  # noqa: N802
        global count
        if self.path == "/inc":
            count += 1
        body = {"count": count, "pid": os.getpid(),
                "instance": identity.instance_id if identity else None}
        if self.path == "/sum":
            body["sum"] = hashlib.sha256(BALLAST).hexdigest()
            body["ballast"] = len(BALLAST)
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
print(f"counter booted, ballast {len(BALLAST)} bytes", flush=True)
identity = pool.runtime.checkpoint()
print(f"counter copy {identity.instance_id} serving", flush=True)
server.serve_forever()
