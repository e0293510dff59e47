"""Build .dvc/plots/offline.html: the page `dvc plots show` and `dvc plots diff` write, with
vega, vega-lite and vega-embed inlined, so that it draws its plots with no network (DVC's own
page loads them from a CDN, and is blank on an air-gapped GPU box). .dvc/config points
`plots.html_template` at it. The built page is kept in git; rebuild it (needs npm and the npm
registry) only to change a version:

    python scripts/offline_plots.py

The versions are the ones DVC's own page loads (dvc_render.vega.VegaRenderer.SCRIPTS), so the
plots look as they do online. All three are BSD-3-Clause (Copyright (c) the University of
Washington Interactive Data Lab); their notices are kept in the page.
"""

from __future__ import annotations

import subprocess
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / ".dvc" / "plots" / "offline.html"
PACKAGES = (  # (npm package, version, minified build inside its tarball)
    ("vega", "5.20.2", "package/build/vega.min.js"),
    ("vega-lite", "5.2.0", "package/build/vega-lite.min.js"),
    ("vega-embed", "6.18.2", "package/build/vega-embed.min.js"),
)
TEMPLATE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>llmpipe plots</title>
<!-- Built by scripts/offline_plots.py: {packages}, inlined (BSD-3-Clause, Copyright (c)
the University of Washington Interactive Data Lab). No script or style is loaded from the
network. DVC fills in the plots below. -->
{scripts}
<style>
body {{ font-family: sans-serif; }}
table {{ border-spacing: 15px; }}
</style>
</head>
<body>
{{plot_divs}}
</body>
</html>
"""


def build(work: Path) -> str:
    subprocess.run(
        ["npm", "pack", "--silent", *(f"{name}@{version}" for name, version, _ in PACKAGES)],
        cwd=work,
        check=True,
        capture_output=True,
    )
    scripts = []
    for name, version, member in PACKAGES:
        with tarfile.open(work / f"{name}-{version}.tgz") as tar:
            code = tar.extractfile(member).read().decode()
        # A source map is only fetched by a browser's developer tools: no reference to one.
        code = "\n".join(
            line for line in code.splitlines() if not line.startswith("//# sourceMappingURL")
        )
        if "</script" in code or "{plot_divs}" in code:
            raise SystemExit(f"{name} {version}: cannot be inlined as it is")
        scripts.append(f"<script>/* {name} {version} */\n{code}\n</script>")
    packages = ", ".join(f"{name} {version}" for name, version, _ in PACKAGES)
    return TEMPLATE.format(packages=packages, scripts="\n".join(scripts))


def main() -> None:
    with tempfile.TemporaryDirectory() as work:
        page = build(Path(work))
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(page)
    print(f"{PAGE.relative_to(ROOT)}: {len(page) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
