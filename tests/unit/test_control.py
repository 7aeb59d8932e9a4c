"""The control channel's asyncio side: a frame larger than the pipe never blocks the loop."""
import asyncio
import os
import threading

from pool.wire import control


def test_a_frame_larger_than_the_pipe_is_written_without_blocking_the_loop():
    msg = {"type": "identity", "env": {"BIG": "x" * (600 * 1024)}}  # ten pipe buffers
    r, w = os.pipe()
    reader_may_start = threading.Event()
    got = {}

    def app():  # the copy's side: reads only when told, with the SDK's blocking reader
        reader_may_start.wait(10)
        got["msg"] = control.read_frame(r)

    thread = threading.Thread(target=app)
    thread.start()

    async def main():
        write = asyncio.create_task(control.write_frame_async(w, msg))
        ticks = 0
        while ticks < 50:  # the loop keeps running while the pipe is full
            await asyncio.sleep(0)
            ticks += 1
        assert not write.done()
        reader_may_start.set()
        await asyncio.wait_for(write, 10)

    try:
        asyncio.run(main())
    finally:
        reader_may_start.set()
        thread.join(10)
        os.close(r)
        os.close(w)
    assert got["msg"] == msg
