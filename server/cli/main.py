"""`personaplex-agent` command line: offline evaluation, personas tools, the server, call campaigns."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import structlog

from agent.errors import AgentError
from server.logging_setup import configure_logging

log = structlog.get_logger(__name__)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model-dir", type=Path, help="local model directory (same layout as the HF repo)")
    g.add_argument("--hf-repo", default=None, help="Hugging Face repo (default nvidia/personaplex-7b-v1; needs HF_TOKEN)")
    g.add_argument("--demo-model", action="store_true", help="use the built-in tiny demo model (no weights needed)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--cpu-offload", action="store_true", help="keep LM layers in host memory (needs accelerate)")


def open_model(args: argparse.Namespace):
    from agent.model.files import DEFAULT_HF_REPO, resolve_model_files
    from agent.model.loader import load_model

    if getattr(args, "demo_model", False):
        from agent.model.demo import demo_model_dir

        files = resolve_model_files(demo_model_dir())
    else:
        files = resolve_model_files(args.model_dir, args.hf_repo or DEFAULT_HF_REPO)
    return load_model(files, device=args.device, cpu_offload=args.cpu_offload)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    from agent.model.sampling_params import SamplingParams

    g = p.add_argument_group("sampling")
    d = SamplingParams()  # the defaults' one place
    g.add_argument("--temp-audio", type=float, default=d.temp_audio)
    g.add_argument("--temp-text", type=float, default=d.temp_text)
    g.add_argument("--topk-audio", type=int, default=d.topk_audio)
    g.add_argument("--topk-text", type=int, default=d.topk_text)
    g.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def cmd_offline(args: argparse.Namespace) -> int:
    from agent.offline.evaluate import offline_files
    from agent.model.sampling import SamplingParams

    try:
        sampling = SamplingParams(greedy=args.greedy, temp_audio=args.temp_audio, temp_text=args.temp_text,
                                  topk_audio=args.topk_audio, topk_text=args.topk_text)
    except ValueError as exc:  # pydantic's ValidationError: a bound the model sets
        err = exc.errors()[0]
        raise SystemExit(f"error: --{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None
    model = open_model(args)
    seed = None if args.seed is None or args.seed < 0 else args.seed
    offline_files(model, args.input_wav, args.output_wav, args.output_text, args.voice_prompt, args.text_prompt,
                  sampling, seed, tokens_out=args.tokens_out, progress=sys.stderr.isatty(),
                  context_policy=args.context_policy, reprime_keep_s=args.reprime_keep_s)
    return 0


def cmd_voices(args: argparse.Namespace) -> int:
    from agent.model.voices import available_voices

    model = open_model(args)
    if args.voices_command == "list":
        for name in available_voices(model.files.voices_dir):
            sys.stdout.write(f"{name}\n")
        return 0
    from agent.model.engine import Engine
    from agent.model.voice_record import record_voice_prompt, save_voice_pt

    with Engine(model, 1) as engine:  # encodes the wav (-24 LUFS, Mimi) like a custom wav voice
        codes = engine.voice(str(args.wav), allow_paths=True).codes
    save_voice_pt(record_voice_prompt(model.lm, codes, args.out.stem), args.out)
    sys.stdout.write(f"wrote {args.out} ({codes.shape[0]} frames); use it as a persona's voice: {args.out}\n")
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    from agent.model.demo import demo_model_dir

    sys.stdout.write(f"{demo_model_dir()}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="personaplex-agent", description=__doc__)
    p.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    p.add_argument("--log-level", default="info")
    sub = p.add_subparsers(dest="command", required=True)

    off = sub.add_parser("offline", help="run the model over a wav file (wav in, wav + text out)")
    _add_model_args(off)
    _sampling_args(off)
    off.add_argument("--voice-prompt", required=True, help="voice name (NATF2, NATF2.pt) or a .pt/.wav path")
    off.add_argument("--text-prompt", default="You are a wise and friendly teacher. Answer questions or provide "
                     "advice in a clear and engaging way.")
    off.add_argument("--input-wav", required=True, type=Path)
    off.add_argument("--output-wav", required=True, type=Path)
    off.add_argument("--output-text", type=Path, help="JSON list of text pieces, one per frame")
    off.add_argument("--tokens-out", type=Path, help="npy of output tokens [frames, 17]")
    off.add_argument("--context-policy", choices=["reprime", "slide", "hangup"], default="reprime",
                     help="past the model's context (240 s): rebuild it from the prompt and the latest frames "
                          "(default), let the prompt slide out, or stop the agent (silence)")
    off.add_argument("--reprime-keep-s", type=float, default=None,
                     help="conversation a re-prime keeps (default: what leaves a third of the context free)")
    off.set_defaults(func=cmd_offline)

    vo = sub.add_parser("voices", help="list a model's voices, or make a .pt voice prompt from a recording")
    vsub = vo.add_subparsers(dest="voices_command", required=True)
    vl = vsub.add_parser("list", help="voices the model has")
    _add_model_args(vl)
    vl.set_defaults(func=cmd_voices)
    vm = vsub.add_parser("make", help="record a custom voice prompt (.pt) from a wav: calls start faster "
                         "than with the wav itself")
    _add_model_args(vm)
    vm.add_argument("wav", type=Path)
    vm.add_argument("out", type=Path)
    vm.set_defaults(func=cmd_voices)

    dm = sub.add_parser("demo-model", help="build (if needed) the tiny demo model and print its folder")
    dm.set_defaults(func=cmd_demo_model)

    from server.cli import campaign as campaign_cli
    from server.cli import personas as personas_cli
    from server.cli import serve as server_cli

    personas_cli.register(sub)
    server_cli.register(sub)
    campaign_cli.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    try:
        return int(args.func(args) or 0)
    except AgentError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
