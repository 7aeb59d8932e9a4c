"""py-embed-fork: py-embed (../py-embed: torch + sentence-transformers, warmed up) in fork mode.

The model is loaded and warmed up on one thread (EMBED_THREADS=1, OMP_NUM_THREADS=1, and no tqdm
monitor thread): an OpenMP pool or a monitor started before the checkpoint would leave threads in the
zygote, and a fork is refused while more than one thread runs. Each forked copy then sets its own intra-op threads (COPY_THREADS) and opens its port
in an after_restore hook, in its own network namespace, before the pool replies to its spawn.
"""
import os
import sys
from http.server import ThreadingHTTPServer

import tqdm

tqdm.tqdm.monitor_interval = 0  # the progress bar shown while the model loads starts no thread
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "py-embed"))

import app as embed_app  # noqa: E402  torch and the model, warmed up on one thread
import torch  # noqa: E402

import pool.runtime  # noqa: E402

PORT = int(os.environ.get("PORT", "8080"))
server = None


@pool.runtime.after_restore
def open_port(_identity):
    global server
    torch.set_num_threads(int(os.environ.get("COPY_THREADS", "2")))
    server = ThreadingHTTPServer(("127.0.0.1", PORT), embed_app.Handler)


print("py-embed-fork: model loaded and warmed up on one thread", flush=True)
identity = pool.runtime.checkpoint()
if server is None:  # outside the pool: no after_restore
    open_port(identity)
print(f"py-embed-fork: serving as instance {identity.instance_id}", flush=True)
server.serve_forever()
