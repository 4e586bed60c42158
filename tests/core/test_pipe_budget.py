"""Pipes to peer programs are enlarged within a budget, and give it back."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator

import pytest

from torbridge.transport.process import PIPE_SIZE, PipeBudget


@pytest.fixture
def pipes() -> Iterator[list[int]]:
    fds: list[int] = []
    for _ in range(3):
        fds.extend(os.pipe())
    yield fds
    for fd in fds:
        os.close(fd)


def size(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)


def test_enlarges_up_to_the_limit(pipes: list[int]) -> None:
    budget = PipeBudget(limit=2)
    default = size(pipes[4])
    assert budget.enlarge([pipes[0], pipes[2]]) == 2
    assert size(pipes[0]) == size(pipes[2]) == PIPE_SIZE
    assert budget.enlarge([pipes[4]]) == 0  # over budget: left as it was
    assert size(pipes[4]) == default
    budget.release(2)
    assert budget.used == 0
    assert budget.enlarge([pipes[4]]) == 1
    assert size(pipes[4]) == PIPE_SIZE


def test_a_refused_pipe_costs_nothing(pipes: list[int]) -> None:
    budget = PipeBudget(limit=4)
    with open(os.devnull, "rb") as not_a_pipe:
        assert budget.enlarge([not_a_pipe.fileno(), pipes[0]]) == 0
    assert budget.used == 0
