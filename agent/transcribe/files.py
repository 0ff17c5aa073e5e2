"""Where the caller transcriber's files come from: a local folder or the Hugging Face Hub.

A Kyutai STT repository (`kyutai/stt-1b-en_fr`) holds `config.json` (moshi's LM keyword
arguments plus `stt_config`, `mimi_name`, `tokenizer_name`, `moshi_name`), the LM weights, its
Mimi checkpoint and its sentencepiece tokenizer; the file names of the last three come from the
config. Downloads go through huggingface_hub with `HF_TOKEN` exactly as PersonaPlex's do
(`agent.model.files`): without a route to the Hub only the local cache is read, and every failure
becomes one sentence (`ModelUnavailable`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.errors import ModelUnavailable
from agent.model.files import ModelFiles, _hf_error_message, _hub_reachable

log = structlog.get_logger(__name__)

DEFAULT_STT_REPO = "kyutai/stt-1b-en_fr"
CONFIG_FILE = "config.json"
DEFAULT_LM_FILE = "model.safetensors"  # moshi's default when the config names none


@dataclass(frozen=True)
class SttFiles:
    config: Path
    lm: Path
    mimi: Path
    text_tokenizer: Path
    source: str  # for logs: "dir:/path", "hf:repo" or "demo:/path"


def _names(config: Path) -> tuple[str, str, str]:
    """(LM, Mimi, tokenizer) file names the config asks for."""
    try:
        raw = json.loads(config.read_text())
        return raw.get("moshi_name", DEFAULT_LM_FILE), raw["mimi_name"], raw["tokenizer_name"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelUnavailable(f"{config}: not a Kyutai STT config (needs mimi_name and tokenizer_name): {exc}") \
            from exc


def local_stt_files(folder: Path, source: str | None = None) -> SttFiles:
    root = Path(folder).expanduser()
    config = root / CONFIG_FILE
    if not config.exists():
        raise ModelUnavailable(f"{root} has no {CONFIG_FILE}: not a Kyutai STT model folder")
    lm, mimi, tok = (root / n for n in _names(config))
    missing = [p.name for p in (lm, mimi, tok) if not p.exists()]
    if missing:
        raise ModelUnavailable(f"{root} is missing {', '.join(missing)} (named by its {CONFIG_FILE})")
    return SttFiles(config=config, lm=lm, mimi=mimi, text_tokenizer=tok, source=source or f"dir:{root}")


def hub_stt_files(repo: str = DEFAULT_STT_REPO, revision: str | None = None) -> SttFiles:
    """Download (or find in the HF cache) a Kyutai STT model's files."""
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import hf_hub_download

    token = os.environ.get("HF_TOKEN") or None
    offline = not _hub_reachable()

    def fetch(name: str) -> Path:
        log.info("model_file_fetch", repo=repo, file=name, cache_only=offline)
        return Path(hf_hub_download(repo, name, revision=revision, token=token, local_files_only=offline))
    try:
        config = fetch(CONFIG_FILE)
        lm, mimi, tok = (fetch(n) for n in _names(config))
    except ModelUnavailable:
        raise
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled, ConnectionError,
            TimeoutError) as exc:
        raise ModelUnavailable(f"{repo} is not in the local Hugging Face cache and the Hub cannot be reached: "
                               "connect this machine once (the files are then cached), or set "
                               "transcript.caller: off") from exc
    except hf_errors.EntryNotFoundError as exc:
        raise ModelUnavailable(f"{repo} lacks an expected file ({exc}); is it a Kyutai STT repository?") from exc
    except Exception as exc:  # huggingface_hub raises many kinds; all become one sentence
        raise ModelUnavailable(_hf_error_message(repo, exc)) from exc
    return SttFiles(config=config, lm=lm, mimi=mimi, text_tokenizer=tok, source=f"hf:{repo}")


def caller_stt_files(persona: ModelFiles, hf_repo: str = DEFAULT_STT_REPO) -> SttFiles:
    """The STT that goes with this PersonaPlex model. The two share one Mimi encode, so they must
    share Mimi's weights: the built-in demo PersonaPlex (random Mimi) gets the built-in tiny
    STT made on that Mimi; a real PersonaPlex gets Kyutai's STT from the Hub."""
    from agent.transcribe.demo import demo_persona_dir, demo_stt_dir

    demo = demo_persona_dir(persona)
    if demo is not None:
        folder = demo_stt_dir(demo)
        return local_stt_files(folder, source=f"demo:{folder}")
    return hub_stt_files(hf_repo)
