"""The TOML configuration file: parsing and validation, no side effects.

Every error is a ``ConfigError`` with one line naming the file and the key, so
the daemon and the CLI can print it as it is. Unknown keys are errors: a typo
such as ``idle_timout`` must not silently fall back to a default.

model.py holds what a configuration is (the dataclasses and their limits),
parse.py reads a file into it (``load_config``), dump.py writes one out
(``dump_config``, for ``torbridge init``).
"""

from torbridge.config.dump import dump_config
from torbridge.config.model import (
    LOG_FORMATS,
    ONION_RE,
    OWN_REPOSITORY,
    UNIX_PATH_MAX,
    Balance,
    Config,
    ConfigError,
    Expose,
    Limits,
    Tor,
    no_limit_if_zero,
)
from torbridge.config.parse import load_config

__all__ = [
    "LOG_FORMATS",
    "ONION_RE",
    "OWN_REPOSITORY",
    "UNIX_PATH_MAX",
    "Balance",
    "Config",
    "ConfigError",
    "Expose",
    "Limits",
    "Tor",
    "dump_config",
    "load_config",
    "no_limit_if_zero",
]
