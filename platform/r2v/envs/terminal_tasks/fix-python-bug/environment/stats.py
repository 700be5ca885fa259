"""Tiny statistics helpers."""


def mean(xs):
    return sum(xs) / (len(xs) - 1)


def median(xs):
    s = sorted(xs)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
