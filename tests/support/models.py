"""Model folders for tests: the demo model with another architecture setting, weights shared."""

from __future__ import annotations

import json
from pathlib import Path


def small_context_dir(demo_dir: Path, dest: Path, context: int) -> Path:
    """The demo model with a `context`-frame context (its files linked, not copied), so a test
    call crosses the context within seconds."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in demo_dir.iterdir():
        if p.name != "personaplex_arch.json" and not (dest / p.name).exists():
            (dest / p.name).symlink_to(p.resolve())
    arch = json.loads((demo_dir / "personaplex_arch.json").read_text())
    arch["lm_kwargs"]["context"] = context
    (dest / "personaplex_arch.json").write_text(json.dumps(arch))
    return dest
