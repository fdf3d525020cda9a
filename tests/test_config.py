import pytest
import yaml

from busi.config import RunConfig, make_config, save_config
from busi.errors import BusiError


def test_defaults_are_the_seed_experiment():
    cfg = make_config()
    assert cfg.models == ["custom-cnn", "resnet50"] and cfg.epochs == 25 and cfg.image_size == 224
    assert cfg.test_size == 0.3 and cfg.split == "grouped"


def test_yaml_then_flags_and_round_trip(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("models: resnet18\nepochs: 3\nlr: 1\n")
    cfg = make_config({"epochs": 5}, f)
    assert cfg.models == ["resnet18"] and cfg.epochs == 5 and cfg.lr == 1.0
    save_config(cfg, tmp_path / "saved.yaml")
    saved = yaml.safe_load((tmp_path / "saved.yaml").read_text())
    assert make_config(config_file=tmp_path / "saved.yaml") == cfg and saved["epochs"] == 5


@pytest.mark.parametrize("text, message", [
    ("epoch: 3\n", "unknown config key 'epoch'"),
    ("epochs: ten\n", "'epochs' must be int, got str"),
    ("epochs: true\n", "'epochs' must be int"),
    ("models: [vgg]\n", "unknown model 'vgg'"),
    ("test_size: 1.5\n", "'test_size' must be in \[0, 1\)"),
    ("- a\n- b\n", "must be a mapping"),
    ("epochs: [\n", "not valid YAML"),
    ("mixup_alpha: 0.4\nmask_weight: 1.0\n", "cannot be combined"),
])
def test_config_errors_name_the_file(tmp_path, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(BusiError, match=message) as e:
        make_config(config_file=f)
    assert "bad.yaml" in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(BusiError, match="config file does not exist"):
        make_config(config_file=tmp_path / "none.yaml")


def test_config_is_a_dataclass_of_plain_values():
    assert all(isinstance(v, (int, float, str, list, type(None))) for v in RunConfig().to_dict().values())


def test_shipped_configs_are_valid():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    files = sorted(root.glob("configs/*.yaml")) + sorted(root.glob("benchmarks/recipes/*.yaml"))
    assert files
    for f in files:
        make_config(config_file=f)
