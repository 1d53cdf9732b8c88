"""Image data sets in the Hugging Face *imagefolder* layout.

A data set is a folder of images plus ``metadata.jsonl``, one JSON object per
image with ``file_name`` (relative to the folder), ``text`` (caption),
``domain``, ``membership`` (``member``, ``nonmember`` or ``public``) and
``copies`` (how often the image appears in pre-training; 0 for non-members).
The testbed writes this layout and a user's own data set uses it too, so one
loader serves both.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import DataError

MEMBERSHIPS = ("member", "nonmember", "public")
METADATA = "metadata.jsonl"


@dataclass(frozen=True)
class Record:
    """One row of ``metadata.jsonl``."""

    file_name: str
    text: str
    domain: str
    membership: str
    copies: int


@dataclass
class ImageDataset:
    """Images as a float tensor ``[N, C, H, W]`` in [0, 1], with their records."""

    records: list[Record]
    images: torch.Tensor

    def __len__(self) -> int:
        return len(self.records)

    def __post_init__(self) -> None:
        if len(self.records) != len(self.images):
            raise DataError(f"{len(self.records)} records but {len(self.images)} images; give one record per image")

    @property
    def domains(self) -> list[str]:
        return sorted({r.domain for r in self.records})

    def select(self, *, membership: str | None = None, domain: str | None = None) -> "ImageDataset":
        keep = [
            i for i, r in enumerate(self.records) if (membership is None or r.membership == membership) and (domain is None or r.domain == domain)
        ]
        return ImageDataset([self.records[i] for i in keep], self.images[keep])

    def distinct_training(self) -> "ImageDataset":
        """Every image pre-training sees (members and public), once each."""
        keep = [i for i, r in enumerate(self.records) if r.membership != "nonmember"]
        return ImageDataset([self.records[i] for i in keep], self.images[keep])

    def training_set(self) -> tuple[torch.Tensor, list[str]]:
        """What pre-training sees: members and public images, each repeated ``copies`` times."""
        index = [i for i, r in enumerate(self.records) if r.membership != "nonmember" for _ in range(r.copies)]
        return self.images[index], [self.records[i].text for i in index]

    def domain_caption(self, domain: str) -> str:
        """The caption shared by a domain's images (the prompt that targets it)."""
        texts = {r.text for r in self.records if r.domain == domain}
        if not texts:
            raise DataError(f"no image of domain '{domain}'; known domains: {', '.join(self.domains)}")
        return sorted(texts)[0]


def write_imagefolder(folder: str | Path, images: np.ndarray, records: Sequence[Record]) -> Path:
    """Write uint8 images ``[N, H, W]`` (grey) or ``[N, H, W, 3]`` (RGB) and their metadata."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if len(images) != len(records):
        raise DataError(f"{len(images)} images but {len(records)} records; give one record per image")
    with open(folder / METADATA, "w", encoding="utf-8") as out:
        for image, record in zip(images, records):
            target = folder / record.file_name
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(image, dtype=np.uint8)).save(target)
            out.write(json.dumps(asdict(record)) + "\n")
    return folder


def load_imagefolder(folder: str | Path, *, channels: int | None = None) -> ImageDataset:
    """Load an imagefolder data set, checking every row and image.

    Args:
        folder: the folder holding ``metadata.jsonl`` and the images.
        channels: convert every image to 1 (grey) or 3 (RGB) channels; None keeps
            what the files hold (all must agree).

    Raises:
        DataError: naming the row or file that is missing, unreadable or inconsistent.
    """
    folder = Path(folder)
    if not (folder / METADATA).is_file():
        raise DataError(f"{folder} has no {METADATA}; a data set folder needs images plus a metadata.jsonl row per image")
    records = list(_read_records(folder / METADATA))
    if not records:
        raise DataError(f"{folder / METADATA} lists no image; add one JSON row per image")
    arrays = [_read_image(folder, record, channels) for record in records]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        examples = {}
        for record, array in zip(records, arrays):
            examples.setdefault(array.shape, record.file_name)
        listing = ", ".join(f"{name} is {shape[1]}x{shape[0]}x{shape[2]}" for shape, name in examples.items())
        raise DataError(f"{folder}: images have mixed sizes ({listing}); resize them to one size first")
    stacked = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    return ImageDataset(records, stacked.contiguous())


def _read_records(path: Path) -> Iterable[Record]:
    seen: set[str] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg}); write one JSON object per line") from None
        missing = [k for k in ("file_name", "text", "domain", "membership") if k not in row]
        if missing:
            raise DataError(f"{where}: missing {', '.join(missing)}; every row needs file_name, text, domain, membership")
        membership = row["membership"]
        if membership not in MEMBERSHIPS:
            raise DataError(f"{where}: unknown membership {membership!r}; use one of {', '.join(MEMBERSHIPS)}")
        copies = row.get("copies", 0 if membership == "nonmember" else 1)
        if isinstance(copies, bool) or not isinstance(copies, int) or copies < 0:
            raise DataError(f"{where}: copies must be a whole number >= 0, got {copies!r}")
        if membership == "nonmember" and copies != 0:
            raise DataError(f"{where}: a nonmember has copies = 0 (it was never trained on), got {copies}")
        if membership != "nonmember" and copies < 1:
            raise DataError(f"{where}: a {membership} image appears in training at least once; set copies >= 1")
        if row["file_name"] in seen:
            raise DataError(f"{where}: {row['file_name']} is listed twice; list each image once and use copies")
        seen.add(row["file_name"])
        yield Record(str(row["file_name"]), str(row["text"]), str(row["domain"]), membership, copies)


def _read_image(folder: Path, record: Record, channels: int | None) -> np.ndarray:
    path = folder / record.file_name
    if not path.resolve().is_relative_to(folder.resolve()):  # "../x.png", an absolute path, or a symlink out
        raise DataError(f"{folder / METADATA}: {record.file_name!r} lies outside the data folder; copy the image into it and name it relative to it")
    if not path.is_file():
        raise DataError(f"{path} is listed in {METADATA} but missing; add the image or remove its row")
    try:
        with Image.open(path) as image:
            if channels == 1 or (channels is None and image.mode in ("L", "1", "I", "I;16")):
                image = image.convert("L")
            else:
                image = image.convert("RGB")
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path} is not a readable image ({exc}); replace or remove it") from None
    except Image.DecompressionBombError as exc:  # a few KB on disk that would decode to gigabytes
        raise DataError(f"{path} is too large to decode safely ({exc}); downscale it to the model's resolution first") from None
    return array[:, :, None] if array.ndim == 2 else array
