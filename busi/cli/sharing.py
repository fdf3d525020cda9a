"""busi model, export, serve and report: a model and its results shown or handed on."""
from __future__ import annotations

from ..errors import BusiError
from .common import print_rule


def register(sub) -> None:
    p = sub.add_parser("serve", help="a local web page to try a checkpoint (needs: pip install -e \".[app]\")")
    p.add_argument("--checkpoint", help="checkpoint.pth (default: the bundled model, see `busi model`)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.set_defaults(run=serve)

    p = sub.add_parser("export", help="write a checkpoint as ONNX or TorchScript, preprocessing and class names inside")
    p.add_argument("--checkpoint", help="checkpoint.pth (default: the bundled model, see `busi model`)")
    p.add_argument("--format", required=True, help="onnx or torchscript")
    p.add_argument("--out", help="output file (default: beside the checkpoint, .onnx or .pt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(run=export)

    p = sub.add_parser("model", help="what the bundled model is, what to expect elsewhere, its decision rule")
    p.add_argument("--full", action="store_true", help="the whole card: data, recipe, figures, intended use and limits")
    p.set_defaults(run=model, needs_torch=False)

    p = sub.add_parser("report", help="rebuild report.html of a run folder from its files")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by train, cv or evaluate")
    p.set_defaults(run=report)


def model(args, cfg) -> int | None:
    from ..bundled import card_summary, card_text, for_terminal
    print(for_terminal(card_text()) if args.full else card_summary())


def serve(args, cfg) -> int | None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise BusiError('the web app needs Gradio: pip install -e ".[app]"') from None
    from ..app import serve
    serve(args.checkpoint, args.host, args.port)


def export(args, cfg) -> int | None:
    from ..export import export
    print(f"wrote {export(args.checkpoint, args.format, args.out, args.overwrite)}")
    print_rule(args.checkpoint, "its decision rule, kept in the file's metadata and applied by `busi predict`: ")


def report(args, cfg) -> int | None:
    from ..report import render
    print(f"wrote {render(args.run_dir)}")
