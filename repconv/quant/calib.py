"""Calibration and evaluation inputs: a directory of images, ``.npy`` batches, or random tensors.

Every loader returns one float32 array of samples, shaped ``(N, *input_shape[1:])``; callers cut it
into batches of the model's own batch size with :func:`batches`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")

RANDOM_NOTE = ("calibrating on random normal inputs: activation ranges are not those of real data, so the "
               "INT8 model's accuracy and the drift figures say little about real use; pass --calib DIR")


class CalibrationError(ValueError):
    """Calibration data that cannot be used (missing, wrong shape, unreadable); one line for the user."""


def load_samples(source: str | Path, input_shape: Sequence[int], *, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, limit: int | None = None) -> np.ndarray:
    """Samples from a ``.npy`` file, or a directory of ``.npy`` files or of images.

    ``.npy`` arrays are ``(N, *sample_shape)`` or one ``sample_shape`` each, used as they are. Images are
    converted to the model's channel count (RGB or grey), resized to its H x W, scaled to [0, 1] and
    normalised with ``mean`` / ``std`` per channel when given."""
    path = Path(source)
    sample_shape = tuple(int(d) for d in input_shape[1:])
    if not path.exists():
        raise CalibrationError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix.lower() != ".npy":
            raise CalibrationError(f"{path}: expected a .npy file or a directory of images / .npy files")
        arrays = [_load_npy(path, sample_shape)]
    else:
        files = sorted(p for p in path.iterdir() if p.is_file())
        npys = [p for p in files if p.suffix.lower() == ".npy"]
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        if npys and images:
            raise CalibrationError(f"{path} mixes .npy files and images: keep one kind per directory")
        if npys:
            arrays = [_load_npy(p, sample_shape) for p in npys]
        elif images:
            arrays = [_load_image(p, sample_shape, mean, std)[None] for p in images[:limit]]
        else:
            raise CalibrationError(f"{path} holds no .npy files and no images ({', '.join(IMAGE_SUFFIXES)})")
    samples = np.concatenate(arrays).astype(np.float32, copy=False)
    if limit is not None:
        samples = samples[:limit]
    if not np.isfinite(samples).all():
        raise CalibrationError(f"{path}: the calibration data contains NaN or Inf")
    return samples


def random_samples(n: int, input_shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """``n`` standard-normal samples of the model's sample shape (see :data:`RANDOM_NOTE`)."""
    if n < 1:
        raise CalibrationError(f"the number of random samples must be positive, got {n}")
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *(int(d) for d in input_shape[1:])), dtype=np.float32)


def split_holdout(samples: np.ndarray, holdout: int) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, held-out): the last ``holdout`` samples are kept out of calibration."""
    if holdout < 1:
        raise CalibrationError(f"--holdout must be at least 1, got {holdout}")
    if len(samples) <= holdout:
        raise CalibrationError(f"{len(samples)} samples cannot give {holdout} held-out samples and still "
                               "calibrate: give more data or a smaller --holdout")
    return samples[:-holdout], samples[-holdout:]


def batches(samples: np.ndarray, batch: int) -> list[np.ndarray]:
    """Consecutive batches of exactly ``batch`` samples (the model's static batch); a shorter tail is dropped."""
    if len(samples) < batch:
        raise CalibrationError(f"{len(samples)} samples are fewer than the model's batch size {batch}")
    return [samples[i:i + batch] for i in range(0, len(samples) - batch + 1, batch)]


def _load_npy(path: Path, sample_shape: tuple[int, ...]) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise CalibrationError(f"{path}: not a readable .npy array ({str(e).splitlines()[0][:120]})") from None
    if arr.dtype.kind not in "fiu":
        raise CalibrationError(f"{path}: holds {arr.dtype} data, expected numbers")
    if tuple(arr.shape) == sample_shape:
        arr = arr[None]
    if tuple(arr.shape[1:]) != sample_shape:
        raise CalibrationError(f"{path}: shape {tuple(arr.shape)} does not fit the model's samples "
                               f"(N, {', '.join(map(str, sample_shape))})")
    return arr.astype(np.float32, copy=False)


def _load_image(path: Path, sample_shape: tuple[int, ...], mean: Sequence[float] | None,
                std: Sequence[float] | None) -> np.ndarray:
    if len(sample_shape) != 3 or sample_shape[0] not in (1, 3):
        raise CalibrationError(f"images need a model input of 1 or 3 channels (N, C, H, W); this model takes "
                               f"(N, {', '.join(map(str, sample_shape))}): pass .npy batches instead")
    try:
        from PIL import Image
    except ImportError:
        raise CalibrationError("reading images needs Pillow: pip install pillow (or pass .npy batches)") from None
    c, h, w = sample_shape
    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if c == 3 else "L").resize((w, h), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except OSError as e:
        raise CalibrationError(f"{path}: not a readable image ({str(e).splitlines()[0][:120]})") from None
    arr = arr.reshape(h, w, c).transpose(2, 0, 1)
    for name, values in (("mean", mean), ("std", std)):
        if values is not None and len(values) not in (1, c):
            raise CalibrationError(f"--{name} needs 1 or {c} values, got {len(values)}")
    if mean is not None:
        arr = arr - np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    if std is not None:
        if any(s <= 0 for s in std):
            raise CalibrationError("--std values must be positive")
        arr = arr / np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    return arr
