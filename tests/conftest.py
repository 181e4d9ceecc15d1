import os
import sys

# Tests import helpers as ``tests.<module>`` regardless of where pytest is started.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

# The SeaweedFS fixtures (s3_server, s3_server_factory) for every test module. pytest only
# honours pytest_plugins in this top-level conftest; modules must not import them again.
pytest_plugins = ["tests.s3server"]


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> str:
    """One uninterrupted 2-process run of tests.launch's standard job, shared by the
    preemption tests (their final checkpoints must equal its final one bit for bit)."""
    from tests.launch import train

    run_dir = str(tmp_path_factory.mktemp("reference-run") / "run")
    train(run_dir)
    return run_dir
