"""Where the model's files come from: a local directory or the Hugging Face Hub.

Layout (same for both): `model.safetensors` (LM), `tokenizer-e351c8d8-checkpoint125.safetensors`
(Mimi), `tokenizer_spm_32k_3.model` (text), voices as `voices/*.pt` or `voices.tgz`, optionally
`personaplex_arch.json`. Every failure to get them becomes one sentence saying which and what to do.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.errors import ModelUnavailable

log = structlog.get_logger(__name__)

DEFAULT_HF_REPO = "nvidia/personaplex-7b-v1"
LM_FILE = "model.safetensors"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
TEXT_TOKENIZER_FILE = "tokenizer_spm_32k_3.model"
VOICES_ARCHIVE = "voices.tgz"
VOICES_DIR = "voices"


@dataclass(frozen=True)
class ModelFiles:
    root: Path | None  # the local directory, None for a Hub download spread over the HF cache
    lm: Path
    mimi: Path
    text_tokenizer: Path
    voices_dir: Path
    source: str  # for logs: "dir:/path" or "hf:repo"


def _hf_error_message(repo: str, exc: BaseException) -> str:
    from huggingface_hub import errors as hf_errors

    has_token = bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))
    if isinstance(exc, hf_errors.GatedRepoError):
        return (f"The licence of {repo} has not been accepted for this Hugging Face account: accept it on "
                f"the model page (https://huggingface.co/{repo}), then retry with that account's HF_TOKEN.")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, hf_errors.RepositoryNotFoundError) or status in (401, 403):
        if not has_token:
            return (f"{repo} needs a Hugging Face token: set HF_TOKEN to a token of an account that accepted "
                    f"the model licence, or pass --model-dir with local weights.")
        return (f"Hugging Face refused HF_TOKEN for {repo} (invalid token, or its account has not accepted "
                f"the licence): check the token and accept the licence on https://huggingface.co/{repo}.")
    if isinstance(exc, (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled, ConnectionError,
                        TimeoutError)) or "connect" in str(exc).lower():
        return (f"Cannot reach the Hugging Face Hub to download {repo} and it is not in the local cache: "
                f"connect this machine to the network, or copy the weights here and pass --model-dir.")
    if isinstance(exc, hf_errors.EntryNotFoundError):
        return f"{repo} lacks an expected file ({exc}); is this a PersonaPlex model repository?"
    return f"Downloading {repo} from the Hugging Face Hub failed: {exc}"


def _extract_voices(archive: Path, dest: Path) -> Path:
    """Unpack voices.tgz once, refusing members that would escape `dest`."""
    marker = dest / ".extracted"
    if marker.exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and Path(m.name).suffix in (".pt", ".wav")]
        for m in members:
            target = dest / Path(m.name).name  # flatten: voices are addressed by basename only
            src = tar.extractfile(m)
            if src is None:
                continue
            target.write_bytes(src.read())
    marker.write_text(str(archive))
    return dest


def _voices_in(root: Path, cache_dir: Path | None = None) -> Path:
    if (root / VOICES_DIR).is_dir():
        return root / VOICES_DIR
    if (root / VOICES_ARCHIVE).exists():
        dest = (cache_dir or root) / VOICES_DIR
        return _extract_voices(root / VOICES_ARCHIVE, dest)
    return root / VOICES_DIR  # may not exist: voice lookup reports it clearly


def local_model_files(model_dir: Path) -> ModelFiles:
    root = Path(model_dir).expanduser()
    if not root.is_dir():
        raise ModelUnavailable(f"--model-dir {root} is not a directory.")
    missing = [n for n in (LM_FILE, MIMI_FILE, TEXT_TOKENIZER_FILE) if not (root / n).exists()]
    if missing:
        raise ModelUnavailable(f"{root} is missing {', '.join(missing)}: a model directory needs the same files "
                               f"as the Hugging Face repo {DEFAULT_HF_REPO}.")
    return ModelFiles(root=root, lm=root / LM_FILE, mimi=root / MIMI_FILE,
                      text_tokenizer=root / TEXT_TOKENIZER_FILE, voices_dir=_voices_in(root),
                      source=f"dir:{root}")


def _hub_reachable(host: str = "huggingface.co") -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    import socket

    endpoint = os.environ.get("HF_ENDPOINT")
    if endpoint:
        from urllib.parse import urlparse

        host = urlparse(endpoint).hostname or host
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def hub_model_files(repo: str = DEFAULT_HF_REPO, revision: str | None = None) -> ModelFiles:
    """Download (or find in the HF cache) the model files; progress bars come from huggingface_hub."""
    from huggingface_hub import hf_hub_download

    token = os.environ.get("HF_TOKEN") or None
    # Without a route to the Hub, use the local HF cache only: fails fast instead of retrying.
    offline = not _hub_reachable()
    paths: dict[str, Path] = {}
    try:
        for name in (TEXT_TOKENIZER_FILE, MIMI_FILE, VOICES_ARCHIVE, LM_FILE):
            log.info("model_file_fetch", repo=repo, file=name, cache_only=offline)
            paths[name] = Path(hf_hub_download(repo, name, revision=revision, token=token,
                                               local_files_only=offline))
    except Exception as exc:  # huggingface_hub raises many kinds; all become one sentence
        raise ModelUnavailable(_hf_error_message(repo, exc)) from exc
    voices = _extract_voices(paths[VOICES_ARCHIVE], paths[VOICES_ARCHIVE].parent / VOICES_DIR)
    return ModelFiles(root=None, lm=paths[LM_FILE], mimi=paths[MIMI_FILE],
                      text_tokenizer=paths[TEXT_TOKENIZER_FILE], voices_dir=voices, source=f"hf:{repo}")


def resolve_model_files(model_dir: str | Path | None, hf_repo: str = DEFAULT_HF_REPO) -> ModelFiles:
    if model_dir:
        return local_model_files(Path(model_dir))
    return hub_model_files(hf_repo)
