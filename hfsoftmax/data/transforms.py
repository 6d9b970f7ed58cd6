"""Image transforms for 112x112 RGB face crops (torchvision).

InsightFace's normalisation maps pixel values x in [0, 255] to ``(x/255 - 0.5) / 0.5`` in
[-1, 1]: ``ToTensor`` then ``Normalize(mean=0.5, std=0.5)``. Training adds a random horizontal
flip (faces are roughly symmetric; InsightFace's arcface_torch does the same).

>>> tensor = train_transform()(pil_image)   # float32 (3, 112, 112) in [-1, 1]
"""
from __future__ import annotations

__all__ = ["MEAN", "STD", "train_transform", "eval_transform", "normalize_uint8",
           "normalize_batch"]

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def train_transform(flip_p: float = 0.5):
    """PIL RGB image -> normalised float CHW tensor, with a random horizontal flip."""
    from torchvision import transforms as T

    return T.Compose([T.RandomHorizontalFlip(flip_p), T.ToTensor(), T.Normalize(MEAN, STD)])


def eval_transform():
    """PIL RGB image -> normalised float CHW tensor (no augmentation)."""
    from torchvision import transforms as T

    return T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])


def normalize_uint8(images):
    """uint8 array/tensor (N, H, W, 3) -> float32 tensor (N, 3, H, W) with the same
    normalisation, for batches decoded with :func:`verification.decode_pairs`."""
    import torch

    t = torch.as_tensor(images)
    return t.permute(0, 3, 1, 2).float().div_(255.0).sub_(0.5).div_(0.5)


def normalize_batch(images, flips=None, channels_last: bool = False):
    """uint8 (N, H, W, 3) batch -> float32 (N, 3, H, W) in [-1, 1], on the batch's device
    (the trainer's and extraction's path: the loader sends uint8, the GPU does the rest).

    ``flips`` (N,) bool flips those images horizontally. The arithmetic is ``ToTensor`` +
    ``Normalize``'s (``x / 255``, ``- 0.5``, ``/ 0.5`` in float32), so on the CPU the result
    equals :func:`eval_transform`'s bit for bit. ``channels_last``: keep the NHWC layout
    (a channels-last NCHW tensor, what convolutions on tensor cores prefer); otherwise
    contiguous NCHW.
    """
    import torch

    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be a uint8 (N, H, W, 3) batch, got {images.dtype} "
                         f"{tuple(images.shape)}")
    if flips is not None:
        images = torch.where(flips.view(-1, 1, 1, 1), images.flip(2), images)
    x = images.permute(0, 3, 1, 2)
    x = x.float() if channels_last else x.contiguous().float()
    return x.div_(255.0).sub_(0.5).div_(0.5)
