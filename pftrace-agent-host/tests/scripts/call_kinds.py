# The calls the agent must pair as CPython's profiler does (threads,
# recursion, exceptions, generators with throw() and close(), a coroutine,
# a name defined in two files) and CPython's own recorder of them, in the
# same process: sys.setprofile on 3.12+, sys.settrace on 3.11, where the
# agent holds the profile slot. Imported by the agent's exactness workload
# (exact_workload.py); run as a script by pftraced's agent tests
# (pftrace-daemon/tests/agent.rs, which writes it and other_module.py into
# its test directory): see the end.
import asyncio
import json
import threading
import sys

import other_module  # defines another `qualified`, in another file

TRACED = {"work", "rec", "boom", "catcher", "gen_count", "gen_thrown", "gen_closed", "coro", "qualified"}
OTHER_FILE = other_module.__file__
events = []
lock = threading.Lock()


def note(frame, kind):
    code = frame.f_code
    if code.co_name in TRACED and code.co_filename != OTHER_FILE:
        with lock:
            events.append((threading.get_native_id(), kind, code.co_name))


def profiler(frame, event, arg):
    if event == "call":
        note(frame, "entry")
    elif event == "return":
        note(frame, "return")


def tracer(frame, event, arg):  # 3.11: 'call' here, 'return' in the local tracer
    if event == "call":
        note(frame, "entry")
        return local_tracer
    return None


def local_tracer(frame, event, arg):
    if event == "return":
        note(frame, "return")
    return local_tracer


def record(on):
    """CPython's recorder on or off in the calling thread."""
    if sys.version_info >= (3, 12):
        sys.setprofile(profiler if on else None)
    else:
        sys.settrace(tracer if on else None)


def print_events():
    """The recorder's events, a JSON line each: [tid, "entry"|"return", name]."""
    for e in events:
        print(json.dumps(e))


def work(x):
    return x * 2


def rec(n):
    return 0 if n == 0 else 1 + rec(n - 1)


def boom(n):
    if n % 3 == 0:
        raise ValueError(n)
    return n


def catcher(n):
    try:
        return boom(n)
    except ValueError:
        return -1


def gen_count(n):
    for i in range(n):
        yield i


def gen_thrown():
    try:
        yield 1
        yield 2
    except KeyError:
        yield 3


def gen_closed():
    try:
        yield 1
        yield 2
    finally:
        pass


async def coro(n):
    total = 0
    for i in range(n):
        await asyncio.sleep(0)
        total += i
    return total


def qualified():
    return 1


def every_kind():
    """In the calling thread: 200 work, rec(50), 30 catcher (10 of them
    catching), an uncaught boom, a generator run out, one thrown into and
    closed, one closed in its try, a coroutine of 5 awaits, `qualified`
    here and in other_module."""
    for i in range(200):
        work(i)
    rec(50)
    for i in range(30):
        catcher(i)
    try:
        boom(0)
    except ValueError:
        pass
    sum(gen_count(10))
    g = gen_thrown()
    next(g)
    g.throw(KeyError)
    g.close()
    g = gen_closed()
    next(g)
    g.close()
    asyncio.run(coro(5))
    qualified()
    other_module.qualified()


def worker():
    """A thread's 300 work and 300 catcher calls, recorded."""
    record(True)
    for i in range(300):
        work(i)
        catcher(i)
    record(False)


def in_threads(n):
    """`worker` in `n` threads, started together, joined."""
    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    # pftraced's agent tests: with an argument (a file), first wait for it to
    # exist, running Python meanwhile (so PEP 768 can reach the process);
    # then every kind of call in the main thread and 4 workers; print the
    # recorder's entries as `REC tid name` lines.
    import os
    import time

    if len(sys.argv) > 1:
        print("ready", flush=True)
        while not os.path.exists(sys.argv[1]):
            time.sleep(0.002)
    record(True)
    every_kind()
    in_threads(4)
    record(False)
    for tid, kind, name in events:
        if kind == "entry":
            print("REC", tid, name)
    print("DONE", "%d.%d" % sys.version_info[:2], flush=True)
