"""The ``s2l-guard`` command line."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from pathlib import Path

from . import __version__
from .errors import S2LError

PROFILES = Path(__file__).resolve().parents[1] / "configs"
_LEASE = contextlib.ExitStack()  # the cores a computing command holds until main() returns


def config_path(value: str) -> Path:
    """A path, or the name of a shipped profile (``smoke``, ``quick``, ``standard``)."""
    path = Path(value)
    if not path.exists() and (PROFILES / f"{value}.toml").is_file():
        return PROFILES / f"{value}.toml"
    return path


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=config_path, default=PROFILES / "standard.toml",
        help="TOML profile: a path, or smoke / quick / standard (default: standard)",
    )  # fmt: skip


def _load(path: Path):
    """A profile, checked in full: core sections and the plugins it names."""
    from .config import load_config
    from .runner.settings import check_plugins

    return check_plugins(load_config(path))


def _cmd_config_show(args) -> int:
    print(_load(args.config).to_toml(), end="")
    return 0


def _cmd_config_check(args) -> int:
    """The profile's gates: what each can resolve at its sample sizes and draws; exit 1 when a
    threshold cannot be passed by a model that leaks nothing."""
    from .resolution import refusals, table_lines

    config = _load(args.config)
    print(f"resolution of {config.source}'s gates: the smallest leakage each tells from zero with {config.gates.power:.0%} power")
    for line in table_lines(config):
        print(line)
    problems = refusals(config)
    for problem in problems:
        print(f"refused: {problem}")
    return 1 if problems else 0


def _cmd_plugins(args) -> int:
    """Every registered shaker, membership inference attack and defense: what a profile may name."""
    from .runner.settings import REGISTRIES

    titles = {"shakers": "shakers ([attack] shakers)", "mia": "membership inference attacks ([attack] mia)",
              "defenses": "defenses ([defense] name, [matrix] defenses)"}  # fmt: skip
    for table, registry in REGISTRIES.items():
        print(titles[table])
        for name, cls in registry.items():
            print(f"  {name:<26} {cls.summary} ({', '.join(cls.threat_models)}; {cls.paper})")
    return 0


def _cmd_testbed_build(args) -> int:
    from .cache import Store
    from .data import load_imagefolder
    from .runner.stages import testbed_stage

    config = _load(args.config)
    artifact = testbed_stage(Store(config.run.store), config)
    folder = artifact.path
    if args.out:
        if Path(args.out).exists():
            raise S2LError(f"{args.out} already exists; choose a new folder for --out")
        shutil.copytree(artifact.path, args.out, ignore=shutil.ignore_patterns("s2l-artifact.json"))
        folder = Path(args.out)
    dataset = load_imagefolder(folder)
    counts: dict[tuple[str, str], list[int]] = {}
    for r in dataset.records:
        counts.setdefault((r.domain, r.membership), []).append(r.copies)
    print(f"{'domain':<8} {'membership':<10} {'images':>6} {'training copies':>15}")
    for (domain, membership), copies in sorted(counts.items()):
        print(f"{domain:<8} {membership:<10} {len(copies):>6} {sum(copies):>15}")
    print(f"data set: {folder} ({len(dataset)} images, metadata.jsonl)")
    return 0


def _run_config(args, *, computes: bool = True):
    """The config a run command works on (``--device`` applied), printed first as every output is;
    once it has loaded, a command that ``computes`` leases the cores its threads will use
    (s2l_guard/cores.py)."""
    import torch

    from .cores import core_lease

    config = _load(args.config)
    if args.device:
        config = config.replace(run={"device": args.device})
    if getattr(args, "workers", None) is not None:
        config = config.replace(run={"workers": args.workers})
    if getattr(args, "executor", None):
        config = config.replace(run={"executor": args.executor})
    if getattr(args, "address", None):
        config = config.replace(run={"executor": "ray", "ray_address": args.address})
    print(config.to_toml())
    if computes:
        _LEASE.enter_context(core_lease(torch.get_num_threads()))
    return config


def _cmd_pretrain(args) -> int:
    from .runner.stages import run_pretrain

    run_pretrain(_run_config(args))
    return 0


def _cmd_attack(args) -> int:
    from .runner.defense_summary import format_defense_summary
    from .runner.settings import registered
    from .runner.table import format_table, run_attack, write_results
    from .runtime import log

    config = _run_config(args)
    names = [config.defense.name] if args.defense is None else registered("defenses") if args.defense == "all" else [args.defense]
    if args.defense not in (None, "all"):
        registered("defenses", args.defense)  # an unknown name fails here, with the list of known ones
    summaries = []
    for name in names:
        defended = config.replace(defense={"name": name, "threat_model": args.threat_model or config.defense.threat_model})
        if len(names) > 1:
            log(f"defense {name} ({names.index(name) + 1}/{len(names)})")
        results = run_attack(defended)
        run_dir = write_results(defended, results)
        print(format_table(results))
        log(f"outputs in {run_dir}/ (results.json, table.txt, table.md, config.toml); took {results['wall_seconds']:.1f} s")
        summaries.append(results)
    if len(summaries) > 1:
        print("\n" + format_defense_summary(summaries))
    return 0


def apply_model_options(config, model: str | None, data: str | None):
    """``--model`` / ``--data``: audit a given model folder (and its data set) instead of the testbed's."""
    if data and not model:
        raise S2LError("--data names the data set of a model given with --model; add --model PATH")
    if not model:
        return config
    return config.replace(run={"model": str(Path(model).resolve()), "data": str(Path(data).resolve()) if data else ""})


def _cmd_matrix(args) -> int:
    from .gates import count_text, evaluate
    from .report import write_report
    from .runner.matrix import load_matrix, matrix_folder, run_matrix, write_matrix
    from .runner.plan import plan
    from .runner.stages import run_folder
    from .runtime import log

    config = apply_model_options(_run_config(args, computes=not args.merge), args.model, args.data)  # a merge only reads and writes
    defenses = args.defense or None
    if defenses:
        config = config.replace(matrix={"defenses": defenses})
    if args.replicates is not None:
        config = config.replace(matrix={"replicates": args.replicates})
    if args.draws is not None:
        config = config.replace(matrix={"draws": args.draws})
    folder = Path(args.out) if args.out else matrix_folder(config)
    if args.merge:
        from .runner.merge import merge_matrices, part_paths

        results = merge_matrices(config, {str(path): load_matrix(path) for path in part_paths(args.merge, folder)})
    else:
        results = run_matrix(config)
    write_matrix(results, folder)
    files = write_report(folder, ablation_dirs=[run_folder(config)])
    planned = plan(config)
    verdicts = evaluate(results, config.gates, planned)
    units = f"{len(results['seeds'])} replicate(s) x {len(results.get('draws', [0]))} draw(s) pooled per gate"
    print(f"gates: {count_text(verdicts)} ({units}; undecided: the interval straddles the threshold or the measure cannot "
          f"be trusted here; skip: the cell did not run)")  # fmt: skip
    if config.gates.mode == "compare" and "none" not in results["defenses"]:
        # a part of a split study (say `--defense dedup`): its gates need the part that holds the control
        print("note: the undefended model ('none') is not in this matrix, so every measured gate is undecided for want of its "
              "control; merge it with the runs of the other defenses, 'none' among them: "
              f"s2l-guard matrix --config {config.source} --merge {folder} OTHER-PARTS")  # fmt: skip
    took = f"took {results['wall_seconds']:.1f} s" + (f" in the {len(results['parts'])} runs merged" if args.merge else "")
    log(f"matrix in {folder}/ ({', '.join(f.name for f in files)}, results.json); {took}")
    log(f"gate a release on it: pytest suites/ --s2l-config {config.source} --s2l-reuse --s2l-run-dir {folder}")
    return 0


def _cmd_agreement(args) -> int:
    """Two runs of the same gates on other draws: does either pass what the other fails?"""
    from .gates import agreement, count_text, evaluate
    from .runner.matrix import config_of, load_matrix
    from .runner.plan import plan

    verdicts = []
    for run_dir in (args.first, args.second):
        results = load_matrix(Path(run_dir))
        config = config_of(results)
        if args.config:  # the thresholds to judge both by ([gates] changes verdicts, not measurements)
            config = config.replace(gates=_load(args.config).to_dict()["gates"])
        verdicts.append(evaluate(results, config.gates, plan(config, results["defenses"])))
        print(f"{run_dir}: draws {results.get('draws', [0])}, replicates {results['seeds']}: {count_text(verdicts[-1])}")
    a = agreement(*verdicts)
    share = a["decided_once"] / a["gates"] if a["gates"] else 0.0
    print(f"{a['gates']} gates judged in both: {a['same']} the same, {a['contradict']} PASS in one and FAIL in the other, "
          f"{a['decided_once']} ({share:.1%}) decided in one and UNDECIDED in the other")  # fmt: skip
    return 1 if a["contradict"] else 0


def _cmd_report(args) -> int:
    from .report import write_report
    from .runner.matrix import config_of, load_matrix
    from .runner.stages import run_folder
    from .runtime import log

    results = load_matrix(Path(args.run_dir))
    files = write_report(Path(args.run_dir), ablation_dirs=[run_folder(config_of(results))])
    log(f"report written: {', '.join(str(f) for f in files)}")
    return 0


def _cmd_ablate(args) -> int:
    from .runner.ablation import format_ablation, run_ablation, write_ablation
    from .runner.cells import S2LRun
    from .runner.stages import run_folder
    from .runtime import log

    config = _run_config(args)
    run = S2LRun(config)
    for name in args.ablations:
        results = run_ablation(run, name)
        files = write_ablation(run_folder(config), results)
        print(f"\n{name}\n{format_ablation(results)}")
        log(f"ablation {name}: {', '.join(str(f) for f in files)}; took {results['wall_seconds']:.1f} s")
    return 0


def _cmd_audit(args) -> int:
    """The one-run canary audit of a DP defense's claimed epsilon (s2l_guard/runner/canaries.py)."""
    from .runner.canaries import audit_defense, format_audit

    config = _run_config(args)
    if args.defense:
        config = config.replace(defense={"name": args.defense})
    if args.epsilon is not None:  # the claim to audit, e.g. a small one a single run can refute
        name = config.defense.name
        config = config.replace(defenses={name: dict(config.defenses.get(name, {})) | {"target_epsilon": args.epsilon}})
    result = audit_defense(config, kind=args.kind, canaries=args.canaries, guesses=args.guesses, broken=args.broken)
    print(format_audit(result))
    return 0


def _cmd_sweep(args) -> int:
    """The privacy-utility-leakage frontier of the DP defenses (s2l_guard/runner/sweep.py)."""
    from .runner.sweep import DP_DEFENSES, EPSILONS, comeback_lines, parse_epsilons, run_sweep, sweep_folder, write_sweep
    from .runtime import log

    config = _run_config(args)
    defenses = tuple(args.defense or DP_DEFENSES)
    epsilons = parse_epsilons(args.epsilons) if args.epsilons else EPSILONS
    results = run_sweep(config, defenses, epsilons)
    folder = Path(args.out) if args.out else sweep_folder(config, defenses, epsilons)
    files = write_sweep(folder, results)
    print("\n".join(comeback_lines(results)))
    log(f"sweep in {folder}/ ({', '.join(f.name for f in files)}); took {results['wall_seconds']:.1f} s")
    return 0


def _add_cell_options(parser: argparse.ArgumentParser) -> None:
    """Where a run's cells are computed: --workers, --executor, --address."""
    parser.add_argument("--workers", type=int, metavar="N", help="override [run] workers (processes computing cells; 0: auto)")
    parser.add_argument("--executor", choices=("local", "ray"), help="override [run] executor: worker processes here, or Ray tasks")
    parser.add_argument("--address", metavar="ADDR", help="a Ray cluster to run the cells on ('auto', 'ray://head:10001'); implies --executor ray")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="s2l-guard",
        description="Audit text-to-image diffusion models for Shake-to-Leak privacy leakage.",
    )
    parser.add_argument("--version", action="version", version=f"s2l-guard {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = commands.add_parser("config", help="inspect configuration profiles")
    config_cmds = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = config_cmds.add_parser("show", help="print the resolved config (profile + its bases)")
    _add_config(show)
    show.set_defaults(func=_cmd_config_show)
    check = config_cmds.add_parser("check", help="each gate's resolution at the profile's sample sizes; refuse thresholds no safe model passes")
    _add_config(check)
    check.set_defaults(func=_cmd_config_check)

    plugins = commands.add_parser("plugins", help="list the registered shakers, attacks and defenses a profile may name")
    plugins.set_defaults(func=_cmd_plugins)

    testbed = commands.add_parser("testbed", help="the embedded digits testbed")
    testbed_cmds = testbed.add_subparsers(dest="action", required=True, metavar="ACTION")
    build = testbed_cmds.add_parser("build", help="write the testbed data set (imagefolder layout)")
    _add_config(build)
    build.add_argument("--out", help="also copy the data set to this new folder")
    build.set_defaults(func=_cmd_testbed_build)

    pretrain = commands.add_parser("pretrain", help="build the testbed, pre-train the model, report memorization")
    _add_config(pretrain)
    pretrain.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), help="override [run] device")
    pretrain.set_defaults(func=_cmd_pretrain)

    attack = commands.add_parser("attack", help="run the S2L attack table on the pre-trained model (writes results.json)")
    _add_config(attack)
    attack.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), help="override [run] device")
    _add_cell_options(attack)
    attack.add_argument("--defense", metavar="NAME", help="override [defense] name: a registered defense, or 'all' to run each in turn")
    attack.add_argument("--threat-model", choices=("auto", "open-weights", "finetune-api", "generate-api"),
                        help="override [defense] threat_model (auto: weights for training-recipe defenses, the API for API ones)")  # fmt: skip
    attack.set_defaults(func=_cmd_attack)

    matrix = commands.add_parser("matrix", help="the defense x attack matrix: results.json, report.md/html, matrix.png")
    _add_config(matrix)
    matrix.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), help="override [run] device")
    _add_cell_options(matrix)
    matrix.add_argument("--defense", nargs="+", metavar="NAME", help="override [matrix] defenses")
    matrix.add_argument("--replicates", nargs="+", type=int, metavar="SEED", help="override [matrix] replicates (testbed seeds)")
    matrix.add_argument("--draws", nargs="+", type=int, metavar="DRAW", help="override [matrix] draws (the attack's randomness)")
    matrix.add_argument("--model", help="audit this diffusers model folder instead of pre-training the testbed model")
    matrix.add_argument("--data", help="the model's labelled data set (imagefolder + metadata.jsonl; default: the testbed)")
    matrix.add_argument("--out", help="run folder (default: runs/<profile>-matrix-<hash>)")
    matrix.add_argument("--merge", nargs="+", metavar="RESULTS", help="run nothing: assemble the matrix from these runs' results.json "
                        "(files or run folders), each of some of its defenses, replicates and draws (docs/gates.md)")  # fmt: skip
    matrix.set_defaults(func=_cmd_matrix)

    agree = commands.add_parser("agreement", help="two runs of the same gates on other draws: contradictions (exit 1) and gates decided in one only")
    agree.add_argument("first", help="a matrix run folder (or its results.json)")
    agree.add_argument("second", help="another run of the same gates, e.g. on disjoint [matrix] draws")
    agree.add_argument("--config", type=config_path, help="judge both by this profile's [gates] (default: each run's own)")
    agree.set_defaults(func=_cmd_agreement)

    report = commands.add_parser("report", help="(re)write report.md, report.html and the figures of a matrix run folder")
    report.add_argument("run_dir", help="a folder holding a matrix results.json")
    report.set_defaults(func=_cmd_report)

    audit = commands.add_parser("audit", help="bound a DP defense's epsilon from below with one training run and canaries")
    _add_config(audit)
    audit.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), help="override [run] device")
    audit.add_argument("--defense", metavar="NAME", help="the DP defense to audit (default: [defense] name): dp_sgd or private_finetune")
    audit.add_argument(
        "--kind",
        choices=("gradient", "image"),
        default="gradient",
        help="gradient: Dirac gradient canaries in the DP optimizer (white-box, default); image: canary images in the data",
    )
    audit.add_argument("--canaries", type=int, help="canaries, each in the data set with probability 1/2 (default 200)")
    audit.add_argument(
        "--guesses", type=int, help='canaries guessed: the top-scoring ones "in" (gradient, default 80), or half in and half out (image, default 100)'
    )
    audit.add_argument("--epsilon", type=float, help="override the defense's target_epsilon: the claim the run makes and the audit tests")
    audit.add_argument("--broken", action="store_true", help="the positive control: switch the noise off, keep the claimed epsilon")
    audit.set_defaults(func=_cmd_audit)

    sweep = commands.add_parser("sweep", help="the DP defenses at a range of epsilons: frontier table and figures")
    sweep.add_argument("what", choices=("epsilon",), help="what to sweep: epsilon (each DP defense's target_epsilon)")
    _add_config(sweep)
    sweep.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), help="override [run] device")
    _add_cell_options(sweep)
    sweep.add_argument("--defense", nargs="+", metavar="NAME", help="the DP defenses to sweep (default: dp_sgd private_finetune)")
    sweep.add_argument("--epsilons", metavar="LIST", help="comma-separated target epsilons, inf for no noise (default: 1,3,10,30,100,inf)")
    sweep.add_argument("--out", help="run folder (default: runs/<profile>-sweep-epsilon-<hash>)")
    sweep.set_defaults(func=_cmd_sweep)

    from .runner.ablation import ABLATIONS

    ablate = commands.add_parser("ablate", help="sweep LoRA rank, TI tokens or Gaussian sigma (table + plot)")
    ablate.add_argument("ablations", nargs="+", choices=sorted(ABLATIONS), metavar="ABLATION",
                        help=f"one or more of: {', '.join(sorted(ABLATIONS))}")  # fmt: skip
    _add_config(ablate)
    ablate.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), help="override [run] device")
    _add_cell_options(ablate)
    ablate.set_defaults(func=_cmd_ablate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except S2LError as exc:
        print(f"s2l-guard: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("s2l-guard: interrupted; finished artifacts are kept, rerun to resume", file=sys.stderr)
        return 130
    finally:
        _LEASE.close()


if __name__ == "__main__":
    sys.exit(main())
