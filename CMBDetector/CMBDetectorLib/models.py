"""Model versions a user manages: the shipped model and site models, and `cmbdetector models`.

A site model is a folder DATA_DIR/models/NAME holding its own ensemble card (classify's format: member
.pt files named by SHA-256, each with its own card) plus the fine-tune's record in that card. The same hash
rules as the shipped model apply, so a tampered site model is refused like a tampered shipped one.
Site models live in the user's data folder, never inside the installed extension (an update of the
extension replaces that folder; the site's models must survive it). Nothing here touches the network.

DATA_DIR/active.json records the version `Detector()` uses when no model is named, and the versions used
before it (for `rollback`). No file, or "shipped": the model shipped in Resources/Models.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
from pathlib import Path

from .classify import DEFAULT_MODEL, read_ensemble_card
from .errors import CMBError, WeightsError
from .weights import verified_card

SHIPPED = "shipped"
DATA_DIR_ENV = "CMBDETECTOR_DATA_DIR"  # overrides the platform's user data folder (tests, shared installs)
ACTIVE_FILE = "active.json"
CARD_NAME = "cmb_cnn_ensemble.json"  # a site model's ensemble card, as the shipped one is named
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def data_dir() -> Path:
    """The user data folder: $CMBDETECTOR_DATA_DIR, else the platform's per-user application data folder."""
    override = os.environ.get(DATA_DIR_ENV)
    if override:
        return Path(override)
    home = Path.home()
    if sys.platform.startswith("win"):
        return Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local") / "CMBDetector"
    if sys.platform == "darwin":
        return home / "Library" / "Application Support" / "CMBDetector"
    return Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share") / "cmbdetector"


def models_dir() -> Path:
    return data_dir() / "models"


def check_name(name: str) -> str:
    if name == SHIPPED or not _NAME.fullmatch(name or ""):
        raise CMBError(f"model version name {name!r}: use letters, digits, '.', '_' or '-' (not {SHIPPED!r})")
    return name


def version_dir(name: str) -> Path:
    return models_dir() / check_name(name)


def model_path(name: str) -> Path:
    """The ensemble card of a version ("shipped" or a site model's name)."""
    return DEFAULT_MODEL if name == SHIPPED else version_dir(name) / CARD_NAME


def verify(name: str) -> dict:
    """The version's ensemble card after every hash check (card against members, members against their own
    cards), without loading any network; WeightsError for a missing or tampered version."""
    path = model_path(name)
    if not path.is_file():
        raise WeightsError(f"model version {name!r} not found ({path}); see `cmbdetector models list`")
    card = read_ensemble_card(path)
    for member in card["members"]:
        _, digest = verified_card(path.parent / member["file"], f"model {name} member")
        if digest != member["sha256"]:
            raise WeightsError(f"model version {name!r}: member {member['file']} is not the network its card "
                               "names (it was replaced)")
    return card


def _read_active() -> dict:
    path = data_dir() / ACTIVE_FILE
    if not path.is_file():
        return {"active": SHIPPED, "history": []}
    try:
        record = json.loads(path.read_text())
    except ValueError as error:
        raise CMBError(f"{path} is not valid JSON ({error}); delete it to go back to the shipped model") from None
    return {"active": str(record.get("active") or SHIPPED), "history": list(record.get("history", []))}


def _write_active(record: dict) -> None:
    path = data_dir() / ACTIVE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**record, "changed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(record, indent=2))
    os.replace(temporary, path)  # a crash never leaves half a file


def active_version() -> str:
    return _read_active()["active"]


def active_model_path() -> Path:
    """The ensemble card `Detector()` loads when no model is named (its hashes are checked on loading)."""
    name = active_version()
    path = model_path(name)
    if not path.is_file():
        raise WeightsError(f"the active model version {name!r} is missing ({path}); "
                           f"`cmbdetector models use {SHIPPED}` goes back to the shipped model")
    return path


def version_of(path) -> str:
    """The version name of a model file: "shipped", a site model's name, or the file's own path."""
    path = Path(path).resolve()
    if path == DEFAULT_MODEL.resolve():
        return SHIPPED
    if path.parent.parent == models_dir().resolve() and path.name == CARD_NAME:
        return path.parent.name
    return str(path)


def activation_refusal(card: dict) -> str | None:
    """Why a site model may not be activated (its fine-tune found it worse than its base, or no better), else None."""
    verdict = card.get("adaptation", {}).get("activation", {})
    return None if verdict.get("allowed", True) else verdict.get("reason", "its fine-tune refused it")


def use(name: str) -> str:
    """Make `name` the active version (after every hash check, and only if its fine-tune allowed it)."""
    card = verify(name)
    refusal = activation_refusal(card)
    if refusal:
        raise CMBError(f"model version {name!r} may not be activated: {refusal}")
    record = _read_active()
    if record["active"] != name:
        record["history"] = (record["history"] + [record["active"]])[-20:]
        record["active"] = name
        _write_active(record)
    return name


def rollback() -> str:
    """Go back to the version active before the current one (the shipped model when there is none)."""
    record = _read_active()
    previous = record["history"][-1] if record["history"] else SHIPPED
    if previous != SHIPPED:
        verify(previous)
    record["active"], record["history"] = previous, record["history"][:-1]
    _write_active(record)
    return previous


def site_versions() -> list:
    folder = models_dir()
    # ".NAME.partial": a fine-tune still writing (or cancelled while writing), never a version
    return sorted(p.name for p in folder.iterdir()
                  if not p.name.startswith(".") and (p / CARD_NAME).is_file()) if folder.is_dir() else []


def describe(name: str) -> dict:
    """One row of `models list`: name, active, ok (hashes), created, base, held-out numbers, refusal."""
    row = {"name": name, "active": name == active_version()}
    try:
        card = verify(name)
    except CMBError as error:
        return {**row, "ok": False, "problem": str(error)}
    adaptation = card.get("adaptation", {})
    return {**row, "ok": True, "sha256": card["sha256"], "created": adaptation.get("created", ""),
            "base": adaptation.get("base", {}).get("version", ""),
            "held_out": adaptation.get("held_out", {}).get("chosen", {}),
            "refused": activation_refusal(card)}


def add_arguments(parser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="the shipped model and the site models, the active one marked")
    use_parser = actions.add_parser("use", help="make a version the active one (hash-checked)")
    use_parser.add_argument("version", help=f"{SHIPPED!r} or a site model's name")
    actions.add_parser("rollback", help="go back to the version active before the current one")
    actions.add_parser("where", help="print the folder that holds site models and the active-version record")


def _line(row: dict) -> str:
    mark = "*" if row["active"] else " "
    if not row["ok"]:
        return f"{mark} {row['name']}: REFUSED: {row['problem']}"
    text = f"{mark} {row['name']}  sha256 {row['sha256'][:12]}"
    if row.get("base"):
        text += f"  from {row['base']}  {row['created']}"
    held = row.get("held_out") or {}
    if "before" in held:
        text += (f"  held-out reviews: sensitivity {held['before']['sensitivity']:.3f} -> "
                 f"{held['after']['sensitivity']:.3f}, FP/scan {held['before']['fp_per_scan']:.2f} -> "
                 f"{held['after']['fp_per_scan']:.2f}")
    if row.get("refused"):
        text += f"  (not activatable: {row['refused']})"
    return text


def run(args) -> int:
    if args.action == "list":
        for name in [SHIPPED, *site_versions()]:
            print(_line(describe(name)))
        print(f"site models: {models_dir()}")
    elif args.action == "use":
        print(f"active model: {use(args.version)}")
    elif args.action == "rollback":
        print(f"active model: {rollback()}")
    elif args.action == "where":
        print(data_dir())
    return 0
