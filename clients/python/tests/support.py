"""Helpers the test modules share (pytest puts this directory on sys.path)."""

from __future__ import annotations

import random
import uuid

#: Seconds any call may take unless a test says otherwise.
TIMEOUT = 10.0


def unique_email(tag: str = "py") -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}@example.com"


def random_id() -> int:
    """A large client-chosen id that no other test (or run) is likely to use."""
    return random.randint(2**40, 2**63 - 1)
