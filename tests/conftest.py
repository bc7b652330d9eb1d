"""Shared test settings: every hypothesis test runs at least 50 examples, with no deadline on a slow CPU."""
import os

from hypothesis import settings

settings.register_profile("ci", max_examples=50, deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
