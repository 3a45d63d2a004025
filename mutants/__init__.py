"""Mutation catalogue: deliberate one-line bugs, each of which the tests must catch.

`mutants.catalogue.CATALOGUE` lists the mutants (file, exact old text, replacement, the
pytest targets that should catch it); `python -m mutants` (or `make mutants`) applies
each to a fresh copy of the working tree, runs its targets there and reports which were
caught. Results: docs/mutants.md and docs/mutants.json (generated, never edited by hand).
"""
from .catalogue import CATALOGUE, Mutant

__all__ = ["CATALOGUE", "Mutant"]
