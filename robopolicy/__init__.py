"""robopolicy: robot policy learning with sim-to-real deployment.

Importing the package changes nothing in the caller's process: the environment defaults
(headless rendering, offline hub, ROS 2 on localhost, passive OpenMP waiting) are applied by
the entry points only (see :mod:`robopolicy.process_defaults`).
"""

__version__ = "0.1.0"
