"""``dvc plots show`` that works offline: the charting scripts inlined, not fetched from a CDN.

    make plots        # -> reports/plots/index.html, opens with no network

DVC renders its plots as Vega-Lite specs in an HTML page whose ``{scripts}`` placeholder it
fills with ``<script src="https://cdn.jsdelivr.net/...">`` tags, so the page is blank offline.
Given an ``--html-template`` without that placeholder it adds no script tags; this module
writes such a template with vega, vega-lite and vega-embed inlined. The three files come from
the npm registry (``npm pack`` of pinned versions, at set-up: ``make setup``) into
``build/vega/``, where :func:`vendor` puts them and checks they are there.

Set-up also writes that template to ``build/vega/dvc-template.html`` and names it in this
checkout's DVC config (``dvc config --local plots.html_template``, which DVC reads when no
``--html-template`` is given), so the plain ``dvc plots show`` a DVC user types works offline
too (:func:`configure`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENDOR_DIR = REPO / "build" / "vega"
# The versions DVC's own page asks the CDN for are older; any vega 5 / vega-lite 5 / embed 6
# renders DVC's specs. Pinned so that the page is the same on every machine.
PACKAGES = {"vega": "5.33.1", "vega-lite": "5.23.0", "vega-embed": "6.29.0"}

# {refresh_tag} and {plot_divs} are DVC's placeholders; INLINE_SCRIPTS is filled here.
PAGE = """<!DOCTYPE html>
<html>
<head>
  <meta charset="utf-8">
  {refresh_tag}
  <title>llmcore plots</title>
  INLINE_SCRIPTS
  <style>body { font-family: sans-serif; } table { border-spacing: 15px; }</style>
</head>
<body>
  {plot_divs}
</body>
</html>
"""


class VendorError(RuntimeError):
    """The charting scripts are missing and cannot be fetched."""


def script_files(vendor_dir: Path = VENDOR_DIR) -> list[Path]:
    return [vendor_dir / f"{name}.min.js" for name in PACKAGES]


def vendor(vendor_dir: Path = VENDOR_DIR) -> list[Path]:
    """The three minified scripts, fetched with ``npm pack`` if they are not there yet."""
    files = script_files(vendor_dir)
    if all(f.is_file() and f.stat().st_size > 0 for f in files):
        return files
    vendor_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        specs = [f"{n}@{v}" for n, v in PACKAGES.items()]
        try:
            subprocess.run(["npm", "pack", "--silent", *specs], cwd=tmp, check=True,
                           capture_output=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            raise VendorError(f"could not fetch {', '.join(specs)} from the npm registry "
                              f"({exc}); install npm or copy the three build/*.min.js files "
                              f"into {vendor_dir}") from None
        for (name, version), out in zip(PACKAGES.items(), files, strict=True):
            with tarfile.open(Path(tmp) / f"{name}-{version}.tgz") as tgz:
                member = tgz.extractfile(f"package/build/{name}.min.js")
                assert member is not None
                out.write_bytes(member.read())
    return files


def template(files: list[Path]) -> str:
    """The page with the scripts inlined (``</script`` inside them escaped)."""
    scripts = "\n".join(
        "<script>\n" + f.read_text(encoding="utf-8").replace("</script", "<\\/script") +
        "\n</script>" for f in files)
    return PAGE.replace("INLINE_SCRIPTS", scripts)


TEMPLATE_FILE = VENDOR_DIR / "dvc-template.html"


def configure(repo: Path = REPO) -> Path:
    """Write the offline template and make it this checkout's default for ``dvc plots show``
    (``.dvc/config.local``, which git ignores: the path is this machine's)."""
    TEMPLATE_FILE.write_text(template(vendor()), encoding="utf-8")
    dvc = Path(sys.executable).with_name("dvc")
    # DVC reads a relative template path from the .dvc directory
    rel = Path("..") / TEMPLATE_FILE.relative_to(repo) if TEMPLATE_FILE.is_relative_to(repo) \
        else TEMPLATE_FILE
    subprocess.run([str(dvc) if dvc.exists() else "dvc", "config", "--local",
                    "plots.html_template", str(rel)], cwd=repo, check=True, capture_output=True,
                   timeout=120)
    return TEMPLATE_FILE


def render(out_dir: Path, targets: list[str] | None = None, repo: Path = REPO) -> Path:
    """Run ``dvc plots show`` with the offline template; the page's path."""
    files = vendor()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tpl = out_dir / "template.html"
    tpl.write_text(template(files), encoding="utf-8")
    dvc = Path(sys.executable).with_name("dvc")
    cmd = [str(dvc) if dvc.exists() else "dvc", "plots", "show", "--html-template", str(tpl),
           "-o", str(out_dir), *(targets or [])]
    subprocess.run(cmd, cwd=repo, check=True)
    tpl.unlink()
    return out_dir / "index.html"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="reports/plots")
    ap.add_argument("--vendor-only", action="store_true", help="fetch the scripts and stop")
    ap.add_argument("--configure", action="store_true",
                    help="fetch the scripts, write the offline template and make it the "
                         "default of `dvc plots show` in this checkout")
    ap.add_argument("targets", nargs="*")
    args = ap.parse_args()
    try:
        if args.configure:
            print(configure())
            return
        if args.vendor_only:
            print("\n".join(str(f) for f in vendor()))
            return
        print(render(Path(args.out), args.targets))
    except VendorError as exc:
        sys.exit(f"plots: {exc}")


if __name__ == "__main__":
    main()
