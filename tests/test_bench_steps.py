"""kernels/bench.py steps: the step benchmark runs a method file's own model and train_step."""
from kernels import bench_steps


def test_step_benchmark_on_two_steps_times_each_variant_of_both_methods(capsys):
    results = bench_steps.main(["--model", "tiny", "--pretrained", "shapes", "--classes", "world", "--steps", "2",
                                "--repeats", "1", "--device", "cpu"])
    assert [r["method"] for r in results] == ["coop", "cocoop"] and [r["batch"] for r in results] == [32, 1]
    for r in results:
        assert set(r["times"]) == {"full", "eager"} and all(t > 0 for t in r["times"].values())
        assert r["classes"] == 12  # the world's base names
    assert "ratio = full / variant" in capsys.readouterr().out


def test_caltech_names_are_the_50_base_classes_in_coop_order():
    names = bench_steps.class_names("caltech101")
    assert len(names) == 50 and names[:4] == ["face", "leopard", "motorbike", "accordion"]
    assert names[-1] == "helicopter" and len(bench_steps.CALTECH101_FOLDERS) == 100


def test_step_benchmark_times_vprompt_beside_the_coop_step_it_builds_on(capsys):
    results = bench_steps.main(["--model", "tiny", "--pretrained", "shapes", "--classes", "world", "--steps", "1",
                                "--repeats", "1", "--device", "cpu", "--samples", "2",
                                "--method", "vprompt,vprompt-conditional"])
    assert [r["method"] for r in results] == ["vprompt", "vprompt-conditional"]
    assert [r["builds_on"][0] for r in results] == ["coop", "cocoop"] and all(r["batch"] == 1 for r in results)
    assert all(r["builds_on"][1] > 0 and set(r["times"]) == {"full", "eager"} for r in results)
    assert "vprompt-conditional / cocoop" in capsys.readouterr().out


def test_step_benchmark_times_promptsrc_against_coop_on_the_same_batch(capsys):
    results = bench_steps.main(["--method", "promptsrc", "--model", "tiny", "--pretrained", "shapes", "--classes",
                                "world", "--steps", "1", "--repeats", "1", "--device", "cpu"])
    assert [(r["method"], r["batch"]) for r in results] == [("promptsrc", 4)]
    assert set(results[0]["times"]) == {"full", "eager"} and all(t > 0 for t in results[0]["times"].values())
    assert results[0]["builds_on"][0] == "coop" and results[0]["builds_on"][1] > 0
    assert "promptsrc / coop" in capsys.readouterr().out
