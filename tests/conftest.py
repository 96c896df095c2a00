"""Suite-wide settings."""

from hypothesis import HealthCheck, settings

# Machines here are shared and noisy: generating examples can be slow for
# reasons that have nothing to do with the code under test.  Timing is never
# what a property test checks.
settings.register_profile("hivemind", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("hivemind")
