"""Where one S2L table cell spends its time: seconds and shares per stage.

    .venv/bin/python benchmarks/profile_cell.py [--config standard] [--rows pretrained lora]
                                               [--pretrain-steps 20] [--threads N]

The cost of a cell does not depend on what the weights hold, so the testbed model is
pre-trained for only ``--pretrain-steps`` steps at the profile's shape (in a throwaway
store: nothing is read from or written to the project's cache). Then each row of one
domain runs as `s2l-guard attack` runs it - the pre-trained row first, as the table does,
so its SP set is generated once - with the parts of a cell wrapped in timers:

- SP generation: the model's own images of the domain's prompt (shared by the SP rows);
- fine-tuning, and the trajectory's MIA scoring inside it;
- each MIA on the domain's members and non-members;
- candidate generation and extraction matching;
- statistics: the per-domain summary the table prints (bootstrap intervals, tests);
- the rest of the cell: caching, bookkeeping, writing.

A stage nested in another (a noise prediction inside an MIA) counts to the outer one,
except an MIA inside fine-tuning, which is the trajectory. The table goes into
docs/performance.md before and after every speed change.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager


class StageTimer:
    """Exclusive wall time per stage label; a timed call inside another counts to the outer one."""

    NESTED = {"fine-tuning": "trajectory scoring"}  # an MIA scored inside fine-tuning

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.stack: list[str] = []
        self.containers: set[str] = set()  # stages whose timed calls are counted apart

    def _counts_apart(self, label: str) -> bool:
        if not self.stack or self.stack[-1] in self.containers:
            return True
        return label.startswith("MIA") and self.stack[-1] in self.NESTED

    def wrap(self, owner, attr: str, label: str) -> None:
        original = getattr(owner, attr)
        timer = self

        def timed(*args, **kwargs):
            if not timer._counts_apart(label):
                return original(*args, **kwargs)  # counts to the stage it runs in
            name = timer.NESTED.get(timer.stack[-1], label) if timer.stack else label
            timer.stack.append(name)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timer.stack.pop()
                took = time.perf_counter() - start
                timer.seconds[name] += took
                if timer.stack:  # the outer stage's own time excludes it
                    timer.seconds[timer.stack[-1]] -= took

        setattr(owner, attr, timed)

    @contextmanager
    def stage(self, label: str):
        """Time a block; the timed calls inside it are counted apart (its own time excludes them)."""
        start = time.perf_counter()
        self.containers.add(label)
        self.stack.append(label)
        try:
            yield
        finally:
            self.stack.pop()
            self.seconds[label] += time.perf_counter() - start


def wrap_cell_stages(timer: StageTimer) -> None:
    """Time the parts of a cell: SP generation, fine-tuning, candidates, matching, each MIA."""
    import attacks.s2l as s2l_attack
    import s2l_guard.runner.cells as cells
    from attacks.base import MIA
    from s2l_guard.provider import Provider

    timer.wrap(cells, "generate_sp_set", "SP generation")
    timer.wrap(Provider, "finetune", "fine-tuning")
    timer.wrap(Provider, "generate", "candidate generation")
    timer.wrap(s2l_attack, "candidate_distances", "extraction matching")
    for name in MIA.names():
        timer.wrap(MIA.get(name), "score", f"MIA {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="standard", help="a profile name under configs/ or a TOML path")
    parser.add_argument("--rows", nargs="+", default=["pretrained", "lora"], help="table rows to run, in order")
    parser.add_argument("--domain", default=None, help="the private domain (default: the first)")
    parser.add_argument("--pretrain-steps", type=int, default=20, help="pre-training steps (cost does not depend on them)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    import s2l_guard.runner.cells as cells
    from s2l_guard.cli import config_path
    from s2l_guard.config import load_config
    from s2l_guard.runner.plan import plan_rows
    from s2l_guard.runner.summaries import controls_for, summarize_cell

    path = config_path(args.config)
    timer = StageTimer()
    wrap_cell_stages(timer)

    with tempfile.TemporaryDirectory() as store:
        config = load_config(path)
        config = config.replace(run={"store": store, "out_dir": os.path.join(store, "runs")},
                                pretrain={"steps": args.pretrain_steps, "checkpoint_every": args.pretrain_steps})  # fmt: skip
        with timer.stage("loading (testbed, short pre-training, model)"):
            run = cells.S2LRun(config)
        rows = {row.label: row for row in plan_rows(run.config)}
        unknown = [r for r in args.rows if r not in rows]
        if unknown:
            raise SystemExit(f"no row {', '.join(unknown)} in {path.name}; its rows: {', '.join(rows)}")
        domain = next((d for d in run.domains if d.name == args.domain), None) if args.domain else run.domains[0]
        if domain is None:
            raise SystemExit(f"no domain {args.domain}; the profile's: {', '.join(d.name for d in run.domains)}")
        done = {}
        start = time.perf_counter()
        for label in args.rows:
            with timer.stage("rest of the cell (cache, bookkeeping, writing)"):
                done[label] = run.run_cell(domain, rows[label])
        with timer.stage("statistics (summaries, intervals, tests)"):
            for label, cell in done.items():
                summarize_cell(cell, done.get("pretrained", cell), run.config, run.config.run.seed, controls_for(done, cell))
        total = time.perf_counter() - start

    print(f"profile {path.name}, domain {domain.name}, rows {' '.join(args.rows)}, torch threads {torch.get_num_threads()}")
    print(f"{'stage':48s} {'seconds':>8s} {'share':>6s}")
    for label, seconds in sorted(timer.seconds.items(), key=lambda kv: -kv[1]):
        if label.startswith("loading"):
            continue
        print(f"{label:48s} {seconds:8.1f} {seconds / total:6.1%}")
    print(f"{'cells in all':48s} {total:8.1f} {1:6.0%}")
    print(f"(not in the cells: {timer.seconds['loading (testbed, short pre-training, model)']:.1f} s loading)")


if __name__ == "__main__":
    main()
