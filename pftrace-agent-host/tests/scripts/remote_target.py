# Target of the PEP 768 tests. "spin": the main thread waits in join() while
# a worker runs Python; once the agent (loaded from outside) is tracing, the
# worker calls work() exactly N times. "handoff": the same, but the worker
# first waits for a line on stdin, so the main thread is the last to hold the
# GIL when it blocks in join() (the request is aimed at a thread that will
# never run Python again). "sleep S": only the main thread, asleep.
import sys
import threading
import time


def work(x):
    return x + 1


def spin(n):
    # READY from here, running Python: printed by the main thread before
    # this one started, a request could be aimed at the main thread (then
    # the GIL holder) just before it blocked in join() for good: the test
    # then timed out (1 run in 3 here under load). After 0.1 s of Python
    # here the main thread has had the GIL back (5 ms switch interval) and
    # is in join().
    end = time.monotonic() + 0.1
    while time.monotonic() < end:
        sum(range(100))
    print("READY", flush=True)
    trace_calls(n)


def trace_calls(n):
    while True:
        m = sys.modules.get("pftrace_agent")
        if m is not None and m.status().startswith("tracing"):
            for i in range(n):
                work(i)
            print("CALLED", n, flush=True)
            return
        sum(range(100))


def handoff(n):
    sys.stdin.readline()  # blocked, without the GIL, until the test writes
    trace_calls(n)


if sys.argv[1] == "handoff":
    t = threading.Thread(target=handoff, args=(int(sys.argv[2]),))
    t.start()
    time.sleep(0.2)  # the worker is in readline(): from here only this thread takes the GIL
    print("READY", flush=True)
    t.join()
elif sys.argv[1] == "spin":
    t = threading.Thread(target=spin, args=(int(sys.argv[2]),))
    t.start()
    t.join()
else:
    print("READY", flush=True)
    time.sleep(float(sys.argv[2]))
    print("WOKE", "pftrace_agent" in sys.modules, flush=True)
