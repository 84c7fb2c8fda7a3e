"""Contextual rephrase detection (ContReph-style span model), its training data, baselines and
evaluation. Wang et al., "Contextual Rephrase Detection for Reducing Friction in Dialogue
Systems", EMNLP 2021."""
