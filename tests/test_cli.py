import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sspo import config, registry, storage
from sspo.errors import SSPOError


def sspo(*args, cwd="/", umask=-1):
    """Runs outside the repository so its params.yaml does not apply."""
    return subprocess.run([sys.executable, "-m", "sspo.cli", *args], capture_output=True, text=True, cwd=cwd,
                          umask=umask)


@pytest.mark.parametrize("stage", [None, *config.STAGES])
def test_help_of_every_stage(stage):
    result = sspo(*([stage] if stage else []), "--help")
    assert result.returncode == 0
    assert "usage: sspo" in result.stdout


def test_every_config_field_is_a_flag():
    text = sspo("train", "--help").stdout
    for field in config.field_types(config.TrainConfig):
        assert "--" + field.replace("_", "-") in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["prepare", "--source", "/does/not/exist", "--output", "{tmp}/out"], "not found: /does/not/exist"),
        (["prepare", "--source", "{tmp}", "--output", "{tmp}/out", "--on-error", "explode"], "on_error must be"),
        (["train", "--beta", "-1"], "beta must be positive"),
        (["train", "--steps", "1.5"], "steps='1.5' is not a valid int"),
        (["evaluate", "--model", "{tmp}/nothing", "--output", "{tmp}/eval"], "not a directory"),
        (["world", "--params", "{tmp}/missing.yaml"], "params file not found"),
    ],
)
def test_bad_input_is_one_clear_message(tmp_path, args, message):
    result = sspo(*[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_params_file_then_flags(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"steps": 7, "objective": "sft", "lora_rank": 4}}))
    cfg = config.load("train", str(params), {"steps": "9"})
    assert (cfg.steps, cfg.objective, cfg.lora_rank) == (9, "sft", 4)
    params.write_text("train:\n  mixed_precision: no\n")
    assert config.load("train", str(params), {}).mixed_precision == "no"
    params.write_text(yaml.safe_dump({"train": {"stepz": 7}}))
    with pytest.raises(SSPOError, match="unknown key.*stepz"):
        config.load("train", str(params), {})


@pytest.mark.parametrize("stage, section, message", [
    ("train", {"steps": True}, "steps=True is not a valid int"),  # a bool is no int, though Python says it is
    ("train", {"learning_rate": False}, "learning_rate=False is not a valid float"),
    ("train", {"objective": {"name": "sspo"}}, "objective={'name': 'sspo'} is not a valid str"),
    ("train", {"output": ["runs/a"]}, "output=['runs/a'] is not a valid str"),
    ("train", {"output": None}, "output=None is not a valid str"),
    ("evaluate", {"seeds": [0, True]}, "seeds=True is not a valid int"),
    ("evaluate", {"prompts": {"toy": "train"}}, "prompts={'toy': 'train'} is not a valid list"),
    ("evaluate", {"scorer_paths": ["pickscore=s3://m"]}, "scorer_paths=['pickscore=s3://m'] is not a valid dict"),
    ("evaluate", {"scorer_paths": {"pickscore": {"url": "s3://m"}}},
     "scorer_paths={'url': 's3://m'} is not a valid str"),
])
def test_a_params_file_value_of_the_wrong_kind_is_one_error_naming_its_field(tmp_path, stage, section, message):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({stage: section}))
    with pytest.raises(SSPOError) as raised:
        config.load(stage, str(params), {})
    assert str(raised.value) == f"invalid config: {message}"


def test_params_file_lists_take_one_value_or_comma_separated_text(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"evaluate": {"seeds": 3, "prompts": "toy:train,toy:heldout",
                                                   "scorer_paths": {"pickscore": "s3://m "}}}))
    cfg = config.load("evaluate", str(params), {})
    assert (cfg.seeds, cfg.prompts, cfg.scorer_paths) == ([3], ["toy:train", "toy:heldout"], {"pickscore": "s3://m"})


FLOAT_KNOBS = [(stage, name) for stage, cls in config.STAGES.items()
               for name, kind in config.field_types(cls).items() if kind is float]


@pytest.mark.parametrize("stage, name", FLOAT_KNOBS)
def test_every_float_knob_refuses_nan(stage, name):
    with pytest.raises(SSPOError, match=f"^invalid config: {name} "):
        config.load(stage, None, {name: "nan"})


def test_outputs_are_never_overwritten(tmp_path):
    assert sspo("world", "--output", str(tmp_path / "w"), "--samples-per-scene", "1").returncode == 0
    before = (tmp_path / "w" / "manifest.json").read_text()
    again = sspo("world", "--output", str(tmp_path / "w"), "--samples-per-scene", "1")
    assert again.returncode == 2 and "already exists" in again.stderr
    assert (tmp_path / "w" / "manifest.json").read_text() == before


def modes(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): stat.S_IMODE(path.stat().st_mode) for path in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_published_and_pulled_outputs_get_the_mode_the_umask_gives(tmp_path, umask):
    """On a shared volume others read what a stage published (or pulled) exactly as far as the umask allows."""
    def expected(folder: Path) -> dict[str, int]:
        return {name: (0o777 if (folder / name).is_dir() else 0o666) & ~umask for name in modes(folder)}

    world = tmp_path / "world"
    assert sspo("world", "--output", str(world), "--samples-per-scene", "1", umask=umask).returncode == 0
    assert modes(world) == expected(world)
    if umask == 0o022:
        assert modes(world)["."] == 0o755 and all(mode & stat.S_IROTH for mode in modes(world).values())

    root = str(tmp_path / "registry")
    storage.publish_dir(world, registry.version_url(root, "toy", "1"))
    pulled = tmp_path / "pulled" / "toy"
    result = sspo("registry", "pull", "--registry", root, "--name", "toy", "--version", "1", "--output", str(pulled),
                  umask=umask)
    assert result.returncode == 0, result.stderr
    assert modes(pulled) == expected(pulled)


def test_params_yaml_keeps_yes_no_on_off_as_words_for_text_fields(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  ssr: off\n  mixed_precision: no\n  shared_noise: off\n  gradient_checkpointing: yes\n")
    train = config.load("train", str(params), {})
    assert (train.ssr, train.mixed_precision, train.shared_noise, train.gradient_checkpointing) == ("off", "no", False,
                                                                                                  True)


def test_params_file_key_selects_nested_sections(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("conditions:\n  clean:\n    world:\n      samples_per_scene: 3\n  plain: 1\n")
    assert config.load("world", f"{params}#conditions.clean", {}).samples_per_scene == 3
    for key in ("conditions.missing", "conditions.plain"):
        with pytest.raises(SSPOError, match=f"has no mapping '{key}'"):
            config.load("world", f"{params}#{key}", {})
