"""torbridge: a git-annex P2P proxy behind a Tor onion service."""

__version__ = "0.1.0"
