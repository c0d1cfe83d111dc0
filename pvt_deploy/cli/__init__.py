"""The ``pvt-deploy`` command line.

Subcommands are imported only when invoked, so torch-free commands (predict, embed, features, info) never
load torch or onnx. Every ``PvtDeployError`` becomes one ``Error: ...`` line on stderr and its exit code.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from pvt_deploy import __version__
from pvt_deploy.errors import PvtDeployError

# name -> ("module:attribute", short help). Each area owns its own module under pvt_deploy/cli/; the short help
# is listed here so `pvt-deploy --help` imports nothing heavy.
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "download": ("pvt_deploy.cli.model_cmds:download", "Download a published checkpoint into the cache."),
    "export": ("pvt_deploy.cli.export_cmds:export", "Export a checkpoint to verified ONNX graphs."),
    "verify": ("pvt_deploy.cli.export_cmds:verify", "Compare an exported folder with PyTorch."),
    "predict": ("pvt_deploy.cli.runtime_cmds:predict", "Top-k labels for images (torch-free)."),
    "embed": ("pvt_deploy.cli.runtime_cmds:embed", "Write embeddings for files or folders (torch-free)."),
    "features": ("pvt_deploy.cli.runtime_cmds:features", "Write stage1..stage4 feature maps (torch-free)."),
    "info": ("pvt_deploy.cli.info_cmds:info", "Describe an exported folder and check its checksums."),
    "train": ("pvt_deploy.cli.train_cmds:train", "MMCR pretraining and fine-tuning."),
    "bench": ("pvt_deploy.cli.bench_cmds:bench", "Benchmark PyTorch against onnxruntime variants."),
    "conformance": (
        "pvt_deploy.cli.conformance_cmds:conformance",
        "Write preprocessing conformance vectors for other languages (torch-free).",
        (),
    ),
}


class LazyGroup(click.Group):
    """A click group whose subcommands live in other modules and load on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY_COMMANDS:
            module_name, attribute = LAZY_COMMANDS[cmd_name][0].split(":")
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                # e.g. `export` in a runtime-only install without torch; our own modules missing is a bug
                missing = exc.name or "a module"
                if missing.startswith("pvt_deploy"):
                    raise
                raise click.ClickException(
                    f"'{cmd_name}' needs {missing}, which is not installed; install pvt-deploy[export]"
                ) from None
            return getattr(module, attribute)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, LAZY_COMMANDS[name][1]) for name in sorted(LAZY_COMMANDS)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PvtDeployError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pvt-deploy")
def cli() -> None:
    """Export birder's PVT v2 classifier to ONNX, verify it against PyTorch, and run it without torch."""


def main() -> None:
    cli(prog_name="pvt-deploy")


if __name__ == "__main__":
    sys.exit(main())
