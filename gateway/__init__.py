"""Switchboard's deployable edge server: listeners, auth, the CLI and the client SDK."""
__version__ = "0.1.0"
