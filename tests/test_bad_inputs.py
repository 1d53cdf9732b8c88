"""The catalogue of refused inputs: each exits 2 with one line naming the problem and the fix,
computes nothing, and leaves the artifact store and earlier runs as they were."""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file

from s2l_guard.cli import main
from s2l_guard.data import Record, write_imagefolder
from s2l_guard.gates import evaluate
from s2l_guard.results import POOLED, Status, cells_by_key
from s2l_guard.runner.matrix import config_of
from s2l_guard.runner.plan import plan
from s2l_guard.testing import save_sd_v1_folder

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.toml"


def user_data(folder: Path, *, size: int = 16, per_domain: int = 3) -> Path:
    """An imagefolder of RGB noise: domains cat and dog, members and held-out non-members."""
    rng = np.random.default_rng(0)
    records, images = [], []
    for domain in ("cat", "dog"):
        for membership in ("member", "nonmember"):
            for i in range(per_domain):
                records.append(Record(f"{domain}-{membership}-{i}.png", f"a photo of {domain}", domain, membership, int(membership == "member")))
                images.append(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return write_imagefolder(folder, np.stack(images), records)


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def write_rows(folder: Path, records: list[dict]) -> None:
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A work folder with an earlier run's store and outputs, a Stable-Diffusion-v1-shaped model
    folder (16x16 RGB images through a VAE) and a data set that fits it."""
    root = tmp_path_factory.mktemp("world")
    (root / "base.toml").write_text(f'extends = "{SMOKE}"\n[run]\nstore = "{root / "store"}"\nout_dir = "{root / "runs"}"\n')
    assert main(["testbed", "build", "--config", str(root / "base.toml")]) == 0  # the earlier run's artifact
    (root / "runs" / "earlier").mkdir(parents=True)
    (root / "runs" / "earlier" / "results.json").write_text('{"earlier": true}')
    save_sd_v1_folder(root / "sd")
    user_data(root / "data")
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for base in ("store", "runs")
        for p in (root / base).rglob("*")
        if p.is_file()
    }


def copy_data(world: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(world / "data", tmp_path / "data"))


def audit_config(world: Path, tmp_path: Path, *, model: Path | None = None, data: Path | None = None, domains: tuple = (), extra: str = "") -> str:
    """A profile auditing the given model on the given data (by default the world's, which fit)."""
    path = tmp_path / "audit.toml"
    path.write_text(
        f'extends = "{world / "base.toml"}"\n[run]\nmodel = "{model or world / "sd"}"\ndata = "{data or world / "data"}"\n'
        f"[attack]\ndomains = {list(domains)}\nmia = ['loss']\n"
        + (extra or "[report]\nloss_timesteps = [10, 40]\n")  # the tiny model's schedule has 100 steps
        + "[mia.loss]\ntimesteps = [10]\n"
    )
    return str(path)


def config_file(tmp_path: Path, text: str, name: str = "bad.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# Each case: (id, build(world, tmp_path) -> argv, words the message must hold).
def _toml(text):
    return lambda w, t: ["attack", "--config", config_file(t, f'extends = "{w / "base.toml"}"\n{text}')]


def _data(change):
    def build(w, t):
        data = copy_data(w, t)
        change(data)
        return ["attack", "--config", audit_config(w, t, data=data)]

    return build


def _model(change):
    def build(w, t):
        import shutil

        model = Path(shutil.copytree(w / "sd", t / "sd"))
        change(model)
        return ["attack", "--config", audit_config(w, t, model=model)]

    return build


def _cycle(w, t):
    config_file(t, 'extends = "b.toml"\n', "a.toml")
    config_file(t, 'extends = "a.toml"\n', "b.toml")
    return ["attack", "--config", str(t / "a.toml")]


def _corrupt_png(d):
    (d / "cat-member-0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)


def _mixed_sizes(d):
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(d / "cat-member-1.png")


def _escaping(d):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(d.parent / "outside.png")
    write_rows(d, rows(d) + [{"file_name": "../outside.png", "text": "a photo of cat", "domain": "cat", "membership": "member"}])


def _symlink_out(d):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(d.parent / "secret.png")
    (d / "link.png").symlink_to(d.parent / "secret.png")
    write_rows(d, rows(d) + [{"file_name": "link.png", "text": "a photo of cat", "domain": "cat", "membership": "member"}])


def _bomb(d):
    """A PNG header claiming 20000 x 20000 pixels (over twice PIL's 89M-pixel limit) in 57 bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    (d / "cat-member-0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


def _no_nonmembers(d):
    write_rows(d, [r for r in rows(d) if not (r["domain"] == "dog" and r["membership"] == "nonmember")])


def _one_nonmember(d):
    write_rows(d, [r for r in rows(d) if not (r["domain"] == "cat" and r["membership"] == "nonmember" and not r["file_name"].endswith("0.png"))])


def _duplicate_row(d):
    write_rows(d, rows(d) + rows(d)[:1])


def _missing_image(d):
    (d / "dog-member-2.png").unlink()


def _nan_weights(m):
    path = next((m / "unet").glob("*.safetensors"))
    weights = load_file(path)
    weights[sorted(weights)[0]][...] = float("nan")
    save_file(weights, path)


def _pickle_only(m):
    for path in (m / "unet").glob("*.safetensors"):
        torch.save(load_file(path), m / "unet" / "diffusion_pytorch_model.bin")
        path.unlink()


def _no_unet(m):
    index = json.loads((m / "model_index.json").read_text())
    index.pop("unet")
    (m / "model_index.json").write_text(json.dumps(index))


def _not_a_model(w, t):
    (t / "empty").mkdir()
    return ["attack", "--config", audit_config(w, t, model=t / "empty")]


def _small_data(w, t):
    return ["attack", "--config", audit_config(w, t, data=user_data(t / "small", size=8))]


def _unknown_domain(w, t):
    return ["attack", "--config", audit_config(w, t, domains=("cow",))]


def _report_folder(content):
    def build(w, t):
        if content is not None:
            (t / "results.json").write_text(content)
        return ["report", str(t)]

    return build


def _merge(part_toml: str):
    """`matrix --merge` of one part, replicate 0 of defense none, into base.toml's matrix under replicates 0 and 1."""

    def build(w, t):
        from s2l_guard.config import load_config
        from s2l_guard.runner.matrix import failed_cells, matrix_results, write_matrix
        from s2l_guard.runner.plan import plan

        matrix = f'extends = "{w / "base.toml"}"\n[matrix]\ndefenses = ["none"]\n'
        part = load_config(config_file(t, matrix + "replicates = [0]\n" + part_toml, "part.toml"))
        cells = [c.to_dict() for c in failed_cells(plan(part), "not run: a test part")]
        write_matrix(matrix_results(part, ["none"], {"none/0": {"status": "failed"}}, cells, 1.0), t / "part")
        return [
            "matrix",
            "--config",
            config_file(t, matrix + "replicates = [0, 1]\n", "whole.toml"),
            "--merge",
            str(t / "part"),
            "--out",
            str(t / "m"),
        ]

    return build


CASES = [
    ("toml-syntax", _toml("[run\nseed = 0"), ["bad.toml", "line"]),
    ("unknown-key", _toml("[run]\nsed = 1"), ["sed"]),
    ("unknown-section", _toml("[rnu]\nseed = 1"), ["rnu"]),
    ("wrong-type", _toml("[pretrain]\nsteps = 'many'"), ["steps"]),
    ("out-of-range", _toml("[pretrain]\nsteps = 0"), ["steps", ">= 1"]),
    ("extends-cycle", _cycle, ["extends"]),
    ("extends-missing", lambda w, t: ["attack", "--config", config_file(t, 'extends = "nowhere.toml"\n')], ["nowhere.toml"]),
    ("unknown-defense", _toml("[defense]\nname = 'dp_sdg'"), ["dp_sdg", "did you mean 'dp_sgd'"]),
    ("unknown-shaker", _toml("[attack]\nshakers = ['lroa']"), ["lroa", "did you mean 'lora'"]),
    ("unknown-mia", _toml("[attack]\nmia = ['secmii']"), ["secmii", "did you mean 'secmi'"]),
    ("unknown-defense-flag", lambda w, t: ["attack", "--config", str(w / "base.toml"), "--defense", "dedupe"], ["dedupe", "did you mean 'dedup'"]),
    ("bad-threat-model", _toml("[matrix]\ndefenses = ['none@open']"), ["none@open", "threat model"]),
    ("prompt-template", _toml("[sp_set]\nprompt_templates = ['a picture']"), ["{prompt}"]),
    ("bad-plugin-setting", _toml("[shakers.lora]\nrank = -2"), ["rank"]),
    ("negative-workers", lambda w, t: ["attack", "--config", str(w / "base.toml"), "--workers", "-1"], ["workers", ">= 0"]),
    ("unwritable-store", _toml('[run]\nstore = "/proc/s2l-store"'), ["store", "writable"]),
    ("data-without-model", lambda w, t: ["matrix", "--config", str(w / "base.toml"), "--data", str(w / "data")], ["--model"]),
    ("data-not-a-folder", lambda w, t: ["attack", "--config", audit_config(w, t, data=t / "nowhere")], ["not a folder"]),
    ("no-metadata", _data(lambda d: (d / "metadata.jsonl").unlink()), ["metadata.jsonl"]),
    ("metadata-not-json", _data(lambda d: (d / "metadata.jsonl").write_text("{oops\n")), ["metadata.jsonl:1", "JSON"]),
    ("row-missing-fields", _data(lambda d: write_rows(d, [{"file_name": "cat-member-0.png"}])), ["missing", "membership"]),
    ("missing-image", _data(_missing_image), ["dog-member-2.png", "missing"]),
    ("corrupt-png", _data(_corrupt_png), ["cat-member-0.png", "not a readable image"]),
    ("mixed-sizes", _data(_mixed_sizes), ["mixed sizes", "12x12"]),
    ("file-name-escapes", _data(_escaping), ["../outside.png", "outside the data folder"]),
    ("symlink-out", _data(_symlink_out), ["link.png", "outside the data folder"]),
    ("decompression-bomb", _data(_bomb), ["cat-member-0.png", "too large"]),
    ("no-nonmembers", _data(_no_nonmembers), ["dog", "non-members"]),
    ("duplicate-row", _data(_duplicate_row), ["listed twice"]),
    ("one-nonmember", _data(_one_nonmember), ["cat", "1 held-out non-member", "at least 2"]),
    ("unknown-domain", _unknown_domain, ["cow", "'cat', 'dog'"]),
    ("model-and-data-mismatch", _small_data, ["3x8x8", "3x16x16"]),
    (
        "loss-timesteps-outside-schedule",
        lambda w, t: ["attack", "--config", audit_config(w, t, extra="[report]\nloss_timesteps = [10, 400]\n")],
        ["400", "0..99"],
    ),
    ("not-a-model", _not_a_model, ["model_index.json"]),
    ("model-missing-unet", _model(_no_unet), ["unet"]),
    ("nan-weights", _model(_nan_weights), ["NaN"]),
    ("pickle-only-weights", _model(_pickle_only), ["pickle", "--trust-pickle"]),
    ("report-without-results", _report_folder(None), ["results.json", "does not exist"]),
    ("report-results-not-json", _report_folder("{"), ["results.json", "not valid JSON"]),
    ("seed-twice", lambda w, t: ["matrix", "--config", str(w / "base.toml"), "--replicates", "1", "1"], ["replicates lists a value twice"]),
    ("draw-twice", lambda w, t: ["matrix", "--config", str(w / "base.toml"), "--draws", "2", "2"], ["draws lists a value twice"]),
    ("seeds-renamed", _toml("[matrix]\nseeds = [0, 1]"), ["seeds is now replicates", "or draws"]),
    ("count-threshold-renamed", _toml("[gates]\nmax_extracted = 0"), ["max_extracted_share", "upper confidence bound"]),
    ("merge-missing-seed", _merge(""), ["no part holds none under replicate 1", "--defense NAME --replicates SEED --draws DRAW"]),
    ("merge-other-config", _merge("[pretrain]\nsteps = 13\n"), ["another config", "pretrain.steps = 13, not 12"]),
]


@pytest.mark.parametrize("build, words", [pytest.param(b, w, id=i) for i, b, w in CASES])
def test_refused_with_one_line_and_nothing_touched(world, tmp_path, capsys, build, words):
    before = snapshot(world)
    argv = build(world, tmp_path)
    capsys.readouterr()
    start = time.perf_counter()
    assert main(argv) == 2
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("s2l-guard: error: "), err
    for word in words:
        assert word in err, (word, err)
    assert seconds < 15, f"{seconds:.1f} s before refusing"
    assert snapshot(world) == before


def test_the_catalogue_is_long_enough():
    assert len(CASES) >= 30


def test_a_plugin_that_fails_to_load_is_named(monkeypatch, capsys):
    """A third-party package whose entry point raises: one line naming the plugin, not a traceback."""
    from importlib.metadata import EntryPoint

    from attacks.base import MIA
    from s2l_guard import registry

    broken = EntryPoint("brokenmia", "no_such_module_s2l:Attack", MIA.group)
    monkeypatch.setattr(registry, "entry_points", lambda group: [broken] if group == MIA.group else [])
    monkeypatch.setattr(MIA, "_loaded", False)
    monkeypatch.setattr(MIA, "_items", {})
    assert main(["plugins"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'brokenmia'" in err and "ModuleNotFoundError" in err and "uninstall" in err


@pytest.mark.slow  # a table and its gates on a Stable-Diffusion-shaped model
def test_a_model_and_data_that_fit_run_and_are_gated(world, tmp_path, monkeypatch, capsys):
    """The case the refusals guard: the same SD-shaped folder with data at its resolution runs
    every cell, measures utility without the digits classifier, and its gates are judged."""
    monkeypatch.chdir(tmp_path)
    config = audit_config(world, tmp_path)
    assert main(["matrix", "--config", config, "--defense", "none", "--out", str(tmp_path / "m")]) == 0
    results = json.loads((tmp_path / "m" / "results.json").read_text())
    failed = [c for c in results["cells"] if c["status"] == "failed"]
    assert not failed, failed[:2]
    [utility] = [c for c in results["cells"] if c["measure"] == "utility"]
    assert utility["status"] == "ok" and "conditional_accuracy" not in utility["metrics"]
    assert utility["metrics"]["frechet_distance"] > 0 and utility["metrics"]["heldout_denoising_loss"] > 0
    # The gates, judged as `pytest suites/` and the report judge them, on the config the matrix ran with.
    config = config_of(results)
    planned = plan(config, results["defenses"])
    verdicts = evaluate(results, config.gates, planned)
    cells = cells_by_key(results).values()
    ran = {c.id for c in cells if c.status == Status.OK}
    assert len(ran) == len(planned) == len(results["cells"]), (len(ran), len(planned), len(results["cells"]))
    # Every gate read a cell that ran (not one missing from results.json, failed or not run), and every pooled
    # cell, utility's among them, is judged: the verdicts rest on the measurements, whatever they are.
    judged = {v.cell_id for v in verdicts}
    pooled = {c.id for c in cells if c.domain == POOLED and c.status == Status.OK}
    assert pooled <= judged <= ran, (sorted(pooled - judged), sorted(judged - ran))
    [gate] = [v for v in verdicts if v.check == "utility"]
    assert gate.cell_id == utility["id"] and "classifier" in gate.message, gate  # says why accuracy is not gated
    # The line the CLI prints counts those verdicts, each outcome as often as the gates gave it.
    [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("gates: ")]
    printed = {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", line.split(" (")[0]) if int(n)}
    tally = dict(Counter(str(v.outcome) for v in verdicts))
    assert printed == tally, (line, tally)


# ---------------------------------------------------------------- fuzzing the config loader

SECTIONS = ["run", "testbed", "model", "pretrain", "report", "attack", "ablation", "sp_set", "extraction", "defense", "adaptive",
            "utility", "matrix", "gates", "shakers.lora", "mia.secmi", "defenses.dp_sgd", "nosuch"]  # fmt: skip
KEYS = ["seed", "steps", "workers", "domains", "mia", "shakers", "delta", "rank", "name", "learning_rate", "caption", "mode",
        "private_domains", "checks", "extends", "batch_size", "bogus"]  # fmt: skip


def toml_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is a JSON string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


scalars = st.one_of(st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False, width=32),
                    st.text(max_size=12))  # fmt: skip
values = st.one_of(scalars, st.lists(st.one_of(st.integers(-20, 20), st.text(max_size=6)), max_size=4))
tables = st.dictionaries(st.sampled_from(SECTIONS), st.dictionaries(st.sampled_from(KEYS), values, max_size=4), max_size=4)


@settings(max_examples=100, deadline=None)
@given(tables, st.booleans())
def test_any_toml_loads_or_is_a_config_error(sections, from_smoke):
    """Whatever a profile holds, the loader returns a Config or raises ConfigError: never another exception."""
    from s2l_guard.config import Config, load_config
    from s2l_guard.errors import ConfigError

    text = (f'extends = "{SMOKE}"\n' if from_smoke else "") + "".join(
        f"[{name}]\n" + "".join(f"{key} = {toml_value(v)}\n" for key, v in table.items()) for name, table in sections.items()
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.toml"
        path.write_text(text)
        try:
            assert isinstance(load_config(path), Config)
        except ConfigError:
            pass


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_any_text_loads_or_is_a_config_error(text):
    from s2l_guard.config import load_config
    from s2l_guard.errors import ConfigError

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.toml"
        path.write_text(text, encoding="utf-8")
        try:
            load_config(path)
        except ConfigError:
            pass
