"""report.md and report.html of a run made without training: long-form tables whose numbers are
the rows', no markdown line over 120 characters, one self-contained page that a real browser
renders (wide and phone-sized) with every metric row, and an export that regenerates itself."""

import html
import io
import json
import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner
from PIL import Image

from cdmbench.cli import cli
from cdmbench.recipe.load import load_recipe
from cdmbench.reporting.tables import read_results
from cdmbench.reporting.write import export_report, write_report
from cdmbench.storage.rundir import RunDir, load_run, result_row

CLASSES = [f"class{i}" for i in range(10)]
SAMPLERS = {"base16": "ddpm {'steps': 100, 'eta': 1.0, 'clip_denoised': True}, bf16",
            "sr_gauss": "dpm-solver-2m {'steps': 25, 'order': 2, 'lower_order_final': True}, bf16"}
LONG = {"seeds": "sample seed 0, images 0..999 of a class-balanced draw over all ten classes",
        "samples": "sr_gauss/eval_samples/50b9ee03383b5f1d2e3c4b5a6978877665544332211",
        "features_sha256": "73c5bbdb4bf3cb9a6e8212e02523ac1db9726c6fa0d06bfd49ce5e63c9067e81",
        "note": "a <script>alert('x')</script> & a note longer than a line: " + "word " * 30}
FID = {"dataset": "shapes", "resolution": 16, "features": "classifier", "mode": "native", "n": 1000,
       "reference_split": "test", "samplers": SAMPLERS, **LONG}
IMAGENET = {"dataset": "imagenet", "resolution": 64, "features": "inception-2015-12-05", "mode": "legacy_tensorflow",
            "n": 50000, "reference_split": "train", "evaluator": "adm-evaluator", "labels": "random",
            "reference": "VIRTUAL_imagenet64_labeled.npz", "seeds": "sample seed 0, images 0..49999"}


def row(stage, metric, value, stderr=None, unit="", steps=None, **protocol):
    """A result row: n is the protocol's, else the training ``steps``."""
    return result_row(run="ablation-augmentation", stage=stage, metric=metric, value=value, stderr=stderr,
                      n=protocol.get("n", steps), unit=unit, higher_is_better=False, protocol=protocol)


def make_run(path):
    """The ablation recipe with sr_gauss trained twice, as `run`, `evaluate` and `sweep` leave it:
    run.yaml, train logs, grids and rows: training's, FID of every SR stage (an older one of
    sr_none first), FID of base16 on ImageNet (comparable with published rows) and at n 1000 (not),
    sweeps of sr_gauss and its copy."""
    recipe, plugins = load_recipe("recipes/ablation_augmentation.yaml",
                                  overrides=["data={name: shapes}", "stages.sr_gauss.replicates=2"])
    run_dir = RunDir(path)
    run_dir.prepare(recipe, plugins, CLASSES)
    rows = [row("sr_none", "fid_test", 99.0, 9.0, **FID)]
    for i, stage in enumerate(recipe.stages):
        folder = run_dir.stage(stage.name)
        (folder / "samples").mkdir(parents=True)
        log = [{"step": s, "loss": 0.1 / s + i / 100, "grad_norm": 1.0, "images_per_s": 50.0 + i, "seconds": 3.0 * s}
               for s in (10, 20, 30)]
        (folder / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        grid = Image.new("RGB", (16 * 4, 16 * 10), (40 * i % 255, 120, 200))
        grid.paste((250, 60, 20), (4, 4, 30, 30))
        grid.save(folder / "samples" / "grid.png")
        rows += [row(stage.name, "train_loss", 0.1 / 30 + i / 100, steps=30, loss=stage.loss),
                 row(stage.name, "train_throughput", 50.0 + i, steps=30, unit="img/s", device="cpu")]
        if stage.name != "base16":
            rows.append(row(stage.name, "fid_test", 30.0 - i * 1.2345678, 0.987654, **FID))
    rows += [row("base16", "fid_train", 5.123456, 0.25, **IMAGENET),
             row("base16", "fid_train", 7.5, 0.5, **{**IMAGENET, "n": 1000})]
    for stage in ("sr_gauss", "sr_gauss_r2"):
        for inputs, values in (("generated", [31.0, 27.5, 29.25]), ("ground-truth", [12.0, 14.0, 19.0])):
            rows += [row(stage, "fid_test", v, 0.5, n=1000, level=s, inputs=inputs, truncated=False,
                         samplers={stage: SAMPLERS["sr_gauss"]}) for s, v in zip((0.0, 0.1, 0.3), values, strict=True)]
    run_dir.add_results(rows)
    return run_dir, recipe, plugins


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The run, its report written."""
    run_dir, recipe, plugins = make_run(tmp_path_factory.mktemp("report") / "run")
    summary = write_report(run_dir, recipe, plugins)
    return run_dir.path, summary


def newest(path):
    """(stage, metric, n) -> the newest non-sweep row."""
    return {(r["stage"], r["metric"], r["n"]): r for r in RunDir(path).results() if "level" not in r["protocol"]}


def table_after(text, heading):
    """The rows of the first pipe table after ``heading`` as dicts of its cells."""
    lines = text.split(heading, 1)[1].split("\n\n|", 1)[1].split("\n\n")[0].splitlines()
    header = [c.strip() for c in ("|" + lines[0]).strip("|").split("|")]
    return [dict(zip(header, [c.strip() for c in line.strip("|").split("|")], strict=True)) for line in lines[2:]]


def note(text, cell):
    """A cell's text: the note it stands for when it is a note label (``N3``), its lines joined."""
    found = re.search(rf"^- \*\*{re.escape(cell)}\*\*: (.*?)(?=\n- |\n\n|\Z)", text, re.M | re.S)
    return " ".join(found[1].split()) if re.fullmatch(r"N\d+", cell) and found else cell


def test_no_markdown_line_is_longer_than_120_characters(written):
    path, summary = written
    text = (path / "report.md").read_text()
    for section in ("## Results", "## Beside published results", "### Same protocol",
                    "### Context (not the same protocol)", "## Stages trained several times",
                    "## Sampling-level sweeps", "## CDM's findings",
                    "## Training", "## Samples"):
        assert section in text
    assert max(len(line) for line in text.splitlines()) <= 120
    assert max(len(line) for line in summary.splitlines()) <= 120
    assert "```" not in text  # tables, not text dumps


def test_the_results_are_long_form_with_each_protocol_once(written):
    path, _ = written
    text = (path / "report.md").read_text()
    table = table_after(text, "## Results")
    rows = newest(path)
    assert len(table) == len(rows) and {(t["stage"], t["metric"], int(t["n"])) for t in table} == set(rows)
    for cells in table:
        r = rows[cells["stage"], cells["metric"], int(cells["n"])]
        assert cells["value"] == f"{r['value']:.4g}"
        assert cells["±"] == ("" if r["stderr"] is None else f"{r['stderr']:.4g}")
        assert cells["unit"] == r["unit"]
    assert [c["stage"] for c in table if c["metric"] == "train_loss"] == [
        "base16", "sr_none", "sr_gauss", "sr_trunc", "sr_blur", "sr_gauss_r2"]  # the recipe's order
    [label] = {c["protocol"] for c in table if c["metric"] == "fid_test"}  # all SR stages' FID: one protocol
    assert text.count(f"- **{label}** (") == 1
    assert f"- **{label}** (fid_test: sr_none, sr_gauss, sr_trunc, sr_blur, sr_gauss_r2): dataset: shapes;" in text
    assert "note: a \\<script>alert('x')\\</script> & a note" in " ".join(text.split())
    assert "sr_none" in text and "| 99 " not in text  # the older FID of sr_none is not shown


def test_each_evaluation_has_a_protocol_card_with_every_field(written):
    """The feature network and its hash, the reference and its hash, n, labels, samplers (with their
    steps), precision, guidance and seeds: as recorded, else 'not recorded'; in report.md and report.html."""
    path, _ = written
    text = (path / "report.md").read_text()
    cards = {m[1]: " ".join(m[2].split()) for m in re.finditer(r"^- \*\*(P\d+)\*\* \((.*?)(?=\n- |\n\n)", text,
                                                               re.M | re.S)}
    [imagenet] = [c for c in cards.values() if c.startswith("fid_train: base16): dataset: imagenet")]
    for field in ("features", "features_sha256", "reference", "reference_sha256", "n", "labels", "samplers",
                  "precision", "guidance", "seeds"):
        assert re.search(rf"[:;] {field}: ", imagenet), field
    assert "labels: random;" in imagenet and "reference: VIRTUAL_imagenet64_labeled.npz;" in imagenet
    assert "features_sha256: not recorded" in imagenet and imagenet.endswith("guidance: not recorded")
    [shapes] = [c for c in cards.values() if c.startswith("fid_test: sr_none")]
    assert "labels: not recorded" in shapes and "features_sha256: 73c5bbdb" in shapes
    assert "reference: not recorded" in shapes  # older rows name a split only (reference_split)
    [train] = [c for c in cards.values() if c.startswith("train_loss")]
    assert "not recorded" not in train  # not an evaluation: no card fields
    page = (path / "report.html").read_text()
    assert "<dt>labels</dt><dd>random</dd>" in page and "<dt>precision</dt><dd>not recorded</dd>" in page


def test_published_rows_are_grouped_with_the_reason(written):
    """base16's FID (ADM's evaluator, its reference batch, random labels) at n 50000 has ADM's protocol;
    every other pair is context with each differing field, today's records marked."""
    text = (written[0] / "report.md").read_text()
    same = table_after(text, "### Same protocol")
    assert [(c["published model"], c["value"], c["±"], c["published"]) for c in same] == [
        ("ADM", "5.123", "0.25", "2.07")]
    context = table_after(text, "### Context (not the same protocol)")
    why = {(c["value"], c["published model"]): note(text, c["why not"]) for c in context}
    assert len(context) == len(why) == 13
    assert why["5.123", "BigGAN-deep"] == why["5.123", "Improved DDPM"] == (
        "labels 'random' vs 'not stated in the source'")  # ADM's evaluator, labels not stated
    assert why["7.5", "ADM"] == "n 1000 vs 50000"
    assert why["5.123", "CDM"] == ("labels 'random' vs 'not stated in the source'; evaluator 'adm-evaluator' vs "
                                   "'authors'; reference 'VIRTUAL_imagenet64_labeled.npz' vs 'ImageNet train split "
                                   "(all images)'")
    assert {m for _, m in why if m.endswith("(record)")} == {"EDM (record)", "EDM2-XL (record)", "RIN (record)"}
    assert [c["published model"] for c in context][3:6] == ["EDM (record)", "EDM2-XL (record)", "RIN (record)"]
    assert all(w.startswith("n 1000 vs ") for (value, _), w in why.items() if value == "7.5")
    assert "Not on this dataset: fid_test (published rows are on imagenet, not 'shapes')." in text


def test_replicates_sweeps_and_training_are_tables(written):
    path, _ = written
    text = (path / "report.md").read_text()
    [gauss] = [r for r in table_after(text, "## Stages trained several times") if r["metric"].startswith("fid_test")]
    fids = [r["value"] for r in RunDir(path).results() if r["stage"].startswith("sr_gauss")
            and r["metric"] == "fid_test" and "level" not in r["protocol"]]
    assert gauss["runs"] == "2" and gauss["mean"] == f"{sum(fids) / 2:.4g}"
    sweeps = table_after(text, "## Sampling-level sweeps")
    [label] = {r["samplers"] for r in sweeps}  # too long for a row: a note
    assert len(sweeps) == 12 and note(text, label).startswith("dpm-solver-2m {'steps': 25")
    assert [r["value"] for r in sweeps[:3]] == ["31", "27.5", "29.25"] and sweeps[0]["s"] == "0"
    training = table_after(text, "## Training")
    assert [r["steps"] for r in training] == ["30"] * 6 and training[0]["loss"] == f"{0.1 / 30:.4g}"
    assert "![training loss](training.png)" in text and "![metrics against s](sweeps.png)" in text


def hooks(page):
    """(kind, stage, metric) of each table row with a hook."""
    return [(m[1], html.unescape(m[2]), html.unescape(m[3]))
            for m in re.finditer(r'<tr class="(\w+)" data-stage="([^"]*)" data-metric="([^"]*)"', page)]


def test_the_page_is_self_contained_escaped_and_has_every_metric_row(written):
    path, _ = written
    page = (path / "report.html").read_text()
    assert {(stage, metric) for kind, stage, metric in hooks(page) if kind == "result"} == {
        (s, m) for s, m, _ in newest(path)}
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page) and "<script" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) == 8 and all(src.startswith("data:image/png;base64,") for src in images)  # 2 plots, 6 grids
    assert page.count('<section class="card protocol"') == len(re.findall(r"- \*\*P\d+\*\* \(",
                                                                           (path / "report.md").read_text()))
    assert page.count("<details") == 3 and "sr_gauss_r2" in page.split("Recipe (resolved)")[1]
    assert page.count('<div class="scroll"><table>') == 6  # results, published (2), replicates, sweeps, training


def chromium(*args, cwd):
    """Headless chromium's completed process (its console messages on stderr)."""
    return subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--log-level=0", "--user-data-dir=" + str(cwd / "profile"), *args],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def not_blank(png):
    """A screenshot's size, its number of colours and the share of its pixels darker than near-white."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    histogram = image.convert("L").histogram()
    return image.size, len(image.getcolors(1 << 24)), sum(histogram[:200]) / sum(histogram)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (Debian: apt-get install chromium)")
def test_a_browser_renders_the_page_with_every_metric_row_and_no_console_message(written, tmp_path):
    path, _ = written
    url = (path / "report.html").as_uri()
    for width in (1280, 390):
        shot = tmp_path / f"{width}.png"
        done = chromium(f"--screenshot={shot}", f"--window-size={width},2000", url, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        assert not [line for line in done.stderr.splitlines() if "CONSOLE" in line]
        size, colours, dark = not_blank(shot.read_bytes())
        assert size == (width, 2000) and colours > 50 and 0.02 < dark < 0.9, (width, colours, dark)
    dom = chromium("--dump-dom", url, cwd=tmp_path)
    assert dom.returncode == 0 and not [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert {(s, m) for kind, s, m in hooks(dom.stdout) if kind == "result"} == {(s, m) for s, m, _ in newest(path)}
    assert dom.stdout.count("data:image/png;base64,") == 8


@pytest.mark.slow
def test_an_export_regenerates_itself(written, tmp_path):
    """The export holds run.yaml and the train logs: `cdmbench report --out DIR DIR` loads it and
    writes its report and figures again."""
    path, _ = written
    out = tmp_path / "exported"
    export_report(path, out)
    names = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    stages = ["base16", "sr_none", "sr_gauss", "sr_trunc", "sr_blur", "sr_gauss_r2"]
    assert names == {"report.md", "report.html", "run.yaml", "results.jsonl", "results.csv", "sweeps.png",
                     "training.png", *(f"{s}/train_log.jsonl" for s in stages),
                     *(f"{s}/samples/grid.png" for s in stages)}
    load_run(out)
    before = (out / "report.md").read_text()
    for name in ("report.md", "report.html", "training.png", "sweeps.png"):
        (out / name).unlink()
    result = CliRunner().invoke(cli, ["report", "--out", str(out), str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report.md").read_text() == before and (out / "training.png").stat().st_size > 0
    assert (out / "sweeps.png").is_file() and (out / "report.html").is_file()
    assert len(read_results([out])) == len(read_results([path]))


def test_long_names_and_cells_stay_within_120_characters():
    """A run name of 128 characters becomes a heading over two lines; cells that would make a row
    too long become notes (the same text one note), a pipe in a cell stays text."""
    from cdmbench.reporting import markdown
    from cdmbench.reporting.document import Report, Table

    long = ["a|" + "x" * 60, "y " * 40, "z" * 130]
    text = markdown.render(Report("r" * 128, ["## " + "heading " * 20, Table(["a", "b", "c", "d"], [
        [*long, "1"], [*long, "2"]])], None))
    assert max(len(line) for line in text.splitlines()) <= 120
    assert text.startswith("r" * 120 + "\n" + "r" * 8 + "\n===\n")
    [first, second] = [line for line in text.splitlines() if line.startswith("| a\\|x")]
    assert first.endswith("| N2  | N1  | 1   |") and second.endswith("| N2  | N1  | 2   |")
    assert text.count("- **N1**: zzz") == 1 and text.count("- **N2**: y y") == 1
