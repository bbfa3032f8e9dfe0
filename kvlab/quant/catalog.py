"""The scheme catalog: every registered quantizer, its parameters and what it costs in bits per value.

``schemes_table()`` feeds ``python -m kvlab schemes [--json]``; ``format_schemes(rows)`` is the human table.
"""

from __future__ import annotations

import dataclasses

from kvlab.quant.base import Quantizer
from kvlab.quant.registry import available, get

D_GRID = (64, 128)
T_GRID = (512, 4096)
ROTATE = ("none", "hadamard")


def _summary(q: Quantizer) -> str:
    doc = (type(q).__doc__ or "").strip().split("\n\n")[0]
    return " ".join(doc.split()).split(" (see ")[0]


def _params(q: Quantizer) -> list[dict]:
    choices = dict(q.choices, rotate=ROTATE)
    names = [f.name for f in dataclasses.fields(q) if f.init and f.name != "rotate"] + ["rotate"]  # as spec
    defaults = {f.name: f.default for f in dataclasses.fields(q)}
    return [
        {"name": n, "default": defaults[n], "allowed": list(choices[n]) if n in choices else None} for n in names
    ]


def _bits(q: Quantizer) -> dict[str, float | None]:
    out = {}
    for D in D_GRID:
        for T in T_GRID:
            try:
                out[f"D={D},T={T}"] = q.bits_per_value(T, D)
            except ValueError:  # the default config cannot hold this head_dim
                out[f"D={D},T={T}"] = None
    return out


def schemes_table() -> list[dict]:
    """One dict per registered scheme, sorted by name.

    Keys: ``name``; ``summary`` (its docstring's first sentence); ``spec`` (the default config);
    ``params`` (list of ``{name, default, allowed}``, ``allowed`` None where open-ended); ``causal`` and
    ``prerope`` of the default config (for K and V both: True only if both are); ``bits_k`` and
    ``bits_v`` (bits per value of the default config used for K and for V, keyed ``"D=..,T=.."`` over
    D in (64, 128) and T in (512, 4096)); ``bits`` (the K/V mean, equal to both for schemes that treat K
    and V alike); ``kv_differ`` (True where K and V are stored differently, e.g. KIVI, KVQuant).
    """
    rows = []
    for name in available():
        q = get(name)
        k, v = q.for_tensor("k"), q.for_tensor("v")
        bits_k, bits_v = _bits(k), _bits(v)
        mean = {key: None if bits_k[key] is None else (bits_k[key] + bits_v[key]) / 2 for key in bits_k}
        rows.append({
            "name": name,
            "summary": _summary(q),
            "spec": q.spec,
            "params": _params(q),
            "causal": bool(k.causal and v.causal),
            "prerope": {"k": bool(k.prerope), "v": bool(v.prerope)},
            "bits_k": bits_k,
            "bits_v": bits_v,
            "bits": mean,
            "kv_differ": bits_k != bits_v,
        })
    return rows


def _param_text(p: dict) -> str:
    allowed = "" if p["allowed"] is None else " {" + ",".join(str(a).lower() for a in p["allowed"]) + "}"
    default = str(p["default"]).lower() if isinstance(p["default"], bool) else p["default"]
    return f"{p['name']}={default}{allowed}"


def format_schemes(rows: list[dict]) -> str:
    """Human table of :func:`schemes_table` rows. Schemes that store K and V differently get one line
    each (``kivi [K]``, ``kivi [V]``); the parameters and the summary follow on indented lines."""
    keys = list(rows[0]["bits"]) if rows else []
    head = f"{'scheme':<14}" + "".join(f"{k:>14}" for k in keys) + f"{'causal':>8}"
    lines = ["bits per value of the default config (metadata and fp16 windows included)", head, "-" * len(head)]
    for r in rows:
        variants = [("[K]", r["bits_k"]), ("[V]", r["bits_v"])] if r["kv_differ"] else [("", r["bits"])]
        for tag, bits in variants:
            cells = "".join(f"{'n/a' if b is None else f'{b:.4f}':>14}" for b in bits.values())
            lines.append(f"{(r['name'] + ' ' + tag).strip():<14}{cells}{'yes' if r['causal'] else 'no':>8}")
        lines.append("    " + ", ".join(_param_text(p) for p in r["params"]))
        lines.append("    " + r["summary"])
    return "\n".join(lines)
