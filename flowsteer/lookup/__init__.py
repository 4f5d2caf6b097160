"""The lookup hook."""
