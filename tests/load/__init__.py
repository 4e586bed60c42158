"""Load tests: many sessions and a pre-auth flood against one real daemon.

See :mod:`tests.harness.profiles` for the CI and the long profile
(``TORBRIDGE_LOAD=long``) and ``bench/bench_load.py`` for the stand-alone bench.
"""
