import os
import sys

# Tests import helpers as ``tests.<module>`` regardless of where pytest is started.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The SeaweedFS fixtures (s3_server, s3_server_factory) for every test module. pytest only
# honours pytest_plugins in this top-level conftest; modules must not import them again.
pytest_plugins = ["tests.s3server"]
