"""The model: architecture, files, loading, the demo model, Mimi, the batched generator, prefill, prompts, voices, the engine."""
