"""qanafed: federated QANA training with on-site Akida conversion and encrypted metrics."""

import common  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)

__version__ = "0.1.0"
