"""py-fork: py-hello for fork mode. Boots and builds its table like py-hello and checkpoints; each
copy opens its HTTP port in an after_restore hook, in its own network namespace, before the pool
replies to its spawn (a listener opened before the checkpoint would stay in the zygote's: the fork
is refused)."""
import json
import os
import random
import socket
import sys
import tempfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pool.runtime

PORT = int(os.environ.get("PORT", "8080"))
TABLE = {i: f"item-{i}" for i in range(200_000)}  # state built at boot, shared by every copy
identity = None
server = None


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = json.dumps({
            "instance": identity.instance_id if identity else None,
            "random": random.random(),
            "tempname": os.path.basename(tempfile.mktemp()),
            "args": sys.argv[1:],
            "greeting": os.environ.get("GREETING"),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "pidns": os.readlink("/proc/self/ns/pid"),
            "netns": os.readlink("/proc/self/ns/net"),
            "table": len(TABLE),
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass


@pool.runtime.after_restore
def open_port(_identity):
    global server
    server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)


print(f"py-fork booted with {len(TABLE)} entries", flush=True)
identity = pool.runtime.checkpoint()
if server is None:  # outside the pool: no after_restore
    open_port(identity)
print(f"py-fork copy {identity.instance_id} serving on {PORT}, args={sys.argv[1:]}", flush=True)
server.serve_forever()
