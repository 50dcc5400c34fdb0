"""Config validation, Config.from_env parsing, and candidate names checked by backend()."""
import dataclasses
import pathlib
import re

import pytest

import torchfx_eff
from torchfx_eff import Config
from torchfx_eff.cost import SPECS
from torchfx_eff.kernels import names


def test_defaults_are_valid_and_documented_values():
    c = Config()
    assert (c.attention, c.linear, c.accuracy, c.inner) == ("auto", "auto", "balanced", "inductor")
    assert (c.calibrate, c.strict, c.log, c.device) == (False, False, None, None)
    assert set(c.to_dict()) == {f.name for f in dataclasses.fields(Config)}


@pytest.mark.parametrize("field,bad,allowed", [
    ("accuracy", "fast", ("lossless", "balanced", "aggressive")),
    ("accuracy", "Balanced", ("lossless", "balanced", "aggressive")),
    ("inner", "aot_eager", ("inductor", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "eager")),
    ("inner", None, ("inductor", "eager")),
    ("attention", "on", ("auto", "off")),
    ("cuda_graphs", True, ("auto", "on", "off")),
    ("linear", "yes", ("auto", "off")),
    ("device", "tpu", ("h100", "h200", "a100", "l40s", "cuda", "cpu")),
])
def test_bad_choice_names_field_and_lists_allowed_values(field, bad, allowed):
    with pytest.raises(ValueError) as e:
        Config(**{field: bad})
    msg = str(e.value)
    assert msg.startswith(f"Config.{field}="), msg
    assert repr(bad) in msg
    for value in allowed:
        assert repr(value) in msg, (value, msg)


@pytest.mark.parametrize("field", ["attention", "linear"])
@pytest.mark.parametrize("bad", [(), [], ("int8_weight_only", 3), 5, None])
def test_bad_family_value(field, bad):
    with pytest.raises(ValueError) as e:
        Config(**{field: bad})
    msg = str(e.value)
    assert msg.startswith(f"Config.{field}=")
    for word in ("'auto'", "'off'", "tuple"):
        assert word in msg


@pytest.mark.parametrize("field", ["calibrate", "strict", "fuse_epilogues", "fuse_norms", "output_linear_8bit",
                                   "combo_kernels"])
@pytest.mark.parametrize("bad", [1, 0, "true", None])
def test_booleans_must_be_bool(field, bad):
    with pytest.raises(ValueError) as e:
        Config(**{field: bad})
    msg = str(e.value)
    assert msg.startswith(f"Config.{field}=")
    assert "True" in msg and "False" in msg


@pytest.mark.parametrize("bad", [3, b"x.jsonl", ["a"]])
def test_bad_log(bad):
    with pytest.raises(ValueError, match=r"^Config\.log="):
        Config(log=bad)


def test_family_tuple_and_pathlike_are_normalized(tmp_path):
    c = Config(linear=["int8_weight_only", "original"], attention=("sdpa_cpu",), log=tmp_path / "x.jsonl")
    assert c.linear == ("int8_weight_only", "original") and isinstance(c.linear, tuple)
    assert c.attention == ("sdpa_cpu",)
    assert c.log == str(tmp_path / "x.jsonl") and isinstance(c.log, str)
    assert c.family("linear") == c.linear
    assert c.family("some_future_kind") == "auto"


def test_every_registered_device_name_is_accepted():
    for name in SPECS:
        assert Config(device=name).device == name


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().accuracy = "aggressive"


@pytest.mark.parametrize("bad", [1, 0, "true", "on", None])
def test_fuse_siblings_is_auto_or_a_bool(bad):
    assert Config().fuse_siblings == "auto" and Config(fuse_siblings=False).fuse_siblings is False
    with pytest.raises(ValueError) as e:
        Config(fuse_siblings=bad)
    msg = str(e.value)
    assert msg.startswith("Config.fuse_siblings=") and repr(bad) in msg
    assert "'auto'" in msg and "True" in msg and "False" in msg


@pytest.mark.parametrize("raw,value", [("auto", "auto"), ("AUTO", "auto"), ("1", True), ("false", False)])
def test_from_env_fuse_siblings(raw, value):
    assert Config.from_env(environ={"TORCHFX_EFF_FUSE_SIBLINGS": raw}).fuse_siblings == value


def test_from_env_reads_every_field(tmp_path):
    log = str(tmp_path / "log.jsonl")
    env = {
        "TORCHFX_EFF_ATTENTION": "off",
        "TORCHFX_EFF_LINEAR": "int8_weight_only, original",
        "TORCHFX_EFF_ACCURACY": "aggressive",
        "TORCHFX_EFF_INNER": "eager",
        "TORCHFX_EFF_CALIBRATE": "TRUE",
        "TORCHFX_EFF_STRICT": "1",
        "TORCHFX_EFF_COMBO_KERNELS": "0",
        "TORCHFX_EFF_LOG": log,
        "TORCHFX_EFF_DEVICE": "h100",
        "UNRELATED": "x",
    }
    c = Config.from_env(environ=env)
    assert c == Config(attention="off", linear=("int8_weight_only", "original"), accuracy="aggressive",
                       inner="eager", calibrate=True, strict=True, combo_kernels=False, log=log, device="h100")


def test_from_env_empty_environment_gives_defaults():
    assert Config.from_env(environ={}) == Config()


@pytest.mark.parametrize("raw,value", [("1", True), ("true", True), ("Yes", True), ("0", False), ("false", False),
                                       ("NO", False)])
def test_from_env_booleans(raw, value):
    assert Config.from_env(environ={"TORCHFX_EFF_CALIBRATE": raw}).calibrate is value
    assert Config.from_env(environ={"TORCHFX_EFF_STRICT": raw}).strict is value


@pytest.mark.parametrize("raw", ["2", "on", ""])
def test_from_env_bad_boolean_names_variable(raw):
    with pytest.raises(ValueError, match=r"TORCHFX_EFF_STRICT="):
        Config.from_env(environ={"TORCHFX_EFF_STRICT": raw})


def test_from_env_single_candidate_is_a_tuple_and_modes_stay_strings():
    assert Config.from_env(environ={"TORCHFX_EFF_LINEAR": "int8_weight_only"}).linear == ("int8_weight_only",)
    assert Config.from_env(environ={"TORCHFX_EFF_ATTENTION": "auto"}).attention == "auto"
    assert Config.from_env(environ={"TORCHFX_EFF_ATTENTION": "sdpa_cpu,,original,"}).attention == ("sdpa_cpu", "original")


def test_from_env_values_are_validated():
    with pytest.raises(ValueError, match=r"^Config\.accuracy="):
        Config.from_env(environ={"TORCHFX_EFF_ACCURACY": "best"})
    with pytest.raises(ValueError, match=r"^Config\.linear="):
        Config.from_env(environ={"TORCHFX_EFF_LINEAR": " , "})


def test_from_env_overrides_win():
    c = Config.from_env(environ={"TORCHFX_EFF_INNER": "inductor", "TORCHFX_EFF_ACCURACY": "lossless"}, inner="eager")
    assert (c.inner, c.accuracy) == ("eager", "lossless")


def test_backend_without_config_reads_environment(monkeypatch):
    monkeypatch.setenv("TORCHFX_EFF_ACCURACY", "aggressive")
    monkeypatch.setenv("TORCHFX_EFF_LINEAR", "off")
    b = torchfx_eff.backend()
    assert b.config.accuracy == "aggressive" and b.config.linear == "off"


@pytest.mark.parametrize("kind", ["linear", "attention"])
def test_backend_rejects_unknown_candidate_names(kind):
    with pytest.raises(ValueError) as e:
        torchfx_eff.backend(Config(**{kind: ("original", "no_such_kernel")}))
    msg = str(e.value)
    assert msg.startswith(f"Config.{kind}")
    assert "no_such_kernel" in msg
    # the message lists what is known, so a typo can be fixed
    for known in names(kind):
        assert known in msg


def test_backend_accepts_every_registered_candidate():
    # names() is the registry; every registered name must be accepted, and the documented ones must be there
    assert {"original", "int8_weight_only"} <= set(names("linear"))
    assert {"original", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_cpu"} <= set(names("attention"))
    b = torchfx_eff.backend(Config(linear=names("linear"), attention=names("attention")))
    assert b.config.linear == names("linear")
    assert re.search(r"Config\(", repr(b))


def test_config_log_accepts_pathlib(tmp_path):
    assert Config(log=pathlib.Path(tmp_path) / "a.jsonl").log.endswith("a.jsonl")
