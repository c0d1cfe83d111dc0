"""The ``pvt-deploy`` command line.

Subcommands are imported only when invoked, so torch-free commands (predict, embed, features, info) never
load torch or onnx. Every ``PvtDeployError`` becomes one ``Error: ...`` line on stderr and its exit code.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import click

from pvt_deploy import __version__
from pvt_deploy.errors import MissingExtraError, PvtDeployError, UsageError
from pvt_deploy.staging import sticky_interrupts

if TYPE_CHECKING:
    from pvt_deploy.runtime.config import RuntimeConfig

# name -> ("module:attribute", short help, extras it needs). Each area owns its own module under pvt_deploy/cli/; the
# short help is listed here so `pvt-deploy --help` imports nothing heavy, and the extras turn a missing package into
# one line naming what to install (tests/test_extras.py checks them against every import the command reaches).
LAZY_COMMANDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "download": ("pvt_deploy.cli.model_cmds:download", "Download a published checkpoint into the cache.", ()),
    "export": ("pvt_deploy.cli.export_cmds:export", "Export a checkpoint to verified ONNX graphs.", ("export",)),
    "verify": ("pvt_deploy.cli.export_cmds:verify", "Compare an exported folder with PyTorch.", ("export",)),
    "predict": ("pvt_deploy.cli.runtime_cmds:predict", "Top-k labels for images (torch-free).", ("bulk", "ray")),
    "embed": (
        "pvt_deploy.cli.runtime_cmds:embed",
        "Embeddings of many images, resumable (torch-free).",
        ("bulk", "ray"),
    ),
    "features": (
        "pvt_deploy.cli.runtime_cmds:features",
        "Write stage1..stage4 feature maps (torch-free).",
        ("bulk", "ray"),
    ),
    "info": ("pvt_deploy.cli.info_cmds:info", "Describe an exported folder and check its checksums.", ()),
    "train": ("pvt_deploy.cli.train_cmds:train", "MMCR pretraining and fine-tuning.", ("train",)),
    "bench": (
        "pvt_deploy.cli.bench_cmds:bench",
        "Benchmark PyTorch against onnxruntime variants.",
        ("export", "bench"),
    ),
    "serve": (
        "pvt_deploy.cli.serve_cmds:serve",
        "HTTP inference service: JSON, KServe v2, a web page (torch-free).",
        ("serve", "ray"),
    ),
    "index": ("pvt_deploy.cli.search_cmds:index", "Build a search store (LanceDB) from embeddings.", ("bulk",)),
    "search": ("pvt_deploy.cli.search_cmds:search", "Nearest stored images for query images.", ("bulk",)),
    "duplicates": ("pvt_deploy.cli.search_cmds:duplicates", "Near-duplicate pairs in a search store.", ("bulk",)),
    "conformance": (
        "pvt_deploy.cli.conformance_cmds:conformance",
        "Write preprocessing conformance vectors for other languages (torch-free).",
        (),
    ),
}


DISTRIBUTION_OF = {
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "onnxruntime": "onnxruntime-gpu",
    "multipart": "python-multipart",
    "grpc": "grpcio",
    "google": "protobuf",  # google.protobuf: the gRPC stubs' messages
}
"""Import name -> distribution name, where they differ (else ``_`` becomes ``-``)."""


def distribution_of(module: str) -> str:
    return DISTRIBUTION_OF.get(module, module).lower().replace("_", "-")


def _extras_listing(distribution: str, extras: tuple[str, ...]) -> tuple[str, ...]:
    """Which of ``extras`` require ``distribution``, from the installed package's own metadata."""
    try:
        requirements = importlib.metadata.requires("pvt-deploy") or []
    except importlib.metadata.PackageNotFoundError:
        return ()
    found = []
    for requirement in requirements:
        name = re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        extra = re.search(r"extra\s*==\s*[\"']([^\"']+)", requirement)
        if name == distribution and extra and extra.group(1) in extras and extra.group(1) not in found:
            found.append(extra.group(1))
    return tuple(found)


def missing_extra(command: str, exc: ModuleNotFoundError) -> MissingExtraError:
    """One line naming the extra to install, for a third-party module that is not there. Our own modules missing
    is a packaging bug and is re-raised as it is."""
    missing = (exc.name or "").split(".")[0]
    if not missing or missing == "pvt_deploy":
        raise exc
    declared = LAZY_COMMANDS.get(command, ("", "", ()))[2]
    extras = _extras_listing(distribution_of(missing), declared) or declared
    if not extras:
        return MissingExtraError(f"`pvt-deploy {command}` needs {missing}, which is not installed")
    spec = ",".join(extras)
    noun = "extra" if len(extras) == 1 else "extras"
    return MissingExtraError(
        f"`pvt-deploy {command}` needs the [{spec}] {noun} ({missing} is not installed): {install_hint(spec)}"
    )


def install_hint(extras: str) -> str:
    """How to add ``extras``: from the package index, and (the form that works there) from a source checkout."""
    return f"pip install 'pvt-deploy[{extras}]' (from a source checkout: pip install -e '.[{extras}]')"


def runtime_config(option_names: Mapping[str, str] | None = None, **fields: Any) -> RuntimeConfig:
    """``RuntimeConfig(**fields)`` from a command's options. A value it refuses (``--threads`` above the CPUs'
    bound) is one ``UsageError`` naming the option: ``--`` and the field's name, unless ``option_names`` maps the
    field to the command's own option (``{"batch_size": "--max-batch"}``)."""
    from pvt_deploy.runtime.config import RuntimeConfig  # lazily: `pvt-deploy --help` imports nothing heavy

    try:
        return RuntimeConfig(**fields)
    except ValueError as exc:
        field, _, rest = str(exc).partition(" ")
        option = (option_names or {}).get(field, f"--{field.replace('_', '-')}")
        raise UsageError(f"{option} {rest}") from None


class LazyGroup(click.Group):
    """A click group whose subcommands live in other modules and load on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY_COMMANDS:
            module_name, attribute = LAZY_COMMANDS[cmd_name][0].split(":")
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:  # e.g. `export` in a runtime-only install without torch
                error = missing_extra(cmd_name, exc)
                click.echo(f"Error: {error}", err=True)
                ctx.exit(error.exit_code)
            return getattr(module, attribute)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, LAZY_COMMANDS[name][1]) for name in sorted(LAZY_COMMANDS)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with sticky_interrupts():  # a Ctrl-C that a library swallows (onnxsim's C++) still ends in exit 130
                return super().invoke(ctx)
        except PvtDeployError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except ModuleNotFoundError as exc:  # a command importing its extra's packages only when it runs
            error = missing_extra(ctx.invoked_subcommand or "", exc)
            click.echo(f"Error: {error}", err=True)
            ctx.exit(error.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pvt-deploy")
def cli() -> None:
    """Export birder's PVT v2 classifier to ONNX, verify it against PyTorch, and run it without torch."""


def main() -> None:
    try:
        cli(prog_name="pvt-deploy")
    except SystemExit as exc:
        if exc.code == 130:
            # once an interrupt has passed through C code (torch's start-up, onnxsim), CPython ends the process with
            # SIGINT at exit, which shells see as 130 but a parent process as -2; exit with 130 itself instead
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        raise


if __name__ == "__main__":
    sys.exit(main())
