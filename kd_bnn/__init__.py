"""kd_bnn: binary-weight object detectors for autonomous driving by knowledge transfer.

Follows Xu et al., "Training a Binary Weight Object Detector by Knowledge Transfer for
Autonomous Driving" (ICRA 2019). See docs/architecture.md for the layout of the package.
"""

from kd_bnn.offline import setup_offline_env

setup_offline_env()

__version__ = "0.1.0"
