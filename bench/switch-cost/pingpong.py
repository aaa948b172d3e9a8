# The same ping-pong between two threads of a traced Python process (each
# has a CPU slot from its creation): every switch writes a slot. Prints
# round trips done; `mark()` is the traced function (called once).
import os, sys, threading, time

def mark():
    pass

def main(n):
    mark()
    ab, ba = os.pipe(), os.pipe()
    def echo():
        for _ in range(n):
            os.write(ba[1], os.read(ab[0], 1))
    t = threading.Thread(target=echo)
    t.start()
    t0 = time.perf_counter_ns()
    for _ in range(n):
        os.write(ab[1], b"x")
        os.read(ba[0], 1)
    t.join()
    print("traced ping-pong", (time.perf_counter_ns() - t0) / n, "ns per round trip", flush=True)

main(int(sys.argv[1]))
