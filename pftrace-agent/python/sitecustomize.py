# pftrace's agent loader for launch mode (installed by pftraced: root-owned,
# read-only). pftraced puts this directory first on PYTHONPATH and the control
# socket in PFTRACE_AGENT_SOCKET; Python imports this file at start-up (not
# with -E, -I or -S). It loads the agent, never raises into the program, then
# runs the interpreter's own sitecustomize, if any, as if this file were not here.


def _pftrace_start():
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    sock = os.environ.get("PFTRACE_AGENT_SOCKET")
    # Before 3.11 pftraced uses the USDT probes (or cannot trace): nothing to load.
    if sock and sys.version_info >= (3, 11):
        try:
            import pftrace_loader  # beside this file

            pftrace_loader._pftrace_load(here, sock)
        except BaseException as e:  # never into the program
            sys.stderr.write("pftrace: the agent did not load: %r\n" % (e,))
    # Drop our directory from sys.path (PYTHONPATH still carries it to
    # child processes) and run the next sitecustomize on the path.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    return here


def _pftrace_chain(here):
    import importlib.machinery
    import importlib.util
    import sys

    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", sys.path)
    if spec is None or spec.origin is None or spec.origin.startswith(here + "/"):
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    # Errors propagate to site.py, which reports them as it would have.
    spec.loader.exec_module(module)


_pftrace_chain(_pftrace_start())
del _pftrace_start, _pftrace_chain
