"""How input files are named in a job's outputs: by their path (the default) or, with
``--pseudonymize``, by a keyed pseudonym.

File and folder names of X-rays are often patient names or accession numbers. A pseudonym is the
first 20 hex digits of HMAC-SHA256(key, relative path) plus the file's extension, so it is stable for
one key (a rerun resumes), reveals nothing without the key, and differs between two users' keys.
The key and the pseudonym → path table live in one JSON file *outside* the output folder, which
the user keeps (and never shares with the outputs). Every text an output carries about an input
(a failure reason, say) is scrubbed of the input's path, name and stem.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path, PurePosixPath

from data.errors import UsageError
from data.files import write_json

MAP_FORMAT = "cxr-pseudonyms"


class InputNames:
    """Input names as they are: ``name(rel) == rel``."""

    pseudonymous = False

    def name(self, rel: str) -> str:
        """The name outputs use for the input at ``rel`` (a path relative to the input folder)."""
        return rel

    def scrub(self, text: str, rel: str) -> str:
        """``text`` with every mention of the input at ``rel`` replaced by its output name."""
        return text

    def fingerprint(self) -> str | None:
        """What a resumed run must match (None: plain names)."""
        return None

    def save(self) -> None:
        """Write what the user keeps (nothing for plain names)."""


class Pseudonyms(InputNames):
    """Keyed pseudonyms, with the key and the table kept in ``map_path`` (created if absent)."""

    pseudonymous = True

    def __init__(self, map_path: str | os.PathLike[str], *, out: str | os.PathLike[str]) -> None:
        self.path = Path(map_path)
        resolved_out = Path(out).resolve()
        if resolved_out == self.path.resolve().parent or resolved_out in self.path.resolve().parents:
            raise UsageError(f"{self.path}: the pseudonym map must live outside the output folder {out} "
                             "(it holds the real names); choose another --pseudonym-map")
        self.table: dict[str, str] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                if data.get("format") != MAP_FORMAT:
                    raise ValueError("not a pseudonym map")
                self.key = bytes.fromhex(data["key"])
                self.table = dict(data.get("names", {}))
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
                raise UsageError(f"{self.path}: not a cxr pseudonym map ({err}); restore it or choose another "
                                 "--pseudonym-map") from None
        else:
            self.key = secrets.token_bytes(32)

    def name(self, rel: str) -> str:
        digest = hmac.new(self.key, rel.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:20]
        pseudonym = digest + PurePosixPath(rel).suffix.lower()
        self.table[pseudonym] = rel
        return pseudonym

    def scrub(self, text: str, rel: str) -> str:
        path = PurePosixPath(rel)
        pseudonym = self.name(rel)
        parts = {rel, path.name, path.stem, *path.parent.parts}
        for part in sorted((p for p in parts if len(p) >= 2), key=len, reverse=True):  # longest first
            text = text.replace(part, pseudonym)
        return text

    def fingerprint(self) -> str:
        return hashlib.sha256(b"cxr-pseudonym-key" + self.key).hexdigest()[:16]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"format": MAP_FORMAT, "key": self.key.hex(), "names": dict(sorted(self.table.items()))})
        os.chmod(self.path, 0o600)  # the real names: readable by the user alone


def default_map_path(out: str | os.PathLike[str]) -> Path:
    """``<OUT>.pseudonyms.json``, beside the output folder."""
    out = Path(out)
    return out.with_name(out.name + ".pseudonyms.json")


def input_names(out: str | os.PathLike[str], *, pseudonymize: bool,
                map_path: str | os.PathLike[str] | None = None) -> InputNames:
    """Plain names, or pseudonyms kept in ``map_path`` (default :func:`default_map_path`)."""
    if not pseudonymize:
        if map_path is not None:
            raise UsageError("--pseudonym-map is used with --pseudonymize only")
        return InputNames()
    return Pseudonyms(map_path or default_map_path(out), out=out)
