"""Tor integration: publishing onion services, and a private Tor network for tests.

Submodules import stem themselves, lazily where they are used by the daemon;
importing this package costs nothing.
"""
