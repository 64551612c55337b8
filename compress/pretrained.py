"""Downloadable pretrained weights: a registry, a checksummed fetch into a local cache, and a lookup.

Why: the one real pretrained photo-SR model that ships in a package (idealo ISR "psnr-small" RDN x2, inside the
npm package @upscalerjs/models, see research/data.md section B) is too big to vendor, so `make setup` fetches it
once. Only `fetch` touches the network, and only `make setup` calls it; tests and commands call `path`, which
never downloads and refuses a missing or altered file. Both the tarball and the extracted file are pinned by
sha256, so a cached file is exactly the file the pins describe.

Cache: `$EDGESR_CACHE` if set, else `~/.cache/edgesr`; files live under `<cache>/pretrained/`.
CLI: `python -m compress.pretrained {list,fetch [NAME],path NAME}`.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from edgesr.errors import ArgumentParser, BadInput, cache_root, run_cli
from edgesr.manifest import atomic_output, sha256

log = logging.getLogger(__name__)

SETUP_HINT = "run `make setup` (fetches it from the npm registry)"
CHUNK = 1 << 20
TIMEOUT_S = 60


@dataclass(frozen=True)
class Pretrained:
    """One downloadable weight file: where it comes from (a member of a pinned tarball) and what it must hash to."""

    name: str
    description: str
    license: str
    url: str  # the tarball
    tarball_sha256: str
    tarball_size: int
    member: str  # path of the file inside the tarball
    filename: str  # name in the cache
    sha256: str
    size: int
    loader: str  # "module:function" that turns the file into (model, info)


REGISTRY: dict[str, Pretrained] = {
    p.name: p
    for p in [
        Pretrained(
            name="rdn-psnr-small-x2",
            description="idealo ISR psnr-small RDN C3-D10-G64-G0 64, x2, DIV2K, PSNR-trained (2,619,635 params)",
            license="Apache-2.0 (idealo/image-super-resolution weights); npm package @upscalerjs/models 0.9.0: MIT",
            url="https://registry.npmjs.org/@upscalerjs/models/-/models-0.9.0.tgz",
            # Computed once from the download, and cross-checked then against the registry's published
            # dist.integrity (sha512-R71fAmtSGWJ/BboVj1XADfT946SV+H0Ex5QMttK0cX2wfFGSRDqYR5uOkMZRtcnl3z4xvigNOwSX1a8B
            # nCR8DA==) and dist.shasum (sha1 2a65c5a170b6647c2e35ba0faf173c1267ea7420): both matched.
            tarball_sha256="0fcb08e2fb2f2d59ea6205111497d22c7a59c9d3c02e26879c16306f20de3bae",
            tarball_size=34_193_421,
            # The tarball has a byte-identical copy at package/models/psnr-small-quant-uint8/; this one is canonical.
            member="package/models/idealo/psnr-small-quant-uint8/image-super-resolution-psnr-small.h5",
            filename="rdn-psnr-small-x2.h5",
            sha256="4ea33850fd8e9f2dd39ef53105a69b98b02705570c76993fafdfdcac5c88b48b",
            size=10_742_792,
            loader="compress.models.isr:load_isr_rdn",
        )
    ]
}


def cache_dir() -> Path:
    """Where fetched weights live: `$EDGESR_CACHE/pretrained`, else `~/.cache/edgesr/pretrained`."""
    return cache_root() / "pretrained"


def entry(name: str) -> Pretrained:
    if name not in REGISTRY:
        raise BadInput(f"unknown pretrained weights '{name}'; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def _cached_ok(p: Pretrained, file: Path) -> bool:
    return file.is_file() and file.stat().st_size == p.size and sha256(file) == p.sha256


def path(name: str) -> Path:
    """The cached, checksum-verified file of `name`. Never downloads: a missing or altered file is BadInput."""
    p = entry(name)
    file = cache_dir() / p.filename
    if not file.is_file():
        raise BadInput(f"pretrained weights '{name}' are not in the cache ({file} is missing); {SETUP_HINT}")
    if not _cached_ok(p, file):
        raise BadInput(f"pretrained weights '{name}' at {file} fail their sha256 check; {SETUP_HINT}")
    return file


def _copy(src: BinaryIO, dst: BinaryIO, size: int, desc: str) -> str:
    """Copy exactly `size` bytes (more or fewer is an error), with a progress bar on a TTY; return the sha256."""
    h, done = hashlib.sha256(), 0
    with tqdm(total=size, unit="B", unit_scale=True, desc=desc, disable=not sys.stderr.isatty()) as bar:
        while chunk := src.read(min(CHUNK, size + 1 - done)):
            done += len(chunk)
            if done > size:
                raise BadInput(f"{desc}: more than the expected {size} bytes")
            h.update(chunk)
            dst.write(chunk)
            bar.update(len(chunk))
    if done != size:
        raise BadInput(f"{desc}: got {done} bytes, expected {size}")
    return h.hexdigest()


def _download(p: Pretrained, dst: Path) -> None:
    log.info("downloading %s (%.1f MB)", p.url, p.tarball_size / 1e6)
    try:
        with urllib.request.urlopen(p.url, timeout=TIMEOUT_S) as resp, open(dst, "wb") as out:
            digest = _copy(resp, out, p.tarball_size, Path(p.url).name)
    except (OSError, http.client.HTTPException) as exc:  # URLError, HTTPError, timeouts, truncated reads
        raise BadInput(f"could not download {p.url}: {exc}") from None
    if digest != p.tarball_sha256:
        raise BadInput(f"{p.url}: sha256 {digest} does not match the pinned {p.tarball_sha256}")


def _extract(p: Pretrained, tarball: Path, target: Path) -> None:
    """Write the one pinned member of `tarball` to `target` atomically, checking its size and sha256.

    The tarball's sha256 is already checked. Even so, nothing is extracted by the member's own name (the output
    path is ours), so no member can write outside the cache; links and other non-regular members are refused, and
    at most the pinned size is read.
    """
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            member = next((m for m in tar if m.name == p.member), None)
            if member is None:
                raise BadInput(f"{p.url}: no member {p.member}")
            if not member.isreg() or member.size != p.size:
                raise BadInput(f"{p.url}: {p.member} is not a regular file of {p.size} bytes")
            src = tar.extractfile(member)
            assert src is not None  # a regular member always has a file object
            with atomic_output(target) as tmp, open(tmp, "wb") as out:
                digest = _copy(src, out, p.size, p.filename)
                if digest != p.sha256:  # raising here leaves no file behind
                    raise BadInput(f"{p.member}: sha256 {digest} does not match the pinned {p.sha256}")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BadInput(f"could not extract {p.member} from {p.url}: {exc}") from None


def fetch(name: str) -> Path:
    """Download, verify and cache `name`; a cached file with the pinned sha256 is kept as is. Returns its path."""
    p = entry(name)
    folder = cache_dir()
    target = folder / p.filename
    if _cached_ok(p, target):
        log.info("%s: cached at %s (sha256 ok)", name, target)
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"cannot create the cache folder {folder}: {exc}") from None
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download.") as tmp:
        tarball = Path(tmp) / "package.tgz"
        _download(p, tarball)
        _extract(p, tarball, target)
    log.info("%s: fetched to %s (sha256 ok)", name, target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m compress.pretrained",
        description="Pretrained weights edgesr can fetch (only `fetch` uses the network; `make setup` runs it).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the known weights and whether each is cached", allow_abbrev=False)
    f = sub.add_parser(
        "fetch", help="download and verify weights into the cache (all when NAME is omitted)", allow_abbrev=False
    )
    f.add_argument("name", nargs="?", metavar="NAME")
    q = sub.add_parser("path", help="print the verified cached file of NAME (never downloads)", allow_abbrev=False)
    q.add_argument("name", metavar="NAME")
    args = parser.parse_args(argv)
    if args.command == "list":
        for p in REGISTRY.values():
            state = "cached" if _cached_ok(p, cache_dir() / p.filename) else "not cached"
            print(f"{p.name}\t{state}\t{p.description}")
    elif args.command == "fetch":
        for name in [args.name] if args.name else list(REGISTRY):
            fetch(name)
    else:
        print(path(args.name))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
