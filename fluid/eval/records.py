"""The per-sample records of an evaluation (``samples.jsonl``) and their table for the loggers."""

from __future__ import annotations


def sample_records(samples, ids, tok, outs: dict, correct: dict) -> list[dict]:
    records = []
    for i, s in enumerate(samples):
        r = {"id": s.id, "question": s.question, "prompt": tok.decode(ids[i], skip_special_tokens=False),
             "reference": s.reference}
        for name, out in outs.items():
            st = out["rows"][i]
            r[name] = {"output": out["texts"][i], "correct": None if correct is None else correct[name][i],
                       "ids": list(out["tokens"][i]), "tokens": len(st.tokens), "nfe": st.nfe,
                       "tpf": len(st.tokens) / max(1, st.nfe)}
            if name != "ar":
                r[name]["identical_to_ar"] = out["tokens"][i] == outs["ar"]["tokens"][i]
        records.append(r)
    return records


def sample_table(records: list[dict], names: list[str]) -> tuple[list[str], list[list]]:
    columns = ["id", "prompt", "reference"] + [f"{n}/{k}" for n in names for k in ("output", "correct", "tpf")]
    rows = [[r["id"], r["prompt"], r["reference"]] + [r[n].get(k) for n in names for k in ("output", "correct", "tpf")]
            for r in records]
    return columns, rows
