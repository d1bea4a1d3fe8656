"""Ray job entrypoint: ``qmag-ray calibrate`` with a YAML config.

Writes calibration.json and plots under the configured output; logs to MLflow.

Run ``python jobs/calibrate.py --config jobs/configs/calibrate.yaml [--set key=value ...]``,
directly or as the entrypoint of ``ray job submit ... -- python jobs/calibrate.py ...``.
"""

from _common import run

if __name__ == "__main__":
    run("calibrate", "Fit the QMagFace quality weighting (alpha, beta) on a Ray cluster.")
