"""The entry node users talk to (in progress)."""
