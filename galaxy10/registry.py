"""The models a server offers: the checkpoints of this project (or the original project's) in one folder,
known to clients by name (the file stem), never by path, each described by its record (`ModelRegistry`).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from galaxy10.errors import Galaxy10Error
from galaxy10.files import FileCache
from galaxy10.models import DEFAULT_CHECKPOINT, ModelRecord, is_resume_file, read_record

# The checkpoint cnn.py writes by default; served first unless --default-model says otherwise.
PREFERRED_MODEL = Path(DEFAULT_CHECKPOINT).stem
TRAIN_HINT = "train one with `python cnn.py` (or `make demo` for a quick CPU-sized one)"

log = logging.getLogger("galaxy10.web")


class ServiceError(Exception):
    """A request that cannot be served, with the status code and message the client gets."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


def model_unavailable(name: str) -> ServiceError:
    """A model the page listed whose file has since been deleted or damaged: the server's fault, not the
    client's, so 503 (not 404), whether the file went before the request or during it."""
    return ServiceError(503, f"model {name!r} could not be loaded; reload the page to see the models")


@dataclass(frozen=True)
class ServedModel:
    """One checkpoint on offer: known to clients only by its name (the file stem), described by its record."""

    name: str
    path: Path
    record: ModelRecord


class ModelRegistry:
    """The checkpoints of this project (or the original project's) in one folder, by name (the file stem).

    The folder is re-listed on every call so a model trained while the server runs shows up; a file's
    record is read only when the file is new or changed. Files that `read_record` refuses are left out,
    and so are resume files. Clients choose among these names; they never name a path.
    """

    def __init__(self, folder: Path, default_name: str | None = None) -> None:
        self.folder = folder
        self.default_name = default_name
        self._records: FileCache[ModelRecord | None] = FileCache()  # None: not a checkpoint we serve
        self._lock = threading.Lock()
        self._offered: set[str] = set()  # every name a listing has shown, for get() to tell gone from unknown

    def models(self) -> list[ServedModel]:
        """The available models, the default one first, then by name."""
        paths = sorted(p for p in self.folder.glob("*.pth") if p.is_file() and not is_resume_file(p))
        found = [model for path in paths if (model := self._served(path)) is not None]
        with self._lock:
            self._offered.update(model.name for model in found)
        return sorted(found, key=lambda m: (m.name != self.default_name, m.name != PREFERRED_MODEL, m.name))

    def get(self, name: str | None) -> ServedModel:
        """The model called `name` (the default for an empty name), or a 503/404 ServiceError.

        The original page posted the checkpoint's file name, so `NAME.pth` also finds NAME; either
        way it is only looked up among the names on offer, never opened as a path. A name offered
        earlier whose file has since been deleted or damaged gets 503, as when that happens mid-request.
        """
        models = self.models()
        if not models:
            raise ServiceError(503, f"no trained model is available: {TRAIN_HINT}")
        if not name:
            return models[0]
        candidates = (name, name.removesuffix(".pth"))
        by_name = {model.name: model for model in models}
        for candidate in candidates:
            if candidate in by_name:
                return by_name[candidate]
        with self._lock:
            gone = [candidate for candidate in candidates if candidate in self._offered]
        if gone:
            raise model_unavailable(gone[0])
        available = ", ".join(m.name for m in models)
        raise ServiceError(404, f"unknown model {name!r}; available: {available}")

    def _served(self, path: Path) -> ServedModel | None:
        try:
            record = self._records.get(path, lambda: _read_record_or_none(path))
        except OSError:  # deleted since the folder was listed
            return None
        return None if record is None else ServedModel(path.stem, path, record)


def _read_record_or_none(path: Path) -> ModelRecord | None:
    try:
        # Memory-mapped: listing a 913 MB checkpoint reads its record, not its weights or optimizer state.
        return read_record(path)
    except Galaxy10Error as err:
        log.warning("ignoring %s: %s", path.name, err)
        return None
