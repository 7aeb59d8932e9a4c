"""counter: a small SDK test app whose state lives in memory. GET /inc adds one and returns the count,
GET / returns it (and which checkpoint hooks have run); GET /sum touches every page of an optional
ballast (BALLAST_MB of varied bytes) and returns its checksum, so a lazily restored copy must really
have fetched all its memory; GET /hold?PATH connects to the unix socket at PATH and keeps the
connection, which CRIU cannot dump (a checkpoint that fails, on demand)."""
import hashlib
import json
import os
import socket
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
hooks = []  # the SDK's checkpoint hooks, as they ran in this process's history
held = []   # GET /hold?PATH: connections to unix sockets outside the copy


@pool.runtime.before_checkpoint
def _before():
    hooks.append("before")


@pool.runtime.after_checkpoint
def _after():
    hooks.append("after")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: no keep-alive socket to checkpoint

    def do_GET(self):  # noqa: N802
        global count
        if self.path == "/inc":
            count += 1
        elif self.path.startswith("/hold?"):  # a connection CRIU cannot dump: to a unix socket
            held.append(socket.socket(socket.AF_UNIX))  # outside the copy
            held[-1].connect(self.path.partition("?")[2])
        body = {"count": count, "pid": os.getpid(), "hooks": hooks,
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
