"""Report -> per-anatomy texts, and fVLM's per-anatomy calibrated loss."""
import json

import pytest
import torch
import torch.nn.functional as F

from RadCLIPCore import RadCLIPError
from RadCLIPCore.losses import anatomy_info_nce, contrastive_loss, info_nce
from RadCLIPCore.reports import anatomy_texts, assign_sentences, read_lexicon, split_sentences

REPORT = """FINDINGS: The liver measures approx. 18.5 cm and shows a 3.2 cm hypodense lesion in segment VI.
No pleural effusion; the right lower lobe shows a small nodule.
Heart size is normal!  Degenerative changes of the thoracic spine (T10-T11)."""
LEXICON = {5: ["liver", "hepatic"], 14: ["right lower lobe", "lung_lower_lobe_right"], 51: ["heart", "cardiac"],
           34: ["vertebrae_T10", "T10", "thoracic spine"], 1: ["spleen", "splenic"]}


def test_sentences_split_on_boundaries_not_numbers_or_abbreviations():
    sentences = split_sentences(REPORT)
    assert sentences == [
        "FINDINGS: The liver measures approx. 18.5 cm and shows a 3.2 cm hypodense lesion in segment VI.",
        "No pleural effusion;",
        "the right lower lobe shows a small nodule.",
        "Heart size is normal!",
        "Degenerative changes of the thoracic spine (T10-T11).",
    ]
    assert split_sentences("  ") == []


def test_sentences_go_to_every_anatomy_they_name():
    assigned = assign_sentences(split_sentences(REPORT), LEXICON)
    assert assigned[5] == [split_sentences(REPORT)[0]]
    assert assigned[14] == ["the right lower lobe shows a small nodule."]
    assert assigned[51] == ["Heart size is normal!"]
    assert assigned[34] == ["Degenerative changes of the thoracic spine (T10-T11)."]
    assert assigned[1] == []
    # underscores in structure names match spaces, whole words only
    assert assign_sentences(["Lung lower lobe right: clear."], {14: ["lung_lower_lobe_right"]})[14]
    assert not assign_sentences(["Hepatitis history."], {5: ["hepatic"]})[5]


def test_anatomies_without_a_sentence_get_the_normal_template():
    texts, normal = anatomy_texts(REPORT, LEXICON, names={1: "spleen"})
    assert texts[1] == "Spleen shows no significant abnormalities." and normal[1]
    assert not normal[5] and "hypodense lesion" in texts[5]
    again, _ = anatomy_texts(REPORT, LEXICON, names={1: "spleen"})
    assert again == texts  # deterministic


def test_lexicon_from_json(tmp_path):
    (tmp_path / "lex.json").write_text(json.dumps({"5": ["liver"], "14": "right lower lobe"}))
    assert read_lexicon(tmp_path / "lex.json") == {5: ["liver"], 14: ["right lower lobe"]}
    (tmp_path / "bad.json").write_text(json.dumps({"5": []}))
    with pytest.raises(RadCLIPError, match="at least one non-empty name"):
        read_lexicon(tmp_path / "bad.json")


def _features(b=6, a=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(b, a, d, generator=g), dim=-1)
    text = F.normalize(torch.randn(b, a, d, generator=g), dim=-1)
    return image, text


def test_anatomy_loss_is_the_sum_of_calibrated_per_anatomy_losses():
    image, text = _features()
    valid = torch.ones(6, 3, dtype=torch.bool)
    valid[0, 1] = False  # anatomy 1 not found in study 0
    ids = torch.tensor([[0, 10, 20], [1, 11, 21], [0, 12, 22], [2, 13, 23], [3, 14, 24], [0, 15, 25]])
    normal = torch.zeros(6, 3, dtype=torch.bool)
    normal[:, 2] = True  # anatomy 2: every text is the normal template -> contributes nothing
    normal[[1, 3], 0] = True  # two normal texts (different ids) of anatomy 0 -> positives of each other
    groups = torch.where(normal, torch.tensor(-1), ids)  # an anatomy's normal texts share one group
    loss = anatomy_info_nce(image, text, valid, groups, normal, 10.0)
    groups0 = groups[:, 0]
    assert groups0.tolist() == [0, -1, 0, -1, 3, 0]
    expected = contrastive_loss(image[:, 0], text[:, 0], 10.0, groups0)
    rows = valid[:, 1]
    expected = expected + contrastive_loss(image[rows, 1], text[rows, 1], 10.0, ids[rows, 1])
    torch.testing.assert_close(loss, expected)


def test_an_all_normal_anatomy_contributes_nothing():
    image, text = _features(a=1)
    loss = anatomy_info_nce(image, text, torch.ones(6, 1, dtype=torch.bool), torch.zeros(6, 1, dtype=torch.long),
                            torch.ones(6, 1, dtype=torch.bool), 10.0)
    assert float(loss) == 0.0


def test_info_nce_is_gather_plus_contrastive_loss():
    image, text = _features(a=1)
    torch.testing.assert_close(info_nce(image[:, 0], text[:, 0], 5.0), contrastive_loss(image[:, 0], text[:, 0], 5.0))
