"""Plans kept per (device, problem, path).

``select_plan``, ``select_bwd_plan`` and ``select_decode_plan`` are pure, and a training or
decode loop asks each of them the same question at every step: 20-35 us of Python per
question, a noticeable part of a small call's host time (benchmarks/NOTES.md, tenth
session). The key is everything the answer depends on; code that patches the planners'
constants (bench_decode's sweep) clears the cache.
"""
from __future__ import annotations

from functools import lru_cache

from .plan import select_plan
from .plan_bwd import select_bwd_plan
from .plan_decode import select_decode_plan

PLANS_KEPT = 1024


@lru_cache(maxsize=PLANS_KEPT)
def fwd_plan(device, problem, only):
    return select_plan(device, problem, only=only)


@lru_cache(maxsize=PLANS_KEPT)
def bwd_plan(device, problem, only):
    return select_bwd_plan(device, problem, only=only)


@lru_cache(maxsize=PLANS_KEPT)
def decode_plan(device, problem, only):
    return select_decode_plan(device, problem, only=only)
