"""Test-only: loaded by a `pool serve` that test_warm_path.py starts with this directory on
PYTHONPATH and POOL_TEST_AUDIT naming a file. Whatever the service does while serving a spawn
(a frame of an `rpc_spawn` on the stack: the coordinator's or the node's) that touches a file, lists a
directory, starts a thread or submits to an executor is written to that file, one line each:

    EVENT<TAB>PATH-OR-WHAT<TAB>FLAGS

Work a spawn only triggers (a refill task, the supervisor) runs outside its stack and is not
recorded: it is not between the request and the reply."""
import os
import sys

_OUT = os.environ.get("POOL_TEST_AUDIT")
EVENTS = frozenset({"open", "os.listdir", "os.scandir", "_thread.start_new_thread",
                    "subprocess.Popen", "pool.test.executor_submit"})


def _in_spawn(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "rpc_spawn":
            return True
        frame = frame.f_back
    return False


if _OUT:
    _fd = os.open(_OUT, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def _hook(event, args):
        if event in EVENTS and _in_spawn(sys._getframe(1)):
            what = args[0] if args else ""
            flags = args[2] if event == "open" and len(args) > 2 else ""
            os.write(_fd, f"{event}\t{what}\t{flags}\n".encode())

    sys.addaudithook(_hook)

    # An executor round trip raises no audit event of its own: make submit() raise one.
    from concurrent.futures import thread as _thread

    _submit = _thread.ThreadPoolExecutor.submit

    def _audited_submit(self, fn, /, *args, **kwargs):
        sys.audit("pool.test.executor_submit", getattr(fn, "__qualname__", repr(fn)))
        return _submit(self, fn, *args, **kwargs)

    _thread.ThreadPoolExecutor.submit = _audited_submit
