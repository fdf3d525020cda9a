"""What several commands share: the run options of train and cv, the engine flag, printing a model's figures."""
from __future__ import annotations

import argparse
import sys

ENGINE_HELP = ("what runs the network: auto (ONNX Runtime where installed, once this checkpoint's export is cached or "
               "for 500 images or more: the export takes a minute, once), torch or onnx")


def add_engine(p: argparse.ArgumentParser, help: str = ENGINE_HELP) -> None:
    p.add_argument("--engine", choices=("auto", "torch", "onnx"), default="auto", help=help)


def add_out(p: argparse.ArgumentParser, where: str, overwrite: str = "write into an --out folder that already holds "
            "files", progress: bool = True, required: bool = False) -> None:
    """--out, --overwrite and --no-progress: every command that writes a run folder takes the three."""
    p.add_argument("--out", required=required, help=where)
    p.add_argument("--overwrite", action="store_true", help=overwrite)
    if progress:
        p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def add_run_options(p: argparse.ArgumentParser) -> None:
    """train's and cv's options: every key of busi.config.Config a user sets from the command line."""
    p.add_argument("--data", action="append", help="dataset folder with one sub-folder per class (e.g. "
                   "Dataset_BUSI_with_GT); repeat to pool several sources (e.g. BUSI and your hospital's images)")
    p.add_argument("--config", help="YAML file of settings (flags given here override it)")
    p.add_argument("--meta", action="append", help="CSV with a row per image (e.g. BUS-BRA's bus_data.csv), matched by "
                   "file name; repeat for several sources (each CSV describes the source whose images it names)")
    p.add_argument("--id-column", help="the meta column holding each image's file name without extension (default: ID)")
    p.add_argument("--patient-column", help="meta column naming the patient (e.g. Case; alternatives for several CSVs: "
                   "Case,Patient): a patient's images stay on one side of every split, and confidence intervals "
                   "resample patients")
    p.add_argument("--group-column", help="meta column to break each source's figures down by (e.g. Device)")
    p.add_argument("--model", dest="models", action="append", help="custom-cnn, resnet18, resnet50, efficientnet-lite0 "
                   "or efficientnet-lite2; repeat for several (default: custom-cnn and resnet50, the seed experiment)")
    p.add_argument("--classes", nargs="+", help="class folder names, in label order (default: every sub-folder)")
    p.add_argument("--image-size", type=int, help="side of the square model input in pixels (default 224)")
    p.add_argument("--epochs", type=int, help="training epochs (default 25)")
    p.add_argument("--batch-size", type=int, help="images per step and per device (default 32)")
    p.add_argument("--lr", type=float, help="learning rate (default 0.001)")
    p.add_argument("--weight-decay", type=float, help="weight decay (default 0)")
    p.add_argument("--seed", type=int, help="seed of the split, the folds and training (default 0)")
    p.add_argument("--split", choices=["grouped", "random", "source"],
                   help="grouped (default) keeps near-duplicates together; random ignores them (leaky; for comparison "
                        "only); source (cv with several --data): each fold holds out one whole source, a hospital the "
                        "model never saw")
    p.add_argument("--weights", help="local ImageNet state dict for resnet models (offline machines)")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false", default=None,
                   help="start resnet models from random weights")
    p.add_argument("--accelerator", help="cpu, gpu, mps or auto (default auto; Lightning)")
    p.add_argument("--devices", help="how many devices per machine, or auto (default auto; Lightning)")
    p.add_argument("--precision", help="auto (default: bf16-mixed where the device computes bf16 natively, else 32-true), "
                                       "32-true, bf16-mixed, 16-mixed … (Lightning)")
    p.add_argument("--channels-last", action="store_true", default=None,
                   help="NHWC memory layout (default auto: on for CPU and CUDA)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="keep the NCHW layout")
    p.add_argument("--strategy", help="auto, ddp … (default auto; Lightning)")
    p.add_argument("--num-nodes", type=int, help="machines in a multi-node run (default 1; Lightning)")
    p.add_argument("--val-size", type=float,
                   help="share of the training part kept aside for the temperature and the malignant threshold "
                        "(default 0.1; 0: none)")
    p.add_argument("--fit-temperature", action=argparse.BooleanOptionalAction, default=None,
                   help="scale the probabilities by a temperature fitted on the validation part (default: on; "
                        "configs/recommended.yaml: off)")
    p.add_argument("--preprocess", nargs="+", metavar="STEP",
                   help="clean every image before training and prediction (kept in the checkpoint): crop (to the scan "
                        "region), overlays (paint out calipers and text), clahe (equalise grey levels), pad (to a "
                        "square with black, so resizing keeps proportions)")
    p.add_argument("--cine-frames", choices=["middle", "all"], help="what a DICOM cine loop trains with: its middle "
                   "frame (default) or every frame, each a sample (a loop's frames stay on one side of every split)")
    p.add_argument("--ultrasound-p", type=float, help="chance of each ultrasound-like augmentation (speckle, gain, blur, "
                                                      "depth attenuation) per image (default 0)")
    add_out(p, "run folder (default: runs/<timestamp>-<name>)", "write into an --out folder that already holds a run")


# the flags that are keys of busi.config.Config (the rest steer the command, not the run)
RUN_KEYS = ("data", "meta", "id_column", "patient_column", "group_column", "malignant_recall", "models", "preprocess",
            "cine_frames", "ultrasound_p", "classes", "image_size", "epochs", "batch_size", "lr", "weight_decay", "seed",
            "split", "weights", "pretrained", "accelerator", "devices", "precision", "channels_last", "strategy",
            "num_nodes", "test_size", "val_size", "fit_temperature", "folds", "repeats", "external", "external_meta",
            "external_id_column", "external_patient_column", "external_group_column")


def overrides(args) -> dict:
    """The Config keys a user set on the command line (None: not given, the YAML's or the default stands)."""
    return {k: getattr(args, k) for k in RUN_KEYS if getattr(args, k, None) is not None}


def caution(cfg) -> None:
    from ..config import cautions
    for line in cautions(cfg):
        print(f"busi: warning: {line}", file=sys.stderr)


def print_metrics(name: str, m: dict) -> None:
    recalls = ", ".join(f"{c} {v['recall']:.2f}" for c, v in m["per_class"].items() if v["recall"] is not None)
    auroc = "–" if m["auroc"] is None else f"{m['auroc']:.3f}"
    print(f"{name}: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}, AUROC {auroc} "
          f"(n={m['n']}; recall {recalls}; always-majority baseline {m['majority_baseline']:.3f})")


def print_rule(checkpoint, said: str, file=None) -> None:
    """The decision rule a model file carries, when it carries one, after said (on stdout unless file says)."""
    from ..inference import operating_point_of
    operating_point = operating_point_of(checkpoint)
    if operating_point:
        from ..operating import describe
        print(f"{said}{describe(operating_point)}", file=file or sys.stdout)
