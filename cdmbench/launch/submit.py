"""Submitting planned jobs through submitit: a SLURM executor per job (nodes, GPUs, time, the
requeue signal, the dependencies as ``afterok``), or the local executor (processes of this machine;
a job that waits on others is submitted once they finish); arrays for several calls of one job;
the sbatch scripts for ``--dry-run``; and ``<run>/launch.json``, the job ids ``cdmbench status``
shows (each job's log, ``<run>/launch/<job id>_<process>_log.out``, is beside it).

The requeue signal reaches submitit through ``$SUBMITIT_PREEMPT_SIGNAL`` (read when submitit is
imported: exported in each sbatch script before the job's processes start) and SLURM through
``--signal=SIG@grace_s``."""

from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdmbench.errors import CdmbenchError
from cdmbench.launch.jobs import Job
from cdmbench.launch.options import time_minutes
from cdmbench.launch.status import LAUNCH_FILE
from cdmbench.recipe.schema import Launch
from cdmbench.storage.files import atomic_write, locked

PREEMPT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"  # submitit's


@dataclass
class Planned:
    """One job to submit: its name (``train base64``, ``sample``, ``shards``, ``metrics``), its calls
    (one, or one per array element), the names of the jobs it waits for, whether it takes the
    training resources (``launch.nodes`` x ``launch.gpus_per_node`` processes) or one process with
    one GPU, and what launch.json records of it."""

    name: str
    calls: list[Job]
    after: list[str] = field(default_factory=list)
    trains: bool = False
    info: dict[str, Any] = field(default_factory=dict)


def shape(job: Planned, settings: Launch) -> tuple[int, int, int]:
    """(nodes, processes per node, GPUs per node) of ``job``."""
    if job.trains:
        return settings.nodes, max(1, settings.gpus_per_node), settings.gpus_per_node
    return 1, 1, min(1, settings.gpus_per_node)


def slurm_parameters(job: Planned, settings: Launch, run_name: str, dependency: str | None) -> dict[str, Any]:
    """The job's parameters of ``submitit.SlurmExecutor`` (sbatch's names)."""
    nodes, tasks, gpus = shape(job, settings)
    params = dict(job_name=f"{run_name}-{job.name.replace(' ', '-')}", time=time_minutes(settings.time),
                  nodes=nodes, ntasks_per_node=tasks, gpus_per_node=gpus or None, cpus_per_task=settings.cpus_per_task,
                  partition=settings.partition, account=settings.account, qos=settings.qos,
                  signal_delay_s=settings.grace_s, dependency=dependency,
                  setup=[f"export {PREEMPT_SIGNAL_ENV}={settings.signal}", *(settings.setup or [])],
                  additional_parameters={"requeue": True, "signal": f"{settings.signal}@{settings.grace_s}",
                                         **(settings.sbatch or {})})
    return {k: v for k, v in params.items() if v is not None}


def sbatch_scripts(plan: list[Planned], settings: Launch, folder: Path, run_name: str) -> str:
    """The sbatch script of every job, as submitit would write them (its own script maker);
    dependencies name the jobs waited for, whose ids SLURM gives at submission."""
    from submitit.slurm.slurm import _make_sbatch_string  # the text SlurmExecutor submits

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    parts = []
    for job in plan:
        dependency = ("afterok:" + ":".join(f"<{name.replace(' ', '-')}>" for name in job.after)) if job.after else None
        params = slurm_parameters(job, settings, run_name, dependency)
        if len(job.calls) > 1:
            params["map_count"] = len(job.calls)
        parts.append(f"# --- {job.name}" + (f": an array of {len(job.calls)} jobs" if len(job.calls) > 1 else "") + "\n"
                     + _make_sbatch_string(command=command, folder=folder, **params))
    return "\n".join(parts)


def _executor(job: Planned, settings: Launch, folder: Path, run_name: str, dependency: str | None):
    import submitit

    if settings.cluster == "slurm":
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=settings.max_requeues)
        executor.update_parameters(**slurm_parameters(job, settings, run_name, dependency))
        return executor
    _, tasks, gpus = shape(job, settings)
    executor = submitit.LocalExecutor(folder=folder, max_num_timeout=settings.max_requeues)
    executor.update_parameters(timeout_min=time_minutes(settings.time), tasks_per_node=tasks, gpus_per_node=gpus,
                               signal_delay_s=settings.grace_s)
    return executor


def _wait(name: str, jobs: list) -> None:
    """Until the local ``jobs`` end; a failed one stops the launch, naming its log."""
    for job in jobs:
        try:
            job.results()  # every process's
        except Exception as exc:  # submitit's FailedJobError / UncompletedJobError: the job's traceback
            last = str(exc).strip().splitlines()[-1:] or [""]
            raise CdmbenchError(f"job {name} ({job.job_id}) failed: {last[0]}; its log: {job.paths.stdout} and "
                                f"{job.paths.stderr}. Fix it and launch again: finished work is kept") from None


def submit(plan: list[Planned], settings: Launch, *, run_path: Path, run_name: str, echo=print) -> dict[str, list[str]]:
    """Submit ``plan`` (in order: a job after those it waits for); returns each job's ids. On SLURM
    it returns at once; locally it returns when every job has ended. launch.json gets a row per
    job as soon as it is submitted."""
    if settings.cluster == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise CdmbenchError("sbatch and srun are not on PATH: launch on a SLURM login node, or use --cluster local, "
                            "or --dry-run to see the sbatch scripts")
    os.environ[PREEMPT_SIGNAL_ENV] = settings.signal  # the local executor's processes start from this one
    folder = run_path / "launch"
    submitted: dict[str, list] = {}
    record = {"id": uuid.uuid4().hex[:12], "cluster": settings.cluster, "jobs": [],
              "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for job in plan:
        dependency = None
        if settings.cluster == "slurm" and job.after:
            dependency = "afterok:" + ":".join(dict.fromkeys(j.job_id.split("_")[0] for name in job.after
                                                             for j in submitted[name]))
        elif job.after:
            for name in job.after:
                _wait(name, submitted[name])
        executor = _executor(job, settings, folder, run_name, dependency)
        if len(job.calls) == 1:
            submitted[job.name] = [executor.submit(job.calls[0])]
        else:
            with executor.batch():
                pending = [executor.submit(call) for call in job.calls]
            submitted[job.name] = pending
        ids = [j.job_id for j in submitted[job.name]]
        record["jobs"].append({"name": job.name, "job_ids": ids, "after": job.after, **job.info})
        _record(run_path, record)
        echo(f"{job.name}: job {', '.join(ids)}" + (f" (after {', '.join(job.after)})" if job.after else ""))
    if settings.cluster == "local":
        for name, jobs in submitted.items():
            _wait(name, jobs)
    return {name: [j.job_id for j in jobs] for name, jobs in submitted.items()}


def _record(run_path: Path, launch: dict[str, Any]) -> None:
    """Put ``launch`` (this launch, by its id) into ``<run>/launch.json``."""
    path = run_path / LAUNCH_FILE
    with locked(path):
        launches = json.loads(path.read_text())["launches"] if path.exists() else []
        launches = [entry for entry in launches if entry["id"] != launch["id"]] + [launch]
        atomic_write(path, json.dumps({"launches": launches}, indent=1))
