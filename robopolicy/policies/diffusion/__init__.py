"""Diffusion policy: DDPM-trained FiLM U-Net, DDIM sampling."""

from robopolicy.policies.diffusion.config import DiffusionConfig
from robopolicy.policies.diffusion.model import DiffusionPolicy

__all__ = ["DiffusionConfig", "DiffusionPolicy"]
