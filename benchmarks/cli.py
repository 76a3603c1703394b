"""`medblip-bench SUITE ...` (also `python -m medblip_edge.cli_bench SUITE ...`): one group over the suites,
each loaded only when named. Options before any suite name (the pipeline benchmark's command line before
the suites existed, `medblip-bench --preset small --out DIR`) run the `pipeline` suite."""

from __future__ import annotations

import importlib
import shlex

import click

COMMAND = "medblip_edge.bench.command"  # ctx.meta key: the command line as typed, read by suite.py

# name -> (module in this package, the one line `medblip-bench --help` shows for it)
SUITES = {
    "pipeline": ("pipeline", "Every stage, backend and precision against the reference"),
    "decode-formats": ("decode_formats", "The decode step per graph form and weight format"),
    "vision-forms": ("vision_forms", "The ViT's training forms against its fused forms"),
    "gunzip": ("gunzip", "Gzip inflate and NIfTI read with zlib and zlib-ng"),
    "serve-load": ("serve_load", "medblip-serve under load beside the in-process pipeline"),
    "ray-cohort": ("ray_cohort", "A cohort through --engine ray beside the local engine"),
    "export-quality": ("export_quality", "Export fidelity to fp32 per LLM format and vision graph"),
    "node-load": ("node_load", "medblip-node with several senders at once, each study answered once"),
    "known-answer": ("known_answer", "Known-answer models: each format's accuracy against fp32 (medblip-eval)"),
    "qc": ("qc", "OOD score and conform step on synthetic cohorts with a known answer"),
    "explain": ("explain_cost", "Time and peak memory of --explain per model size"),
    "explain-checks": ("explain_checks", "Pointing game, randomisation and deletion on known-answer bundles"),
    "quantization": ("quantization", "INT8/INT4 exports held to a tolerance, fallbacks and quantizers"),
}


class BenchGroup(click.Group):
    """The suites, loaded lazily; `errors` wraps the invocation (one-line errors, exit 2)."""

    def __init__(self, *args, errors=lambda fn: fn, **kwargs):
        super().__init__(*args, **kwargs)
        self.errors = errors

    def list_commands(self, ctx) -> list[str]:
        return list(SUITES)

    def get_command(self, ctx, name: str) -> click.Command | None:
        if name not in SUITES:
            return None
        return importlib.import_module(f"{__package__}.{SUITES[name][0]}").command

    def format_commands(self, ctx, formatter) -> None:
        with formatter.section("Suites (each with --help)"):
            formatter.write_dl([(name, line) for name, (_, line) in SUITES.items()])

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if args and args[0].startswith("-") and args[0] not in ctx.help_option_names:
            args = ["pipeline", *args]
        ctx.meta[COMMAND] = f"{ctx.info_name} {shlex.join(args)}".rstrip()
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        return self.errors(super().invoke)(ctx)

    def main(self, args=None, prog_name: str | None = None, **kwargs):
        return super().main(args, prog_name or self.name, **kwargs)
