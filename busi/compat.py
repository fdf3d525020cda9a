"""The installed torch and torchvision checked to work together, before anything else imports them."""
from __future__ import annotations

from .errors import BusiError


def check_torch() -> None:
    """A torch/torchvision pair from different builds fails deep inside an import ('operator torchvision::nms does not
    exist'); this says so in one line, with the versions and the command that installs a matching pair."""
    import torch
    try:
        import torchvision  # noqa: F401
    except (RuntimeError, ImportError, OSError, AttributeError) as e:
        from importlib.metadata import PackageNotFoundError, version
        try:
            vision = version("torchvision")
        except PackageNotFoundError:
            vision = "none"
        base = torch.__version__.split("+")[0]
        major, minor = (int(x) for x in base.split(".")[:2])
        wanted = f"0.{minor + 15}.*" if major == 2 else "the release matching it"
        index = (" (from the index this torch came from, e.g. --index-url https://download.pytorch.org/whl/cpu; where "
                 "that cannot be reached, reinstall both from pip's own index: pip install --force-reinstall torch "
                 "torchvision)") if "+cpu" in torch.__version__ else ""
        raise BusiError(f"torch {torch.__version__} and torchvision {vision} do not work together "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); install the torchvision built for "
                        f"this torch: pip install --force-reinstall --no-deps \"torchvision=={wanted}\"{index}") from None
