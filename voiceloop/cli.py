"""``voiceloop``: the one command a person types. Each stage is a sub-command."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from voiceloop.settings import load_settings

app = typer.Typer(
    help=(
        "voiceloop: a continual-learning pipeline for a joint speech-recognition + "
        "language-understanding model (audio in; transcript, intent and slots out).\n\n"
        "Settings come from params.yaml; pick a profile (tiny, quick, full) with --profile. "
        "Generated state lives under the workspace folder (params.yaml `workspace`, or "
        "$VOICELOOP_WORKSPACE)."
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

ProfileOpt = Annotated[
    str | None,
    typer.Option("--profile", "-p", help="Profile from params.yaml: tiny, quick or full."),
]
ParamsOpt = Annotated[
    Path | None,
    typer.Option("--params", help="Path to params.yaml (default: the repository's)."),
]
WorkspaceOpt = Annotated[
    Path | None,
    typer.Option("--workspace", "-w", help="Workspace folder for generated state."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def _setup_logging(quiet: bool) -> None:
    # Third-party libraries (GX in particular) are chatty at INFO: only ours speak up.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("voiceloop", "model", "monitoring", "serving", "flows"):
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.INFO)


@app.command()
def corpus(
    profile: ProfileOpt = None,
    params: ParamsOpt = None,
    workspace: WorkspaceOpt = None,
    validate: Annotated[
        bool, typer.Option(help="Run the Great Expectations suite on the manifests.")
    ] = True,
    quiet: QuietOpt = False,
) -> None:
    """Build the spoken-command corpus: grammar → TTS → augmentation → manifests.

    Expands the Home Assistant intents with hassil, renders each sentence with
    espeak-ng, flite or festival, augments it (noise, reverberation, gain, clipping,
    telephone band), writes JSON Lines manifests per split and validates them. Re-running
    resumes: finished audio is not rendered again. Outputs go to
    `WORKSPACE/corpus/PROFILE/` (`manifests/`, `reports/stats.md`,
    `reports/validation.md`, `quarantine.jsonl`).
    """
    from model.data.corpus import CorpusValidationError, build_corpus

    _setup_logging(quiet)
    settings = load_settings(params, profile, workspace)
    start = time.perf_counter()
    try:
        report = build_corpus(settings, progress=not quiet)
    except CorpusValidationError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from exc
    elapsed = time.perf_counter() - start
    s = report.stats
    typer.echo(
        f"corpus '{settings.profile}': {report.written} utterances "
        f"({', '.join(f'{k} {v}' for k, v in s.utterances_by_split.items())}), "
        f"{s.hours:.2f} h audio, {report.quarantined} quarantined, "
        f"validation {'passed' if report.validation_passed else 'not run'}, "
        f"{elapsed:.1f} s\n  → {settings.corpus_dir}"
    )


@app.command("validate-manifest")
def validate_manifest(
    manifests: Annotated[
        list[Path], typer.Argument(help="Manifest files (JSON Lines) validated together.")
    ],
    profile: ProfileOpt = None,
    params: ParamsOpt = None,
    report: Annotated[
        Path | None, typer.Option(help="Also write the markdown report to this file.")
    ] = None,
) -> None:
    """Validate manifests with the Great Expectations suite; exit 1 and list failing rows.

    Checks schema, nulls, unique ids, durations, sample rate, that audio files exist and
    decode, intent/slot vocabularies, and that no template appears in two splits.
    """
    from model.data.grammar import DOMAINS, Grammar
    from monitoring.manifest_suite import validate_manifests

    settings = load_settings(params, profile)
    grammar = Grammar.load(settings.corpus.language)
    result = validate_manifests(
        manifests,
        settings.corpus.validation,
        intents=grammar.intent_names,
        slot_types=grammar.slot_types,
        domains=DOMAINS,
    )
    text = result.to_markdown()
    if report:
        report.write_text(text, encoding="utf-8")
    typer.echo(text)
    if not result.success:
        raise typer.Exit(1)


@app.command()
def stats(
    profile: ProfileOpt = None,
    params: ParamsOpt = None,
    workspace: WorkspaceOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of markdown.")] = False,
) -> None:
    """Print statistics of a built corpus (per split, intent balance, hours per engine)."""
    from model.data.corpus import CorpusLayout, load_corpus_rows
    from model.data.stats import corpus_stats

    settings = load_settings(params, profile, workspace)
    rows = load_corpus_rows(CorpusLayout(settings.corpus_dir))
    if not rows:
        typer.secho(
            f"no corpus at {settings.corpus_dir}: run `voiceloop corpus -p {settings.profile}`",
            fg=typer.colors.RED, err=True,
        )
        raise typer.Exit(1)
    result = corpus_stats(rows)
    typer.echo(json.dumps(result.model_dump(), indent=2) if as_json else result.to_markdown())


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
