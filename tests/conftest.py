import os

# Without a GPU the Triton kernels run in Triton's interpreter. This must be set before
# triton is imported anywhere.
if not os.environ.get("TRITON_INTERPRET"):
    try:
        import torch as _torch
        if not _torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI: a fixed example set (reproducible failures); locally: fresh draws every run.
settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(autouse=True)
def _nan_fill_empty(monkeypatch):
    """Fill torch.empty allocations with NaN, so a kernel that reads memory it never wrote fails."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(fn):
        def wrapper(*a, **kw):
            t = fn(*a, **kw)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return wrapper

    monkeypatch.setattr(torch, "empty", poisoned(real_empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(real_empty_like))
    yield
