"""Audio at the transports' edge: capture, playout, pacing, G.711/L16."""
