"""py-hello: a small SDK template. Boots, builds a lookup table (its "warm-up"), opens its HTTP port,
then checkpoints; every restored copy answers GET / with its own identity and random numbers."""
import json
import os
import random
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pool.runtime

PORT = int(os.environ.get("PORT", "8080"))
TABLE = {i: f"item-{i}" for i in range(200_000)}  # state built at boot, kept by every copy
identity = None


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = json.dumps({
            "instance": identity.instance_id if identity else None,
            "random": random.random(),
            "args": sys.argv[1:],
            "greeting": os.environ.get("GREETING"),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "table": len(TABLE),
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
print(f"py-hello booted with {len(TABLE)} entries, listening on {PORT}", flush=True)
identity = pool.runtime.checkpoint()
print(f"py-hello copy {identity.instance_id} serving, args={sys.argv[1:]}", flush=True)
server.serve_forever()
