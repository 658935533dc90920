"""The adapter-method registry: every strategy maps to one registered method, and unknown names
fail with one line that lists the known ones (the importance scores work the same way)."""

import pytest

from loraplace.errors import LoraplaceError
from loraplace.importance import SCORES, get_score
from loraplace.methods import METHODS, Method, get_method, method_of, register


@pytest.mark.parametrize("label,name", [("attention", "lora"), ("ffn~attention", "lora"), ("qv@0-1[r=4]", "lora"),
                                        ("auto~attention", "auto"), ("auto[score=weight,mode=worst]", "auto"),
                                        ("eva~attention", "eva"), ("adalora", "adalora")])
def test_every_strategy_has_its_method(label, name):
    assert method_of(label) is METHODS[name]
    assert method_of(label).allocated_per_study == (name in ("auto", "eva"))


def test_unknown_names_fail_listing_the_known_ones():
    with pytest.raises(LoraplaceError, match=r"unknown adapter method 'pissa'\. Available: adalora, auto, eva, lora$"):
        get_method("pissa")
    with pytest.raises(LoraplaceError, match=r"unknown importance score 'fisher'\. Available: activation, adam, gradient, pilot, weight$"):
        get_score("fisher")
    assert not get_score("weight").needs_data and get_score("gradient").needs_data and len(SCORES) == 5


def test_a_method_registers_once():
    class Again(Method):
        name = "lora"

    with pytest.raises(ValueError, match="registered twice"):
        register(Again())
    assert type(METHODS["lora"]) is Method
