"""Bad configuration fails at load time, naming the field."""

from pathlib import Path

import pytest
import yaml

from dcgan.config import Config, ConfigError, load_config, parse_config


def test_defaults_are_the_paper():
    c = Config()
    assert (c.train.batch_size, c.train.lr, c.train.beta1) == (128, 2e-4, 0.5)
    assert (c.model.z_dim, c.model.z_dist, c.model.resolution) == (100, "uniform", 64)


def test_unknown_key_names_the_field():
    with pytest.raises(ConfigError, match=r"train\.learning_rate"):
        parse_config({"train": {"learning_rate": 0.1}})


@pytest.mark.parametrize("field, value", [("train.lr", "inf"), ("train.weight_decay", ".inf"), ("dedup.lr", "inf"),
                                          ("dedup.input_noise", "nan"), ("cluster.cpus_per_worker", "inf")])
def test_an_infinite_number_is_refused_naming_the_field(tmp_path, field, value):
    """`--set train.lr=inf` passed `gt=0` (NaN fails every bound, infinity does not) and trained a NaN model to the
    end, exit 0. A number in the config is finite or refused."""
    p = tmp_path / "c.yaml"
    section, name = field.split(".")
    p.write_text(f"{section}:\n  {name}: {value}\n")
    for given in ({"config": p, "overrides": {}}, {"config": None, "overrides": {field: float(value.strip("."))}}):
        with pytest.raises(ConfigError, match=rf"{field}: Input should be a finite number"):
            load_config(given["config"], given["overrides"])


def test_resolution_not_power_of_two():
    with pytest.raises(ConfigError, match=r"model\.resolution.*power of two"):
        parse_config({"model": {"resolution": 48}})


def test_batch_not_divisible_by_workers():
    with pytest.raises(ConfigError, match=r"batch_size \(128\) must be divisible by cluster.workers \(3\)"):
        parse_config({"cluster": {"workers": 3}})


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ntrain: {steps: 5}\n")
    c = load_config(p, {"train.steps": 7, "data": "s3://b/d"})
    assert c.train.steps == 7 and c.data_uri == "s3://b/d"
    # a relative root is resolved once, where the config is read: every later step sees one absolute place
    assert c.run_uri == str(Path("runs").resolve() / "runs" / "x")


CONFIGS = sorted(Path(__file__).parent.parent.glob("configs/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_say_how_long_to_train(path):
    """Every config names its step budget: the default (1000) would stop a paper run after a fraction of an epoch."""
    assert "steps" in (yaml.safe_load(path.read_text()).get("train") or {}), f"{path.name}: no train.steps"
    load_config(path)


def test_model_follows_the_build_resolution_unless_it_says_otherwise():
    assert load_config(None, {"build.resolution": 32}).model.resolution == 32
    with pytest.raises(ConfigError, match=r"build.resolution \(32\) differs from model.resolution \(64\)"):
        load_config(None, {"build.resolution": 32, "model.resolution": 64})

def test_shipped_configs_are_all_found():
    assert {"imagenet-32.yaml", "svhn-32.yaml", "faces-64.yaml", "lsun-bedrooms-64.yaml"} <= {p.name for p in CONFIGS}


def test_generator_stack_that_misses_the_resolution_names_the_field():
    stack = {"resolution": 32, "g_channels": [64, 32], "g_strides": [2, 1], "g_kernel_size": 3}
    with pytest.raises(ConfigError, match=r"model: .*g_strides take G's 4x4 projection to 8x8, not resolution 32"):
        parse_config({"model": stack})
    with pytest.raises(ConfigError, match=r"model: .*g_kernel_size 4 .* stride 1"):
        parse_config({"model": {"resolution": 16, "g_channels": [64, 32, 16], "g_strides": [2, 1, 2],
                                "g_kernel_size": 4}})
    with pytest.raises(ConfigError, match=r"g_channels and g_strides must be given together"):
        parse_config({"model": {"g_channels": [64, 32]}})


def test_readme_configuration_reference_is_current():
    """README's field table is generated from the models; edit a field's description, then run
    `python -m dcgan.config_reference`."""
    from dcgan import config_reference

    text = config_reference.README.read_text()
    start = text.index(config_reference.START)
    end = text.index(config_reference.END) + len(config_reference.END)
    assert text[start:end] == config_reference.render(), "README.md is stale: run python -m dcgan.config_reference"


def test_set_takes_a_top_level_field_as_the_readme_says_any_field():
    """`--set root=s3://bucket` was refused ("expected SECTION.FIELD=VALUE"), so a shipped config whose root is
    ./runs could not be pointed at object storage without editing it. A top-level field is set as a section's is,
    once; any other key without a section is refused, naming what is taken."""
    from dcgan.cli import build_parser
    from dcgan.commands import config_of

    def config(*argv: str):
        return config_of(build_parser().parse_args(["train", "--config", "configs/faces-64.yaml", *argv]))

    cfg = config("--set", "root=s3://dcgan", "--set", "name=faces-b")
    assert (cfg.root, cfg.data_uri, cfg.run_uri) == ("s3://dcgan", "s3://dcgan/datasets/faces-b/v1",
                                                     "s3://dcgan/runs/faces-b")
    with pytest.raises(ConfigError, match=r"--data s3://x/d and --set data=s3://y/d both set data: give it once"):
        config("--data", "s3://x/d", "--set", "data=s3://y/d")
    with pytest.raises(ConfigError, match=r"--set 'roots=x': expected SECTION.FIELD=VALUE, e.g. train.lr=0.001, or a "
                                          r"top-level field \(name, root, data, run\)"):
        config("--set", "roots=x")
