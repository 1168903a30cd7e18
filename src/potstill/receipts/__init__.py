"""What a run hands over besides weights: the model card, terms, the Merkle manifest, SPDX."""
