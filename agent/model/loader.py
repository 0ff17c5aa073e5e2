"""Build Moshi's LM and Mimi from PersonaPlex files (moshi's own modules, our loading rules).

Rules that differ from `moshi.models.loaders.get_moshi_lm`:
- the depformer is always built with the agent's 8 codebooks: only depformer sets 0..7 can
  influence what the agent says or sounds like (sets 8..15 predict the caller, whose real codes
  always replace them). Checkpoints with 16 sets (the reference loader's layout) are sliced;
  checkpoints with 8 load as they are.
- bfloat16 on CUDA, float32 on CPU, unless told otherwise.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece
import structlog
import torch
from safetensors.torch import load_file

from agent.model.arch import AUDIO_CODEBOOKS, Architecture, load_architecture
from agent.errors import ModelUnavailable
from agent.model.files import ModelFiles

log = structlog.get_logger(__name__)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_device(name: str | None) -> torch.device:
    if not name or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailable(f"--device {name} was asked for but this torch sees no CUDA GPU; use --device cpu.")
    return dev


def count_depformer_sets(state: dict[str, torch.Tensor]) -> int:
    idx = [int(m.group(1)) for k in state if (m := re.match(r"linears\.(\d+)\.", k))]
    if not idx:
        raise ModelUnavailable("checkpoint has no depformer output layers (linears.N): not a Moshi LM")
    return max(idx) + 1


def slice_depformer(state: dict[str, torch.Tensor], keep: int) -> dict[str, torch.Tensor]:
    """Keep depformer sets 0..keep-1 of a checkpoint that has more.

    Per-step weights are stacked step-major in `self_attn.in_proj_weight`/`out_proj.weight`
    (moshi's load hook splits them as `weight.view(steps, -1, ...)`), so slicing rows keeps the
    first `keep` steps exactly.
    """
    have = count_depformer_sets(state)
    if have == keep:
        return state
    if have < keep:
        raise ModelUnavailable(f"checkpoint has {have} depformer sets, at least {keep} are needed")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = re.match(r"(linears|depformer_in)\.(\d+)\.", key)
        if m and int(m.group(2)) >= keep:
            continue
        m = re.match(r"depformer_emb\.(\d+)\.", key)
        if m and int(m.group(1)) >= keep - 1:
            continue
        m = re.match(r"depformer\.layers\.\d+\.gating\.(\d+)\.", key)
        if m and int(m.group(1)) >= keep:
            continue
        if re.match(r"depformer\.layers\.\d+\.self_attn\.(in_proj_weight|out_proj\.weight)$", key):
            rows = value.shape[0] // have
            value = value[: rows * keep]
        out[key] = value
    return out


@contextlib.contextmanager
def weights_not_initialised():
    """Build modules without drawing their initial weights (the checkpoint's replace them).

    On the meta device torch's `normal_` runs a Python reference implementation whose first
    call imports torch._dynamo: 1.9 s of every server start, for values nobody reads. The
    swap is process-wide while it lasts, which is fine at load time (nothing else builds
    modules then)."""
    names = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
             "xavier_uniform_", "xavier_normal_", "zeros_", "ones_", "constant_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def build_lm(path: Path, arch: Architecture, device: torch.device, dtype: torch.dtype):
    from moshi.models.lm import LMModel

    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:
        raise ModelUnavailable(f"cannot read LM weights {path}: {exc}") from exc
    state = slice_depformer(state, AUDIO_CODEBOOKS)
    kwargs = dict(arch.lm_kwargs)
    kwargs.pop("depformer_causal", None)  # deprecated in moshi
    kwargs["dep_q"] = AUDIO_CODEBOOKS
    # The delays cover text + 16 audio streams whatever dep_q is.
    with weights_not_initialised():
        model = LMModel(device=torch.device("meta"), dtype=dtype, **kwargs)
    for key, value in state.items():
        if value.dtype.is_floating_point:
            state[key] = value.to(dtype)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelUnavailable(f"LM weights {path} do not fit the architecture: {exc}") from exc
    model = model.to(device)
    model.eval()
    return model


def build_mimi(path: Path, arch: Architecture, device: torch.device):
    from moshi.models import loaders

    try:
        mimi = loaders.get_mimi(str(path), arch.mimi_config, device=device, num_codebooks=arch.num_codebooks)
    except Exception as exc:
        raise ModelUnavailable(f"cannot load Mimi weights {path}: {exc}") from exc
    mimi.eval()
    return mimi


@dataclass
class LoadedModel:
    """Everything the engine needs from a model: LM, codec, text tokenizer, voices."""

    lm: torch.nn.Module
    mimi: torch.nn.Module
    text_tokenizer: sentencepiece.SentencePieceProcessor
    arch: Architecture
    files: ModelFiles
    device: torch.device
    dtype: torch.dtype
    extra: dict = field(default_factory=dict)

    @property
    def sample_rate(self) -> int:
        return int(self.mimi.sample_rate)

    @property
    def frame_size(self) -> int:
        return int(self.mimi.sample_rate / self.mimi.frame_rate)

    @property
    def context(self) -> int:
        return int(self.arch.lm_kwargs.get("context") or 3000)


def load_model(files: ModelFiles, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, cpu_offload: bool = False) -> LoadedModel:
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = dtype or default_dtype(dev)
    arch = load_architecture(files.root)
    log.info("model_loading", source=files.source, device=str(dev), dtype=str(dt).removeprefix("torch."))
    # Offloading keeps the weights in host memory and streams them to the GPU per layer.
    lm = build_lm(files.lm, arch, torch.device("cpu") if cpu_offload else dev, dt)
    if cpu_offload:
        lm = _offload(lm, dev)
    mimi = build_mimi(files.mimi, arch, dev)
    try:
        tok = sentencepiece.SentencePieceProcessor(model_file=str(files.text_tokenizer))
    except Exception as exc:
        raise ModelUnavailable(f"cannot load text tokenizer {files.text_tokenizer}: {exc}") from exc
    log.info("model_loaded", source=files.source)
    return LoadedModel(lm=lm, mimi=mimi, text_tokenizer=tok, arch=arch, files=files, device=dev, dtype=dt)


def _offload(lm: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Keep the big transformer layers' weights in host memory, each layer loaded whole onto the
    device just for its forward (accelerate hooks). Whole layers, not leaf modules: moshi's gated
    feed-forward reads its Linear weights directly, which leaf-level hooks would not see."""
    try:
        from accelerate.hooks import AlignDevicesHook, add_hook_to_module
        from accelerate.utils import OffloadedWeightsLoader
    except ImportError as exc:  # pragma: no cover - accelerate is a declared dependency
        raise ModelUnavailable("--cpu-offload needs the 'accelerate' package (pip install accelerate).") from exc
    for name, module in lm.named_children():
        if name != "transformer":
            module.to(device)
    pin = device.type == "cuda"
    for layer in lm.transformer.layers:
        weights = {k: (v.detach().cpu().pin_memory() if pin else v.detach().cpu().clone())
                   for k, v in layer.state_dict().items()}
        add_hook_to_module(layer, AlignDevicesHook(execution_device=device, offload=True, io_same_device=True,
                                                   weights_map=OffloadedWeightsLoader(state_dict=weights),
                                                   place_submodules=True))
    for name, buf in lm.transformer.named_buffers(recurse=False):
        buf.data = buf.data.to(device)
    return lm
