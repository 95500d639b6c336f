"""Which model references are local folders and which are hub ids, and failing fast on either.

`from_pretrained` reads a string as a local folder when one exists and as a hub id otherwise:
a mistyped local path (`models/ec-lora-t-bse`) then becomes a hub request that retries for
minutes offline, and `/nonexistent` fails with "Repo id must use alphanumeric chars". Here a
reference is local when it starts with `/`, `./`, `../` or `~`, or when its first path
component exists (`models/...` in this repository); a local reference must exist. Anything
else is a hub id: with `HF_HUB_OFFLINE=1` it comes from the local cache or fails at once, and
otherwise the hub must answer one request within `timeout` seconds before any download starts.
Nothing here downloads; `from_pretrained` does, once the reference is known to be reachable.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_TIMEOUT_S = 10.0
_LOCAL_PREFIXES = ("/", "./", "../", "~")


class HubUnreachableError(ConnectionError):
    """A hub id was given, the hub could not be reached and the model is not in the local cache."""


def is_local_reference(reference: str, root: str | Path = ".") -> bool:
    """A path (explicitly, or because its first component exists under `root`), not a hub id."""
    reference = str(reference)
    if reference.startswith(_LOCAL_PREFIXES) or reference in (".", ".."):
        return True
    return (Path(root) / Path(reference).parts[0]).exists()


def check_reference(reference: str, root: str | Path = ".", what: str | None = "model") -> Path | str:
    """The local folder (which must exist) or the hub id (which must be spelled as one); no network.

    Raises FileNotFoundError or ValueError with one line that says which rule applied; the
    line starts with `what` and the reference, or with "it" when `what` is None.
    """
    reference = str(reference)
    subject = f"{what} {reference!r}" if what else "it"
    if is_local_reference(reference, root):
        folder = Path(root) / Path(reference).expanduser()
        if not folder.is_dir():
            first = Path(reference).parts[0]
            why = "" if reference.startswith(_LOCAL_PREFIXES) else f" ('{first}' exists here, so it is a path)"
            raise FileNotFoundError(f"{subject} is a local path{why}, and {folder} is not a folder")
        return folder
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(reference)
    except HFValidationError as error:
        raise ValueError(f"{subject} is neither an existing local folder nor a hub id ({error})") from None
    return reference


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set (now, or when huggingface_hub was imported)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") or constants.HF_HUB_OFFLINE


def resolve_pretrained(reference: str | Path, what: str = "model", timeout: float = DEFAULT_TIMEOUT_S) -> str:
    """What to pass to `from_pretrained`: a local folder, a cached snapshot, or a reachable hub id.

    Local references must exist. A hub id offline (HF_HUB_OFFLINE) resolves to its cached
    snapshot or fails at once; online, one metadata request must succeed within `timeout`
    seconds (no retries), else the cached snapshot is used if there is one, else it fails.
    """
    checked = check_reference(str(reference), what=what)
    if isinstance(checked, Path):
        return str(checked)
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    def cached_snapshot() -> str | None:
        try:
            return snapshot_download(checked, local_files_only=True)
        except Exception:  # not in the cache, or the cache is unreadable: both mean "not here"
            return None

    if hub_offline():
        cached = cached_snapshot()
        if cached is None:
            raise HubUnreachableError(
                f"{what} {checked!r} is a hub id, HF_HUB_OFFLINE is set and it is not in the local Hugging Face "
                "cache; download it once online, or give a local folder"
            )
        return cached
    try:
        HfApi().model_info(checked, timeout=timeout)
    except (RepositoryNotFoundError, GatedRepoError) as error:
        raise ValueError(f"{what} {checked!r}: the hub has no such model, or it needs a login ({error})") from None
    except Exception as error:  # DNS, connection, timeout, proxy, 5xx: the hub did not answer
        cached = cached_snapshot()
        if cached is None:
            reason = " ".join(str(error).split()) or type(error).__name__
            raise HubUnreachableError(
                f"{what} {checked!r} is a hub id and the Hugging Face hub cannot be reached within {timeout:g} s "
                f"({reason}); nothing was downloaded. Give a local folder, or connect and run again"
            ) from None
        return cached
    return checked
