"""What every end-to-end test needs: an interpreter that runs the algorithms unprivileged."""

from __future__ import annotations

import pytest

from host_tools.demo import DemoError, worker_python


@pytest.fixture(autouse=True)
def _worker_interpreter() -> None:
    """Skip, naming the package, when no interpreter can run the algorithms unprivileged."""
    try:
        worker_python()
    except DemoError as e:
        pytest.skip(str(e))
