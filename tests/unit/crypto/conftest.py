"""Session-wide keys for the trust-layer tests (object builders: trust_fixtures.py)."""

from __future__ import annotations

import pytest

from firmware.common.crypto.keys import RecipientKey, SigningKey


@pytest.fixture(scope="session")
def central() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture(scope="session")
def inner() -> RecipientKey:
    return RecipientKey.generate()


@pytest.fixture(scope="session")
def inner_pq() -> RecipientKey:
    return RecipientKey.generate(pq=True)


@pytest.fixture(scope="session")
def other_inner() -> RecipientKey:
    return RecipientKey.generate()
