"""Method names: objectives, joint forms, and the copies the workflow and the schema keep."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from medclust.config import load_schema
from medclust.errors import MedclustError
from medclust.train.recipes.pretrain_methods import JOINT_OBJECTIVES, METHODS, OBJECTIVE_SECTIONS, cluster_head, is_joint, objective_of

ROOT = Path(__file__).resolve().parents[1]


def test_objective_and_joint_form_of_each_method():
    assert objective_of("joint") == "swav" and is_joint("joint")
    assert objective_of("swav2d") == "swav" and not is_joint("swav2d")
    assert objective_of("joint-nnclr") == "nnclr" and is_joint("joint-nnclr")
    assert objective_of("depict") == "depict" and not is_joint("depict")
    assert objective_of("none") is None and not is_joint("none")
    assert [m for m in METHODS if m.startswith("joint-")] == [f"joint-{o}" for o in JOINT_OBJECTIVES]
    # contrastive methods have no cluster head: their embeddings are clustered by k-means
    assert not cluster_head("simclr") and not cluster_head("joint-nnclr")
    assert cluster_head("joint") and cluster_head("depict") and cluster_head("gedi")


def test_unknown_method_names_the_choices():
    with pytest.raises(MedclustError, match=r"unknown method 'swav'.*joint, swav2d"):
        objective_of("swav")
    with pytest.raises(MedclustError, match="unknown method 'joint-deepcluster2d'"):
        is_joint("joint-deepcluster2d")


def test_workflow_and_schema_list_the_same_methods():
    text = (ROOT / "workflow" / "rules" / "common.smk").read_text()
    block = re.search(r"PRETRAIN_METHODS = \((.*?)\)", text, re.S)
    assert block and tuple(re.findall(r'"([a-z0-9-]+)"', block.group(1))) == METHODS
    sections = re.search(r"PRETRAIN_SECTIONS = \{(.*?)\}", text, re.S)
    pairs = dict(re.findall(r'"([a-z0-9]+)": "([a-z]+)"', sections.group(1)))
    assert {objective_of(m): s for m, s in pairs.items()} == OBJECTIVE_SECTIONS
    pretrain = load_schema()["properties"]["pretrain"]
    assert tuple(pretrain["properties"]["methods"]["items"]["enum"]) == METHODS
    assert set(OBJECTIVE_SECTIONS.values()) <= set(pretrain["properties"])
