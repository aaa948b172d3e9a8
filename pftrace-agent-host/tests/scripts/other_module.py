# A second `qualified`, in another file: `call_kinds.py:qualified` must not match it.
def qualified():
    return 2
