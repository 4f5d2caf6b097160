"""Commands of the lookup hook (sk_lookup dispatcher)."""
