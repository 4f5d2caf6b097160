"""Unit-test settings: the ``mutate`` hypothesis profile that `make mutate` selects.

Mutation testing runs the unit tests once per mutant, so its property tests draw fewer examples, and
always the same ones (derandomized, no example database), which keeps the scores reproducible.
"""

from __future__ import annotations

from hypothesis import settings

settings.register_profile("mutate", max_examples=25, derandomize=True, database=None, deadline=None)
