"""VLA-style policy: frozen sentence encoder + trained image tokens + state -> transformer -> flow-matching action expert."""

from robopolicy.policies.vla.config import VLAConfig
from robopolicy.policies.vla.model import VLAPolicy

__all__ = ["VLAConfig", "VLAPolicy"]
