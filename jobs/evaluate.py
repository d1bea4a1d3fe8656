"""Ray job entrypoint: ``qmag-ray evaluate`` with a YAML config.

Writes metrics.json and plots under the configured output; logs to MLflow.

Run ``python jobs/evaluate.py --config jobs/configs/evaluate.yaml [--set key=value ...]``,
directly or as the entrypoint of ``ray job submit ... -- python jobs/evaluate.py ...``.
"""

from _common import run

if __name__ == "__main__":
    run("evaluate", "Evaluate cosine against QMagFace on a pair protocol.")
