"""Namespace-lab fixtures: each test gets its own lab, torn down even when the test fails."""

from __future__ import annotations

import pytest

from tests.support.netns import lab_or_skip


@pytest.fixture
def lab():
    lab = lab_or_skip()
    try:
        yield lab
    finally:
        lab.close()
