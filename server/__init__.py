"""The process an operator runs: runtime, config, public and ops HTTP, recording, TLS, the CLI."""
