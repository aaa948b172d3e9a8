# Workload for the agent's exactness test: call_kinds.py's calls in the main
# thread, in 4 workers and in a thread running before the agent starts (the
# agent must reach it), with CPython's recorder beside them; prints the
# recorder's events as JSON lines.
import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from call_kinds import every_kind, in_threads, print_events, record, work  # noqa: E402

go_early = threading.Event()
early_done = threading.Event()


def early():
    go_early.wait()
    record(True)
    for i in range(100):
        work(i)
    record(False)
    early_done.set()


def untraced_noise(n):
    return sum(work_like(i) for i in range(n))


def work_like(i):
    return i


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
    record(True)
    every_kind()
    untraced_noise(100)
    in_threads(4)
    early_done.wait()
    early_thread.join()
    record(False)
    print_events()
    print("DONE", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
