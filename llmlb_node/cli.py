"""The ``llmlb-node`` command: a thin shell over the library.

Exit codes: 0 ok, 1 other error (not installed, bad catalog, load failure), 2 usage (command
line, -o values, environment variables), 3 unsupported model, 4 download failed, 5 integrity
(also a download whose every tried source failed verification) or disk. 130 on Ctrl-C.
A reader that goes away (``llmlb-node models | head -1``) ends the command at once, quietly and
with 0, as ripgrep does. No input a user can type ends in a Python traceback; ``-v`` adds it
to the log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .envfile import load_envfile
from .errors import (
    CatalogError,
    ConfigurationError,
    InsufficientDiskSpaceError,
    IntegrityError,
    LlmlbError,
    ModelDownloadError,
    ModelLoadError,
    ModelNotInstalledError,
    UnsupportedModelError,
)
from .progress import LineProgress, ProgressEvent, TqdmProgress
from .redact import RedactingFilter, redact
from .resolver import ModelInfo, ModelResolver
from .settings import Settings
from .units import human_bytes

log = logging.getLogger("llmlb_node.cli")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNSUPPORTED, EXIT_DOWNLOAD, EXIT_INTEGRITY = 0, 1, 2, 3, 4, 5


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``llmlb-node`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())  # httpx's records too, not only ours
    try:
        load_envfile()  # $LLMLB_HOME/.env, beneath the process environment
        if args.command not in ("backend", "doctor"):
            Settings.from_env()  # a malformed LLMLB_* value: exit 2 now, before any work
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader gone shows here, not in the interpreter's final flush
        return code
    except BrokenPipeError:
        # Whoever read stdout took what they wanted (`| head`): stop quietly, with 0 like
        # ripgrep, so `set -o pipefail` scripts do not fail on it.
        _silence(sys.stdout)
        return EXIT_OK
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BaseException as exc:  # noqa: BLE001 - every error becomes one message and a code
        if isinstance(exc, SystemExit):
            raise
        return _fail(exc, _exit_code(exc))


def _exit_code(exc: BaseException) -> int:
    """The exit code for an error (see the module docstring)."""
    if isinstance(exc, ConfigurationError):
        return EXIT_USAGE
    if isinstance(exc, UnsupportedModelError):
        return EXIT_UNSUPPORTED
    if isinstance(exc, ModelDownloadError):
        return EXIT_INTEGRITY if exc.integrity else EXIT_DOWNLOAD
    if isinstance(exc, (IntegrityError, InsufficientDiskSpaceError)):
        return EXIT_INTEGRITY
    if isinstance(exc, (ModelNotInstalledError, CatalogError, ModelLoadError, LlmlbError)):
        return EXIT_ERROR
    if isinstance(exc, ValueError):  # bad -o values
        return EXIT_USAGE
    return EXIT_ERROR  # an unwritable store (OSError), or a bug: one line, no traceback


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmlb-node",
        description="Resolve, fetch, verify and run llama.cpp models by id.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the catalog: id, name, size, installed or not")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("pull", help="download and install a model")
    p.add_argument("model_id")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("path", help="print an installed model's path (never uses the network)")
    p.add_argument("model_id")
    p.set_defaults(func=cmd_path)

    p = sub.add_parser("rm", help="remove an installed model")
    p.add_argument("model_id")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("status", help="download status of one model or of all")
    p.add_argument("model_id", nargs="?")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "run",
        help="resolve, load and generate text, streamed to stdout",
        description="Resolve the model (downloading it if needed), load it with llama.cpp and "
        "stream the generated text to stdout. The -o options are checked against "
        "llama_cpp.Llama before anything is downloaded.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model_id", help="a catalog id (see `llmlb-node models`)")
    p.add_argument("prompt", help="the prompt (with --chat: the user message)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    p.add_argument(
        "--seed",
        type=int,
        default=-1,
        help="sampling seed; -1 draws a new one each run, any other value repeats a run "
        "(-o seed=N means the same)",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="use the model's chat template (needs an instruction-tuned model)",
    )
    p.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a llama_cpp.Llama keyword argument, e.g. -o n_ctx=4096 (repeatable); "
        "verbose=false unless given",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("doctor", help="platform, llama.cpp build, GPUs and the offload plan")
    p.add_argument("model_id", nargs="?", help="plan the offload for this model")
    p.add_argument(
        "--n-ctx", type=int, default=None, help="context length to plan for (default 512)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("serve", help="run the OpenAI-compatible inference node")
    p.add_argument("--host", help="address to listen on (LLMLB_NODE_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (LLMLB_NODE_PORT, default 8080)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("backend", help="rebuild llama-cpp-python for a GPU backend")
    bsub = p.add_subparsers(dest="backend_command", required=True, metavar="ACTION")
    bp = bsub.add_parser("install", help="pip-reinstall llama-cpp-python with a CMake preset")
    bp.add_argument("--preset", required=True, help="a preset of CMakePresets.json")
    bp.add_argument("--dry-run", action="store_true", help="print the command only")
    bp.set_defaults(func=cmd_backend_install)
    bp = bsub.add_parser("presets", help="list the CMake presets")
    bp.set_defaults(func=cmd_backend_presets)
    return parser


# -- commands --------------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> int:
    from .offload import node_platform

    resolver = ModelResolver()
    models = resolver.models()
    if args.json:
        print(json.dumps([m.to_dict() for m in models], indent=2))
        return EXIT_OK
    here = node_platform()
    _table(
        ["ID", "NAME", "SIZE", "INSTALLED", "RUNNABLE", "ARCH", "CATALOG"],
        [
            [
                m.id,
                m.name,
                _size(m.size_bytes),
                "yes" if m.installed else "-",
                _runnable_text(m, here),
                m.architecture or "-",
                _origin(m.catalog)
                + (f" (overrides {', '.join(map(_origin, m.overrides))})" if m.overrides else ""),
            ]
            for m in models
        ],
    )
    print(f"\ncatalog: {resolver.catalog.path}\nstore:   {resolver.settings.models_dir}")
    print(f"node:    {here} (this node runs GGUF models with llama.cpp)")
    return EXIT_OK


def _runnable_text(model: ModelInfo, here: str) -> str:
    if model.unusable:
        return f"no ({model.unusable})"
    if not model.runnable:
        return f"no ({model.format}/{model.engine})"
    if model.platforms and here not in model.platforms:
        return f"yes (not listed for {here})"
    return "yes"


def _origin(path: str) -> str:
    """A catalog file as the `models` table shows it: "packaged", or its path."""
    from .catalog import PACKAGED_CATALOG

    if path == str(PACKAGED_CATALOG):
        return "packaged"
    home = os.path.expanduser("~")
    return "~" + path[len(home) :] if path.startswith(home + os.sep) else path


def cmd_pull(args: argparse.Namespace) -> int:
    with ModelResolver() as resolver:
        resolved = resolver.resolve(args.model_id, progress=_progress_view())
    print(resolved.path)
    return EXIT_OK


def cmd_path(args: argparse.Namespace) -> int:
    print(ModelResolver().path(args.model_id))
    return EXIT_OK


def cmd_rm(args: argparse.Namespace) -> int:
    resolver = ModelResolver()
    if not resolver.remove(args.model_id):
        resolver.check_known(args.model_id)  # a typo: UnsupportedModelError (exit 3)
        _err(f"{args.model_id}: not installed; nothing to remove")  # like `rm -f`: exit 0
        return EXIT_OK
    print(f"removed {args.model_id}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    resolver = ModelResolver()
    result = resolver.status(args.model_id)
    statuses = result if isinstance(result, list) else [result]
    if args.model_id is not None and statuses[0].status == "missing":
        resolver.check_known(args.model_id)  # a typo: UnsupportedModelError with suggestions
    if args.json:
        data: Any = [s.to_dict() for s in statuses]
        print(redact(json.dumps(data if args.model_id is None else data[0], indent=2)))
        return EXIT_OK
    _table(
        ["ID", "STATUS", "PROGRESS", "SIZE", "ARCH", "DETAIL"],
        [
            [
                s.model_id,
                s.status,
                f"{s.progress:.0%}",
                _size(s.total_bytes),
                s.architecture or "-",
                _detail(s),
            ]
            for s in statuses
        ],
    )
    return EXIT_OK


def _detail(status: Any) -> str:
    if status.status == "interrupted":
        return f"stopped at {_size(status.downloaded_bytes)}; `llmlb-node pull` resumes it"
    return status.error_message or status.local_path or (status.source or "")


def cmd_run(args: argparse.Namespace) -> int:
    from .lazy import LazyLlama
    from .llamacpp import import_llama_cpp, llama_options

    # Everything a user typed is checked before any byte is downloaded.
    llama_cpp = import_llama_cpp()  # LlamaCppNotInstalledError names the install command
    options = llama_options(args.option, llama_cpp.Llama)
    options.setdefault("verbose", False)
    seed = options.pop("seed", args.seed)
    seed = None if seed is None or seed < 0 else seed  # None: llama_cpp draws one per call
    sampling: dict[str, Any] = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": seed if seed is not None else _random_seed(),
        "stream": True,
    }
    resolver = ModelResolver()
    resolver.check_known(args.model_id)  # an unknown id: exit 3 before loading anything
    llm = LazyLlama(args.model_id, resolver=resolver, progress=_progress_view(), **options)
    with resolver, llm:
        llm.prefetch()
        llm.load()
        _err(f"loaded {llm.model_path} ({llm.offload})")
        if args.chat:
            stream = llm.create_chat_completion(
                messages=[{"role": "user", "content": args.prompt}], **sampling
            )
            pieces = (c["choices"][0]["delta"].get("content", "") for c in stream)
        else:
            stream = llm.create_completion(args.prompt, **sampling)
            pieces = (c["choices"][0]["text"] for c in stream)
        # A reader gone (EPIPE) or Ctrl-C stops the loop mid-stream: the stream must end
        # (stop generating, free the model's lock) before `llm` closes, or the close refuses.
        with contextlib.closing(stream):
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
        sys.stdout.write("\n")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    missing = _missing_module("starlette", "uvicorn")
    if missing:
        _err(
            f"error: `llmlb-node serve` needs the server extra ({missing} is not installed): "
            "pip install 'llmlb-node[server]'"
        )
        return EXIT_USAGE
    from .server import ServerSettings, serve

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = ServerSettings.from_env(**overrides)
    if not args.verbose:
        logging.getLogger("llmlb_node").setLevel(logging.INFO)
    logging.getLogger().handlers[0].setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    serve(settings)
    return EXIT_OK


def _missing_module(*names: str) -> str | None:
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            return name
    return None


def _random_seed() -> int:
    # llama_cpp.Llama derives the seed of a call without one from its own fixed seed, so
    # every process would print the same text: draw a fresh one instead.
    import random

    return random.SystemRandom().randrange(2**31)


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import doctor_report, format_report

    if args.model_id:
        ModelResolver().catalog.get(args.model_id)  # an unknown id exits 3, as everywhere
    report = doctor_report(model_id=args.model_id, n_ctx=args.n_ctx)
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return EXIT_OK


def cmd_backend_install(args: argparse.Namespace) -> int:
    from .backend import get_preset, install_backend, shell_command

    get_preset(args.preset)  # an unknown preset is a usage error, listing the known ones
    if args.dry_run:
        print(shell_command(args.preset))
        return EXIT_OK
    return install_backend(args.preset)


def cmd_backend_presets(args: argparse.Namespace) -> int:
    from .backend import cmake_args, load_presets

    presets = load_presets()
    _table(
        ["PRESET", "CMAKE_ARGS", "DESCRIPTION"],
        [[p.name, cmake_args(p), p.description] for p in presets.values()],
    )
    return EXIT_OK


# -- helpers ---------------------------------------------------------------------------------
def _progress_view() -> Callable[[ProgressEvent], None]:
    if sys.stderr.isatty():
        return TqdmProgress(file=sys.stderr)
    return LineProgress(_err)


def _table(header: list[str], rows: list[list[Any]]) -> None:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for row in cells:
        print(redact("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip()))


def _size(n: int | None) -> str:
    return "?" if n is None else human_bytes(n)


def _err(message: str) -> None:
    try:
        print(redact(message), file=sys.stderr, flush=True)
    except BrokenPipeError:  # `2>&1 | head`: messages and progress go quiet, the work goes on
        _silence(sys.stderr)


def _silence(stream: Any) -> None:
    """Point a standard stream whose reader went away at /dev/null: what is still buffered, and
    anything logged later, goes nowhere instead of raising BrokenPipeError again."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _fail(exc: BaseException, code: int) -> int:
    if isinstance(exc, ModelDownloadError):
        _err(f"error: could not download {exc.model_id!r}; every source failed:")
        for failure in exc.failures:
            _err(f"  {failure.source}: [{failure.kind}] {failure.message}")
    elif isinstance(exc, (LlmlbError, ValueError, OSError)):
        _err(f"error: {exc}")
    else:  # not an error we raise on purpose: still one line, and -v logs the traceback
        log.debug("unexpected error", exc_info=exc)
        _err(f"error: unexpected {type(exc).__name__}: {exc} (run with -v for the traceback)")
    return code


if __name__ == "__main__":
    sys.exit(main())
