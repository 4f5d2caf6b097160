"""The divert hook."""
