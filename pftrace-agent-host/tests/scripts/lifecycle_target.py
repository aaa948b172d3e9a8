# Targets of the agent's lifecycle tests; the first argument picks one.
import os
import sys
import time


def work(x):
    return x + 1


def other(x):
    return x - 1


def agent():
    return sys.modules.get("pftrace_agent")


def wait_generation(g, timeout=10):
    end = time.time() + timeout
    while time.time() < end:
        st = agent().status()
        if st.startswith("tracing") and int(st.rsplit("generation=", 1)[1]) >= g:
            return
        time.sleep(0.001)
    raise SystemExit("generation %d never came: %s" % (g, agent().status()))


mode = sys.argv[1]
if mode == "launch":
    # From the first line: the agent was loaded by sitecustomize.
    for i in range(500):
        work(i)
    print("USER_SITE", getattr(sys, "_user_site_ran", False))
    print("STATUS", agent().status() if agent() else "no agent")
    print("PATH_CLEAN", not any("agent" == os.path.basename(p) for p in sys.path))
elif mode == "names":
    # Rounds of 100 work() and 100 other(); names change between rounds.
    sys.path.insert(0, os.environ["PFTRACE_AGENT_DIR"])
    import pftrace_agent

    print(pftrace_agent.start(sys.argv[2]), flush=True)
    for g in range(1, 5):
        wait_generation(g)
        for i in range(100):
            work(i)
            other(i)
        print("ROUND", g, flush=True)
        sys.stdin.readline()
elif mode == "teardown":
    # Times chunks of calls of a traced function until the agent is gone,
    # then a few more: per-call ns before the agent, while tracing, after.
    import json

    def chunk(n=50000):
        t0 = time.perf_counter_ns()
        for i in range(n):
            work(i)
        return (time.perf_counter_ns() - t0) / n

    before = [chunk() for _ in range(10)]
    sys.path.insert(0, os.environ["PFTRACE_AGENT_DIR"])
    import pftrace_agent

    print(pftrace_agent.start(sys.argv[2]), flush=True)
    during = [chunk() for _ in range(5)]
    print("TRACING", flush=True)
    t_gone = None
    deadline = time.time() + 10
    while time.time() < deadline:
        chunk(5000)
        if not pftrace_agent.status().startswith("tracing"):
            t_gone = time.monotonic_ns()
            break
    after = [chunk() for _ in range(10)]
    tools = [sys.monitoring.get_tool(i) for i in range(6)] if hasattr(sys, "monitoring") else []
    print("RESULT", json.dumps({"before": before, "during": during, "after": after, "gone_ns": t_gone,
                                "status": pftrace_agent.status(), "tools": tools,
                                "profile": sys.getprofile() is not None}), flush=True)
elif mode == "fork":
    sys.path.insert(0, os.environ["PFTRACE_AGENT_DIR"])
    import pftrace_agent

    print(pftrace_agent.start(sys.argv[2]), flush=True)
    for i in range(10):
        work(i)
    pid = os.fork()
    if pid == 0:
        for i in range(100):
            work(i)
        # The child's own connection: pftraced answers it, then we leave.
        end = time.time() + 10
        while time.time() < end and "generation=2" not in pftrace_agent.status():
            time.sleep(0.001)
        os._exit(0 if "generation=2" in pftrace_agent.status() else 7)
    _, st = os.waitpid(pid, 0)
    print("CHILD", pid, os.waitstatus_to_exitcode(st), flush=True)
