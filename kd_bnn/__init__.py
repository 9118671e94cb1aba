"""kd_bnn: binary-weight object detectors for autonomous driving by knowledge transfer.

Follows Xu et al., "Training a Binary Weight Object Detector by Knowledge Transfer for
Autonomous Driving" (ICRA 2019). See docs/architecture.md for the layout of the package.
Importing it changes nothing in the process: third-party libraries are made offline-safe only
where the toolkit imports them (`kd_bnn.offline`).
"""

__version__ = "0.1.0"
