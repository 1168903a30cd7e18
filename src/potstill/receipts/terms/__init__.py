"""The terms registry (``registry.yaml``) and the gate that reads it. A record-keeping aid, not
legal advice."""

from potstill.receipts.terms.gate import (USES, VERDICTS, Evidence, Family, TeacherTerms, check, evidence, family,
                                          gate, id_families, merge_obligations, prefixed_name, registry, weigh)

__all__ = ["USES", "VERDICTS", "Evidence", "Family", "TeacherTerms", "check", "evidence", "family", "gate",
           "id_families", "merge_obligations", "prefixed_name", "registry", "weigh"]
