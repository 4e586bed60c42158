"""The trio layer: listeners, sessions, git services."""
