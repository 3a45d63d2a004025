"""pytest plugin loaded into every mutant run (and the baseline) as `-p _mutants_pytest_plugin`.

It keeps the Hypothesis profile the suite loaded (HYPOTHESIS_PROFILE=ci: the same
examples, derandomized) and only drops the shrink phase and the example database: a
mutant is caught by the first failing example, and shrinking it can take minutes. The
runner copies this file next to (not into) the tree under test.
"""
import os


def pytest_configure(config):
    try:
        from hypothesis import Phase, settings
    except ImportError:  # pragma: no cover - the project's tests need hypothesis anyway
        return
    name = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    try:
        parent = settings.get_profile(name)   # registered by property_tests/conftest.py
    except Exception:
        parent = settings.default
    settings.register_profile("mutants", parent=parent, database=None,
                              phases=[Phase.explicit, Phase.reuse, Phase.generate])
    settings.load_profile("mutants")
