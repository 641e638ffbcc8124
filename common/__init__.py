"""Shared, Flower-free core of qanafed: data, models, quantization, Akida and privacy."""

import os

# quantizeml and cnn2snn only accept tf_keras (Keras 2) models; this must be set before
# TensorFlow is first imported anywhere in the process.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
