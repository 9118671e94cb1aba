import pytest

from kd_bnn.config import ConfigError, apply_overrides, diff_configs, load_config
from kd_bnn.io import atomic_path, atomic_write_text
from kd_bnn.registry import Registry


def test_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\ntrain:\n  epochs: 5\n  lr: 0.01\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nname: child\ntrain:\n  lr: 0.1\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.epochs=7", "data.classes=[Car]"])
    assert cfg.name == "child"
    assert cfg.train.epochs == 7 and cfg.train.lr == 0.1
    assert cfg.data.classes == ["Car"]


def test_unknown_key_lists_valid_keys(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  epoch: 5\n")
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "bad.yaml")
    msg = str(exc.value)
    assert "train.epoch" in msg and "epochs" in msg and "did you mean" in msg


def test_bad_value_and_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs=many"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.epochs"])


def test_base_loop_detected(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")


def test_diff_configs():
    assert diff_configs({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 0}) == ["a.c", "d"]


def test_registry_errors_name_close_matches():
    reg = Registry("thing")

    @reg.register("ste_sign")
    class A:  # noqa: D401 - test class
        pass

    assert reg.get("ste_sign") is A and reg.list("ste*") == ["ste_sign"]
    with pytest.raises(KeyError, match="did you mean ste_sign"):
        reg.get("ste_sgn")


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("crash")
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["f.txt"]
