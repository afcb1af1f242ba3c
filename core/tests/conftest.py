from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _clear_echo_calls():
    from tunestack.testing.probe import CALLS

    CALLS.clear()
    yield
    CALLS.clear()


@pytest.fixture
def calls():
    from tunestack.testing.probe import CALLS

    return CALLS
