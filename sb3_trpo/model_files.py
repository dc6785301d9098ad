"""Model files that are never half-written and never half-read.

SB3 writes a model straight into its final path, so a crash or Ctrl-C during ``save`` leaves a truncated file
where the previous good checkpoint was; and a damaged file fails deep inside ``zipfile``, ``torch.load`` or
``json`` with an error that does not say what is wrong. Here a model is written to a temporary file beside the
target and renamed over it (an atomic replace), and a file is checked before SB3 reads it.
"""

import io
import os
import pathlib
import stat
import zipfile
import zlib
from collections.abc import Callable

# members every SB3 model archive has (see stable_baselines3.common.save_util.save_to_zip_file)
REQUIRED_MEMBERS = ("data", "policy.pth")


def resolve_save_path(path: str | os.PathLike) -> pathlib.Path:
    """The file SB3 would write for ``path``: ``.zip`` is appended when the name has no suffix."""
    target = pathlib.Path(path)
    return target if target.suffix else pathlib.Path(f"{target}.zip")


def save_atomically(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> pathlib.Path:
    """Write a file through ``write`` into a temporary file, then rename it over the target.

    If ``write`` fails or is interrupted, the target keeps its previous content and no temporary file is left.
    What writing in place would keep is kept: a symlink stays a link (the file it points to is replaced), and an
    existing file keeps its permissions (a new one gets those ``open`` gives).

    :param path: the target path (``.zip`` is appended when it has no suffix, as SB3 does)
    :param write: writes the whole content into the given binary file
    :return: the path written (for a symlink, the file it points to)
    """
    # a rename over a symlink would replace the link itself: rename over the file the link resolves to instead
    target = pathlib.Path(os.path.realpath(resolve_save_path(path)))
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        with partial.open("wb") as file:
            if target.exists():  # a new file gets the default permissions: give it the checkpoint's
                os.chmod(file.fileno(), stat.S_IMODE(target.stat().st_mode))
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def check_model_file(path: str | os.PathLike | io.BufferedIOBase) -> None:
    """Check that ``path`` is a complete, undamaged SB3 model archive before SB3 reads it.

    A missing file is left to SB3, which raises ``FileNotFoundError`` naming it.

    :param path: a path (``.zip`` may be omitted, as with SB3) or a binary file object
    :raises ValueError: if the file is truncated, damaged, or not an SB3 model
    """
    source: pathlib.Path | io.BufferedIOBase
    if isinstance(path, (str, os.PathLike)):
        file_path = pathlib.Path(path)
        if not file_path.exists():
            file_path = pathlib.Path(f"{path}.zip")
            if not file_path.exists():
                return
        source, name = file_path, str(file_path)
    else:
        source, name = path, "the given file object"
        start = path.tell()
    try:
        with zipfile.ZipFile(source) as archive:
            bad_member = archive.testzip()  # reads every member and checks its CRC
            members = archive.namelist()
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError, ValueError) as error:
        raise ValueError(
            f"Cannot load a model from {name}: the file is truncated or damaged ({type(error).__name__}: {error}). "
            "Load an earlier checkpoint, or save the model again."
        ) from error
    finally:
        if not isinstance(source, pathlib.Path):
            source.seek(start)
    if bad_member is not None:
        raise ValueError(
            f"Cannot load a model from {name}: the file is damaged (its member {bad_member!r} fails its checksum). "
            "Load an earlier checkpoint, or save the model again."
        )
    missing = [member for member in REQUIRED_MEMBERS if member not in members]
    if missing:
        raise ValueError(
            f"Cannot load a model from {name}: it is a zip archive but not a Stable-Baselines3 model "
            f"(it has no {', '.join(repr(m) for m in missing)} inside)."
        )
