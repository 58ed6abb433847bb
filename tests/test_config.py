"""Recipe validation: every mistake is one line naming the key path and what is allowed."""

import pytest

from kdforge.config import apply_override, build_config, load_config, parse_override
from kdforge.core.errors import ConfigError

MINIMAL = {"data": {"name": "digits"}, "student": {"name": "mlp"}}


def error_of(data, overrides=()):
    with pytest.raises(ConfigError) as info:
        build_config(data, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_and_overrides():
    c = build_config(
        MINIMAL,
        ["train.epochs=3", "train.optimizer.lr=0.1", "method.name=kd", "method.temperature=2", "teachers.0.name=lenet"],
    )
    assert c.train.epochs == 3 and c.train.optimizer.lr == 0.1
    assert c.method.name == "kd" and c.method.params() == {"temperature": 2}
    assert c.teachers[0].name == "lenet"
    assert c.train.optimizer.momentum == 0.9 and c.train.scheduler.name == "multistep"


def test_unknown_key_suggests_the_closest():
    msg = error_of(MINIMAL, ["train.optimzer.lr=0.1"])
    assert "train.optimzer" in msg and "did you mean 'optimizer'" in msg and "allowed here" in msg


def test_unknown_top_level_and_method_keys():
    assert "did you mean 'student'" in error_of({"studnet": {"name": "mlp"}, **MINIMAL})
    msg = error_of({**MINIMAL, "method": {"name": "kd", "temprature": 2}})
    assert "method.temprature" in msg and "did you mean 'temperature'" in msg


def test_bad_values_name_the_path_and_the_value():
    msg = error_of(MINIMAL, ["train.optimizer.lr=fast"])
    assert "train.optimizer.lr" in msg and "'fast'" in msg
    msg = error_of(MINIMAL, ["train.optimizer.name=rmsprop"])
    assert "train.optimizer.name" in msg and "sgd" in msg
    assert "train.epochs" in error_of(MINIMAL, ["train.epochs=0"])
    assert "method.temperature" in error_of(
        {**MINIMAL, "method": {"name": "kd", "temperature": {"kind": "linear", "start": 4}}}
    )


def test_unknown_method_lists_the_available_ones():
    msg = error_of({**MINIMAL, "method": {"name": "kdd"}})
    assert "did you mean 'kd'" in msg and "ensemble_kd" in msg


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("train.epochs")
    with pytest.raises(ConfigError, match="out of range"):
        apply_override({"teachers": []}, ["teachers", 3, "name"], "x")


def test_recipe_files(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "data: {name: digits}\nstudent: {name: mlp}\ntrain: {epochs: 7, batch_size: 32}\n"
    )
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain: {epochs: 9}\n")
    c = load_config(tmp_path / "child.yaml")
    assert c.train.epochs == 9 and c.train.batch_size == 32
    (tmp_path / "broken.yaml").write_text("student: {name: mlp\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips():
    c = build_config({**MINIMAL, "method": {"name": "kd", "temperature": {"kind": "cosine", "start": 8, "end": 1}}})
    again = build_config(c.to_dict())
    assert again.to_dict() == c.to_dict()


def test_checkpoint_paths_resolve_against_the_recipe_folder_when_not_found_here(tmp_path, monkeypatch):
    from kdforge.config import read_yaml

    (tmp_path / "recipes").mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "t.pt").write_bytes(b"x")
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.write_text(
        "pipeline:\n"
        "  a: {student: {name: mlp}, teachers: [{checkpoint: ../models/t.pt}]}\n"
        "  b: {student: {checkpoint: '{a}/checkpoints/model_last.pt'}}\n"
    )
    elsewhere = tmp_path / "a" / "b"  # ../models/t.pt does not exist from here
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    stages = read_yaml(recipe)["pipeline"]
    assert stages["a"]["teachers"][0]["checkpoint"] == str((tmp_path / "models" / "t.pt").resolve())
    assert stages["b"]["student"]["checkpoint"] == "{a}/checkpoints/model_last.pt"  # stage refs untouched
    # a path that exists relative to the working directory keeps its meaning
    monkeypatch.chdir(tmp_path / "recipes")
    assert read_yaml(recipe)["pipeline"]["a"]["teachers"][0]["checkpoint"] == "../models/t.pt"
