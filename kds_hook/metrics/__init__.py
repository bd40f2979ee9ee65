"""Image-quality metrics for restoration results: PSNR and SSIM (scikit-image) and LPIPS (AlexNet, lin).

Images are float tensors in [0, 1], shape (3, H, W) or (B, 3, H, W). LPIPS needs converted weights
(:func:`lpips_weights_path`; ``python -m kds_hook.metrics.convert_lpips`` makes them) and is reported as missing,
never estimated, without them.
"""

from .fidelity import psnr, ssim
from .lpips import LPIPS, LPIPSWeightsMissing, load_lpips, lpips, lpips_weights_path

__all__ = ["psnr", "ssim", "lpips", "LPIPS", "LPIPSWeightsMissing", "load_lpips", "lpips_weights_path"]
