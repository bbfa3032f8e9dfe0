"""kvlab.evaluation.evaluate: a policy is parsed once, at the public function, and passed down as an object."""

from __future__ import annotations

import pytest

from kvlab.evaluation.evaluate import scheme_report
from kvlab.quant import policy as P


def test_scheme_report_parses_each_policy_once(model, tokenizer, monkeypatch):
    made = []
    original = P.Policy.__post_init__

    def counting(self):
        made.append(self.spec if hasattr(self, "k") else None)
        original(self)

    monkeypatch.setattr(P.Policy, "__post_init__", counting)
    r = scheme_report(model=model, tokenizer=tokenizer, corpus="pydoc", ctx=32, windows=1,
                      policy="kv=q4_0;keep_first=1", progress=False)
    assert r["scheme"].startswith("k=q4_0") or "q4_0" in r["scheme"]
    # one Policy for the scheme (emulation, hooks and checks all receive that object) and one for the
    # fp16 reference: no layer below re-parses the string
    assert len(made) == 2, made


def test_a_policy_object_passes_through_unparsed():
    p = P.parse_policy("kv=q8_0;keep_last=1")
    assert P.parse_policy(p) is p
    with pytest.raises(ValueError, match="policy spec must be a non-empty string"):
        P.parse_policy(3)
