"""Backbones: images (B, 3, 112, 112) in [-1, 1] -> embeddings (B, embedding_size).

ResNet-18/34/50/101 adapted to 112x112 face crops (``resnet*``), InsightFace's IResNet
(``ir18`` .. ``ir100``), MobileFaceNet (``mobilefacenet``) and small convnets for CPU demos
(``convnet-s``, ``convnet-s-gn``). ``build_backbone(name, embedding_size)`` builds one.
"""
from .registry import build_backbone, head_defaults, list_backbones, register_backbone

__all__ = ["build_backbone", "head_defaults", "list_backbones", "register_backbone"]
