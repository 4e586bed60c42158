"""The test harness (see the module list below)."""
