"""Fixtures: a tiny model, and one live server over it for the tests that do not reconfigure it."""

import pytest
from helpers import random_tiny
from live import live_server


@pytest.fixture(scope="package")
def tiny_model():
    return random_tiny("llama-gqa")


@pytest.fixture(scope="package")
def served(tiny_model):
    with live_server(tiny_model, block_size=4) as running:
        yield running


@pytest.fixture
def base(served):
    return served[0]
