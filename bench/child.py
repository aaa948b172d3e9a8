"""A short-lived child for the churn benchmark: calls foo on its first line,
then every 5 ms, 10 calls in about 50 ms."""

import time


def foo():
    pass


for _ in range(10):
    foo()
    time.sleep(0.005)
