"""Ground truth for pftrace-code's static tests: compile each file named on
the command line with this interpreter and print one JSON line per code
object in it (found through co_consts, as the compiler nests them):
file, co_name, co_firstlineno, co_qualname (3.11+, else null), co_varnames,
co_argcount, co_posonlyargcount, co_kwonlyargcount, co_flags, co_stacksize.
A file that does not compile prints {"file": ..., "error": ...}."""
import json
import sys
import types


def walk(code):
    yield code
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            yield from walk(c)


def main():
    optimize = int(sys.argv[1])
    for path in sys.argv[2:]:
        try:
            with open(path, "rb") as f:
                source = f.read()
            top = compile(source, path, "exec", dont_inherit=True, optimize=optimize)
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            print(json.dumps({"file": path, "error": f"{type(e).__name__}: {e}"}))
            continue
        for c in walk(top):
            print(json.dumps({
                "file": path,
                "name": c.co_name,
                "firstlineno": c.co_firstlineno,
                "qualname": getattr(c, "co_qualname", None),
                "varnames": list(c.co_varnames),
                "argcount": c.co_argcount,
                "posonlyargcount": c.co_posonlyargcount,
                "kwonlyargcount": c.co_kwonlyargcount,
                "flags": c.co_flags,
                "stacksize": c.co_stacksize,
            }))


main()
