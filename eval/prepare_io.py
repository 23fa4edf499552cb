"""Shared pieces of ``eval.prepare``: loading a Hugging Face copy, writing files and images, checking a folder.

What to build for a benchmark is in its spec (``eval.benchmarks``, ``Benchmark.prepare``): the parts its rows come
from (``Part``: dataset, config, split), a ``build`` that writes LLaVA's playground files from those rows, and a
``check`` that lists the required files plus the image references ``--check`` verifies in an existing (e.g.
upstream eval.zip) folder.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from eval.common import EvalInputError, iter_jsonl, jsonl_line

if TYPE_CHECKING:
    from eval.benchmarks import Part

DEFAULT_ORGS = ("lmms-lab-encoder", "lmms-lab")
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
_PIL_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tif"}


@dataclass(frozen=True)
class Requirement:
    path: str  # relative to the benchmark folder; a trailing "/" means a folder
    note: str = ""
    optional: bool = False


@dataclass(frozen=True)
class ImageRefs:
    """Images a question file points at: ``folder`` relative to the benchmark folder, names relative to it."""

    question_file: str
    folder: str
    names: Callable[[Path], list[str]]


def load_part(
    part: Part, *, orgs: tuple[str, ...], token: bool | None, from_disk: str | None, single: bool, limit: int | None
) -> Any:
    """The split as a ``datasets.Dataset`` with images left undecoded (so they can be written byte-exact)."""
    import datasets

    if from_disk is not None:
        saved = load_local(Path(from_disk))
        if isinstance(saved, datasets.DatasetDict):
            if part.split not in saved:
                raise EvalInputError(f"{from_disk}: no split {part.split!r} (has {sorted(saved)})")
            ds = saved[part.split]
        elif single:
            ds = saved
        else:
            raise EvalInputError(
                f"{from_disk}: holds one Dataset, but several splits are needed; save a DatasetDict or pass --parts"
            )
    else:
        offline = go_offline_if_unreachable()
        ds = None
        failures = []
        for org in orgs:
            repo = f"{org}/{part.dataset}"
            try:
                ds = datasets.load_dataset(repo, part.config, split=part.split, token=token)
                print(f"loaded {repo} config={part.config} split={part.split} ({len(ds)} rows)")
                break
            except (OSError, ValueError) as err:  # not found / no access / offline: try the next org
                failures.append(f"{repo}: {type(err).__name__}: {err}")
        if ds is None:
            where = "the hub is not reachable and the local cache does not hold it" if offline else "offline?"
            raise EvalInputError(
                f"could not load the dataset ({where}). On a machine with network: "
                f"datasets.load_dataset('{orgs[-1]}/{part.dataset}').save_to_disk('DIR') (or huggingface-cli download "
                f"{orgs[-1]}/{part.dataset} --repo-type dataset --local-dir DIR, parquet files), copy DIR here and "
                "pass --from-disk DIR:\n  " + "\n  ".join(failures)
            )
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    if "image" in ds.features and isinstance(ds.features["image"], datasets.Image):
        ds = ds.cast_column("image", datasets.Image(decode=False))
    return ds


SAVED_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")


def load_local(path: Path) -> Any:
    """A dataset on disk: a folder written by ``save_to_disk``, one ``.parquet`` file (one split), or a folder of
    parquet files as the hub stores them (``data/<split>-00000-of-00001.parquet``, one split per name prefix)."""
    import datasets

    if path.is_file() and path.suffix == ".parquet":
        return datasets.Dataset.from_parquet(str(path))
    if not path.is_dir():
        raise EvalInputError(f"--from-disk {path}: not found (expected a save_to_disk folder or parquet files)")
    if any((path / marker).is_file() for marker in SAVED_MARKERS):
        try:
            return datasets.load_from_disk(str(path))
        except (OSError, ValueError) as err:
            raise EvalInputError(f"--from-disk {path}: cannot load the saved dataset ({err})") from None
    files: dict[str, list[str]] = {}
    for file in sorted(path.rglob("*.parquet")):
        files.setdefault(file.name.split("-")[0].split(".")[0], []).append(str(file))
    if not files:
        raise EvalInputError(
            f"--from-disk {path}: neither a folder written by save_to_disk ({', '.join(SAVED_MARKERS)}) nor a "
            "folder of .parquet files"
        )
    return datasets.DatasetDict({split: datasets.Dataset.from_parquet(names) for split, names in files.items()})


def go_offline_if_unreachable(timeout: float = 3.0) -> bool:
    """Without network, ``datasets`` retries the hub for about 47 s per repository before it fails. Probe the hub
    once; when it cannot be reached (and no proxy is configured), let ``datasets`` read only its local cache.
    Returns whether the hub is treated as offline."""
    import datasets.config
    from huggingface_hub import constants

    if datasets.config.HF_HUB_OFFLINE:
        return True
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as err:
        print(
            f"the Hugging Face hub ({constants.ENDPOINT}) is not reachable ({err}): local cache only", file=sys.stderr
        )
        datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
        return True
    return False


def rows(ds: Any, drop_images: bool = False) -> Iterator[dict[str, Any]]:
    if drop_images and "image" in ds.column_names:
        ds = ds.remove_columns(["image"])
    yield from ds


def image_bytes(value: Any, where: str) -> bytes:
    """The stored bytes of an undecoded ``datasets.Image`` value (or the file it points at)."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        if value.get("path") and Path(value["path"]).is_file():
            return Path(value["path"]).read_bytes()
    raise EvalInputError(f"{where}: no image bytes or readable image path in {str(value)[:80]!r}")


def image_suffix(data: bytes, where: str) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        fmt = img.format
    if fmt not in _PIL_SUFFIX:
        raise EvalInputError(f"{where}: unexpected image format {fmt!r}")
    return _PIL_SUFFIX[fmt]


def has_image_suffix(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file, so an interrupted run never leaves a truncated file that a rerun would keep."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


class ImageWriter:
    """Writes each image name once (many rows share an image); files already on disk are kept."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._seen: set[str] = set()
        self.written = 0
        self.kept = 0

    def write(self, name: str, value: Any, where: str) -> None:
        if name in self._seen:
            return
        self._seen.add(name)
        target = self.folder / name
        if target.is_file():
            self.kept += 1
            return
        atomic_write(target, image_bytes(value, where))
        self.written += 1

    def summary(self) -> str:
        return f"{self.folder}: {self.written} images written, {self.kept} already there"


def write_text(path: Path, text: str) -> str:
    atomic_write(path, text.encode("utf-8"))
    return str(path)


def write_json(path: Path, obj: Any, indent: int | None = None) -> str:
    return write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


def write_jsonl(path: Path, lines: Iterable[dict[str, Any]]) -> str:
    return write_text(path, "".join(jsonl_line(line) for line in lines))


def int_if_numeric(value: Any) -> Any:
    """Numeric string ids become ints, as in LLaVA's question files."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


def jsonl_field(field_name: str) -> Callable[[Path], list[str]]:
    """Reader of one field of every line of a JSON-lines question file (for the image checks)."""

    def names(path: Path) -> list[str]:
        return [row[field_name] for _, row in iter_jsonl(path) if isinstance(row, dict) and row.get(field_name)]

    return names


def read_json_images(path: Path) -> list[str]:
    """The ``image`` of every entry of a JSON-list question file (ScienceQA's llava_test_CQM-A.json)."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EvalInputError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if not isinstance(entries, list):
        raise EvalInputError(f"{path}: expected a JSON list of questions")
    return [e["image"] for e in entries if isinstance(e, dict) and e.get("image")]


def check(bench_dir: Path, requirements: list[Requirement], image_refs: list[ImageRefs]) -> tuple[list[str], list[str]]:
    """Problems (missing files, folders, images) and warnings (missing optional files) of an existing layout."""
    problems, warnings = [], []
    for req in requirements:
        path = bench_dir / req.path
        exists = path.is_dir() if req.path.endswith("/") else path.is_file()
        if not exists:
            kind = "folder" if req.path.endswith("/") else "file"
            message = f"missing {kind}: {path}" + (f" ({req.note})" if req.note else "")
            (warnings if req.optional else problems).append(message)
    for refs in image_refs:
        qfile = bench_dir / refs.question_file
        folder = bench_dir / refs.folder
        if not qfile.is_file() or not folder.is_dir():
            continue
        try:
            names = refs.names(qfile)
        except EvalInputError as err:
            problems.append(str(err))
            continue
        absent = [name for name in dict.fromkeys(names) if not (folder / name).is_file()]
        if absent:
            problems.append(
                f"missing images: {len(absent)} of {len(set(names))} referenced by {qfile.name} are not in "
                f"{folder}, first: {folder / absent[0]}"
            )
    return problems, warnings
