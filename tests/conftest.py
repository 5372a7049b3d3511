import os

import pytest
from hypothesis import HealthCheck, settings

# "ci" is derandomised so a CI failure reproduces; "device" draws more, fresh examples.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=50,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("device", deadline=None, max_examples=120,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _gpu_reason():
    from portattn.arch.detect import gpu_status
    ok, why = gpu_status()
    return None if ok else why


_REASON = _gpu_reason()


def pytest_collection_modifyitems(config, items):
    if _REASON is None:
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU: {_REASON}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
