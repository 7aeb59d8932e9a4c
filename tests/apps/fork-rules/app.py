"""Test app: an SDK app for fork mode that breaks one fork rule before checkpoint() when BREAK says
so: "thread" (a thread still running), "listener" (a listening socket), "child" (a child process)."""
import os
import socket
import subprocess
import threading
import time

import pool.runtime

BREAK = os.environ.get("BREAK", "")
if BREAK == "thread":
    threading.Thread(target=time.sleep, args=(3600,), name="early-worker", daemon=True).start()
elif BREAK == "listener":
    early = socket.create_server(("127.0.0.1", 8080))
elif BREAK == "child":
    helper = subprocess.Popen(["sleep", "3600"])

identity = pool.runtime.checkpoint()
print(f"fork-rules copy {identity.instance_id} up", flush=True)
while True:
    time.sleep(3600)
