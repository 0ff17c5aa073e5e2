"""What the personas CLI and the server share: finding a tokenizer and the prompt-length rule."""

from __future__ import annotations

from pathlib import Path

from agent.personas.schema import Persona, RenderedPrompt
from agent.model.prompt import SILENCE_FRAMES, tokenize_prompt


def find_tokenizer(model_dir: Path | None):
    """The text tokenizer of `model_dir`, else of the 7B model if it is in the local HF cache."""
    import sentencepiece

    from agent.model.files import DEFAULT_HF_REPO, TEXT_TOKENIZER_FILE

    path = None
    if model_dir is not None and (Path(model_dir) / TEXT_TOKENIZER_FILE).exists():
        path = Path(model_dir) / TEXT_TOKENIZER_FILE
    else:
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(DEFAULT_HF_REPO, TEXT_TOKENIZER_FILE, local_files_only=True))
        except Exception:
            return None
    return sentencepiece.SentencePieceProcessor(model_file=str(path))


def voice_steps(voices_dir: Path | None, voice: str) -> int:
    """Prompt steps a voice takes (0 when unknown): a `.pt` voice one more than its embeddings
    (see `VoicePrompt.prompt_steps`), a custom wav one per started 80 ms frame of its audio."""
    candidates = [Path(voice)] if ("/" in voice or voice.endswith(".wav")) else (
        [voices_dir / f"{voice}.pt"] if voices_dir else [])
    for p in candidates:
        if not p.is_file():
            continue
        try:
            if p.suffix == ".pt":
                import torch  # here only: the personas CLI and its unit tests stay torch-free

                return int(torch.load(p, map_location="cpu", weights_only=True)["embeddings"].shape[0]) + 1
            if p.suffix == ".wav":
                from agent.audio_io import read_audio
                from agent.timebase import FRAME, SAMPLE_RATE

                return -(-len(read_audio(p, SAMPLE_RATE)) // FRAME)
        except Exception:
            return 0
    return 0


def prompt_budget(context: int, voice_steps: int) -> int:
    """Text tokens a prompt may have: the context minus the voice, the silences and one step."""
    return context - 1 - 2 * SILENCE_FRAMES - voice_steps


def fit_to_budget(persona: Persona, values: dict[str, str], count_tokens, budget: int) -> RenderedPrompt:
    """The persona rendered for one call, information items dropped from the end until it fits
    `budget` tokens (a long CRM answer costs facts, never the call)."""
    rendered = persona.render(values)
    kept = persona.list_items - rendered.items_left_out
    while count_tokens(rendered.text) > budget and kept > 0:
        kept -= 1
        rendered = persona.render(values, max_items=kept)
    return rendered


def make_prompt_limit(tokenizer, context: int, voices_dir: Path | None):
    """A `PromptLimit` for the registry: (tokens, allowed tokens) of a persona's prompt."""
    if tokenizer is None:
        return None
    cache: dict[str, int] = {}

    def limit(p: Persona) -> tuple[int, int]:
        if p.voice not in cache:
            cache[p.voice] = voice_steps(voices_dir, p.voice)
        tokens = len(tokenize_prompt(tokenizer, p.prompt))
        return tokens, prompt_budget(context, cache[p.voice])

    return limit
