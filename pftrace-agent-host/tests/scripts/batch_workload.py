# Workload for the batched agent road's test (pftrace-agent-host/tests/batch.rs):
# threads of known native ids make a known number of traced calls; the test
# gives each thread its CPU slot between "TIDS ..." and "go" on stdin.
# argv: socket, how it ends: "clean" (threads end, interpreter exits),
# "os_exit" (a worker calls os._exit(0) while the main thread holds records)
# "kill" (the test sends SIGKILL while the main thread spins and a worker
# waits, both holding calls in their buffers), "fork" (the main thread forks after buffering calls; the child calls
# and leaves by os._exit) or "exec" (the main thread execs a new Python
# while its buffer holds calls).
import os
import sys
import threading
import time

sys.path.insert(0, os.environ["PFTRACE_AGENT_DIR"])
import pftrace_agent

st = pftrace_agent.start(sys.argv[1])
if not st.startswith("tracing"):
    print("ERR", st, flush=True)
    sys.exit(3)
mode = sys.argv[2]


def traced(x):
    return x + 1


def rec(n):
    return rec(n - 1) + 1 if n > 1 else 1


# First calls of each code object go the two-report road (their strings).
traced(0)
rec(1)

PER_THREAD = [100, 257, 1000]
go = threading.Event()
hold = threading.Event()
# Set by the last worker once its calls are made: in "kill" mode the main
# thread waits for it, so the SIGKILL finds that worker's calls in its buffer
# (CI once killed before the worker ran at all: main spun holding the GIL).
made = threading.Event()


def worker(n, last):
    go.wait()
    for i in range(n):
        traced(i)
    rec(5)
    if last and mode == "os_exit":
        hold.wait()
        os._exit(0)
    if last and mode == "kill":
        made.set()
        hold.wait()  # blocked, its last calls in its buffer, until SIGKILL


threads = [threading.Thread(target=worker, args=(n, i == len(PER_THREAD) - 1)) for i, n in enumerate(PER_THREAD)]
for t in threads:
    t.start()
print("TIDS", threading.get_native_id(), *[t.native_id for t in threads], flush=True)
if sys.stdin.readline().strip() != "go":
    sys.exit(4)
# A switch-in after the test gave this thread its slot writes the slot (the
# line may have been there before this thread ever slept).
time.sleep(0.01)
go.set()
if mode in ("os_exit", "kill"):
    # The others done first, so the count is known when the last one ends
    # the process while this thread holds its records.
    for t in threads[:-1]:
        t.join()
    if mode == "kill" and not made.wait(30):
        sys.exit(8)
# The main thread's own calls, held in its buffer (40 events, fewer than a buffer's 64).
for i in range(20):
    traced(i)
if mode == "os_exit":
    hold.set()
    threading.Event().wait(30)
    sys.exit(5)
if mode == "kill":
    # Running (no switch-out of its own) when the test's SIGKILL comes.
    print("HOLD", flush=True)
    while True:
        pass
for t in threads:
    t.join()
if mode == "exec":
    # The main thread's 20 calls (40 events) are still in its buffer (fewer than 64):
    # the kernel drains them at the execve, before the image goes.
    os.execv(sys.executable, [sys.executable, "-c", "print('DONE', flush=True)"])
if mode == "fork":
    pid = os.fork()
    if pid == 0:
        print("CHILD", os.getpid(), flush=True)
        if sys.stdin.readline().strip() != "go":
            os._exit(6)
        time.sleep(0.01)
        for i in range(7):
            traced(i)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        sys.exit(7)
    for i in range(3):
        traced(i)
print("DONE", flush=True)
