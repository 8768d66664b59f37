"""The ``llmlb-node`` command: a thin shell over the library.

Exit codes: 0 ok, 1 other error (not installed, bad catalog, load failure), 2 usage,
3 unsupported model, 4 download failed, 5 integrity or disk.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .errors import (
    CatalogError,
    InsufficientDiskSpaceError,
    IntegrityError,
    LlmlbError,
    ModelDownloadError,
    ModelLoadError,
    ModelNotInstalledError,
    UnsupportedModelError,
)
from .progress import LineProgress, ProgressEvent, TqdmProgress
from .resolver import ModelResolver
from .units import human_bytes

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNSUPPORTED, EXIT_DOWNLOAD, EXIT_INTEGRITY = 0, 1, 2, 3, 4, 5


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``llmlb-node`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except UnsupportedModelError as exc:
        return _fail(exc, EXIT_UNSUPPORTED)
    except ModelDownloadError as exc:
        _err(f"error: could not download {exc.model_id!r}; every source failed:")
        for failure in exc.failures:
            _err(f"  {failure.source}: [{failure.kind}] {failure.message}")
        return EXIT_DOWNLOAD
    except (IntegrityError, InsufficientDiskSpaceError) as exc:
        return _fail(exc, EXIT_INTEGRITY)
    except (ModelNotInstalledError, CatalogError, ModelLoadError, LlmlbError) as exc:
        return _fail(exc, EXIT_ERROR)
    except ValueError as exc:  # bad settings in the environment, bad -o values
        return _fail(exc, EXIT_USAGE)
    except OSError as exc:  # an unwritable or misplaced store: say so, no traceback
        return _fail(exc, EXIT_ERROR)
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


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

    p = sub.add_parser("run", help="resolve, load and generate text, streamed to stdout")
    p.add_argument("model_id")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--chat", action="store_true", help="use the model's chat template")
    p.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a llama_cpp.Llama keyword argument, e.g. -o n_ctx=4096 (repeatable)",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("doctor", help="platform, llama.cpp build, GPUs and the offload plan")
    p.add_argument("model_id", nargs="?", help="plan the offload for this model")
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
    resolver = ModelResolver()
    rows = []
    for entry in resolver.catalog:
        installed = resolver.installed(entry.id)
        rows.append(
            {
                "id": entry.id,
                "name": entry.name,
                "size_bytes": entry.total_size,
                "installed": installed is not None,
                "path": str(installed.path) if installed else None,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    _table(
        ["ID", "NAME", "SIZE", "INSTALLED"],
        [
            [r["id"], r["name"], _size(r["size_bytes"]), "yes" if r["installed"] else "-"]
            for r in rows
        ],
    )
    print(f"\ncatalog: {resolver.catalog.path}\nstore:   {resolver.settings.models_dir}")
    return EXIT_OK


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
        _err(f"{args.model_id}: not installed")
        return EXIT_ERROR
    print(f"removed {args.model_id}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    resolver = ModelResolver()
    result = resolver.status(args.model_id)
    statuses = result if isinstance(result, list) else [result]
    if (
        args.model_id is not None
        and statuses[0].status == "missing"
        and args.model_id not in resolver.catalog
    ):
        resolver.catalog.get(args.model_id)  # a typo: UnsupportedModelError with suggestions
    if args.json:
        data: Any = [s.to_dict() for s in statuses]
        print(json.dumps(data if args.model_id is None else data[0], indent=2))
        return EXIT_OK
    _table(
        ["ID", "STATUS", "PROGRESS", "SIZE", "DETAIL"],
        [
            [
                s.model_id,
                s.status,
                f"{s.progress:.0%}",
                _size(s.total_bytes),
                s.error_message or s.local_path or (s.source or ""),
            ]
            for s in statuses
        ],
    )
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from .lazy import LazyLlama

    options = dict(_parse_option(o) for o in args.option)
    options.setdefault("verbose", False)
    llm = LazyLlama(args.model_id, progress=_progress_view(), **options)
    with llm:
        llm.prefetch()
        llm.load()
        _err(f"loaded {llm.model_path} ({llm.offload})")
        if args.chat:
            stream = llm.create_chat_completion(
                messages=[{"role": "user", "content": args.prompt}],
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                stream=True,
            )
            pieces = (c["choices"][0]["delta"].get("content", "") for c in stream)
        else:
            stream = llm.create_completion(
                args.prompt,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                stream=True,
            )
            pieces = (c["choices"][0]["text"] for c in stream)
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


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import doctor_report, format_report

    required = None
    if args.model_id:
        required = ModelResolver().catalog.get(args.model_id).required_memory_bytes
    report = doctor_report(required_memory_bytes=required, model_id=args.model_id)
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


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"-o expects KEY=VALUE, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = {"true": True, "false": False, "none": None}.get(raw.lower(), raw)
    return key.strip(), value


def _table(header: list[str], rows: list[list[Any]]) -> None:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())


def _size(n: int | None) -> str:
    return "?" if n is None else human_bytes(n)


def _err(message: str) -> None:
    print(message, file=sys.stderr)


def _fail(exc: BaseException, code: int) -> int:
    _err(f"error: {exc}")
    return code


if __name__ == "__main__":
    sys.exit(main())
