"""Command-line entry point: ``qmag-ray <command>``. Each command is a module of this package."""

from qmag_ray.cli import calibrate as _calibrate  # noqa: F401  (registers `qmag-ray calibrate`)
from qmag_ray.cli import compare as _compare  # noqa: F401  (registers `qmag-ray compare`)
from qmag_ray.cli import demo as _demo  # noqa: F401  (registers `qmag-ray demo`)
from qmag_ray.cli import embed as _embed  # noqa: F401  (registers `qmag-ray embed`)
from qmag_ray.cli import evaluate as _evaluate  # noqa: F401  (registers `qmag-ray evaluate`)
from qmag_ray.cli import identify as _identify  # noqa: F401  (registers `qmag-ray identify`)
from qmag_ray.cli import recalibrate as _recalibrate  # noqa: F401  (`qmag-ray recalibrate`)
from qmag_ray.cli import synth as _synth  # noqa: F401  (registers `qmag-ray synth`)
from qmag_ray.cli import synth_protocols as _synth_protocols  # noqa: F401  (`synth-protocols`)
from qmag_ray.cli import train as _train  # noqa: F401  (registers `qmag-ray train`)
from qmag_ray.cli.app import app

__all__ = ["app"]
