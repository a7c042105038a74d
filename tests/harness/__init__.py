"""Test harness: start real throwaway services (PostgreSQL, Redis, nginx, the app) on loopback.

Kept separate from fixtures so that any test module (or a benchmark script) can reuse the
helpers without pulling in pytest side effects; see :mod:`tests.harness.services`.
"""
