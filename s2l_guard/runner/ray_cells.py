"""A table's missing cells as Ray tasks ([run] executor = "ray"): spread over a Ray cluster, or a
Ray instance started on this machine.

Each task computes one cell with the code a local worker process runs (``S2LRun.run_cell``) into
the same content-addressed store, so the store must be a path every node reads and writes (a
shared file system), and the results are those of the local executor: a task runs one thread on a
CPU (as the local workers do) and takes a whole GPU on a GPU machine. A task whose worker dies is
retried by Ray and resumes from what the store holds; a killed driver resumes like a local run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from s2l_guard.config import Config
from s2l_guard.errors import ConfigError
from s2l_guard.results import TableCell
from s2l_guard.runtime import log

RETRIES = 3  # attempts after a worker dies mid-cell


def ray_cells(run, missing: list, utility: bool) -> Iterator[tuple]:
    """(domain, row, cell) for each of ``missing`` as its task finishes; ``utility``: the deployed
    model's utility is measured by a task too (the longest one, so it is submitted first)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("[run] executor = 'ray' needs Ray: pip install 'ray>=2.9' (or use executor = 'local')") from None
    config = shared_config(run.config)
    started_here = not ray.is_initialized()
    if started_here:
        address = config.run.ray_address or None
        cpus = None if address else torch.get_num_threads()
        ray.init(address=address, num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    gpu = run.device.type == "cuda"
    resources = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": 1}
    cell_task = ray.remote(max_retries=RETRIES, **resources)(_ray_cell)
    where = config.run.ray_address or "a local Ray instance"
    log(
        f"{len(missing)} cells{' and utility' if utility else ''} to compute as Ray tasks on {where} ({ray.cluster_resources().get('CPU', 0):g} CPUs)"
    )
    pending = {}
    try:
        if utility:
            pending[ray.remote(max_retries=RETRIES, **resources)(_ray_utility).remote(config)] = None
        for domain, row in missing:
            pending[cell_task.remote(config, domain.name, row)] = (domain, row)
        while pending:
            [done], _ = ray.wait(list(pending), num_returns=1)
            which = pending.pop(done)
            result = ray.get(done)
            if which is not None:
                yield *which, result
    finally:  # on an error or Ctrl-C the queued tasks are dropped; what finished is in the store
        for ref in pending:
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()


def shared_config(config: Config) -> Config:
    """The config as a task on another node reads it: the store and output paths made absolute."""
    return config.replace(run={"store": str(Path(config.run.store).resolve()), "out_dir": str(Path(config.run.out_dir).resolve())})


_RUNS: dict[str, object] = {}  # a Ray worker process's runs, by config: built once, reused by its later tasks


def _worker_run(config: Config):
    from s2l_guard.cache import content_key

    from .cells import worker_run

    key = content_key("run", config.to_dict())
    if key not in _RUNS:
        _RUNS[key] = worker_run(config, threads=1)
    return _RUNS[key]


def _ray_cell(config: Config, domain_name: str, row) -> TableCell:
    from .cells import _safe_cell

    run = _worker_run(config)
    domain = next(d for d in run.domains if d.name == domain_name)
    return _safe_cell(run, domain, row)


def _ray_utility(config: Config) -> None:
    _worker_run(config).utility()
