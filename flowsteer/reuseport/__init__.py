"""The reuseport hook."""
