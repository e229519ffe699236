"""medq: train, quantize (Intel Neural Compressor) and benchmark medical image classifiers on Intel Xeon CPUs."""

__version__ = "0.1.0"
