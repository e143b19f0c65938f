"""``voiceloop``: the one command a person types. Each stage is a sub-command."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from voiceloop.settings import load_settings

if TYPE_CHECKING:
    from model.training.lm_stage import LMResult
    from monitoring.alerts import AlertStore

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
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a setting for this run: dotted.key=value (YAML "
                 "value), repeatable, e.g. --set student.train.max_minutes=60."),
]


def _setup_logging(quiet: bool) -> None:
    # Third-party libraries (GX in particular) are chatty at INFO: only ours speak up.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("voiceloop", "model", "monitoring", "serving", "flows"):
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.INFO)
    # GX configures its own loggers at INFO on import.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)


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
    from model.data.corpus import CorpusValidationError
    from voiceloop.stages import corpus_stage

    _setup_logging(quiet)
    settings = load_settings(params, profile, workspace)
    start = time.perf_counter()
    try:
        report = corpus_stage(settings, progress=not quiet, validate=validate)
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


@app.command()
def train(
    profile: ProfileOpt = None,
    params: ParamsOpt = None,
    workspace: WorkspaceOpt = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from the last checkpoint if there is one.")
    ] = True,
    track: Annotated[bool, typer.Option(help="Log the run to MLflow and register the model.")] = True,
    overrides: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Train the teacher (Conformer encoder; CTC, intent and parse heads) on the corpus.

    CTC over tagged transcripts (slots are read off them) plus intent cross-entropy with
    fixed weights, on-the-fly voice perturbation (speed, VTLP, spectral tilt) and
    SpecAugment, AdamW with warm-up and cosine decay, checkpoints every epoch (a crashed
    run resumes), checkpoint selection and early stopping on the mean validation SemER of
    the training voices and of a voice family never trained on. Writes `WORKSPACE/models/PROFILE/teacher/`
    (`model/`, `history.csv`, `train_metrics.json`, `learning_curves.png`) and logs
    everything to MLflow; the model is registered as `voiceloop-slu-teacher@current`.
    """
    from voiceloop.stages import train_stage

    _setup_logging(quiet)
    settings = load_settings(params, profile, workspace, overrides or ())
    result = train_stage(settings, progress=not quiet, resume=resume, track=track).result
    v = result.best_valid
    typer.echo(
        f"teacher '{settings.profile}': {result.parameters / 1e6:.2f} M parameters, "
        f"{result.epochs_run} epochs in {result.wall_s / 60:.1f} min ({result.stopped}); "
        f"best epoch {result.best_epoch}: valid SemER {v.get('valid_semer', float('nan')):.3f}, "
        f"WER {v.get('valid_wer', float('nan')):.3f}, "
        f"intent acc {v.get('valid_intent_accuracy', float('nan')):.3f}\n  → {result.model_dir}"
    )


LMOpt = Annotated[
    bool | None,
    typer.Option(
        "--lm/--no-lm",
        help="Transcribe with the model's lexicon + word n-gram beam search (its lm/ folder) "
        "instead of greedy CTC. Default: decode.lm.enabled in params.yaml.",
    ),
]

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m",
        help="A torch model folder (weights.pt + config.json), an ONNX deploy bundle "
        "(encoder.onnx, decoder.onnx, config.json), an MLflow pyfunc model folder, or an "
        "MLflow URI such as models:/voiceloop-slu@candidate or "
        "models:/voiceloop-slu-teacher@current.",
    ),
]


@app.command()
def evaluate(
    model: ModelOpt,
    split: Annotated[str, typer.Option(help="Corpus split to score: train, valid or test.")] = "test",
    profile: ProfileOpt = None,
    params: ParamsOpt = None,
    workspace: WorkspaceOpt = None,
    out: Annotated[
        Path | None, typer.Option(help="Report folder (default: next to the model).")
    ] = None,
    track: Annotated[bool, typer.Option(help="Log the report to the model's MLflow run.")] = True,
    lm: LMOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Score a model on a corpus split: WER/CER, intent accuracy, slot P/R/F1, SLU-F1,
    SemER, exact-frame accuracy, calibration (ECE), per slice (engine, voice, domain,
    augmentation, duration).

    Writes `metrics.json`, `evaluation.json`, `evaluation.md`, `confusion_matrix.png` and
    `reliability.png`, and logs them to MLflow.
    """
    from voiceloop.stages import evaluate_stage

    _setup_logging(quiet)
    settings = load_settings(params, profile, workspace)
    result = evaluate_stage(settings, model, split, out, progress=not quiet, track=track,
                            use_lm=lm)
    o = result.report.overall
    typer.echo(
        f"{split} ({o.n} utterances): WER {o.wer:.1%}, intent accuracy {o.intent_accuracy:.1%}, "
        f"slot F1 {o.slot_f1:.1%}, SLU-F1 {o.slu_f1:.1%}, SemER {o.semer:.1%}, "
        f"exact {o.exact_match:.1%}, ECE {o.ece:.3f}\n  → {result.out_dir / 'evaluation.md'}"
    )


@app.command()
def distill(
    profile: ProfileOpt = None,
    params: ParamsOpt = None,
    workspace: WorkspaceOpt = None,
    teacher: Annotated[
        Path | None,
        typer.Option(help="Teacher model folder (default: WORKSPACE/models/PROFILE/teacher/model)."),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from the last checkpoint if there is one.")
    ] = True,
    track: Annotated[
        bool, typer.Option(help="Log to MLflow and register the deploy bundle (pyfunc).")
    ] = True,
    init_from: Annotated[
        Path | None,
        typer.Option(help="Warm start: a float student model folder (e.g. an earlier run's "
                     "student/pre_qat_model) to continue from instead of random weights."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Run folder (default: WORKSPACE/models/PROFILE/student)."),
    ] = None,
    overrides: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Distil the teacher into the small streaming student, with quantisation-aware
    training, and export it as an int8 ONNX deploy bundle.

    Knowledge distillation (temperature-scaled KL on CTC frames, intent and parse tokens,
    mixed with ground-truth losses by `student.distill` weights in params.yaml),
    dynamic-chunk attention training (one model for streaming and full context), fake int8
    quantisation in the last part of training (`student.qat`). Then the int8 bundle is
    scored on the test split next to the teacher (`eval/test/comparison.md`), and, with
    `--track`, registered as an MLflow pyfunc model `voiceloop-slu@candidate`.
    Writes `WORKSPACE/models/PROFILE/student/`.
    """
    from voiceloop.stages import distill_stage

    _setup_logging(quiet)
    settings = load_settings(params, profile, workspace, overrides or ())
    outcome = distill_stage(settings, teacher, progress=not quiet, resume=resume, track=track,
                            out_dir=out, init_from=init_from)
    r, c = outcome.result, outcome.comparison
    typer.echo(
        f"student '{settings.profile}': {r.parameters / 1e6:.2f} M parameters, {r.epochs_run} "
        f"epochs in {r.wall_s / 60:.1f} min ({r.stopped}); QAT from epoch {r.qat_start_epoch}\n"
        + c.to_markdown()
        + (f"registered as {outcome.registered}\n" if outcome.registered else "")
    )


@app.command("lm")
def lm_command(
    profile: ProfileOpt = None,
    params: ParamsOpt = None,
    workspace: WorkspaceOpt = None,
    model: Annotated[
        Path | None,
        typer.Option("--model", "-m", help="Torch model folder (default: the profile's teacher)."),
    ] = None,
    bundle: Annotated[
        list[Path] | None,
        typer.Option(help="Deploy bundle(s) made from that model that should carry the LM too "
                     "(repeatable)."),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Build the transcript language model for a trained model and attach it.

    Trains a word n-gram (`decode.lm`: order, discount) on the training transcripts,
    writes `lm/` (lexicon, ARPA, decoder settings) into the model folder and the given
    bundles, and picks the LM weight and word score by WER on validation utterances for
    this model. Training runs this itself; use it for models trained before it existed,
    or after the corpus grew.
    """
    from model.training.lm_stage import attach_lm

    _setup_logging(quiet)
    settings = load_settings(params, profile, workspace)
    folder = model or settings.models_dir / "teacher" / "model"
    typer.echo(lm_summary(attach_lm(settings, folder, progress=not quiet, bundles=bundle or ())))


def lm_summary(r: LMResult) -> str:
    """`voiceloop lm`'s one-line report. Only a model with a parse decoder has the
    copy-values comparison; a tagged one reports the beam's SemER."""
    text = (f"LM attached to {r.folder.parent}: order {r.config.order}, lm_weight "
            f"{r.config.lm_weight}, word_score {r.config.word_score}, beam {r.config.beam_size}; "
            f"validation WER on {r.utterances} utterances {r.greedy_wer:.1%} greedy → "
            f"{r.beam_wer:.1%} beam")
    if r.beam_semer is not None:
        text += f", SemER {r.beam_semer:.1%} (tuned by {r.criterion})"
    if r.semer:
        text += (f"; SemER with/without copying values {r.semer['true']:.1%} / "
                 f"{r.semer['false']:.1%} (copy_values {r.config.copy_values})")
    return text


@app.command()
def predict(
    manifest: Annotated[
        Path, typer.Option(help="JSON Lines input; each line has at least `id` and `audio`.")
    ],
    out: Annotated[Path, typer.Option(help="JSON Lines output, one prediction per input line.")],
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Default: the released model (release/student). "
                     "Otherwise a torch model folder (weights.pt + config.json), an ONNX "
                     "deploy bundle, an MLflow pyfunc model folder, or an MLflow URI such as "
                     "models:/voiceloop-slu@production."),
    ] = None,
    params: ParamsOpt = None,
    workspace: WorkspaceOpt = None,
    batch_size: Annotated[int, typer.Option(help="Utterances per forward pass.")] = 16,
    lm: LMOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Batch prediction: audio files → transcript, intent, slots, confidence.

    Input `audio` is a WAV/FLAC path (relative paths are taken from the manifest's folder),
    any sample rate, mono or stereo. Each output line is `{"id", "transcript", "intent",
    "slots": [{"type", "value"}], "confidence", "model_version", "clarify"}`; a line whose
    audio cannot be read, or that lacks `id`/`audio`, gets an `error` field instead of
    stopping the run.
    """
    from voiceloop.stages import predict_stage

    _setup_logging(quiet)
    settings = load_settings(params, None, workspace)
    if model is None:
        from voiceloop.release import default_model

        released = default_model()
        if released is None:
            typer.secho("no --model given and the repository has no released model "
                        "(release/student): train one or pass --model", fg=typer.colors.RED,
                        err=True)
            raise typer.Exit(2)
        model = str(released)
    summary = predict_stage(settings, model, manifest, out, batch_size, progress=not quiet,
                            use_lm=lm)
    typer.echo(
        f"{summary.written} predictions ({summary.errors} with errors) → {out}"
    )


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to listen on (default "
                                             "serving.host: 127.0.0.1, loopback only).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default serving.port: 8000).")] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Serve this one model (any form `voiceloop predict` "
                     "takes: a model folder, a deploy bundle, a pyfunc folder or an MLflow "
                     "URI), with no canary. Default: the registry's `production` alias of "
                     "voiceloop-slu, plus its `canary` alias at the canary share."),
    ] = None,
    log_traffic: Annotated[bool, typer.Option(
        help="Log requests (audio + answers) to the traffic store "
             "(serving.traffic; WORKSPACE/traffic by default).")] = True,
    workers: Annotated[int | None, typer.Option(
        help="Inference threads per process (default serving.workers; 0 = the cores "
             "divided among the processes).")] = None,
    processes: Annotated[int | None, typer.Option(
        help="Server processes sharing the port (default serving.processes; 0 = one per "
             "core). The LM beam search holds Python's GIL: one process keeps about 1.2 "
             "cores busy. Prometheus metrics are summed over the processes; a canary "
             "share set through /admin reaches the other processes at their next "
             "registry poll.")] = None,
    profile: ProfileOpt = None,
    params: ParamsOpt = None,
    workspace: WorkspaceOpt = None,
    overrides: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Run the HTTP inference service (FastAPI + uvicorn).

    `POST /v1/understand` with a WAV/FLAC/OGG body (or multipart field `file`) and an
    optional `X-Device-Id` header answers transcript, intent, slots, confidence, clarify,
    model_version, route and latency_ms; `/healthz`, `/readyz`, `/metrics` (Prometheus);
    `PUT /admin/canary` and `POST /admin/reload` with `Authorization: Bearer
    $VOICELOOP_ADMIN_TOKEN` (disabled when the variable is unset). Aliases and the canary
    share (a tag on the registered model) are re-read every `serving.poll_seconds`.
    """
    from serving.service import ServeSpec, run_server, server_processes
    from voiceloop.tracking import resolve_model_uri

    _setup_logging(quiet)
    settings = load_settings(params, profile, workspace, overrides or ())
    folder = resolve_model_uri(model, settings) if model else None
    if folder is None:
        from voiceloop.stages import seed_production

        try:
            seeded = seed_production(settings)
            if seeded:
                typer.echo(f"the registry had no production model: registered the released "
                           f"model as version {seeded} (alias production)")
        except FileNotFoundError as exc:
            typer.secho(f"{exc}; starting unready (/readyz 503) until a production alias "
                        "appears", fg=typer.colors.YELLOW, err=True)
    spec = ServeSpec(params=str(params) if params else None, profile=profile,
                     workspace=str(workspace) if workspace else None,
                     overrides=list(overrides or ()),
                     model_dir=str(folder) if folder else None, log_traffic=log_traffic,
                     workers=workers, processes=server_processes(settings, processes))
    run_server(spec, host or settings.serving.host,
               settings.serving.port if port is None else port, quiet=quiet)


@app.command()
def simulate(
    url: Annotated[str, typer.Option(
        help="Base URL of the running service, e.g. http://127.0.0.1:8000.")],
    scenario: Annotated[str, typer.Option(
        help="Scenario of params.yaml `simulator.scenarios`: baseline (the training "
             "distribution), accent_shift (accents and a voice never trained on), "
             "noise_shift (low SNR, reverb, telephone band), domain_shift (timers and "
             "shopping lists instead of lights and climate), new_values (unseen area and "
             "device names), ramp (baseline turning into another scenario over the run).")],
    requests: Annotated[int | None, typer.Option(
        min=1, help="Send at most this many requests (default simulator.requests).")] = None,
    rate: Annotated[float | None, typer.Option(
        min=0, help="Target requests per second over all clients; 0 = as fast as they go "
                    "(default simulator.rate).")] = None,
    seed: Annotated[int | None, typer.Option(
        min=0, help="Seed: the same seed renders the same utterances, voices, rooms, "
                    "devices and feedback (default: params.yaml seed).")] = None,
    concurrency: Annotated[int | None, typer.Option(
        min=1, help="Client threads = requests in flight at most "
                    "(default simulator.concurrency).")] = None,
    max_seconds: Annotated[float | None, typer.Option(
        min=0.001, help="Start no request after this many seconds, setup included; "
                        "requests in flight then finish or time out "
                        "(default simulator.max_seconds).")] = None,
    timeout: Annotated[float | None, typer.Option(
        min=0.001, help="Per-request HTTP timeout in seconds "
                        "(default simulator.timeout_s).")] = None,
    ramp_to: Annotated[str | None, typer.Option(
        help="For a ramp scenario: the scenario it ramps to (default: the ramp's `end` "
             "in params.yaml, accent_shift).")] = None,
    render_workers: Annotated[int | None, typer.Option(
        min=0, help="Processes rendering TTS + augmentation ahead of the clients; 0 = one "
                    "per core, 1 = a thread (default simulator.render_workers).")] = None,
    profile: ProfileOpt = None,
    params: ParamsOpt = None,
    workspace: WorkspaceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Drive a running service with simulated users and print what happened.

    Renders the scenario's utterances (grammar sentences, TTS voices, room and noise
    augmentation) and sends them as WAV uploads to `POST URL/v1/understand`, each from
    one of `simulator.devices` simulated users (`X-Device-Id`). Users compare each answer
    with what they meant and sometimes send implicit feedback (`POST URL/v1/feedback`:
    repeat or correction; probabilities in `simulator.feedback`). Stops after
    `--requests` requests or `--max-seconds`, whichever comes first.

    The ground truth of every answered request goes to the annotation store
    (`WORKSPACE/annotations/dt=DATE/RUN.jsonl`, keyed by the service's request id), never
    to the traffic store. The report (requests, errors, latency percentiles, accuracy,
    feedback, routes, the scenario mixture used) is printed and written to
    `WORKSPACE/simulations/TIMESTAMP-SCENARIO.json`.
    """
    from serving.simulator import simulate as run_simulation

    _setup_logging(quiet)
    settings = load_settings(params, profile, workspace)
    try:
        report = run_simulation(
            url, scenario, settings=settings, requests=requests, rate=rate, seed=seed,
            concurrency=concurrency, max_seconds=max_seconds, timeout_s=timeout,
            render_workers=render_workers, ramp_to=ramp_to, progress=not quiet,
        )
    except ConnectionError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from exc
    except ValueError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc
    out = settings.simulations_dir / f"{report.started_at:%Y%m%dT%H%M%SZ}-{report.scenario}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report.model_dump_json(indent=2), encoding="utf-8")
    typer.echo(report.to_table())
    typer.echo(f"  → {out}")


alerts_app = typer.Typer(
    help=(
        "Drift alerts raised by the monitor (stored in `WORKSPACE/monitoring/alerts.db`).\n\n"
        "One alert per drift *episode*: the first drifted window raises it, further drifted "
        "windows join it, and `monitoring.alerts.close_after` clean windows in a row close "
        "it. Status: open → acknowledged (`ack`) → closed (episode over)."
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(alerts_app, name="alerts")


def _alert_store(params: Path | None, profile: str | None, workspace: Path | None) -> AlertStore:
    from monitoring.alerts import AlertStore

    settings = load_settings(params, profile, workspace)
    # Reading and acknowledging deliver nothing: no sinks, so a CLI call never posts.
    return AlertStore.for_workspace(settings.workspace, settings.monitoring.alerts, sinks=[])


@alerts_app.command("list")
def alerts_list(
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print a JSON array of the alerts (full signals) instead of a table.")
    ] = False,
    all_: Annotated[bool, typer.Option(
        "--all", help="Every alert (acknowledged and closed too), not only the open ones.")
    ] = False,
    profile: ProfileOpt = None,
    params: ParamsOpt = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """List drift alerts, newest first: the open (unacknowledged) ones unless `--all`.

    The table shows the alert id (for `voiceloop alerts ack ID`), status, when it was
    raised, the model version judged, the drifted windows of its episode so far, and
    the signals that crossed their thresholds in the latest drifted window.
    """
    store = _alert_store(params, profile, workspace)
    alerts = store.list(None if all_ else "open")
    if as_json:
        typer.echo(json.dumps([a.model_dump(mode="json") for a in alerts], indent=2))
        return
    if not alerts:
        typer.echo("no alerts" if all_ else "no open alerts (--all shows the others)")
        return
    typer.echo(f"{'id':>4}  {'status':<12}  {'created (UTC)':<19}  {'model':<12}  "
               f"{'windows':>7}  drifted signals")
    for a in alerts:
        typer.echo(f"{a.id:>4}  {a.status:<12}  {a.created:%Y-%m-%d %H:%M:%S}  "
                   f"{(a.model_version or '?')[:12]:<12}  {a.drifted_windows:>7}  "
                   f"{', '.join(a.drifted_signal_names) or '-'}")


@alerts_app.command("ack")
def alerts_ack(
    alert_id: Annotated[int, typer.Argument(metavar="ID", help="The alert's id (see `list`).")],
    by: Annotated[str | None, typer.Option(
        help="Who acknowledges (default: $USER).")] = None,
    profile: ProfileOpt = None,
    params: ParamsOpt = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """Acknowledge an alert: someone is on it, so `list` stops showing it as open.

    The episode goes on: it still collects drifted windows and closes after enough
    clean ones. Exit code 1 for an unknown or closed alert.
    """
    import getpass

    store = _alert_store(params, profile, workspace)
    who = by or getpass.getuser()
    try:
        alert = store.acknowledge(alert_id, who)
    except (LookupError, ValueError) as exc:
        typer.secho(str(exc).strip("'\""), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"alert {alert.id} acknowledged by {alert.acknowledged_by} "
               f"at {alert.acknowledged_at:%Y-%m-%d %H:%M:%S} UTC")


@app.command()
def release(
    profile: ProfileOpt = None,
    params: ParamsOpt = None,
    workspace: WorkspaceOpt = None,
    out: Annotated[Path | None, typer.Option(help="Release folder (default: release/ in the "
                                             "repository).")] = None,
    note: Annotated[str, typer.Option(help="Training history the model folders cannot tell "
                                      "(e.g. a warm-started continuation), into the card.")] = "",
    quiet: QuietOpt = False,
) -> None:
    """Package the profile's trained student and teacher as the repository's released
    model: `release/student/` (int8 ONNX bundle + LM: the default model of `predict` and
    `serve`, and the loop's seed production model), `release/teacher/` (fp16), and a
    model card (`MODEL_CARD.md`, `release.json`) with data, recipe, params hash, git
    commit, test metrics per slice (template-held-out test split and held-out voices),
    latency and sizes. Refuses to write more than 15 MB.
    """
    from voiceloop.release import make_release

    _setup_logging(quiet)
    settings = load_settings(params, profile, workspace)
    report = make_release(settings, out, progress=not quiet, note=note)
    m = report.card["metrics"]["student_int8_test"]
    h = report.card["metrics"]["student_int8_test_heldout"]
    typer.echo(
        f"released {report.folder} ({report.bytes / 1e6:.1f} MB): test intent "
        f"{m['intent_accuracy']:.1%}, slot F1 {m['slot_f1']:.1%}, WER {m['wer']:.1%}, SemER "
        f"{m['semer']:.1%}; held-out voices intent {h['intent_accuracy']:.1%}, WER "
        f"{h['wer']:.1%}, ECE {h['ece']:.3f}; p50 {report.card['latency']['student_int8_lm_p50_ms']} ms"
    )


@app.command()
def ingest(
    profile: ProfileOpt = None,
    params: ParamsOpt = None,
    workspace: WorkspaceOpt = None,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="The model whose encoder embeds the samples (any form "
        "`voiceloop predict` takes). Default: the registry's `production` version, seeded "
        "from the released model when the registry is empty.")] = None,
) -> None:
    """Ingest production traffic now (the `voiceloop-ingest` Prefect flow, run by hand).

    Picks up every committed traffic batch not yet ingested (idempotent by batch id),
    validates audio and metadata with the Great Expectations traffic suite, quarantines
    bad samples with their reasons, computes monitoring features (signal features, the
    model's pooled encoder embedding, its answers), writes the curated dataset
    (`WORKSPACE/curated/`) and versions it with DVC. Counts balance: requests = accepted +
    quarantined.
    """
    from flows.ingest import ingest_flow

    _setup_logging(False)
    settings = load_settings(params, profile, workspace)
    report = ingest_flow(settings.profile, str(settings.workspace),
                         str(params) if params else None, model=model)
    typer.echo(f"ingested {len(report['batches'])} batches ({report['skipped']} already in the "
               f"ledger): {report['requests']} requests = {report['accepted']} accepted + "
               f"{report['quarantined']} quarantined; data version "
               f"{report['data_version'] or '-'}\n  → {report['curated_root']}")


@app.command()
def monitor(
    profile: ProfileOpt = None,
    params: ParamsOpt = None,
    workspace: WorkspaceOpt = None,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="The model whose reference and embeddings to use (any form "
        "`voiceloop predict` takes). Default: the registry's `production` version.")] = None,
    window: Annotated[int | None, typer.Option(
        help="Window size in samples (default monitoring.drift.window_rows).")] = None,
) -> None:
    """Check the latest window of ingested traffic for drift now (the `voiceloop-monitor`
    Prefect flow, run by hand).

    Evidently compares it with the model's reference (its own validation data, featurised
    once per model version): column drift on signal features, prediction drift on intent,
    domain, clarify and confidence, embedding drift; plus a label-free accuracy estimate.
    Writes the HTML report under `WORKSPACE/monitoring/reports/`, logs it to MLflow, and on
    a new drift episode raises an alert and the `voiceloop.drift.detected` event.
    """
    from flows.monitor import monitor_flow

    _setup_logging(False)
    settings = load_settings(params, profile, workspace)
    result = monitor_flow(settings.profile, str(settings.workspace),
                          str(params) if params else None, model=model, window_rows=window)
    if result.get("warming_up"):
        typer.echo(f"warming up: the version's live reference has {result['live_rows']} of "
                   f"{settings.monitoring.reference_rows} ingested rows (monitoring."
                   "adapted_reference); no drift decision until then")
        return
    verdict = ("DRIFT: " + "; ".join(result.get("reasons", [])) if result["drifted"]
               else "no drift" if result.get("sufficient") else "not enough samples to decide")
    typer.echo(f"{verdict} (window {result['window']} samples)"
               + (f", alert {result['alert_id']}" if result.get("alert_id") else "")
               + (f"\n  report: {result['report_dir']}/drift.html" if result.get("report_dir") else ""))


flows_app = typer.Typer(help="Prefect: the local server and the flow deployments.",
                        no_args_is_help=True)
app.add_typer(flows_app, name="flows")


@flows_app.command("server")
def flows_server(
    port: Annotated[int, typer.Option(help="Port of the Prefect server and UI.")] = 4200,
) -> None:
    """Start a local Prefect server on 127.0.0.1 (UI at http://127.0.0.1:PORT). Point
    other processes at it with PREFECT_API_URL=http://127.0.0.1:PORT/api."""
    import os

    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    os.execvpe(sys.executable, [sys.executable, "-m", "prefect", "server", "start",
                                "--host", "127.0.0.1", "--port", str(port)], env)


@flows_app.command("serve")
def flows_serve(
    profile: ProfileOpt = None,
    params: ParamsOpt = None,
    workspace: WorkspaceOpt = None,
    schedules: Annotated[bool, typer.Option(
        help="Run the flows on their schedules. --no-schedules keeps the deployments and "
             "their event triggers (drift → retraining → promotion) but no clock: for a "
             "driver that runs ingestion and monitoring itself, as `voiceloop demo` "
             "does.")] = True,
) -> None:
    """Serve every flow deployment with its schedule (params.yaml `flows`): ingestion
    every 10 min, drift monitoring hourly, retraining weekly and on the drift event,
    promotion after each retraining. Needs a Prefect server (`voiceloop flows server`)
    and PREFECT_API_URL pointing at it; blocks until interrupted."""
    from flows.deploy import serve_flows

    _setup_logging(False)
    settings = load_settings(params, profile, workspace)
    serve_flows(settings, {"profile": settings.profile, "workspace": str(settings.workspace)},
                schedules=schedules)


@app.command("retrain-train", hidden=True)
def retrain_train(
    run_dir: Annotated[Path, typer.Option(help="A retraining run folder (spec.json + corpus).")],
    profile: ProfileOpt = None,
    params: ParamsOpt = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """The DVC stage `retrain`: fine-tune the teacher and distil the student of one
    retraining run (the retraining flow runs it through
    `dvc exp run pipelines/retrain/dvc.yaml:retrain`)."""
    from voiceloop.retrain import train_candidate

    _setup_logging(False)
    settings = load_settings(params, profile, workspace)
    out = train_candidate(settings, run_dir.resolve(), progress=False)
    typer.echo(json.dumps(out.metrics, indent=2))


@app.command()
def retrain(
    profile: ProfileOpt = None,
    params: ParamsOpt = None,
    workspace: WorkspaceOpt = None,
    corrupt_labels: Annotated[bool, typer.Option(
        help="Shuffle the training intents: a deliberately bad candidate, to see the gate "
             "and the canary catch it.")] = False,
) -> None:
    """Retrain now (the `voiceloop-retrain` Prefect flow, run by hand; it also runs on the
    drift event and weekly).

    Selects traffic the production model has seen since the last retraining: active
    learning within the labelling budget (`retrain` in params.yaml: lowest confidence,
    teacher/student disagreement, drifted regions of the embedding space; labels from the
    annotation store), teacher pseudo-labels for confident samples, plus a replay sample
    of the old corpus; then fine-tunes the teacher, distils the student with QAT, exports
    int8 and registers the result as `candidate` with its lineage.
    """
    from flows.retrain import retrain_flow

    _setup_logging(False)
    settings = load_settings(params, profile, workspace)
    result = retrain_flow(settings.profile, str(settings.workspace),
                          str(params) if params else None, corrupt_labels=corrupt_labels,
                          reason="manual")
    if result["status"] != "registered":
        typer.echo("nothing to retrain on yet (too few new samples)")
        return
    typer.echo(f"candidate version {result['version']} (run {result['run_id']}, trained "
               f"{result['trained']}): labels {result['labelled']}/{result['budget']}, "
               f"{result['pseudo']} pseudo-labels, {result['replay']} replayed")


@app.command()
def rollback(
    reason: Annotated[str, typer.Option(help="Why (recorded on the version's tags).")] = "manual rollback",
    to: Annotated[str | None, typer.Option(help="Version to restore (default: `previous`).")] = None,
    profile: ProfileOpt = None,
    params: ParamsOpt = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """Roll back at once: a running canary is stopped (share 0, alias removed); without
    one, `production` moves back to `previous` (or --to). Running services pick it up at
    their next registry poll."""
    from voiceloop.registry import Registry

    settings = load_settings(params, profile, workspace)
    registry = Registry(settings)
    registry.recover()
    try:
        version = registry.rollback(reason, to)
    except LookupError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"production is version {version}; aliases {registry.aliases()}")


@app.command()
def registry(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    profile: ProfileOpt = None,
    params: ParamsOpt = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """The registered versions with their aliases and rollout history (gate verdict,
    canary steps, promotion or rollback and why), newest first."""
    from voiceloop.registry import Registry

    settings = load_settings(params, profile, workspace)
    reg = Registry(settings)
    rows = reg.versions()
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    typer.echo(f"{reg.name}: canary share {reg.canary_share():g} %")
    typer.echo(f"{'version':>7}  {'aliases':22} {'status':12} {'gate':6} {'canary steps':14} reason")
    for r in rows:
        t = r["tags"]
        steps = sorted(k for k in t if k.startswith("canary.step"))
        passed = sum('"passed": true' in t[k] for k in steps)
        typer.echo(f"{r['version']:>7}  {','.join(r['aliases']) or '-':22} "
                   f"{t.get('rollout.status', '-'):12} {t.get('gate.result', '-'):6} "
                   f"{f'{passed}/{len(steps)} passed' if steps else '-':14} "
                   f"{t.get('rollout.reason', '')[:80]}")


@app.command()
def promote(
    version: Annotated[str | None, typer.Option(help="Version to promote (default: the "
                                                "`candidate` alias).")] = None,
    profile: ProfileOpt = None,
    params: ParamsOpt = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """Promote the candidate (the `voiceloop-promote` Prefect flow, run by hand): the
    offline gate (golden set + recent labelled traffic: per metric, per slice, an absolute
    floor, negative flips), then canary stages (`promotion.canary.steps`) analysed on live
    traffic against production, with automatic rollback; success moves `production` to
    the candidate and keeps the old one as `previous`. Needs a running service with
    traffic for the canary stages."""
    from flows.promote import promote_flow

    _setup_logging(False)
    settings = load_settings(params, profile, workspace)
    result = promote_flow(settings.profile, str(settings.workspace),
                          str(params) if params else None, version=version)
    if result["status"] == "nothing":
        typer.echo("no candidate to promote")
        return
    typer.echo(f"version {result['version']} {result['status']}: {result['reason']}\n"
               f"production is version {result['production']}")


@app.command()
def demo(
    scenario: Annotated[str, typer.Option(help="The drift scenario of params.yaml "
                                          "`simulator.scenarios` the users move to.")] = "accent_shift",
    requests: Annotated[int, typer.Option(help="Requests per traffic phase.")] = 300,
    keep_running: Annotated[bool, typer.Option(
        help="Keep the servers (Prefect UI, MLflow UI, service) running at the end.")] = False,
    profile: ProfileOpt = "quick",
    params: ParamsOpt = None,
    workspace: Annotated[Path | None, typer.Option(
        "--workspace", "-w", help="Demo workspace, wiped first (default WORKSPACE/demo).")] = None,
) -> None:
    """The whole loop end to end (`make demo`): the released model serves simulated
    users; ingestion and drift monitoring (Prefect flows, Evidently) catch a drift
    scenario; the drift event starts retraining (teacher fine-tune + student distillation
    with QAT); the offline gate and canary stages promote the candidate; a deliberately
    bad candidate is caught and never serves. Prints the story with figures, decisions and
    the URLs of the Prefect UI, the MLflow UI and the Evidently report.
    """
    from voiceloop.demo import run_demo

    _setup_logging(True)
    settings = load_settings(params, profile, None)
    ws = workspace or settings.workspace / "demo"
    settings = settings.model_copy(update={"workspace": ws.resolve()})
    story = run_demo(settings, scenario, keep_running, requests)
    f = story.figures
    typer.echo("\n# The loop, end to end\n")
    for line in story.events:
        typer.echo(f"- {line}")
    before, after = f.get("drift_before", {}), f.get("drift_after", {})
    typer.echo(
        f"\n{scenario}: intent {before.get('intent', 0):.1%} → {after.get('intent', 0):.1%}, "
        f"exact frame {before.get('frame', 0):.1%} → {after.get('frame', 0):.1%} "
        f"(version {before.get('version')} → {after.get('version')})\n"
        f"Evidently report: {f.get('evidently_report')}\n"
        f"Prefect UI (while servers run): {f.get('prefect_ui')}; MLflow UI: {f.get('mlflow_ui')}\n"
        f"Later: `uv run voiceloop flows server` and `uv run mlflow ui --backend-store-uri "
        f"{settings.tracking_uri}`; `uv run voiceloop registry -w {ws}` for the rollout history."
    )


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
