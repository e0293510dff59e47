"""`dvc plots show` writes a page that draws every plot with the network blocked: the page DVC
writes by default loads vega from a CDN and is blank offline, where a GPU box often is
(.dvc/config's plots.html_template, built by scripts/offline_plots.py)."""

from conftest import ROOT, browser_path, run


def test_every_plot_is_drawn_with_the_network_blocked(tmp_path):
    from playwright.sync_api import sync_playwright

    out = tmp_path / "plots"
    run(["dvc", "plots", "show", "-o", str(out)], ROOT)  # the curves and items kept in git
    html = (out / "index.html").read_text()
    assert "<script src=" not in html and "cdn.jsdelivr.net" not in html
    plots = html.count("vegaEmbed(")
    assert plots >= 10  # the training curves, the per-item scatters, the models' bars

    executable = browser_path()
    blocked = []

    def only_local(route):
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=executable, headless=True, args=["--no-sandbox"]
        )
        page = browser.new_page()
        page.route("**/*", only_local)
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto((out / "index.html").as_uri())
        drawn = (  # embeds that hold a drawn chart (vega-embed's default renderer: a canvas)
            "[...document.querySelectorAll('.vega-embed')]"
            ".filter((e) => e.querySelector('canvas')).length"
        )
        page.wait_for_function(f"{drawn} >= {plots}", timeout=60_000)
        assert page.evaluate(drawn) == plots
        browser.close()
    assert not blocked and not errors
