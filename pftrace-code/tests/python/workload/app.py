import _recorder
_recorder.start()
import functools
import json
import helpers
from mypkg.sub import mod


class Outer:
    class Inner:
        def run(self, x):
            y = x * 2
            return y

    def run(self):
        return Outer.Inner().run(1)


class A:
    def run(self, *args, **kw):
        total = len(args)
        return total


class B:
    def run(self, a, /, b, *, c=1):
        squares = [i * i for i in range(a)]
        table = {k: v for k, v in zip("ab", squares)}
        return squares, table, set(j for j in squares)


def make_adder(n):
    def add(k):
        return n + k
    return add


def deco(f):
    @functools.wraps(f)
    def wrapper(*a, **k):
        return f(*a, **k)
    return wrapper


@deco
@deco
def decorated(a, b=2):
    t = a + b
    return t


lam = (lambda q, *r:
       q + len(r))


def gen(n):
    for i in range(n):
        yield i


Outer().run()
A().run(1, 2, k=3)
B().run(3, 4, c=5)
make_adder(1)(2)
decorated(1)
lam(1, 2)
list(gen(2))
json.loads('{"a": [1, 2.5, "x"], "b": {"c": null}}')
json.dumps({"b": [1]})
helpers.helper(2)
mod.Worker().work(3)
mod.top_level()
_recorder.finish()
