import subprocess
import sys
from pathlib import Path

import pytest

from s2l_guard.config import Config, load_config
from s2l_guard.errors import ConfigError
from s2l_guard.runner.settings import check_plugins, mia_settings, shaker_settings

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path, text, name="profile.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("profile", ["smoke", "quick", "standard"])
def test_shipped_profiles_load(profile):
    config = load_config(CONFIGS / f"{profile}.toml")
    assert config.source.endswith(f"{profile}.toml")


@pytest.mark.parametrize(
    "path",
    sorted(CONFIGS.glob("*.toml")) + sorted((CONFIGS.parent / "docs" / "calibration").glob("*.toml")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_every_shipped_config_loads(path):
    check_plugins(load_config(path))


def test_the_pretraining_recipes_say_what_they_are(tmp_path):
    sd, annealed = load_config(CONFIGS / "sd-recipe.toml"), load_config(CONFIGS / "annealed.toml")
    assert (sd.pretrain.lr_schedule, sd.pretrain.release, sd.pretrain.ema_decay) == ("constant_with_warmup", "ema", 0.99)
    assert (annealed.pretrain.lr_schedule, annealed.pretrain.release) == ("cosine", "raw")
    with pytest.raises(ConfigError, match="release = 'ema' needs an EMA"):
        load_config(write(tmp_path, '[pretrain]\nrelease = "ema"\n'))
    with pytest.raises(ConfigError, match="warmup_steps"):
        load_config(write(tmp_path, "[pretrain]\nsteps = 10\nwarmup_steps = 10\n"))


def test_standard_profile_equals_builtin_defaults():
    assert load_config(CONFIGS / "standard.toml") == Config()


def test_extends_overrides_only_stated_keys():
    quick, smoke = load_config(CONFIGS / "quick.toml"), load_config(CONFIGS / "smoke.toml")
    assert smoke.pretrain.steps == 12 and quick.pretrain.steps == 600
    assert smoke.pretrain.learning_rate == quick.pretrain.learning_rate  # inherited through the chain
    assert smoke.report.guidance_scale == Config().report.guidance_scale


def test_unknown_key_names_key_file_and_line(tmp_path):
    path = write(tmp_path, "[pretrain]\nsteps = 10\nlearnig_rate = 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "learnig_rate" in message and f"{path}:3" in message and "did you mean 'learning_rate'" in message


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section \[pretrian\]"):
        load_config(write(tmp_path, "[pretrian]\nsteps = 1\n"))


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('[pretrain]\nsteps = "ten"\n', "expected an integer"),
        ("[pretrain]\nsteps = 1.5\n", "expected an integer"),
        ("[pretrain]\ntrain_text_encoder = 1\n", "expected true or false"),
        ("[testbed]\nprivate_domains = 7\n", "expected a list of int"),
        ("[testbed]\nprivate_domains = [7, 'x']\n", "expected an integer"),
        ("[pretrain]\nsteps = 0\n", "must be >= 1"),
        ("[testbed]\nduplicated_share = 1.5\n", "must be <= 1.0"),
        ("[testbed]\nprivate_domains = [12]\n", "every item must be <= 9"),
        ("[run]\ndevice = 'tpu'\n", "must be one of"),
    ],
)
def test_wrong_types_and_ranges_name_the_key(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    key = text.split("\n")[1].split("=")[0].strip()
    assert fragment in str(err.value) and key in str(err.value) and str(path) in str(err.value)


def test_all_problems_reported_at_once(tmp_path):
    path = write(tmp_path, "[pretrain]\nsteps = -1\nbatch_size = 'x'\nbogus = 1\n")
    with pytest.raises(ConfigError, match=r"^3 problem\(s\)"):
        load_config(path)


def test_cross_section_checks(tmp_path):
    with pytest.raises(ConfigError, match="both private and public"):
        load_config(write(tmp_path, "[testbed]\nprivate_domains = [1]\npublic_domains = [1, 2]\n"))


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[pretrain\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_extends_cycle(tmp_path):
    write(tmp_path, 'extends = "b.toml"\n', "a.toml")
    write(tmp_path, 'extends = "a.toml"\n', "b.toml")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.toml")


def test_resolved_toml_round_trips(tmp_path):
    config = load_config(CONFIGS / "smoke.toml")
    again = load_config(write(tmp_path, config.to_toml()))
    assert again == config


def test_config_is_frozen():
    with pytest.raises(Exception):
        Config().pretrain.steps = 3


def test_method_tables_are_validated_against_each_methods_settings(tmp_path):
    config = load_config(write(tmp_path, '[shakers.lora]\nrank = 2\n\n[shakers."dreambooth+lora"]\nsteps = 3\n\n[mia.secmi]\nk = 5\n'))
    assert shaker_settings(config, "lora").rank == 2 and shaker_settings(config, "dreambooth+lora").steps == 3
    assert mia_settings(config, "secmi").k == 5
    assert shaker_settings(config, "end2end") == type(shaker_settings(config, "end2end"))()  # defaults when absent
    assert load_config(write(tmp_path, config.to_toml(), "again.toml")) == config  # round trip with method tables


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[shakers.lroa]\nrank = 2\n", "did you mean 'lora'"),
        ("[shakers.lora]\nrnak = 2\n", "unknown key 'rnak' in [shakers.lora] (did you mean 'rank'?)"),
        ("[shakers.lora]\nrank = 'two'\n", "expected an integer"),
        ("[shakers.lora]\nsteps = 0\n", "must be >= 1"),
        ("[attack]\nshakers = ['lora', 'dreambooht']\n", "unknown shaker 'dreambooth'".replace("dreambooth", "dreambooht")),
        ("[attack]\nmia = ['secmy']\n", "did you mean 'secmi'"),
        ("[attack]\ndomains = ['digit3']\n", "not private testbed domains"),
        ("[sp_set]\nprompt_templates = ['photo']\n", "needs '{prompt}'"),
    ],
)
def test_attack_config_errors_name_the_problem(tmp_path, text, fragment):
    """Core sections are checked on load; plugin names and settings by the runner before it starts."""
    with pytest.raises(ConfigError) as err:
        check_plugins(load_config(write(tmp_path, text)))
    assert fragment in str(err.value)


def test_the_config_module_imports_no_plugin_and_no_torch():
    """config.py is a leaf: the registries and heavy libraries load only where the runner needs them."""
    code = "import sys, s2l_guard.config; print(sorted(m for m in ('torch', 'diffusers', 'attacks', 'defenses') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_method_tables_merge_key_by_key_across_extends(tmp_path):
    """A profile that changes one setting of a method keeps the others its base set."""
    write(tmp_path, "[shakers.lora]\nsteps = 7\nrank = 2\n", "base.toml")
    config = load_config(write(tmp_path, 'extends = "base.toml"\n[shakers.lora]\nlearning_rate = 0.5\n'))
    lora = shaker_settings(config, "lora")
    assert (lora.steps, lora.rank, lora.learning_rate) == (7, 2, 0.5)
