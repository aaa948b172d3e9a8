"""Ground truth for pftrace-code's workload tests: a sys.setprofile
recorder. start() installs it; finish() writes, per code object seen called,
co_name, co_filename, co_firstlineno, the qualified name (co_qualname on
3.11+; on 3.9 the __qualname__ of the function object holding the code,
found with gc.get_referrers unless functools.wraps replaced it (then null), or of the generator running it; '<module>' for
module code; for a class body, the __qualname__ it sets, read at its
'return': 3.9 names a class body's function after the bare class name), __name__ of the frame's globals, co_varnames with the counts
and flags that split it, co_stacksize, and the last line a 'return' event
reported (what a return probe gives). Then it prints READY and waits for a
line on stdin (or, at end of input, PFTRACE_RECORD_LINGER seconds), so the
process is alive while it is resolved from outside."""
import gc
import json
import os
import sys
import types

_seen = {}


def _qualname(frame, code):
    q = getattr(code, "co_qualname", None)
    if q is not None:
        return q
    if code.co_name == "<module>":
        return "<module>"
    for r in gc.get_referrers(code):
        if isinstance(r, types.FunctionType) and r.__code__ is code:
            # functools.wraps copied another function's __qualname__ onto
            # this one: no ground truth on 3.9-3.10.
            if hasattr(r, "__wrapped__"):
                return None
            return r.__qualname__
    for r in gc.get_referrers(frame):
        if isinstance(r, (types.GeneratorType, types.CoroutineType)) and r.gi_code is code:
            return r.__qualname__
    return None


def _profile(frame, event, arg):
    code = frame.f_code
    if code.co_filename == __file__:
        return
    rec = _seen.get(code)
    if event == "call" and rec is None:
        _seen[code] = rec = {
            "name": code.co_name,
            "filename": code.co_filename,
            "firstlineno": code.co_firstlineno,
            "qualname": _qualname(frame, code),
            "module": frame.f_globals.get("__name__"),
            "varnames": list(code.co_varnames),
            "argcount": code.co_argcount,
            "posonlyargcount": code.co_posonlyargcount,
            "kwonlyargcount": code.co_kwonlyargcount,
            "flags": code.co_flags,
            "stacksize": code.co_stacksize,
            "return_line": None,
        }
    elif event == "return" and rec is not None:
        rec["return_line"] = frame.f_lineno
        # A class body (no CO_NEWLOCALS, not a module) on 3.9-3.10.
        if not hasattr(code, "co_qualname") and not code.co_flags & 0x2 and code.co_name != "<module>":
            rec["qualname"] = frame.f_locals.get("__qualname__")


def start():
    sys.setprofile(_profile)


def finish():
    sys.setprofile(None)
    with open(os.environ["PFTRACE_RECORD"], "w") as f:
        for rec in _seen.values():
            f.write(json.dumps(rec) + "\n")
    print("READY", flush=True)
    # Without a stdin to wait on (a command pftraced launches), stay alive
    # PFTRACE_RECORD_LINGER seconds, for what is resolved from outside.
    if not sys.stdin.readline():
        import time
        time.sleep(float(os.environ.get("PFTRACE_RECORD_LINGER", "0")))
