"""The `instructflow` command. Heavy imports (prefect, torch) happen inside commands, after the data
home and Prefect's settings are fixed, so `--help` and `status` stay fast."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

# an unexpected error's traceback shows no local variables: they hold the teacher's URL and key
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Seed tasks -> Self-Instruct -> ROUGE-L filter -> SFT -> preferences -> reward -> PPO / DPO / GRPO -> evaluate.")
console = Console(stderr=True, soft_wrap=True)  # one-line errors stay one line at any width

# Prefect reads its settings once, when first imported: `use_prefect_defaults` sets these before a
# command imports it. The ephemeral API's first start migrates a new SQLite file: slow on a busy 2-core machine.
PREFECT_DEFAULTS = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING",
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}

ProfileOpt = typer.Option(None, "--profile", "-p", help="Config profile (default: the file's default_profile, 'cpu').")
HomeOpt = typer.Option(None, "--home", help="Data home (default: $INSTRUCTFLOW_HOME or ./.instructflow).")
ConfigOpt = typer.Option(None, "--config", help="Config file (default: $INSTRUCTFLOW_CONFIG, ./instructflow.toml, packaged).")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Also show library warnings and tracebacks here "
                          "(they always go to HOME/logs/console.log).")


def fail(message: str, code: int = 2) -> None:
    from rich.markup import escape

    from instructflow.tasks.secrets import redact

    console.print(f"[bold red]error:[/] {escape(redact(message))}", highlight=False)
    raise typer.Exit(code)


def _prepare(home: Optional[str], config: Optional[str], profile: Optional[str], verbose: bool = False,
             hold_warehouse: bool = True):
    """Resolve config and home, point Prefect at the home (unless the user pointed it elsewhere).
    hold_warehouse: take the home's warehouse for this process (waiting for a run that holds it);
    otherwise only check it (deploy: the runs take it)."""
    use_prefect_defaults()
    from instructflow.flows.common import check_warehouse, data_home, warehouse_for
    from instructflow.tasks.config import ConfigError, load_config
    from instructflow.warehouse.store import WarehouseError

    try:
        cfg = load_config(profile, config)
        home_path = data_home(home)
        # take the warehouse (and its lock) before Prefect starts: a newer file fails in one line, and
        # while another run holds it this waits for that run, saying so
        if hold_warehouse:
            warehouse_for(home_path, say=lambda line: console.print(line, highlight=False))
        else:
            check_warehouse(home_path)
    except (ConfigError, WarehouseError) as exc:
        fail(str(exc))
    # Ephemeral flow runs land in the home's own Prefect database, so `instructflow dashboard`
    # later shows their history and artifacts.
    if "PREFECT_HOME" not in os.environ:
        (home_path / "prefect").mkdir(exist_ok=True)  # Prefect does not create missing parents
        os.environ["PREFECT_HOME"] = str(home_path / "prefect")
    from instructflow.flows.server import running_dashboard

    dashboard_api = running_dashboard(home_path)
    if dashboard_api and "PREFECT_API_URL" not in os.environ:
        os.environ["PREFECT_API_URL"] = dashboard_api  # runs show up live in `instructflow dashboard`
    if "PREFECT_API_URL" not in os.environ:
        from instructflow.flows.server import guard_ephemeral_server

        guard_ephemeral_server()
    from instructflow.flows.common import quiet_console
    from instructflow.flows.server import stop_on_term_and_hangup
    from instructflow.flows.status import publish_status

    stop_on_term_and_hangup()  # SIGTERM/SIGHUP: one line and exit 143/129, with every child process stopped
    quiet_console(home_path, verbose)
    if hold_warehouse:
        publish_status(cfg, home_path, None)  # `status` answers from it while this process holds the lock
    return cfg, home_path


def _run_guarded(fn, home_path: Path):
    from instructflow.flows.server import Terminated
    from instructflow.tasks.config import ConfigError
    from instructflow.tasks.exhaustion import exhausted, exhaustion_line
    from instructflow.warehouse.store import WarehouseError

    try:
        return fn()
    # RuntimeError: a stage's own failure (e.g. a launcher, a full disk); Prefect has already logged the traceback
    except (ConfigError, WarehouseError, KeyError, ValueError, FileNotFoundError, RuntimeError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        fail(str(message).splitlines()[0] if message else type(exc).__name__, code=1)
    except Terminated as exc:  # SIGTERM / SIGHUP: unwound like Ctrl-C, so every child process was stopped
        console.print(f"[yellow]terminated ({exc.name}): rerun the same command to resume[/]")
        raise typer.Exit(128 + exc.signum)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: rerun the same command to resume[/]")
        raise typer.Exit(130)
    except Exception as exc:  # out of disk or memory outside a stage (a stage says it itself): one line too
        kind = exhausted(exc, home_path)
        if kind is None:
            raise
        fail(exhaustion_line(kind, "run", home_path, log=home_path / "logs" / "console.log"), code=1)


@app.command()
def run(profile: Optional[str] = ProfileOpt, home: Optional[str] = HomeOpt, config: Optional[str] = ConfigOpt,
        force: bool = typer.Option(False, "--force", help="Rerun every stage even if its inputs are unchanged."),
        stages: Optional[str] = typer.Option(None, "--stages", help="Comma-separated subset of stages."),
        verbose: bool = VerboseOpt):
    """Run the whole pipeline; stages whose inputs are unchanged are skipped."""
    cfg, home_path = _prepare(home, config, profile, verbose)
    only = [s.strip() for s in stages.split(",")] if stages else None
    _check_memory(cfg, only)
    from instructflow.flows.pipeline import pipeline

    results = _run_guarded(lambda: pipeline(home=str(home_path), stages_to_run=only, force=force, cfg=cfg), home_path)
    _print_summary(cfg, home_path, results)
    _print_outcome(home_path, results)


@app.command()
def stage(name: str = typer.Argument(..., help="Stage name (see `instructflow status`)."),
          profile: Optional[str] = ProfileOpt, home: Optional[str] = HomeOpt, config: Optional[str] = ConfigOpt,
          force: bool = typer.Option(False, "--force", help="Redo the stage's reusable work: retrain from "
                                     "scratch, re-sample, re-ask the judge."),
          downstream: bool = typer.Option(False, "--downstream", help="Continue through the stages after it (stale ones)."),
          verbose: bool = VerboseOpt):
    """Rerun exactly one stage (always runs), optionally followed by its stale downstream stages."""
    cfg, home_path = _prepare(home, config, profile, verbose)
    from instructflow.flows.pipeline import run_single
    from instructflow.flows.stages import stage_names, stage_spec

    if name not in stage_names():
        fail(f"unknown stage {name!r} (stages: {', '.join(stage_names())})")
    spec = stage_spec(name)
    if spec.enabled is not None and not spec.enabled(cfg):
        fail(f"{name} is not among profile {cfg.profile}'s methods ({', '.join(cfg.methods) or 'none'}): add it to "
             f"`methods` in [profiles.{cfg.profile}]")
    _check_memory(cfg, stage_names()[stage_names().index(name):] if downstream else [name])
    results = _run_guarded(lambda: run_single(name, cfg, home_path, force, downstream), home_path)
    _print_summary(cfg, home_path, results)
    _print_outcome(home_path, results)


def _check_memory(cfg, stages: Optional[list[str]]) -> None:
    """On a GPU, refuse (one line) a training stage of `stages` (None: all) that cannot fit, before any runs."""
    from instructflow.flows.plan import memory_refusal
    from instructflow.models.devices import visible_gpus
    from instructflow.tasks.memory_plan import PlanError

    try:
        found = memory_refusal(cfg, stages, visible_gpus())
    except (PlanError, OSError, RuntimeError) as exc:  # a model the plan cannot read: the stage says what is wrong
        console.print(f"[yellow]memory plan skipped:[/] {str(exc).splitlines()[0]}", highlight=False)
        return
    if found:
        fail(found)


@app.command()
def plan(profile: Optional[str] = ProfileOpt, config: Optional[str] = ConfigOpt,
         gpus: Optional[int] = typer.Option(None, "--gpus", help="GPUs per machine (default: the visible ones, or 1)."),
         gpu_memory_gb: Optional[float] = typer.Option(None, "--gpu-memory-gb", help="Memory of each GPU in GB "
                                                       "(2^30 bytes; default: the visible GPUs')."),
         as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")):
    """GPU memory per device of each training stage, whether it fits, and what would make it fit.

    Weights, gradients, AdamW state, frozen models and an activation estimate, from the base model's
    config.json and the profile's training sections; loads no weights, starts no Prefect."""
    from instructflow.flows.plan import hardware_for, plan_for, plan_report
    from instructflow.tasks.config import ConfigError, load_config
    from instructflow.tasks.memory_plan import PlanError

    if gpus is not None and gpus < 1:
        fail(f"--gpus must be >= 1, got {gpus}")
    if gpu_memory_gb is not None and not gpu_memory_gb > 0:
        fail(f"--gpu-memory-gb must be > 0, got {gpu_memory_gb}")
    try:
        cfg = load_config(profile, config)
        visible = []
        if gpus is None or gpu_memory_gb is None:  # torch only when an option is left to the machine
            from instructflow.models.devices import visible_gpus

            visible = visible_gpus()
        hardware, where = hardware_for(gpus, gpu_memory_gb, visible)
        plans, shape, source = plan_for(cfg, hardware)
    except (ConfigError, PlanError, OSError, RuntimeError) as exc:
        fail(str(exc).splitlines()[0])
    if as_json:
        print(json.dumps(plan_report(cfg, plans, shape, source, hardware, where)))
    else:
        _print_plans(cfg, plans, shape, source, where)
    if any(p.fits is False for p in plans):
        raise typer.Exit(1)


PLAN_ROWS = {"weights": "weights", "gradients": "gradients", "optimizer": "AdamW moments",
             "reference": "reference (frozen)", "reward_model": "reward model (frozen)",
             "critic": "critic (trained)", "activations": "activations"}


def _print_plans(cfg, plans, shape, source, where) -> None:
    """One table per training stage: GB per component, the total against the GPU, then the advice."""
    from instructflow.tasks.memory_plan import GB

    out = Console(soft_wrap=True)  # an advice line stays one line
    out.print(f"model: {source}", highlight=False)
    out.print(f"  {shape.params() / 1e9:.3g}B parameters: {shape.num_hidden_layers} layers, hidden {shape.hidden_size}, "
              f"{shape.num_attention_heads} heads ({shape.num_key_value_heads} kv), vocab {shape.vocab_size}",
              highlight=False)
    out.print(f"plan for: profile {cfg.profile}, {where}", highlight=False)
    for p in plans:
        rope = f" · RoPE {p.rope}" if p.rope != "none" else ""
        table = Table(title=f"{p.stage} · {p.training} · {p.precision} · {p.rows} x {p.seq_len} tokens{rope} · "
                            f"{p.attention} · {p.sharding}", title_justify="left", min_width=72)
        table.add_column("per GPU")
        table.add_column("GB", justify="right")
        table.add_column("", style="dim")
        notes = p.component_notes()
        for name, label in PLAN_ROWS.items():
            if p.components[name]:
                table.add_row(label, f"{p.components[name] / GB:.2f}", notes[name])
        verdict = ("no verdict" if p.fits is None else f"[green]fits {p.memory_bytes / GB:.1f} GB[/]" if p.fits
                   else f"[red]over {p.memory_bytes / GB:.1f} GB[/]")
        table.add_row("[bold]total[/]", f"[bold]{p.total_bytes / GB:.2f}[/]", verdict)
        out.print(table)
        for advice in p.advice:
            out.print(f"  fits with: {advice}", highlight=False)
        if p.closest is not None:
            out.print(f"  no setting tried makes it fit; the least: {p.closest}", highlight=False)
        for note in p.notes:
            out.print(f"  note: {note}", highlight=False)


@app.command()
def status(profile: Optional[str] = ProfileOpt, home: Optional[str] = HomeOpt, config: Optional[str] = ConfigOpt,
           as_json: bool = typer.Option(False, "--json", help="Print one JSON object (the scripting contract).")):
    """What each stage last produced, and which stages are stale (and why)."""
    from instructflow.flows.status import read_status, warehouse_exists

    report = read_status(home, profile, config)  # always an answer: the states, or an "error"
    if "error" in report:
        if as_json:
            print(json.dumps(report, default=str))
        fail(report["error"], code=1)
    if as_json:
        print(json.dumps(report, default=str))
        return
    live = report if report["running"] else None
    if live:
        console.print(f"a run (pid {live['pid']}) holds the warehouse: "
                      f"{'stage ' + live['stage'] + ' is running' if live['stage'] else 'between stages'}; "
                      f"states as of {live['as_of']}")
    elif not warehouse_exists(Path(report["home"])):
        console.print(f"No runs yet in [bold]{report['home']}[/]: every stage is [dim]never[/]. "
                      "Start with `instructflow run` (or `make run`).")
    table = Table(title=f"instructflow status · {report['home']} · profile {report['profile']} "
                        f"({PROFILE_SOURCES[report['profile_source']]})")
    for column in ("stage", "state", "last run", "disk", "key metrics", "why"):
        table.add_column(column, overflow="fold", justify="right" if column == "disk" else "left")
    colours = {"fresh": "green", "stale": "yellow", "failed": "red", "interrupted": "magenta", "never": "dim",
               "off": "dim"}
    for name, entry in report["stages"].items():
        metrics = ", ".join(f"{k}={_short(v)}" for k, v in list(entry["metrics"].items())[:5])
        table.add_row(name, f"[{colours.get(entry['state'], 'white')}]{entry['state']}[/]", entry["last_run"] or "-",
                      _size(entry.get("disk_bytes")), metrics or "-", "; ".join(entry["why"]) or "-")
    Console().print(table)
    if report.get("disk_bytes") is not None:
        stages_bytes = sum(entry.get("disk_bytes") or 0 for entry in report["stages"].values())
        console.print(f"disk: {_size(report['disk_bytes'])} in {report['home']}, {_size(stages_bytes)} of it in "
                      "stages/ (`instructflow gc` removes the run folders no current result uses)", highlight=False)
    if report.get("open_batches"):
        console.print(f"open batches: {len(report['open_batches'])} ({', '.join(report['open_batches'][:5])}): "
                      "the next generate run polls them; `instructflow batches` lists them", highlight=False)


@app.command("gc")
def gc_command(home: Optional[str] = HomeOpt,
               dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be removed.")):
    """Remove the run folders (stages/*/run-*, holdout-reward-*) that no current stage result points to."""
    from instructflow.flows.common import data_home
    from instructflow.flows.gc import collect_garbage
    from instructflow.warehouse.store import WarehouseError

    try:
        found = collect_garbage(data_home(home), dry_run)
    except (WarehouseError, OSError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, code=1)
    out = Console(soft_wrap=True, highlight=False)
    for folder, size in found.removed:
        out.print(f"{'would remove' if dry_run else 'removed'} {folder} ({_size(size)})")
    for folder, why in found.kept:
        out.print(f"kept {folder} ({why})")
    out.print(f"{'would free' if dry_run else 'freed'} {_size(found.freed)} ({found.freed} bytes) in "
              f"{len(found.removed)} run folder(s); kept {len(found.kept)}")


PROFILE_SOURCES = {"option": "--profile", "env": "$INSTRUCTFLOW_PROFILE", "last_run": "the last run's",
                   "default": "the config's default", "running": "the running run's"}


def _config_for_reading(profile: Optional[str], config: Optional[str], wh):
    from instructflow.flows.status import config_for_reading

    return config_for_reading(profile, config, wh)


def _size(n: Optional[int]) -> str:
    from instructflow.tasks.exhaustion import size_text

    return "-" if n is None else size_text(n)


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)[:40]
    return str(value)[:40]


@app.command()
def doctor(profile: Optional[str] = ProfileOpt, home: Optional[str] = HomeOpt, config: Optional[str] = ConfigOpt):
    """Versions, data home, bundled model, teacher reachability, GPU, and whether scheduled runs are being created."""
    from instructflow.flows.doctor import doctor_rows

    rows = doctor_rows(profile, home, config)
    table = Table(title="instructflow doctor")
    table.add_column("check")
    table.add_column("result", overflow="fold")
    table.add_column("ok")
    for name, value, ok in rows:
        table.add_row(name, value, "[green]ok[/]" if ok else "[red]problem[/]")
    Console().print(table)
    if not all(ok for _, _, ok in rows):
        raise typer.Exit(1)


@app.command()
def batches(home: Optional[str] = HomeOpt, profile: Optional[str] = ProfileOpt, config: Optional[str] = ConfigOpt,
            cancel: Optional[str] = typer.Option(None, "--cancel", help="Cancel this batch id at its endpoint "
                                                 "(what it finished is still collected by the next generate run)."),
            as_json: bool = typer.Option(False, "--json", help="Print the batches as one JSON list.")):
    """Teacher batches (teacher.mode = "batch"): the newest first, open ones marked; --cancel ID cancels one."""
    from instructflow.warehouse import queries

    if cancel is None:
        _, wh = _read_existing_warehouse(home)
        try:
            found = queries.batch_rows(wh)
        finally:
            wh.close()
        if as_json:
            print(json.dumps(found, default=str))
            return
        table = Table(title="teacher batches (newest first)")
        table.add_column("batch id", no_wrap=True)
        for column in ("stage", "status", "lines", "done", "failed", "created", "collected"):
            table.add_column(column, overflow="fold")
        for b in found:
            table.add_row(b["batch_id"] or f"(not created: {b['input_file_id']})", b["stage"], b["status"],
                          str(b["requests"]), str(b["completed"] or 0), str(b["failed"] or 0), str(b["created_at"]),
                          str(b["collected_at"] or "[yellow]open[/]"))
        Console().print(table)
        return
    from instructflow.flows.common import data_home
    from instructflow.tasks.batch import BatchAPIError, cancel_batch
    from instructflow.tasks.config import ConfigError, teacher_api_key
    from instructflow.warehouse.store import WarehouseError, open_warehouse

    try:
        wh = open_warehouse(data_home(home))
    except WarehouseError as exc:
        fail(str(exc), code=1)
    try:
        cfg, _ = _config_for_reading(profile, config, wh)
        status = cancel_batch(wh, cancel, cfg.teacher.model, teacher_api_key(cfg.teacher))
        console.print(f"batch {cancel}: {status} (the next run of its stage collects what it finished and "
                      "resubmits only the rest)", highlight=False)
    except (ConfigError, BatchAPIError) as exc:
        fail(str(exc), code=1)
    finally:
        wh.close()


export_app = typer.Typer(help="Carry the results out: the SFT set (alpaca, jsonl, hf), the preference pairs (hf --what "
                         "pairs), a trained model with its card (model).", no_args_is_help=True)
app.add_typer(export_app, name="export")


def _read_existing_warehouse(home: Optional[str]):
    """(home, read-only warehouse) for commands that only read; one-line error when there is none."""
    from instructflow.flows.common import data_home
    from instructflow.flows.status import warehouse_exists
    from instructflow.warehouse.store import WarehouseError, open_warehouse

    try:
        home_path = data_home(home)
        if not warehouse_exists(home_path):
            fail(f"no warehouse in {home_path} yet: run `instructflow run` first", code=1)
        return home_path, open_warehouse(home_path, read_only=True)
    except WarehouseError as exc:
        fail(str(exc), code=1)


SourceOpt = typer.Option(None, "--source", help="generated | seeds | all (default: what SFT trains on: all, "
                         "or generated when the profile's sft.include_seed_instances is false).")


def _config_of(wh, profile: Optional[str], config: Optional[str]):
    from instructflow.tasks.config import ConfigError

    try:
        return _config_for_reading(profile, config, wh)[0]
    except ConfigError as exc:
        fail(str(exc), code=1)


def _sft_source(source: Optional[str], cfg_of) -> tuple[str, str]:
    """(--source, why): what SFT trains on under the profile (`cfg_of()`) unless --source says otherwise."""
    from instructflow.warehouse.queries import EXPORT_SOURCES

    if source is not None and source not in EXPORT_SOURCES:
        fail(f"--source {source!r}: expected one of {', '.join(EXPORT_SOURCES)}")
    if source is not None:
        return source, ""
    cfg = cfg_of()
    return "all" if cfg.sft.include_seed_instances else "generated", f": what SFT trains on under profile {cfg.profile}"


def _export_rows(home: Optional[str], source: Optional[str], profile: Optional[str], config: Optional[str]):
    """(records, the summary line's tail): what SFT trains on unless --source says otherwise."""
    from instructflow.warehouse.queries import export_rows

    _, wh = _read_existing_warehouse(home)
    try:
        source, why = _sft_source(source, lambda: _config_of(wh, profile, config))
        rows, counts = export_rows(wh, source)
    finally:
        wh.close()
    return rows, f"{counts['generated']} generated, {counts['seeds']} from seeds (--source {source}{why})"


def _export_records(write, out: Path, home, source, profile, config) -> None:
    """`export alpaca` and `export jsonl`: the SFT set's rows, written by `write(rows, out)`, and one line."""
    rows, summary = _export_rows(home, source, profile, config)
    write(rows, out)
    console.print(f"wrote {len(rows)} records to {out}: {summary}", highlight=False)


@export_app.command("alpaca")
def export_alpaca(out: Path = typer.Option(..., "--out", help="Output JSON file."), home: Optional[str] = HomeOpt,
                  source: Optional[str] = SourceOpt, profile: Optional[str] = ProfileOpt,
                  config: Optional[str] = ConfigOpt):
    """Alpaca JSON: a list of {"instruction", "input", "output"} (by default the examples SFT trains on)."""
    from instructflow.tasks.export import write_alpaca

    _export_records(write_alpaca, out, home, source, profile, config)


@export_app.command("jsonl")
def export_jsonl(out: Path = typer.Option(..., "--out", help="Output JSONL file."), home: Optional[str] = HomeOpt,
                 source: Optional[str] = SourceOpt, profile: Optional[str] = ProfileOpt,
                 config: Optional[str] = ConfigOpt):
    """One {"prompt", "completion"} line per example, the prompt in the Alpaca format (TRL's prompt-completion form)."""
    from instructflow.tasks.export import write_prompt_completion_jsonl

    _export_records(write_prompt_completion_jsonl, out, home, source, profile, config)


@export_app.command("hf")
def export_hf(out: Path = typer.Option(..., "--out", help="Output folder (new or empty)."),
              what: str = typer.Option("sft", "--what", help="sft: the SFT set (as `export alpaca`); pairs: the "
                                       "preference pairs (prompt, chosen, rejected, source)."),
              home: Optional[str] = HomeOpt, source: Optional[str] = SourceOpt, profile: Optional[str] = ProfileOpt,
              config: Optional[str] = ConfigOpt):
    """A local Hugging Face dataset folder: data/train-<content hash>.parquet and a dataset card (README.md) that
    `datasets.load_dataset(DIR)` reads."""
    from instructflow.flows.export import export_dataset
    from instructflow.tasks.export import ExportError

    if what == "pairs" and source is not None:
        fail("--source picks a part of the SFT set: it does not apply to --what pairs")
    _, wh = _read_existing_warehouse(home)
    try:
        cfg = _config_of(wh, profile, config)
        source, why = _sft_source(source, lambda: cfg)
        folder, data_file, counts = export_dataset(wh, cfg, what, source, out)
    except (ExportError, OSError) as exc:
        fail(str(exc).splitlines()[0], code=1)
    finally:
        wh.close()
    console.print(f"wrote a Hugging Face dataset to {folder} ({data_file}, README.md): {counts}"
                  + (f" (--source {source}{why})" if what == "sft" else "") + "; set the card's license before "
                  "sharing it", highlight=False)


@export_app.command("model")
def export_model_command(stage: str = typer.Option(..., "--stage", help="sft | ppo | dpo | grpo: whose registered "
                                                   "checkpoint to export."),
                         out: Path = typer.Option(..., "--out", help="Output folder (new or empty)."),
                         home: Optional[str] = HomeOpt):
    """A standalone Hugging Face model folder (weights, tokenizer, generation config) with a model card: base
    model, data, the stage's settings and the evaluate figures against SFT."""
    from instructflow.flows.export import export_model
    from instructflow.tasks.export import ExportError

    _, wh = _read_existing_warehouse(home)
    try:
        folder, checkpoint = export_model(wh, stage, out)
    except (ExportError, OSError) as exc:
        fail(str(exc).splitlines()[0], code=1)
    finally:
        wh.close()
    console.print(f"wrote the {stage} model ({checkpoint['path']}) to {folder} with its card (README.md); set the "
                  "card's license before sharing it", highlight=False)


def _running_snapshot(home: Optional[str]) -> Optional[dict]:
    from instructflow.flows.common import data_home
    from instructflow.flows.status import running_snapshot
    from instructflow.warehouse.store import WarehouseError

    try:
        return running_snapshot(data_home(home))
    except WarehouseError:
        return None  # the normal path says what is wrong with the home, in one line


@app.command()
def report(home: Optional[str] = HomeOpt,
           out: Optional[Path] = typer.Option(None, "--out", help="HTML file (default: HOME/report.html).")):
    """A self-contained HTML report (metrics and plots inlined) of each stage's latest successful run."""
    import shutil

    from instructflow.flows.report import write_report

    live = _running_snapshot(home)
    if live:  # the run holds the warehouse; it rewrites HOME/report.html after each stage
        published = Path(live["home"]) / "report.html"
        if out and out.resolve() != published:
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(published, out)
        console.print(f"report: {out or published} (a run is going; as of its last finished stage, {live['as_of']})")
        return
    home_path, wh = _read_existing_warehouse(home)
    try:
        path = write_report(wh, home_path, out or home_path / "report.html")
    finally:
        wh.close()
    console.print(f"report: {path}")


@app.command()
def dashboard(home: Optional[str] = HomeOpt, port: int = typer.Option(4200, "--port")):
    """Start a local Prefect server with its UI (SQLite in the data home, loopback only) until Ctrl-C.
    While it runs, `instructflow run`/`stage` in other terminals send their flow runs to it."""
    from instructflow.flows.common import data_home
    from instructflow.flows.server import local_prefect_server, stop_on_term_and_hangup

    home_path = data_home(home)
    stop_on_term_and_hangup()
    try:
        with local_prefect_server(home_path, port) as api_url:
            ui = api_url[: -len("/api")]
            console.print(f"Prefect dashboard: [bold]{ui}[/] (flow runs, and each stage's artifacts under {ui}/artifacts)")
            console.print("Ctrl-C stops it.")
            while True:
                import time

                time.sleep(3600)
    except RuntimeError as exc:
        fail(str(exc), code=1)
    except KeyboardInterrupt:
        console.print("dashboard stopped")


@app.command()
def deploy(cron: Optional[str] = typer.Option(None, "--cron", help='Cron schedule, e.g. "0 3 * * *".'),
           interval: Optional[int] = typer.Option(None, "--interval", help="Or: seconds between runs."),
           name: str = typer.Option("instructflow", "--name", help="Deployment name."),
           stages: Optional[str] = typer.Option(None, "--stages", help="Comma-separated subset of stages."),
           work_pool: Optional[str] = typer.Option(None, "--work-pool", help="Register on this Prefect work pool "
                                                   "(created as a process pool if missing) and exit: a worker runs "
                                                   "the pipeline and one deployment per stage; the schedule is optional."),
           profile: Optional[str] = ProfileOpt, home: Optional[str] = HomeOpt, config: Optional[str] = ConfigOpt,
           port: int = typer.Option(4200, "--port", help="Port of the local Prefect server, if one is started.")):
    """Register the pipeline as a scheduled Prefect deployment and serve it (runs happen here) until Ctrl-C.
    Uses $PREFECT_API_URL, a running `instructflow dashboard`, or starts a local server.
    With --work-pool: register on that pool for Prefect workers, then exit."""
    if cron is not None and interval is not None:
        fail("give at most one of --cron or --interval")
    if work_pool is None and cron is None and interval is None:
        fail("give --cron or --interval (or --work-pool NAME, where the schedule is optional)")
    only = [s.strip() for s in stages.split(",")] if stages else None
    cfg, home_path = _prepare(home, config, profile, hold_warehouse=False)  # the runs take the warehouse
    if work_pool is not None:
        _deploy_on_work_pool(cfg, home_path, work_pool, name, only, cron, interval)
        return
    from contextlib import nullcontext

    from instructflow.flows.server import local_prefect_server, stop_on_term_and_hangup

    stop_on_term_and_hangup()  # prefect's runner takes SIGTERM over while serving: it stops, then exits
    api = os.environ.get("PREFECT_API_URL")
    try:
        with (nullcontext(api) if api else local_prefect_server(home_path, port)) as api_url:
            os.environ["PREFECT_API_URL"] = api_url
            from instructflow.flows.deployments import deployment_parameters
            from instructflow.flows.pipeline import pipeline

            parameters = deployment_parameters(cfg, home_path, only)
            console.print(f"serving deployment pipeline/{name} ({'cron ' + cron if cron else f'every {interval} s'}) "
                          f"against {api_url}; Ctrl-C stops it")
            from prefect.settings import PREFECT_API_URL, temporary_settings

            # prefect was imported before the URL was known: without this the runner believes it is on
            # an ephemeral API and warns that it cannot schedule (it can)
            with temporary_settings({PREFECT_API_URL: api_url}):
                pipeline.serve(name=name, cron=cron, interval=interval, parameters=parameters,
                               tags=["instructflow", cfg.profile], print_starting_message=False)
    except RuntimeError as exc:
        fail(str(exc), code=1)
    except KeyboardInterrupt:
        console.print("deployment stopped")


def _deploy_on_work_pool(cfg, home_path: Path, pool: str, name: str, stages: Optional[list], cron: Optional[str],
                         interval: Optional[int]) -> None:
    api = os.environ.get("PREFECT_API_URL")  # _prepare set it to a running dashboard's if the user did not
    if not api:
        fail("--work-pool needs a Prefect server that outlives this command and that the workers reach: set "
             "PREFECT_API_URL, or start `instructflow dashboard` for this home")
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from instructflow.flows.deployments import ensure_work_pool, register_on_work_pool

    try:
        with temporary_settings({PREFECT_API_URL: api}):  # prefect may have been imported before it was set
            pool_type, created = ensure_work_pool(pool)
            console.print(f"work pool {pool}: {'created (type process)' if created else f'exists (type {pool_type})'}",
                          highlight=False)
            names = register_on_work_pool(cfg, home_path, pool, name, stages, cron, interval)
    except (httpx.HTTPError, PrefectHTTPStatusError, ValueError, RuntimeError) as exc:
        fail(f"registering on work pool {pool} at {api}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
             code=1)
    when = f"cron {cron}" if cron else f"every {interval} s" if interval else "no schedule"
    console.print(f"registered on work pool {pool} at {api}: {names[0]} ({when}); per stage, on demand: "
                  f"{', '.join(names[1:]) or 'none'} (a stage runs when its inputs changed; parameter force=true "
                  "redoes it)", highlight=False)
    console.print(f"runs start when a worker polls the pool: PREFECT_API_URL={api} prefect worker start --pool {pool}; "
                  f"trigger one: prefect deployment run {names[-1]}", highlight=False)


def _print_summary(cfg, home_path: Path, results: dict) -> None:
    """One row per stage that ran or was skipped: its headline metrics, whole (every metric: `status --json`)."""
    from instructflow.flows.stages import stage_spec

    table = Table(title=f"instructflow · profile {cfg.profile} · {home_path}")
    table.add_column("stage")
    table.add_column("result", overflow="fold")
    for name, metrics in (results or {}).items():
        metrics = metrics or {}
        shown = [f"{k}={_whole(metrics[k])}" for k in stage_spec(name).headline if metrics.get(k) is not None]
        table.add_row(name, ("skipped (inputs unchanged): " if metrics.get("skipped") else "") + (", ".join(shown) or "-"))
    Console().print(table)


def _whole(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# (stage, metric, label) for the closing lines of `instructflow run`
HEADLINE = [("filter", "kept", "kept instructions"), ("sft", "eval_loss_before", "SFT eval loss before"),
            ("sft", "eval_loss_after", "after"), ("reward", "accuracy_after", "reward accuracy (held-out pairs)"),
            ("dpo", "eval_accuracy", "DPO preference accuracy (held-out pairs)"),
            ("ppo", "reward_slope", "PPO reward slope per update"), ("ppo", "kl_last", "KL last"),
            ("grpo", "reward_slope", "GRPO reward slope per update")]


def _print_outcome(home_path: Path, results: dict) -> None:
    """The few numbers people look at, then where the report and the dashboard are."""
    from instructflow.flows.server import running_dashboard

    out = Console(soft_wrap=True)  # stdout, after the summary table
    shown = [f"{label} {_short(results[stage][key])}" for stage, key, label in HEADLINE
             if key in (results.get(stage) or {})]
    if shown:
        out.print("[bold]" + " · ".join(shown) + "[/]")
    for line in (results.get("evaluate") or {}).get("summary", []):  # each method vs SFT, with its intervals
        out.print(f"[bold]{line}[/]", highlight=False)
    # written once, after each stage (`publish_status`), so `report` during a run sees it too
    report_path = home_path / "report.html"
    out.print(f"report: {report_path}" if report_path.exists() else
              f"report: none yet (no stage ran); `instructflow report --home {home_path}` writes one")
    live = running_dashboard(home_path)
    if live:
        out.print(f"dashboard: {live[: -len('/api')]} (runs, and each stage's artifacts under /artifacts)")
    else:
        out.print(f"dashboard: `instructflow dashboard --home {home_path}`, then open http://127.0.0.1:4200 "
                  "(this run's flow runs and artifacts are stored there)")


@app.callback()
def use_prefect_defaults() -> None:
    """PREFECT_DEFAULTS where the user set nothing, before a command runs (`_prepare` again, for callers
    that skip the command line)."""
    for name, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
