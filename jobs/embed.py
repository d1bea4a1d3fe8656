"""Ray job entrypoint: ``qmag-ray embed`` with a YAML config.

Writes embeddings/, failures/ and summary.json under the configured output.

Run ``python jobs/embed.py --config jobs/configs/embed.yaml [--set key=value ...]``,
directly or as the entrypoint of ``ray job submit ... -- python jobs/embed.py ...``.
"""

from _common import run

if __name__ == "__main__":
    run("embed", "Embed face images from object storage with a MagFace backbone (Ray Data job).")
