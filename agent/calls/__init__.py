"""The 80 ms call service: sessions, the scheduler's tick loop, starts, policy, ledger, per-call context, long calls."""
