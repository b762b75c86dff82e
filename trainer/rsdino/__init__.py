"""DINOv2 self-supervised pretraining for multimodal remote sensing."""

__version__ = "0.1.0"
