"""ComfyUI nodes for Kernel Density Steering: ``KDSSteer`` and ``KDSSelect``.

``KDSSteer`` returns a copy of a MODEL whose every model evaluation, with every ComfyUI sampler, steers the
guided x0 prediction with :meth:`kds_hook.KDS.steer_x0`, gated on t/T read from the model's own
``model_sampling``; ``KDSSelect`` keeps one latent per group of N particles. ComfyUI finds the nodes through
:data:`NODE_CLASS_MAPPINGS`; :func:`install` (``kds-hook comfyui-install PATH``) writes the loader that exports
them into ``custom_nodes/``. ComfyUI is imported only when a node runs, so importing this package needs nothing
but kds-hook. Guide: ``docs/comfyui.md``.
"""

from .install import LOADER_NAME, LOADER_SOURCE, InstallResult, install
from .latents import select_latent
from .nodes import KDSSelect, KDSSteer
from .steering import WRAPPER_KEY, KDSPredictNoiseWrapper
from .timesteps import model_sampling_t_frac

NODE_CLASS_MAPPINGS = {"KDSSteer": KDSSteer, "KDSSelect": KDSSelect}
NODE_DISPLAY_NAME_MAPPINGS = {"KDSSteer": "KDS Steer (Kernel Density Steering)", "KDSSelect": "KDS Select Particle"}

__all__ = [
    "NODE_CLASS_MAPPINGS",
    "NODE_DISPLAY_NAME_MAPPINGS",
    "KDSSteer",
    "KDSSelect",
    "KDSPredictNoiseWrapper",
    "WRAPPER_KEY",
    "model_sampling_t_frac",
    "select_latent",
    "install",
    "InstallResult",
    "LOADER_NAME",
    "LOADER_SOURCE",
]
