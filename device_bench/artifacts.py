"""The model files a bench measures (.tflite, and Core ML .mlpackage folders): resolved from the command line,
checked against their convert manifests, described by the targets, and chosen for each target's workload (its
tile sizes).

A path is a bare .tflite or .mlpackage, a convert manifest.json, a convert output folder (its manifest.json), or
a folder that `convert --tile 128,256,...` wrote: one `tile-<size>/` subfolder per tile, each with its own manifest.
"""

from __future__ import annotations

import gzip
import io as _io
import logging
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgesr.errors import BadInput
from edgesr.manifest import MANIFEST_NAME, read_json, sha256, size_bytes
from edgesr.workload import Size, Workload, format_size, tile_label

log = logging.getLogger("device_bench")

DEFAULT_OVERLAP = 16  # LR pixels; covers the receptive-field radius of the small EDSR presets (edsr-tiny: ~12)
TILE_FOLDER_GLOB = "tile-*"
FORMATS = ("tflite", "coreml")


@dataclass
class Artifact:
    """One model file (or .mlpackage folder) to bench and what its convert manifest (if any) says about it."""

    path: Path
    model: str
    encoding: str = "unknown"
    precision: str = "unknown"
    format: str = "tflite"
    scale: int | None = None
    tile: list[int] | None = None
    overlap: int = DEFAULT_OVERLAP
    io: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    manifest: Path | None = None
    key: str = ""
    runtime_requirements: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""
    convert_command: str | None = None  # how it was made (the manifest's), to suggest another tile

    @property
    def size_bytes(self) -> int:
        return size_bytes(self.path)

    def download_bytes(self) -> int:
        """The file as an app store would ship it: gzip at level 9 (read in full; artifacts are model files). A
        .mlpackage folder is a tar of its files (sorted, no owners or times) gzipped the same way."""
        if not self.path.is_dir():
            return len(gzip.compress(self.path.read_bytes(), compresslevel=9, mtime=0))
        buf = _io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for f in sorted(p for p in self.path.rglob("*") if p.is_file()):
                info = tarfile.TarInfo(str(f.relative_to(self.path)))
                info.size = f.stat().st_size
                with open(f, "rb") as fh:
                    tar.addfile(info, fh)
        return len(gzip.compress(buf.getvalue(), compresslevel=9, mtime=0))


def _from_manifest(manifest_path: Path, overlap: int | None, skipped: list[str]) -> list[Artifact]:
    m = read_json(manifest_path)
    if m.get("kind") != "convert":
        raise BadInput(f"{manifest_path}: not a convert manifest (kind {m.get('kind')!r})")
    entries = m.get("artifacts")
    if not isinstance(entries, list):
        raise BadInput(f"{manifest_path}: 'artifacts' must be a list")
    tile = m.get("tile") or {}
    io = m.get("io") or {}
    radius = tile.get("receptive_field_radius")
    if overlap is not None and isinstance(radius, int) and overlap < radius:
        raise BadInput(
            f"--overlap {overlap} is below the receptive-field radius {radius} that {manifest_path} measured: "
            f"tiles would be stitched with seams; use --overlap {radius} or more (or leave it to the manifest)"
        )
    found = []
    for entry in entries:
        if not isinstance(entry, dict) or "file" not in entry:
            raise BadInput(f"{manifest_path}: each artifact needs a 'file', got {entry!r}")
        fmt = entry.get("format")
        if fmt not in FORMATS:
            note = f"format {fmt!r} is not benchable here"
            skipped.append(f"{entry['file']} ({m.get('model')}): skipped, {note}")
            log.info("skipping %s: %s", entry["file"], note)
            continue
        path = manifest_path.parent / entry["file"]
        entry_io = entry.get("io") if isinstance(entry.get("io"), dict) else io  # Core ML files: NCHW, their own
        if not isinstance(entry.get("runtime_requirements", {}), dict):
            raise BadInput(f"{manifest_path}: {entry['file']}: 'runtime_requirements' must be an object")
        if not (path.is_dir() if fmt == "coreml" else path.is_file()):
            raise BadInput(f"{path}: listed in {manifest_path} but missing")
        if "sha256" in entry and entry["sha256"] != sha256(path):
            raise BadInput(f"{path}: sha256 differs from {manifest_path}; the file changed after conversion")
        found.append(
            Artifact(
                path=path,
                model=str(m.get("model") or path.stem),
                encoding=str(entry.get("encoding", "unknown")),
                precision=str(entry.get("precision", "unknown")),
                format=fmt,
                scale=m.get("scale"),
                tile=[tile["height"], tile["width"]] if "height" in tile and "width" in tile else None,
                overlap=overlap if overlap is not None else int(tile.get("overlap", DEFAULT_OVERLAP)),
                io=entry_io,
                source=m.get("source") or {},
                manifest=manifest_path,
                runtime_requirements=dict(entry.get("runtime_requirements") or {}),
            )
        )
    return found


def _manifests_in(folder: Path) -> list[Path]:
    """A convert folder's manifest, or those of its per-tile subfolders (convert --tile with a list)."""
    if (folder / MANIFEST_NAME).is_file():
        return [folder / MANIFEST_NAME]
    tiles = sorted(p / MANIFEST_NAME for p in folder.glob(TILE_FOLDER_GLOB) if (p / MANIFEST_NAME).is_file())
    if not tiles:
        raise BadInput(
            f"{folder}: folder has no {MANIFEST_NAME} (nor tile-*/{MANIFEST_NAME}); pass a convert output folder "
            "or .tflite files"
        )
    return tiles


def resolve_artifacts(paths: tuple[Path, ...], overlap: int | None) -> tuple[list[Artifact], list[str]]:
    """The .tflite and .mlpackage artifacts behind the command-line paths, and notes on what was skipped."""
    artifacts: list[Artifact] = []
    skipped: list[str] = []
    for p in paths:
        p = Path(p)
        if p.suffix == ".mlpackage":
            if not (p / "Manifest.json").is_file():
                raise BadInput(f"{p}: not a .mlpackage (no Manifest.json)")
            o = DEFAULT_OVERLAP if overlap is None else overlap
            artifacts.append(Artifact(path=p, model=p.stem, format="coreml", overlap=o))
            log.info("%s: bare .mlpackage, model name '%s', overlap %d LR px", p, p.stem, o)
        elif p.is_dir():
            for manifest in _manifests_in(p):
                artifacts += _from_manifest(manifest, overlap, skipped)
        elif not p.exists():
            raise BadInput(f"{p}: no such model file or folder")
        elif p.suffix == ".json":
            artifacts += _from_manifest(p, overlap, skipped)
        elif p.suffix == ".tflite":
            artifacts.append(Artifact(path=p, model=p.stem, overlap=DEFAULT_OVERLAP if overlap is None else overlap))
            log.info("%s: bare .tflite, model name '%s', overlap %d LR px", p, p.stem, artifacts[-1].overlap)
        else:
            raise BadInput(f"{p}: not a .tflite file, a convert output folder or a convert manifest.json")
    if not artifacts:
        raise BadInput("nothing to bench: no TFLite or Core ML artifacts among " + ", ".join(str(p) for p in paths))
    bases = [re.sub(r"[^A-Za-z0-9._-]+", "_", f"{a.model}--{a.path.stem}") for a in artifacts]
    seen: dict[str, int] = {}
    for a, base in zip(artifacts, bases, strict=True):
        if bases.count(base) > 1 and a.tile:  # the same model and file at several tiles (a tile sweep)
            base = f"{base}--tile{a.tile[1]}x{a.tile[0]}"
        seen[base] = seen.get(base, 0) + 1
        a.key = base if seen[base] == 1 else f"{base}-{seen[base]}"
    return artifacts, skipped


def check_description(a: Artifact, desc: dict[str, Any], target: str) -> None:
    """A manifest (or another target's description) that disagrees with the file is an error."""
    where = f"{a.path} (on {target})"
    if a.tile is not None and list(a.tile) != desc["tile"]:
        raise BadInput(f"{where}: manifest tile {a.tile} but the model's input is {desc['tile']}")
    if a.scale is not None and a.scale != desc["scale"]:
        raise BadInput(f"{where}: manifest scale {a.scale} but the model upscales x{desc['scale']}")
    for key, tensors in (("input_shape", "inputs"), ("output_shape", "outputs")):
        if key in a.io and list(a.io[key]) != desc[tensors][0]["shape"]:
            raise BadInput(f"{where}: manifest {key} {a.io[key]} but the model has {desc[tensors][0]['shape']}")
    if 2 * a.overlap >= min(desc["tile"]):
        raise BadInput(f"{where}: overlap {a.overlap} leaves no interior in a {desc['tile'][0]}x{desc['tile'][1]} tile")


def apply_description(a: Artifact, desc: dict[str, Any]) -> None:
    a.tile, a.scale = list(desc["tile"]), int(desc["scale"])
    if a.manifest is None and a.format == "tflite":  # a bare file: its tensors say whether its weights are sparse
        a.encoding = "sparse" if desc.get("sparse_tensors") else "dense"


def for_workload(artifacts: list[Artifact], wl: Workload, target: str) -> list[Artifact]:
    """The artifacts that run at the workload's tile sizes (all of them when it names none). Every model must
    have a file for every tile asked for: a missing one is an error that says how to make it."""
    sizes: list[Size] | None = wl.tile_sizes()
    if sizes is None:
        return list(artifacts)
    chosen = [a for a in artifacts if a.tile is not None and tuple(a.tile) in sizes]
    for model in dict.fromkeys(a.model for a in artifacts):
        have = {tuple(a.tile) for a in artifacts if a.model == model and a.tile is not None}
        missing = [s for s in sizes if s not in have]
        if missing:
            asked = ",".join(("frame" if wl.frame and s == wl.frame else str(s[0])) for s in missing)
            frame = f" --frame {format_size(wl.frame)}" if wl.frame else ""
            had = ", ".join(tile_label(s) for s in sorted(have)) or "none"
            raise BadInput(
                f"{model}: no artifact takes the tile {', '.join(tile_label(s, wl.frame) for s in missing)} asked "
                f"for on target {target} (it has: {had}); convert it with --tile {asked}{frame} (a list such as "
                f"--tile 128,256,frame makes one tile-* folder each) and pass that folder"
            )
    return chosen
