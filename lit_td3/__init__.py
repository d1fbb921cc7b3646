"""lit_td3: TD3 from pixels for autonomous driving, on PyTorch Lightning.

Kept import-light on purpose: env worker processes import ``lit_td3.envs`` without paying for torch or Lightning.
"""

__version__ = "0.1.0"
