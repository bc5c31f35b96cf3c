"""Captions of an image folder, in the order ``lipscope.data`` reads its images (sorted relative paths).

Three forms, as diffusers' training scripts and the Hugging Face ``imagefolder`` convention use them:

* ``captions.jsonl``: one JSON object per line with ``file_name`` (relative to the image folder) and ``text``
  (or ``caption`` / ``prompt``);
* ``captions.csv``: the same two columns, with a header row;
* a folder of ``.txt`` side files: ``<image stem>.txt`` next to each image (the same relative path), or the
  image folder itself.

Every image needs a caption (an empty one is allowed and says so); captions of files that are not in the
folder are refused, since they usually mean the wrong folder.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .data import IMAGE_SUFFIXES
from .errors import InputError

TEXT_KEYS = ("text", "caption", "prompt")


def image_files(folder: str | Path) -> list[Path]:
    """The images of ``folder`` in the order :func:`lipscope.data.load_data` stacks them (relative paths)."""
    root = Path(folder)
    return [p.relative_to(root) for p in sorted(q for q in root.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES
                                                and q.is_file())]  # fmt: skip


def _text(row: dict, where: str) -> str:
    key = next((k for k in TEXT_KEYS if k in row), None)
    if key is None or "file_name" not in row:
        raise InputError(f"`captions` {where}: needs a file_name and one of {', '.join(TEXT_KEYS)} in every row")
    if not isinstance(row[key], str):
        raise InputError(f"`captions` {where}: the caption of {row['file_name']} is not a string")
    return row[key]


def _table(path: Path) -> dict[str, str]:
    """file_name → caption of a .jsonl or .csv file."""
    out: dict[str, str] = {}
    try:
        if path.suffix.lower() == ".jsonl":
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise InputError(f"`captions` {path}: line {i} is not JSON ({e.msg}); fix it") from None
                    if not isinstance(row, dict):
                        raise InputError(f"`captions` {path}: line {i} is not a JSON object")
                    out[str(row.get("file_name"))] = _text(row, f"{path} line {i}")
        elif path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                for i, row in enumerate(csv.DictReader(f), 2):
                    out[str(row.get("file_name"))] = _text(row, f"{path} line {i}")
        else:
            raise InputError(f"`captions` {path}: use a .jsonl or .csv file, or a folder of .txt side files")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"`captions` {path}: cannot be read ({type(e).__name__}); check the file") from None
    return {Path(k).as_posix(): v for k, v in out.items()}


def read_captions(spec: str | Path, data_folder: str | Path) -> list[str]:
    """One caption per image of ``data_folder``, in the order the images are loaded."""
    folder = Path(data_folder).expanduser()
    if not folder.is_dir():
        raise InputError(f"`captions` go with an image folder as `data` (got {data_folder}); pass a folder of images")
    files = image_files(folder)
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(f"`captions` {spec}: no such file or folder; pass a .jsonl/.csv file or a folder of .txt")
    if path.is_dir():
        table: dict[str, str] = {}
        for f in files:
            side = (path / f).with_suffix(".txt")
            if side.is_file():
                table[f.as_posix()] = side.read_text(encoding="utf-8").strip()
    else:
        table = _table(path)
    missing = [f.as_posix() for f in files if f.as_posix() not in table]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise InputError(f"`captions` {spec}: no caption for {missing[0]}{more}; give every image of {folder} one")
    extra = sorted(set(table) - {f.as_posix() for f in files})
    if extra:
        raise InputError(f"`captions` {spec}: {extra[0]} is not an image of {folder}; check `data` and `captions`")
    return [table[f.as_posix()].strip() for f in files]  # one caption, whatever file form: no stray whitespace
