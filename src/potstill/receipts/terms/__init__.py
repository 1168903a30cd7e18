"""The terms registry (``registry.yaml``) and the gate that reads it. A record-keeping aid, not
legal advice."""

from potstill.receipts.terms.gate import (USES, VERDICTS, Family, TeacherTerms, check, family, gate,
                                          match_teacher, merge_obligations, prefixed_name, registry)

__all__ = ["USES", "VERDICTS", "Family", "TeacherTerms", "check", "family", "gate", "match_teacher",
           "merge_obligations", "prefixed_name", "registry"]
