"""Tor integration for the daemon: publishing onion services, client
authorization, their health, Onionbalance. The private Tor network for
tests is the separate package ``torbridge.testnet``.

Submodules import stem themselves, lazily where they are used by the daemon;
importing this package costs nothing.
"""
