"""Ray job entrypoint: ``qmag-ray recalibrate`` with a YAML config.

Embeds new images, calibrates, evaluates, registers a challenger and moves the
champion alias only when the gate passes.

Run ``python jobs/recalibrate.py --config jobs/configs/recalibrate.yaml [--set key=value ...]``,
directly or as the entrypoint of ``ray job submit ... -- python jobs/recalibrate.py ...``.
"""

from _common import run

if __name__ == "__main__":
    run("recalibrate", "Scheduled recalibration with a champion/challenger gate.")
