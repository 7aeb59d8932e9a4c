"""confined: a test app that tries to exceed what its copy is allowed (tests/integration/test_confine.py).

GET /alloc?mb=N touches N MiB more memory; GET /forkbomb?n=N forks up to N sleeping children and
says how many it got and why it stopped; GET /write?path=P tries to create P and says "ok" or the
errno's name; GET / says who the app runs as. BALLAST_MB (env) of memory is touched at boot.
"""
import errno
import json
import os
import signal
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlsplit

HELD = [bytearray(os.urandom(1 << 20)) for _ in range(int(os.environ.get("BALLAST_MB", "0")))]


def alloc(mb: int) -> dict:
    for _ in range(mb):
        HELD.append(bytearray(b"\x01" * (1 << 20)))
    return {"held_mb": len(HELD)}


def forkbomb(n: int) -> dict:
    kids, stopped = [], None
    for _ in range(n):
        try:
            pid = os.fork()
        except OSError as e:
            stopped = errno.errorcode.get(e.errno, str(e.errno))
            break
        if pid == 0:
            signal.pause()
            os._exit(0)
        kids.append(pid)
    for pid in kids:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return {"forked": len(kids), "stopped": stopped}


def write(path: str) -> dict:
    try:
        with open(path, "x") as f:
            f.write("x")
    except OSError as e:
        return {"result": errno.errorcode.get(e.errno, str(e.errno))}
    os.unlink(path)
    return {"result": "ok"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: no keep-alive socket to checkpoint

    def do_GET(self):  # noqa: N802
        u = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        if u.path == "/alloc":
            body = alloc(int(q["mb"]))
        elif u.path == "/forkbomb":
            body = forkbomb(int(q["n"]))
        elif u.path == "/write":
            body = write(q["path"])
        else:
            body = {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


HTTPServer(("127.0.0.1", 8080), Handler).serve_forever()
