"""MNIST as whole tensors on the training device, plus batched augmentation there.

The dataset is 47 MB as uint8, so it lives on the device for the whole run: no DataLoader, no
per-sample transforms, no host-to-device copy per step. `torchvision.datasets.MNIST` still does
the download, the md5 check and the parsing.
"""
import math
import os
import socket

import torch
import torch.nn.functional as F
from torchvision.datasets import MNIST
from torchvision.datasets.utils import check_integrity

# The repository's data/ wherever the command runs from, so train.py and the tests read one copy.
DEFAULT_DATA_DIR = os.environ.get("MNIST_DATA_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
ARCHIVES = [name for name, _ in MNIST.resources]
DOWNLOAD_TIMEOUT_S = 5  # fail fast offline instead of hanging on each mirror


class DataError(Exception):
    """A one-line, user-facing reason the data could not be loaded."""


def _corrupt_archive(raw_dir):
    """The first archive in raw_dir whose md5 is wrong, or None."""
    for name, md5 in MNIST.resources:
        path = os.path.join(raw_dir, name)
        if os.path.exists(path) and not check_integrity(path, md5):
            return path
    return None


def load_mnist(root, train, device):
    """Returns (images, labels): uint8 (N, 1, 28, 28) and int64 (N,), on `device`.

    Downloads the archives into root/MNIST/raw/ when they are not there yet; torchvision checks
    their md5 and fetches a truncated one again."""
    raw_dir = os.path.join(root, "MNIST", "raw")
    extracted = all(os.path.exists(os.path.join(raw_dir, name.removesuffix(".gz"))) for name in ARCHIVES)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        dataset = MNIST(root, train=train, download=not extracted)
    except Exception as e:  # offline, unwritable root, unreadable file: each gets one line
        if extracted:
            raise DataError(f"could not read the extracted MNIST files in {raw_dir} ({type(e).__name__}): "
                            "delete them (keep the .gz archives) and run again") from None
        corrupt = _corrupt_archive(raw_dir)
        if corrupt:
            raise DataError(f"{corrupt} is corrupt or truncated (md5 mismatch) and could not be downloaded "
                            f"again ({type(e).__name__}): copy a good one there") from None
        raise DataError(
            f"MNIST not found in {os.path.abspath(raw_dir)} and could not be downloaded "
            f"({type(e).__name__}). Put {', '.join(ARCHIVES)} there, or point --data-dir / "
            "MNIST_DATA_DIR at a folder holding MNIST/raw/") from None
    finally:
        socket.setdefaulttimeout(previous_timeout)
    expected = 60_000 if train else 10_000
    if len(dataset.data) != expected or len(dataset.targets) != expected:
        raise DataError(f"{raw_dir} holds {len(dataset.data)} images and {len(dataset.targets)} labels for "
                        f"the {'train' if train else 'test'} split, expected {expected}: delete the "
                        "extracted files (keep the .gz archives) and run again")
    return dataset.data.unsqueeze(1).to(device), dataset.targets.to(device)


def to_float(images):
    """uint8 pixels to floats in [0, 1], as ToTensor gives."""
    return images.float().div_(255)


def augment(x, degrees, translate, scale):
    """Random rotation, shift and zoom for a whole batch at once, one draw per image.

    x: float (N, 1, 28, 28) in [0, 1]; the background is 0, so zero padding is correct.
    Ranges: rotation within +-degrees, shift within +-translate of the width, zoom 1 +- scale.
    """
    n = x.shape[0]
    angle = (torch.rand(n, device=x.device) * 2 - 1) * math.radians(degrees)
    zoom = 1 + (torch.rand(n, device=x.device) * 2 - 1) * scale
    shift = (torch.rand(n, 2, device=x.device) * 2 - 1) * translate * 2  # grid coords span 2
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)  # (N, 2, 3)
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
