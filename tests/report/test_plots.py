"""`make plots`: DVC's plots page renders with no network (no CDN script in it)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmcore.report import plots as dvcplots

REPO = Path(__file__).resolve().parents[2]
VENDORED = all(f.is_file() for f in dvcplots.script_files())


def test_the_template_inlines_the_scripts_and_keeps_dvcs_placeholders(tmp_path):
    files = []
    for name in dvcplots.PACKAGES:
        files.append(tmp_path / f"{name}.min.js")
        files[-1].write_text(f"var {name.replace('-', '_')} = 1; '</script>';")
    page = dvcplots.template(files)
    assert "{plot_divs}" in page and "{refresh_tag}" in page
    assert "{scripts}" not in page  # DVC would put its CDN tags there
    assert "var vega_lite = 1;" in page and "<\\/script>" in page
    assert "<script src" not in page


@pytest.mark.skipif(not VENDORED, reason="charting scripts not vendored in build/vega "
                    "(make setup fetches them from the npm registry)")
def test_dvc_plots_page_works_offline(tmp_path):
    out = tmp_path / "plots"
    subprocess.run([sys.executable, "-m", "llmcore.report.plots", "--out", str(out)], cwd=REPO,
                   check=True, capture_output=True, timeout=300)
    html = (out / "index.html").read_text(encoding="utf-8")
    remote = re.findall(r"""<script[^>]+src\s*=\s*["']?(?:https?:)?//[^"'>]+""", html)
    assert remote == []
    assert "cdn.jsdelivr" not in html
    assert html.count("vegaEmbed(") >= 4  # the train/val curves of pretrain and sft
    assert "Vega-Lite" in html or "vega-lite" in html  # the library itself is in the page
    for png in ("loss_curves.png", "speedrun.png"):
        assert png in html


CONFIGURED = subprocess.run([str(Path(sys.executable).with_name("dvc")), "config",
                             "plots.html_template"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()


@pytest.mark.skipif(not (VENDORED and CONFIGURED), reason="this checkout's DVC has no plots "
                    "template (make setup writes it with the vendored charting scripts)")
def test_the_plain_dvc_plots_show_works_offline(tmp_path):
    assert (REPO / ".dvc" / CONFIGURED).resolve() == dvcplots.TEMPLATE_FILE.resolve()
    out = tmp_path / "plain"
    subprocess.run([str(Path(sys.executable).with_name("dvc")), "plots", "show", "-o",
                    str(out)], cwd=REPO, check=True, capture_output=True, timeout=300)
    html = (out / "index.html").read_text(encoding="utf-8")
    assert re.findall(r"""<script[^>]+src\s*=""", html) == [] and "cdn.jsdelivr" not in html
    assert html.count("vegaEmbed(") >= 4 and "vega-lite" in html.lower()
