# Workload for the agent's exactness test: every kind of call the agent must
# pair as CPython's profiler does, with CPython's own recorder beside it in
# the same process (sys.setprofile on 3.12+, sys.settrace on 3.11 where the
# agent holds the profile slot). Prints the recorder's events as JSON lines.
import asyncio
import json
import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
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


def record_here():
    if sys.version_info >= (3, 12):
        sys.setprofile(profiler)
    else:
        sys.settrace(tracer)


def stop_here():
    sys.setprofile(None)
    sys.settrace(None)


# A thread running before the agent starts (the agent must reach it).
go_early = threading.Event()
early_done = threading.Event()


def early():
    go_early.wait()
    record_here()
    for i in range(100):
        work(i)
    stop_here()
    early_done.set()


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


def untraced_noise(n):
    return sum(work_like(i) for i in range(n))


def work_like(i):
    return i


def worker():
    record_here()
    for i in range(300):
        work(i)
        catcher(i)
    stop_here()


def main(sock):
    early_thread = threading.Thread(target=early, daemon=True)
    early_thread.start()
    if sock:
        sys.path.insert(0, os.environ["PFTRACE_AGENT_DIR"])
        import pftrace_agent

        status = pftrace_agent.start(sock)
        if not status.startswith("tracing"):
            print("ERR", status, flush=True)
            sys.exit(3)
    go_early.set()
    record_here()
    threading.setprofile(profiler) if sys.version_info >= (3, 12) else threading.settrace(tracer)
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
    untraced_noise(100)
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    early_done.wait()
    early_thread.join()
    stop_here()
    threading.setprofile(None)
    threading.settrace(None)
    for e in events:
        print(json.dumps(e))
    print("DONE", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
