"""sigscale: cluster-scale SigLIP pretraining.

The stage folders at the repository root (pretrain/, curation/, eval/, slurm/) are installed
as sub-packages of this namespace: ``sigscale.pretrain``, ``sigscale.curation``, ...
"""
import os
from pathlib import Path

__version__ = "0.1.0"

# albumentations (imported by img2dataset) phones PyPI on import unless told not to.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
