class Worker:
    def work(self, n):
        def inner(v):
            return v + n
        return [inner(i) for i in range(n)]


def top_level(*, key=None, **extra):
    found = key or extra
    return found
