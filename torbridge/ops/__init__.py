"""Operating torbridge on a host: systemd notification, ``doctor``, ``init``."""
