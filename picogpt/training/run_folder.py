"""The run folder `picogpt train` writes: a model folder in OpenAI's layout plus the training
state to resume from. picogpt replaces or deletes only files it wrote (listed in its manifest)."""

from pathlib import Path

from picogpt import files
from picogpt.errors import TrainingError
from picogpt.formats import tf_checkpoint

MANIFEST = "train_files.json"  # the files picogpt wrote into a training folder, by relative path
STATE_DIR = "resume"
# The names picogpt writes into a training folder (besides the checkpoints it records).
OWN_NAMES = ("hparams.json", "train_config.json", "train_log.jsonl", "chars.json", "encoder.json",
             "vocab.bpe", "checkpoint", MANIFEST)  # fmt: skip
CHECKPOINT_SUFFIXES = (".index", ".data-00000-of-00001")


class RunFolder:
    """A training folder and the record (train_files.json) of the files picogpt wrote into it.

    picogpt trains only into a new or empty folder, or one that this record (or an older
    picogpt's layout, see `open`) marks as a training folder; there it replaces and deletes only
    files it recorded. A checkpoint's names are recorded before its files are written, so the
    files of a write cut short by a kill are recorded too and removed by a later run."""

    def __init__(self, path, written):
        self.path, self.written = Path(path), set(written)

    @classmethod
    def for_new_run(cls, path):
        """The folder a new run at `path` would train into (nothing is written yet: see begin).
        It must not exist, or be empty, or be a folder of ours with no model and no state (a
        first save that never finished)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise TrainingError(f"--out {path} is a file, not a folder")
        if not (path.is_dir() and any(path.iterdir())):
            return cls(path, [MANIFEST])
        folder = cls.open(path)
        if folder.has_model() or folder.has_state():
            raise TrainingError(f"{path} already holds a model: --resume continues it, or "
                                "choose another --out")
        return folder

    def begin(self):
        """Make the folder ours: create it, write the record, clear what killed runs left."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrainingError(f"--out {self.path}: cannot create the folder: {e}") from e
        self.save_record()
        self.remove_leftovers()

    @classmethod
    def open(cls, path):
        """The training folder at `path`. A folder picogpt did not write is refused, never
        touched: its files are not ours to replace."""
        path = Path(path)
        record = path / MANIFEST
        if record.is_file():
            data = files.load_json(record, 1 << 20, MANIFEST, error=TrainingError)
            written = data.get("files") if isinstance(data, dict) else None
            if not isinstance(written, list) or not all(isinstance(n, str) for n in written):
                raise TrainingError(f"{record}: not a record of picogpt's files")
            if any(Path(n).is_absolute() or ".." in Path(n).parts for n in written):
                raise TrainingError(f"{record}: names a file outside the folder")
            return cls(path, written)
        legacy = cls._legacy_files(path)
        if legacy is None:
            raise TrainingError(
                f"--out {path} is not empty and is not a picogpt training folder: picogpt "
                "writes only into a new or empty folder, or one it trained into")
        return cls(path, legacy + [MANIFEST])

    @staticmethod
    def _legacy_files(path):
        """A folder written by picogpt before the record existed (resume/ state, hparams.json and
        a train_config.json whose command is picogpt's): its files by the names picogpt used,
        the current checkpoints only. None when the folder is not one."""
        config_path = path / "train_config.json"
        if not ((path / STATE_DIR / "checkpoint").is_file() and config_path.is_file()
                and (path / "hparams.json").is_file()):  # fmt: skip
            return None
        try:
            config = files.load_json(config_path, 1 << 20, "train_config.json")
        except files.FileReadError:
            return None
        if not (isinstance(config, dict) and str(config.get("command", "")).startswith(
                "picogpt train ")):  # fmt: skip
            return None
        names = [n for n in OWN_NAMES if (path / n).is_file()]
        names.append(f"{STATE_DIR}/checkpoint")
        for where, stem in (("", "model.ckpt-"), (STATE_DIR + "/", "state.ckpt-")):
            current = _current_checkpoint(path / where)
            if current and current.startswith(stem):
                names += [where + current + suffix for suffix in CHECKPOINT_SUFFIXES]
        return names

    def has_model(self):
        return "checkpoint" in self.written and (self.path / "checkpoint").is_file()

    def has_state(self):
        return f"{STATE_DIR}/checkpoint" in self.written and (
            self.path / STATE_DIR / "checkpoint").is_file()  # fmt: skip

    def save_record(self):
        files.write_json(self.path / MANIFEST, {"written_by": "picogpt train",
                                                "files": sorted(self.written)})  # fmt: skip

    def record(self, *names):
        """Note `names` as ours before writing them."""
        if not set(names) <= self.written:
            self.written.update(names)
            self.save_record()

    def write_json(self, name, obj):
        self.record(name)
        files.write_json(self.path / name, obj)

    def write_bytes(self, name, data):
        self.record(name)
        files.atomic_write(self.path / name, data)

    def write_checkpoint(self, where, stem, iteration, tensors):
        """Write `tensors` as checkpoint `<where>/<stem><iteration>` and make it the current one
        (the `checkpoint` file, replaced last, names it); then delete the recorded checkpoints
        it replaces. A kill at any moment leaves the previous checkpoint whole."""
        base = f"{where}/{stem}" if where else stem
        own = [f"{base}{iteration}{suffix}" for suffix in CHECKPOINT_SUFFIXES]
        self.record(*own, f"{where}/checkpoint" if where else "checkpoint")
        (self.path / where).mkdir(exist_ok=True)
        tf_checkpoint.write(self.path / f"{base}{iteration}", tensors)
        self._delete([n for n in self.written if n.startswith(base) and n not in own])

    def _delete(self, names):
        for name in names:
            (self.path / name).unlink(missing_ok=True)
        if names:
            self.written.difference_update(names)
            self.save_record()

    def remove_leftovers(self):
        """Delete the temporary files (`<name>.tmp<pid>`) a killed picogpt left behind, for the
        names it writes here; and recorded checkpoint files that no `checkpoint` file names
        (a write cut short)."""
        for where, stem in (("", "model.ckpt-"), (STATE_DIR, "state.ckpt-")):
            prefix = f"{where}/" if where else ""
            names = [n[len(prefix):] for n in self.written
                     if n.startswith(prefix) and "/" not in n[len(prefix):]]  # fmt: skip
            if (self.path / where).is_dir():
                files.remove_stale_temporaries(self.path / where, names)
            current = _current_checkpoint(self.path / where)
            self._delete([prefix + n for n in names if n.startswith(stem)
                          and not (current and n.startswith(current + "."))])  # fmt: skip


def _current_checkpoint(folder):
    """The checkpoint name a TensorFlow `checkpoint` file in `folder` names, or None."""
    try:
        text = files.read_text(Path(folder) / "checkpoint", 1 << 16, "checkpoint")
    except files.FileReadError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model_checkpoint_path":
            name = value.strip().strip('"')
            return name if name and "/" not in name and "\\" not in name else None
    return None
