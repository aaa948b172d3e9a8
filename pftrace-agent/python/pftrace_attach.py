# pftrace's agent loader for a running process (CPython 3.14+, PEP 768):
# pftraced writes this file's path into a thread of the target and the
# interpreter runs it at its next eval-breaker check. Installed by pftraced,
# root-owned, read-only; the directory and socket are filled in at install
# time. Defines nothing in the namespace it runs in.


def _pftrace_attach(AGENT_DIR=@AGENT_DIR@, SOCKET=@SOCKET@):
    import sys

    # Never in the middle of an import (a process asked right after its
    # exec runs this during start-up, with `os` half imported): pftraced
    # asks again until the agent connects.
    f = sys._getframe(1)
    while f is not None:
        if f.f_code.co_filename.startswith("<frozen importlib"):
            return
        f = f.f_back
    try:
        sys.path.insert(0, AGENT_DIR)
        try:
            import pftrace_loader
        finally:
            sys.path.remove(AGENT_DIR)
        pftrace_loader._pftrace_load(AGENT_DIR, SOCKET)
    except BaseException as e:  # never into the program
        sys.stderr.write("pftrace: the agent did not load: %r\n" % (e,))


_pftrace_attach()
del _pftrace_attach
