"""What protects a public agent: signed call tokens, per-client limits, the client's address."""
