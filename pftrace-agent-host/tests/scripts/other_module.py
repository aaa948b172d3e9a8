# A second `qualified`, in another file: `exact_workload.py:qualified` must not match it.
def qualified():
    return 2
