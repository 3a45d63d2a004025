"""Hypothesis profiles shared by every suite.

`ci` keeps the CPU run (Triton under TRITON_INTERPRET=1) within a few minutes;
`thorough` runs many more examples; `gpu` is for a native GPU run with larger shapes.
Select with HYPOTHESIS_PROFILE (the Makefile passes PROFILE).
"""
import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough", max_examples=400, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "gpu", max_examples=60, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
