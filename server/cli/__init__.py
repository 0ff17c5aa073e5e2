"""`personaplex-agent`: every command of the process."""
