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
    ("epoch: 3\n", "unknown config key 'epoch' .did you mean 'epochs'."),
    ("imagesize: 3\n", "unknown config key 'imagesize' .did you mean 'image_size'."),
    ("zzz: 3\n", "unknown config key 'zzz' .the keys are listed"),
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


def test_model_names_known_without_torch_are_the_architectures():
    from busi.config import MODEL_NAMES
    from busi.models import ARCHITECTURES
    assert MODEL_NAMES == tuple(ARCHITECTURES)


def test_bad_arguments_are_answered_before_torch_is_imported(tmp_path):
    """Why `busi train --data typo` answers in a fraction of a second instead of after seconds of imports."""
    import subprocess
    import sys
    import torch
    torch.save({"weight": torch.zeros(2)}, tmp_path / "state_dict.pth")  # a PyTorch file, but no busi checkpoint
    (tmp_path / "junk.pth").write_bytes(b"junk")
    calls = [["train", "--data", "/no/such"], ["cv", "--data", ".", "--epochs", "0"],
             ["evaluate", "--checkpoint", "/no.pth", "--data", "."], ["predict", "--checkpoint", "/no.pth", "x"],
             ["predict", "--checkpoint", "state_dict.pth", "x"], ["export", "--checkpoint", "junk.pth", "--format", "onnx"]]
    code = f"import sys; from busi.cli import main; print([main(a) for a in {calls!r}], 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.stdout.strip() == "[2, 2, 2, 2, 2, 2] False", done.stdout + done.stderr
    assert done.stderr.count("busi: error:") == 6 and "Traceback" not in done.stderr
    assert "state_dict.pth: not a busi checkpoint" in done.stderr and "junk.pth: not a readable checkpoint" in done.stderr


def test_fit_temperature_is_the_recipes_unless_a_flag_says_otherwise():
    from pathlib import Path
    from busi.cli import overrides as _overrides, parser
    recommended = Path(__file__).resolve().parents[1] / "configs" / "recommended.yaml"

    def fitted(*flags):
        args = parser().parse_args(["train", "--config", str(recommended), "--data", "d", *flags])
        return make_config(_overrides(args), args.config).fit_temperature
    assert make_config().fit_temperature  # the default fits one
    assert not fitted() and fitted("--fit-temperature") and not fitted("--no-fit-temperature")


def test_a_run_that_is_all_warm_up_is_cautioned(kaggle_folder, tmp_path, capsys):
    from busi.config import cautions
    assert cautions(make_config({"scheduler": "cosine", "warmup_epochs": 2, "epochs": 2}))
    assert not cautions(make_config({"scheduler": "cosine", "warmup_epochs": 2, "epochs": 30}))
    from busi.cli import main
    (tmp_path / "r.yaml").write_text("scheduler: cosine\nwarmup_epochs: 2\n")
    main(["train", "--data", str(kaggle_folder), "--config", str(tmp_path / "r.yaml"), "--epochs", "1", "--model",
          "custom-cnn", "--image-size", "32", "--out", str(tmp_path / "run"), "--no-progress"])
    assert "warmup_epochs 2 >= epochs 1: the whole run is the warm-up" in capsys.readouterr().err


def test_using_a_trained_model_never_imports_the_training_stack():
    """predict, evaluate, serve, export, adapt and calibrate start seconds sooner without Lightning."""
    import subprocess
    import sys
    code = ("import sys, busi.inference, busi.export, busi.adapt, busi.bundled, busi.cli, busi.results, busi.report, "
            "busi.explain, busi.app; "
            "print(sorted(m for m in sys.modules if m == 'lightning' or m.startswith('lightning.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
