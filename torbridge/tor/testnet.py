"""Moved: the private Tor network is the package ``torbridge.testnet``."""

from torbridge.testnet import *  # noqa: F403
from torbridge.testnet import __all__ as __all__
from torbridge.testnet.cli import cli_main as cli_main
