"""Policy families (diffusion, flow) over one shared encoder + FiLM U-Net; see ``factory``.

Import :mod:`robopolicy.policies.factory` for the registry; this package stays light so
that importing :mod:`robopolicy.policies.base` does not pull in every family.
"""
