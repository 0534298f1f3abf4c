"""The study: evaluation, reports, the entropy curve, Spec-Bench, the real-target study."""
