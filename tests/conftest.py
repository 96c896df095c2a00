"""Suite-wide settings."""

import pytest
from hypothesis import HealthCheck, settings

# Machines here are shared and noisy: generating examples can be slow for
# reasons that have nothing to do with the code under test.  Timing is never
# what a property test checks.
settings.register_profile("hivemind", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("hivemind")


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server of the test's own (tests/redis_server.py); a sync
    fixture, so a skip (no binary) keeps its reason."""
    from tests.redis_server import RedisServer, redis_binary

    server = RedisServer(redis_binary(), tmp_path)
    server.start()
    yield server
    server.stop()
