"""Sampling-time searches (`evaluate.search`): the points a grid and a coordinate search evaluate,
the choice of a known synthetic metric curve's minimum, resuming after a kill, reuse, training keys
refused, the chosen point applied later (and overridden by --set), its rows' chosen_by and
tuned_on_reference, and the report's search table and trade-off figure."""

from __future__ import annotations

import importlib
import json
import shutil

import pytest
import yaml
from click.testing import CliRunner

import cdmbench.evaluation.search as search
from cdmbench.cli import cli
from cdmbench.errors import CdmbenchError, RecipeError
from cdmbench.recipe.schema import Search
from cdmbench.recipe.validate import parse_recipe
from cdmbench.training.run import run

LEVEL, STEPS = "stages.sr16.augmentation.args.level", "stages.base8.sampler.args.steps"

# A metric whose value is a known function of the sampling point its samples were made at
# (context.recipe): "fid_train" = (s - 0.2)^2 + 0.01 (steps - 3)^2, minimal at s = 0.2, 3 base steps;
# "is" falls with s. Every call is counted.
CURVE_PLUGIN = '''
from cdmbench import hookimpl

CALLS = []


class Curve:
    name = "curve"

    def evaluate(self, context):
        s = context.recipe.stage("sr16").augmentation.args["level"]
        steps = context.recipe.stage("base8").sampler.args["steps"]
        CALLS.append((s, steps))
        fid = (s - 0.2) ** 2 + 0.01 * (steps - 3) ** 2
        n = len(context.samples)
        return [{"metric": "fid_train", "value": fid, "n": n, "unit": "", "higher_is_better": False,
                 "protocol": {**context.protocol, "reference": "train split"}},
                {"metric": "is", "value": 10 - 5 * s, "n": n, "unit": "", "higher_is_better": True,
                 "protocol": dict(context.protocol)}]


def curve():
    return Curve()


@hookimpl
def cdmbench_register_metrics(register):
    register("curve", curve, summary="a known function of the sampling point")
'''



def searched(space: str = f"{{{LEVEL}: [0.1, 0.2], {STEPS}: [2, 3]}}") -> list[str]:
    """evaluate's arguments: the curve metric, a grid search of ``space`` on 10 samples a point, 20 in all."""
    return ["--set=plugins=[testplugin_curve]", "--set=evaluate.metrics=[curve]",
            f"--set=evaluate.search={{metric: fid_train, num_samples: 10, space: {space}}}",
            "--set=evaluate.num_samples=20", "--set=evaluate.batch_size=10", "--set=evaluate.shard_size=10",
            "--no-progress"]


@pytest.fixture
def curve(plugin_dir):
    (plugin_dir / "testplugin_curve.py").write_text(CURVE_PLUGIN)
    module = importlib.import_module("testplugin_curve")
    module.CALLS.clear()
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny cascade trained once; each test evaluates a copy."""
    from tests.conftest import TINY_RECIPE

    folder = tmp_path_factory.mktemp("trained")
    (folder / "tiny.yaml").write_text(TINY_RECIPE)
    return run(folder / "tiny.yaml", out=folder / "run", progress=False, echo=lambda *_: None)


@pytest.fixture
def run_dir(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("CDMBENCH_CACHE", str(tmp_path / "cache"))
    return shutil.copytree(trained, tmp_path / "run")


def results(run_dir):
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def tiny(tiny_recipe, **search_block):
    raw = yaml.safe_load(tiny_recipe.read_text())
    raw["evaluate"] = {"metrics": ["is"], "search": search_block}
    return raw


# --- without sampling: the strategies over a synthetic metric ------------------------------------

@pytest.fixture
def synthetic(monkeypatch, tiny_recipe, tmp_path):
    """run_search over the tiny recipe with each point's evaluation replaced by the curve above
    (no sampling): returns a function running a search of a space, and the points evaluated."""
    evaluated = []

    def fake_point(point, *, sid, spec, rank, **_):
        evaluated.append(point)
        s, steps = point.get(LEVEL, 0.1), point.get(STEPS, 4)
        value = (s - 0.2) ** 2 + 0.01 * (steps - 3) ** 2
        return {"point": point, "signature": "-", "values": {"fid_train": value},
                "higher_is_better": {"fid_train": False}, "references": {"fid_train": ["train split", None, None]}}

    monkeypatch.setattr(search, "_evaluate_point", fake_point)
    monkeypatch.setattr(search, "check_points", lambda points, **_: None)
    recipe, _ = parse_recipe(yaml.safe_load(tiny_recipe.read_text()))

    def searching(space, strategy="grid"):
        spec = Search(space=space, metric="fid_train", strategy=strategy, num_samples=10)
        return search.run_search(spec, run_path=tmp_path, recipe=recipe, stage="sr16", overrides=[], num_classes=10,
                                 steps={"base8": 4, "sr16": 4}, device="cpu", batch_size=10, shard_size=10,
                                 measure=None, echo=lambda *_: None)

    return searching, evaluated


def test_a_joint_grid_over_two_stages_evaluates_the_cartesian_product_and_picks_the_minimum(synthetic, tmp_path):
    searching, evaluated = synthetic
    chosen = searching({LEVEL: [0.0, 0.1, 0.2, 0.3], STEPS: [2, 3, 4]})
    assert [(p[LEVEL], p[STEPS]) for p in evaluated] == [(s, k) for s in (0.0, 0.1, 0.2, 0.3) for k in (2, 3, 4)]
    assert chosen["point"] == {LEVEL: 0.2, STEPS: 3} and chosen["value"] == 0.0
    manifest = json.loads((tmp_path / "search.json").read_text())
    assert manifest["chosen"] == chosen and manifest["searches"][chosen["search"]]["done"] is True
    assert len(manifest["searches"][chosen["search"]]["points"]) == 12  # the search table


def test_coordinate_search_sets_one_key_at_a_time_in_the_declared_order(synthetic):
    searching, evaluated = synthetic
    chosen = searching({STEPS: [2, 4, 3], LEVEL: [0.0, 0.3, 0.2]}, "coordinate")
    # steps first, from level 0.0: 2, 4, 3 (best 3); then the level with steps 3: 0.0 (done), 0.3, 0.2
    assert [(p[STEPS], p[LEVEL]) for p in evaluated] == [(2, 0.0), (4, 0.0), (3, 0.0), (3, 0.3), (3, 0.2)]
    assert chosen["point"] == {STEPS: 3, LEVEL: 0.2}


def test_a_search_killed_midway_resumes_without_evaluating_its_finished_points_and_a_finished_one_is_reused(
        synthetic, monkeypatch):
    searching, evaluated = synthetic
    real = search._evaluate_point

    def killed(point, **kwargs):
        if len(evaluated) == 2:
            raise KeyboardInterrupt
        return real(point, **kwargs)

    monkeypatch.setattr(search, "_evaluate_point", killed)
    space = {LEVEL: [0.0, 0.1, 0.2, 0.3]}
    with pytest.raises(KeyboardInterrupt):
        searching(space)
    assert [p[LEVEL] for p in evaluated] == [0.0, 0.1]
    monkeypatch.setattr(search, "_evaluate_point", real)
    chosen = searching(space)
    assert [p[LEVEL] for p in evaluated] == [0.0, 0.1, 0.2, 0.3]  # only the points not recorded
    assert chosen["point"] == {LEVEL: 0.2}
    assert searching(space) == chosen and len(evaluated) == 4  # done: reused, nothing evaluated
    searching({LEVEL: [0.2, 0.3]})  # another block: another search
    assert len(evaluated) == 6


def test_a_training_key_is_refused_with_the_reason(tiny_recipe):
    for key in ("stages.sr16.train.lr", "stages.sr16.backbone.args.channels", "stages.sr16.schedule.name",
                "stages.sr16.loss", "stages.sr16.augmentation.args.max_level"):
        with pytest.raises(RecipeError, match=rf"^evaluate\.search\.space\.{key}: is not a sampling-time key: a "
                                              "search changes how the trained weights are sampled, never how they "
                                              r"were trained \(train, backbone"):
            parse_recipe(tiny(tiny_recipe, metric="is", space={key: [1, 2]}))


def test_every_candidate_is_checked_when_the_recipe_loads(tiny_recipe):
    with pytest.raises(RecipeError, match=r"evaluate\.search\.space\.stages\.sr16\.guidance\.scale: candidate 2\.0: "
                                          r"stages\.sr16\.guidance\.scale: guidance needs an unconditional model"):
        parse_recipe(tiny(tiny_recipe, metric="is", space={"stages.sr16.guidance.scale": [1.0, 2.0]}))
    with pytest.raises(RecipeError, match=r"evaluate\.search\.space\.stages\.sr99\.posthoc_sigma_rel: no stage 'sr99'"):
        parse_recipe(tiny(tiny_recipe, metric="is", space={"stages.sr99.posthoc_sigma_rel": [0.05]}))
    with pytest.raises(RecipeError, match=r"evaluate\.search\.metric: required with a space"):
        parse_recipe(tiny(tiny_recipe, space={LEVEL: [0.1]}))
    with pytest.raises(RecipeError, match=r"evaluate\.search\.strategy: expected grid or coordinate"):
        parse_recipe(tiny(tiny_recipe, metric="is", strategy="random", space={LEVEL: [0.1]}))
    with pytest.raises(RecipeError, match=r"evaluate\.search\.space: a grid of 12100 points"):
        parse_recipe(tiny(tiny_recipe, metric="is", space={LEVEL: [i / 110 for i in range(110)],
                                                           "stages.sr16.sampler.args.steps": list(range(1, 111))}))
    recipe, _ = parse_recipe(tiny(tiny_recipe, metric="is", space={LEVEL: [0.0, 0.1], STEPS: [2, 4]}))
    assert recipe.evaluate.search.space == {LEVEL: [0.0, 0.1], STEPS: [2, 4]}


# --- end to end: cdmbench evaluate ---------------------------------------------------------------

@pytest.mark.slow
def test_evaluate_searches_then_evaluates_the_chosen_point_which_later_sampling_applies(curve, run_dir):
    result = CliRunner().invoke(cli, ["evaluate", str(run_dir), *searched()])
    assert result.exit_code == 0, result.output
    manifest = json.loads((run_dir / "search.json").read_text())
    chosen = manifest["chosen"]
    assert chosen["point"] == {LEVEL: 0.2, STEPS: 3} and chosen["n_search"] == 10
    assert curve.CALLS == [(0.1, 2), (0.1, 3), (0.2, 2), (0.2, 3), (0.2, 3)]  # the grid, then the full evaluation
    rows = results(run_dir)
    points = [r for r in rows if "search" in r["protocol"]]
    assert len(points) == 8 and {r["n"] for r in points} == {10}
    assert [r["protocol"]["search"]["point"] for r in points[::2]] == [
        {LEVEL: s, STEPS: k} for s in (0.1, 0.2) for k in (2, 3)]
    final = {r["metric"]: r for r in rows[-2:]}
    assert {r["n"] for r in final.values()} == {20}
    assert final["fid_train"]["protocol"]["chosen_by"] == {"search": chosen["search"], "metric": "fid_train",
                                                           "n_search": 10, "point": chosen["point"]}
    assert final["fid_train"]["protocol"]["tuned_on_reference"] is True  # chosen on its own reference
    assert final["is"]["protocol"]["tuned_on_reference"] is False

    # The report: the search table with the chosen point, the trade-off figure, the tuned row.
    text = (run_dir / "report.md").read_text()
    assert "## Sampling-time searches" in text
    [chosen_line] = [line for line in text.splitlines() if line.startswith(f"| {chosen['search']}")
                     and line.rstrip().endswith("| chosen |")]
    assert "sr16.augmentation.args.level=0.2, base8.sampler.args.steps=3 |" in chosen_line
    assert "fid_train of sr16 (n 20): choice tuned on this metric's reference" in text
    assert "is of sr16 (n 20): choice" not in text
    assert (run_dir / "tradeoffs.png").stat().st_size > 10_000 and "tradeoffs.png" in text
    html = (run_dir / "report.html").read_text()
    assert 'alt="quality against diversity over the searched points"' in html and "data-search=" in html
    assert "choice tuned on this metric&#x27;s reference" in html or "choice tuned on this metric's reference" in html
    from cdmbench.reporting.tables import read_results
    from cdmbench.reporting.tradeoffs import search_table
    table = search_table(read_results([run_dir]), manifest)
    assert len(table) == 4 and list(table["chosen"]).count("chosen") == 1
    assert table.loc[table["chosen"] == "chosen", "fid_train"].item() == 0.0

    # A second evaluate reuses the finished search; --no-search, too, samples at the chosen point.
    curve.CALLS.clear()
    again = CliRunner().invoke(cli, ["evaluate", str(run_dir), *searched()])
    assert again.exit_code == 0 and "reused, not run again" in again.output
    assert curve.CALLS == [(0.2, 3)]
    # --set wins over the chosen point: the level is the user's, the steps still the search's
    overridden = CliRunner().invoke(cli, ["evaluate", str(run_dir), *searched(), "--no-search",
                                          f"--set={LEVEL}=0.3"])
    assert overridden.exit_code == 0, overridden.output
    assert curve.CALLS == [(0.2, 3), (0.3, 3)]
    last = results(run_dir)[-1]
    assert last["protocol"]["chosen_by"]["point"] == {STEPS: 3}

    # cdmbench sample applies the chosen point too
    sampled = CliRunner().invoke(cli, ["sample", str(run_dir), "--per-class", "1", "--no-progress",
                                       "--out", str(run_dir / "picked")])
    assert sampled.exit_code == 0, sampled.output
    settings = json.loads((run_dir / "picked" / "sample.json").read_text())
    assert settings["levels"]["sr16"] == 0.2 and settings["samplers"]["base8"] == "ddpm {'steps': 3}"


@pytest.mark.slow
def test_a_search_killed_midway_resumes_from_its_recorded_points(curve, run_dir, monkeypatch):
    real = search.generate_samples
    sampled = []

    def killed(chain, **kwargs):
        sampled.append(1)
        if len(sampled) == 3:
            raise KeyboardInterrupt
        return real(chain, **kwargs)

    monkeypatch.setattr(search, "generate_samples", killed)
    args = ["evaluate", str(run_dir), "--search-only", *searched(f"{{{LEVEL}: [0.0, 0.2, 0.3]}}")]
    assert CliRunner().invoke(cli, args).exit_code != 0
    assert curve.CALLS == [(0.0, 4), (0.2, 4)]  # killed while sampling the third point
    record = next(iter(json.loads((run_dir / "search.json").read_text())["searches"].values()))
    assert len(record["points"]) == 2 and not record["done"] and "chosen" not in json.loads(
        (run_dir / "search.json").read_text())
    monkeypatch.setattr(search, "generate_samples", real)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.output.count("evaluated before: not evaluated again") == 2
    assert curve.CALLS[2:] == [(0.3, 4)]  # the finished points are not evaluated again
    assert json.loads((run_dir / "search.json").read_text())["chosen"]["point"] == {LEVEL: 0.2}
    assert not [r for r in results(run_dir) if "chosen_by" in r["protocol"]]  # --search-only: no full evaluation


@pytest.mark.slow
def test_a_point_that_cannot_be_sampled_is_refused_before_any_sampling(curve, run_dir, monkeypatch):
    monkeypatch.setattr(search, "generate_samples", lambda *a, **k: pytest.fail("sampled"))
    result = CliRunner().invoke(cli, ["evaluate", str(run_dir), *searched(f"{{{LEVEL}: [0.1, 1.5]}}")])
    assert result.exit_code == 2
    assert "error: evaluate.search: point sr16.augmentation.args.level=1.5:" in result.output
    assert "level must be in [0, 1]" in result.output and curve.CALLS == []


def test_the_chosen_point_applies_to_the_chains_stages_and_yields_to_set(tiny_recipe, tmp_path):
    recipe, _ = parse_recipe(yaml.safe_load(tiny_recipe.read_text()))
    (tmp_path / "search.json").write_text(json.dumps({"searches": {}, "chosen": {
        "search": "x", "metric": "fid_train", "n_search": 10, "point": {LEVEL: 0.2, STEPS: 3}}}))
    overrides, chosen_by = search.with_choice(tmp_path, recipe, "base8", ["sample.seed=3"])
    assert overrides == [f"{STEPS}=3", "sample.seed=3"] and chosen_by["point"] == {STEPS: 3}
    overrides, chosen_by = search.with_choice(tmp_path, recipe, "sr16", ["stages.base8.sampler={name: ddim}"])
    assert overrides == [f"{LEVEL}=0.2", "stages.base8.sampler={name: ddim}"] and chosen_by["point"] == {LEVEL: 0.2}
    with pytest.raises(CdmbenchError):
        search._best([], "fid_train")
