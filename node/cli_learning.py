"""``lungnode train``, ``lungnode runs`` and ``lungnode model``: training runs and the models they
produce (:mod:`node.learn.runs` records, :mod:`training.retrain` trains).

The CLI is the composition root: it is the one place where the node's records
and the trainer meet.  The trainer reads the frozen manifest only; this module
creates the run's row, holds its lease while it trains and records the
candidate (or the error).  Under ``torchrun`` only rank 0 touches the
database; the other ranks learn the run from it through ``torch.distributed``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import getpass
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlalchemy import select

from node.cli_support import ConfigOpt, console, error, sessions, settings, use_config
from node.db import DatasetManifest, TrainingRun
from node.errors import LungnodeError, TrainingError
from node.learn.runs import (
    RunHeartbeat,
    begin_run,
    create_run,
    fail_run,
    finish_run,
    latest_dataset,
    run_params,
)
from node.work.jobs import lease_owner

__all__ = ["model_app", "runs_command", "train_command"]

model_app = typer.Typer(help="Severity models: the shipped ones and the trained candidates.",
                        no_args_is_help=True, rich_markup_mode=None)


def _owner() -> str:
    return lease_owner()


def _world() -> tuple[int, int]:
    """(rank, world size) under torchrun; (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _share_run(rank: int, world: int, value: list[Any]) -> list[Any]:
    """Rank 0's run id, manifest and options, given to every rank (torchrun) by a broadcast."""
    if world <= 1:
        return value
    import torch.distributed as dist

    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return list(box[0] or [])


@contextlib.contextmanager
def _process_group(world: int) -> Iterator[None]:
    """Under torchrun, the process group of the whole command (gloo on the CPU, NCCL on GPUs)."""
    if world <= 1:
        yield
        return
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield
    finally:
        # the DDP model and its reducer (gloo work, C++ threads) go while the group is alive: left
        # to the interpreter's exit they aborted a rank once (std::terminate) under load
        gc.collect()
        with contextlib.suppress(RuntimeError):
            dist.barrier()  # every rank past its last collective before the group goes
        dist.destroy_process_group()


def train_command(
    dataset: Annotated[int | None, typer.Option("--dataset", help="frozen dataset id "
                                                "(default: the latest `lungnode dataset freeze`)")] = None,
    epochs: Annotated[int | None, typer.Option(help="epochs (default [training] epochs)")] = None,
    architecture: Annotated[str | None, typer.Option(help="compact3d or cov3d (default [training])")] = None,
    seed: Annotated[int | None, typer.Option(help="seed (default [training] seed)")] = None,
    resume: Annotated[int | None, typer.Option("--resume", help="continue run RUN from its last "
                                               "checkpoint", metavar="RUN")] = None,
    run: Annotated[int | None, typer.Option("--run", help="train the queued run RUN (what the "
                                            "schedule starts)", metavar="RUN")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as one JSON object")] = False,
    by: Annotated[str | None, typer.Option("--by", help="who starts it (default: the OS user)")] = None,
    config: ConfigOpt = None,
) -> None:
    """Train a candidate severity model on a frozen dataset; it goes into the candidates' registry.

    Under ``torchrun --nproc_per_node N`` every process runs this command; rank 0 alone
    records the run and writes the candidate, the others train their share of each batch.
    """
    use_config(config)
    s = settings()
    rank, world = _world()
    with _process_group(world):
        _train(s, rank, world, dataset=dataset, epochs=epochs, architecture=architecture, seed=seed,
               resume=resume, run=run, as_json=as_json, by=by or getpass.getuser())


def _train(s: Any, rank: int, world: int, *, dataset: int | None, epochs: int | None,
           architecture: str | None, seed: int | None, resume: int | None, run: int | None,
           as_json: bool, by: str) -> None:
    factory = sessions() if rank == 0 else None
    owner = _owner()
    info: list[Any] = []
    if factory is not None:
        try:
            info = _start(factory, s, dataset=dataset, epochs=epochs, architecture=architecture,
                          seed=seed, resume=resume, run=run, by=by, owner=owner)
        except LungnodeError as exc:
            _share_run(rank, world, [])
            error(f"cannot train: {exc}")
            taken = run if run is not None else resume
            if taken is not None:  # the scheduled run's reason, where `lungnode runs` shows it
                with factory() as session:
                    fail_run(session, taken, f"cannot train: {exc}")
            raise typer.Exit(2) from exc
    info = _share_run(rank, world, info)
    if not info:
        raise typer.Exit(2)
    run_id, manifest_rel, params, resuming = info
    root = s.learn_root
    from model.errors import ModelError
    from training.retrain import RunOptions, train_run

    options = RunOptions(**{k: v for k, v in params.items()
                            if k in {f.name for f in dataclasses.fields(RunOptions)}})
    heartbeat = (RunHeartbeat(factory, run_id, owner, s.training.lease_seconds)
                 if factory is not None else contextlib.nullcontext())
    try:
        with heartbeat:
            result = train_run(root / manifest_rel, root / f"runs/run-{run_id}", root / "models",
                               options, resume=resuming, progress=not as_json and rank == 0)
    except BaseException as exc:  # recorded on the run, then re-raised (KeyboardInterrupt too)
        if factory is not None:
            with factory() as session:
                fail_run(session, run_id, f"{type(exc).__name__}: {exc}; `lungnode train --resume "
                                          f"{run_id}` continues from the last checkpoint")
        if isinstance(exc, LungnodeError | ModelError | ValueError | OSError):
            error(f"training run {run_id} failed: {exc}")
            raise typer.Exit(1) from exc
        raise
    if factory is None:
        return
    out = dataclasses.asdict(result)
    with factory() as session:
        finish_run(session, run_id, candidate=out["candidate"], metrics=out.get("metrics", {}))
    out = {"run": run_id, **out}
    if as_json:
        print(json.dumps(out, default=str))
    else:
        console.print(f"training run {run_id} succeeded: candidate {out['candidate']} "
                      f"(best epoch {out.get('best_epoch')}); `lungnode model show {out['candidate']}`",
                      markup=False, highlight=False)


def _start(factory: Any, s: Any, *, dataset: int | None, epochs: int | None, architecture: str | None,
           seed: int | None, resume: int | None, run: int | None, by: str, owner: str) -> list[Any]:
    """Create (or take over) the run's row; returns [run id, manifest path, options, resuming].

    The dataset is checked against the latest locked evaluation set first: a dataset frozen
    before a lock may hold patients that are locked now, and is refused.
    """
    t = s.training
    if resume is not None and run is not None:
        raise TrainingError("--resume and --run name a run each; give one")
    with factory() as session:
        if resume is not None or run is not None:
            run_id = resume if resume is not None else run
            assert run_id is not None
            row = begin_run(session, run_id, owner, t.lease_seconds, resume=resume is not None)
            params = json.loads(row.params or "{}")
            if row.dataset_id is None:
                if not params.get("freeze"):
                    raise TrainingError(f"training run {run_id} has no dataset")
                row.dataset_id = _freeze_for_run(session, s, f"schedule run {run_id}")
            manifest = session.get_one(DatasetManifest, row.dataset_id)
            _check_unlocked(session, s, manifest)
            session.commit()
            return [run_id, manifest.path, _options(params, run_id), resume is not None]
        chosen = (session.get(DatasetManifest, dataset) if dataset is not None
                  else latest_dataset(session))
        if chosen is None or chosen.kind != "training":
            what = f"dataset {dataset} is not a frozen training dataset" if dataset is not None \
                else "there is no frozen dataset yet"
            raise TrainingError(f"{what}; label studies, then `lungnode dataset freeze`")
        _check_unlocked(session, s, chosen)
        params = run_params(s, architecture=architecture, epochs=epochs or None, seed=seed)
        row = create_run(session, dataset_id=chosen.id, trigger="cli", created_by=f"cli:{by}",
                         params=params)
        session.flush()
        begin_run(session, row.id, owner, t.lease_seconds)
        session.commit()
        return [row.id, chosen.path, _options(params, row.id), False]


def _check_unlocked(session: Any, s: Any, row: DatasetManifest) -> None:
    from node.learn.datasets import check_trainable, latest_lock, load_manifest, locked_patients

    check_trainable(load_manifest(s, row), locked_patients(latest_lock(session, s)))


def _options(params: dict[str, Any], run_id: int) -> dict[str, Any]:
    arch = params.get("architecture", "compact3d")
    return {**params, "candidate": f"candidate-run{run_id}-{arch}"}


def _freeze_for_run(session: Any, s: Any, created_by: str) -> int:
    """A scheduled run freezes the labels as they are when it starts."""
    from node.learn.datasets import freeze

    freeze(session, s, created_by=created_by)
    row = latest_dataset(session)
    if row is None:
        raise TrainingError("freezing a dataset for the scheduled run produced nothing")
    return row.id


def runs_command(
    as_json: Annotated[bool, typer.Option("--json")] = False,
    config: ConfigOpt = None,
) -> None:
    """Training runs: state, dataset, candidate, metrics, error."""
    use_config(config)
    with sessions()() as session:
        rows = list(session.scalars(select(TrainingRun).order_by(TrainingRun.id)))
        data: list[dict[str, Any]] = [
                {"run": r.id, "state": str(r.state), "trigger": r.trigger, "slot": r.slot,
                 "dataset": r.dataset_id, "created_by": r.created_by,
                 "created_at": r.created_at.isoformat(),
                 "finished_at": r.finished_at.isoformat() if r.finished_at else None,
                 "candidate": r.candidate, "metrics": json.loads(r.metrics) if r.metrics else None,
                 "error": r.error} for r in rows]
    if as_json:
        print(json.dumps(data))
        return
    if not data:
        console.print("no training runs yet; `lungnode train` starts one")
    for d in data:
        f1 = ((d["metrics"] or {}).get("validation") or {}).get("severity_macro_f1")
        console.print(f"run {d['run']}: {d['state']} ({d['trigger']}) dataset {d['dataset']} "
                      f"candidate {d['candidate'] or '-'}" + (f" F1 {f1:.3f}" if f1 is not None else "")
                      + (f"\n  {d['error']}" if d["error"] else ""), markup=False, highlight=False)


def _registries() -> list[tuple[str, Path]]:
    from model.registry import DEFAULT_REGISTRY

    s = settings()
    out = [("shipped", DEFAULT_REGISTRY)]
    if s.model.registry is not None:
        out.append(("configured", s.model.registry))
    out.append(("candidate", s.learn_root / "models"))
    return out


def _card_summary(kind: str, card: Any) -> dict[str, Any]:
    training = card.training or {}
    return {"name": card.name, "version": card.version, "kind": kind, "architecture": card.architecture,
            "sha256": card.sha256, "dataset_digest": training.get("dataset_digest"),
            "metrics": card.metrics}


@model_app.command("list")
def model_list(as_json: Annotated[bool, typer.Option("--json")] = False, config: ConfigOpt = None) -> None:
    """Models in the shipped, the configured and the candidates' registries, with their cards."""
    use_config(config)
    from model.errors import ModelError
    from model.registry import list_models, read_card

    s = settings()
    live = s.model.name
    rows = []
    for kind, folder in _registries():
        if not folder.is_dir():
            continue
        for name in list_models(folder):
            try:
                card = read_card(name, folder)
            except ModelError as exc:
                rows.append({"name": name, "kind": kind, "error": str(exc)})
                continue
            row = _card_summary(kind, card)
            row["live"] = (name == live) or (live is None and kind == "shipped" and name == _default())
            rows.append(row)
    if as_json:
        print(json.dumps(rows, default=str))
        return
    for r in rows:
        if "error" in r:
            console.print(f"{r['name']} ({r['kind']}): unreadable: {r['error']}", markup=False)
            continue
        val: Any = (r["metrics"] or {}).get("validation", {}) if isinstance(r["metrics"], dict) else {}
        f1 = val.get("severity_macro_f1") if isinstance(val, dict) else None
        console.print(f"{'*' if r['live'] else ' '} {r['name']} {r['version']} ({r['kind']}, "
                      f"{r['architecture']}) sha256 {r['sha256'][:12]}"
                      + (f" dataset {r['dataset_digest'][:12]}" if r["dataset_digest"] else "")
                      + (f" val F1 {f1:.3f}" if isinstance(f1, float) else ""),
                      markup=False, highlight=False)


def _default() -> str:
    from model.registry import DEFAULT_MODEL

    return DEFAULT_MODEL


@model_app.command("show")
def model_show(name: str, config: ConfigOpt = None) -> None:
    """A model's full card (JSON)."""
    use_config(config)
    from model.errors import ModelError
    from model.registry import read_card

    for _kind, folder in _registries():
        if (folder / f"{name}.json").is_file():
            try:
                card = read_card(name, folder)
            except ModelError as exc:
                error(str(exc))
                raise typer.Exit(2) from exc
            print(card.to_json(), end="")
            return
    error(f"no model named {name!r}; `lungnode model list` shows them")
    raise typer.Exit(2)

