"""Pictures keep what they show on the chart."""
from busi.plots import loss_curves


def test_loss_chart_keeps_an_early_spike_on_it_with_a_log_axis(tmp_path):
    spiky = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 40.0 if e == 1 else 0.9} for e in range(1, 11)]
    assert loss_curves({"model": spiky}, tmp_path / "spiky.png") == "log"
    calm = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e} for e in range(1, 11)]
    assert loss_curves({"model": calm}, tmp_path / "calm.png") == "linear"
    assert (tmp_path / "spiky.png").stat().st_size > 0 and (tmp_path / "calm.png").stat().st_size > 0
