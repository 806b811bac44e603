"""Flow-matching policy: rectified-flow FiLM U-Net, Euler sampling."""

from robopolicy.policies.flow.config import FlowConfig
from robopolicy.policies.flow.model import FlowPolicy

__all__ = ["FlowConfig", "FlowPolicy"]
