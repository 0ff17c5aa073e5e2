"""What a stranger meets before a call is admitted: call tokens, per-client limits, replay stores, secrets."""
